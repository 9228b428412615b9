"""Base-vs-adapter evaluation on the task's validation split: eval loss and token accuracy.

dpeft-eval adapter=runs/detox-tiny-llama/adapter
dpeft-eval task=detox model=tiny-llama        # the adapter of that run's output_dir
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from distributed_peft.cli import hydra_app
from distributed_peft.errors import AdapterError
from distributed_peft.objective import completion_token_stats


@contextlib.contextmanager
def evaluation_mode(model) -> Iterator[None]:
    """No grad, dropout off, but 4-bit layers kept in train mode.

    bitsandbytes' CPU path repacks a 4-bit weight for good the first time it runs in eval mode without grad,
    and backward through a repacked layer silently loses the input gradient; so training after an
    evaluation would stop updating the LoRA layers below it. Keeping those layers in train mode avoids it.
    """
    was_training = {module: module.training for module in model.modules()}
    model.eval()
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes"):
            module.training = True
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in was_training.items():
            module.training = training


def evaluate_loss(model, loader, accelerator) -> dict[str, float]:
    """Token-weighted eval loss and next-token accuracy over completion tokens, exact across ranks."""
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    with evaluation_mode(model):
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            stats = completion_token_stats(logits, batch["labels"])
            per_example = torch.stack([stats["loss_sum"].double(), stats["tokens"].double(), stats["correct"].double()])
            per_example = accelerator.gather_for_metrics(per_example.T.contiguous())  # drops padding duplicates
            totals += per_example.sum(dim=0)
    loss_sum, tokens, correct = totals.tolist()
    return {"loss": loss_sum / tokens, "token_accuracy": correct / tokens, "tokens": tokens}


def evaluate_base_and_adapter(model, loader, accelerator) -> dict[str, dict[str, float]]:
    """The same split scored by the base alone (adapter disabled) and by base + adapter."""
    adapter = evaluate_loss(model, loader, accelerator)
    with accelerator.unwrap_model(model).disable_adapter():
        base = evaluate_loss(model, loader, accelerator)
    return {"base": base, "adapter": adapter}


def write_eval_reports(run_dir: Path, results: dict[str, Any], title: str) -> None:
    """eval.json and eval.md (a base-vs-adapter table) in the run directory."""
    from distributed_peft.adapters import metrics_table

    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    improvement = results["base"]["loss"] - results["adapter"]["loss"]
    md = [f"# {title}", "", metrics_table(results), "", f"Eval loss lowered by {improvement:.4f} by the adapter.", ""]
    (run_dir / "eval.md").write_text("\n".join(md))


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Load the base and the run's adapter, score both on the recorded validation split, write the reports."""
    from distributed_peft.adapters import check_base_matches, load_adapter, read_adapter_metadata
    from distributed_peft.data import collate_padded, prepare_task_data
    from distributed_peft.distributed import build_accelerator
    from distributed_peft.model import load_base_model, load_tokenizer, resolve_base
    from distributed_peft.tracking import quiet_library_progress

    quiet_library_progress()

    adapter_dir = Path(cfg.adapter) if cfg.adapter else Path(cfg.output_dir) / "adapter"
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter={str(adapter_dir)!r} does not exist; train first or pass adapter=PATH")
    metadata = read_adapter_metadata(adapter_dir)
    run_cfg = OmegaConf.create(metadata["config"])  # the adapter's own task, model, peft and split
    accelerator = build_accelerator(run_cfg)
    path, identity = resolve_base(run_cfg.model)
    check_base_matches(metadata, identity, allow_mismatch=bool(cfg.get("allow_base_mismatch", False)))
    tokenizer = load_tokenizer(path)
    data = prepare_task_data(run_cfg, tokenizer)
    model = load_adapter(load_base_model(run_cfg, path, device=accelerator.device), adapter_dir)
    loader = torch.utils.data.DataLoader(
        data.eval,
        batch_size=run_cfg.training.eval_batch_size,
        collate_fn=lambda batch: collate_padded(batch, tokenizer.pad_token_id),
    )
    model, loader = accelerator.prepare(model, loader)
    results = evaluate_base_and_adapter(model, loader, accelerator)
    if accelerator.is_main_process:
        run_dir = adapter_dir.parent
        write_eval_reports(run_dir, results, f"{run_cfg.task.name} adapter on {run_cfg.model.name}")
        print(f"eval loss: base {results['base']['loss']:.4f} -> adapter {results['adapter']['loss']:.4f}")
        print(f"reports: {run_dir / 'eval.md'}")
    accelerator.end_training()
    return results


@hydra_app("dpeft-eval")
def main(cfg: DictConfig) -> None:
    run_evaluation(cfg)


if __name__ == "__main__":
    main()
