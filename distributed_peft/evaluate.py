"""Base-vs-adapter evaluation on the task's validation split: eval loss and token accuracy.

dpeft-eval adapter=runs/detox-tiny-llama/adapter
dpeft-eval task=detox model=tiny-llama        # the adapter of that run's output_dir
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

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


def evaluate_generations(model, tokenizer, examples: list[dict[str, Any]], cfg: DictConfig, accelerator) -> dict:
    """Greedy completions of the first validation examples, scored with the task's metrics."""
    from distributed_peft.generation import generate_completions, prompt_ids
    from distributed_peft.metrics import score_all

    examples = examples[: cfg.evaluation.max_generate_examples]
    prompts = [prompt_ids(e["record"], cfg.task, tokenizer) for e in examples]
    predictions = generate_completions(model, tokenizer, prompts, cfg, accelerator)
    references = [e["references"] for e in examples]
    scores = score_all(cfg.task.metrics, predictions, references, [e["record"] for e in examples])
    return {"scores": {**scores, "generated_examples": len(examples)}, "predictions": predictions}


def evaluate_base_and_adapter(model, loader, accelerator, cfg: DictConfig, tokenizer, examples) -> dict[str, Any]:
    """The same split scored by the base alone (adapter disabled) and by base + adapter: loss, token accuracy and,
    when `evaluation.generate`, the task's metrics on greedy generations with a few side-by-side samples."""
    from distributed_peft.generation import prompt_ids

    results: dict[str, Any] = {"adapter": evaluate_loss(model, loader, accelerator)}
    with accelerator.unwrap_model(model).disable_adapter():
        results["base"] = evaluate_loss(model, loader, accelerator)
    if not cfg.evaluation.generate:
        return results
    adapter = evaluate_generations(model, tokenizer, examples, cfg, accelerator)
    with accelerator.unwrap_model(model).disable_adapter():
        base = evaluate_generations(model, tokenizer, examples, cfg, accelerator)
    results["adapter"].update(adapter["scores"])
    results["base"].update(base["scores"])
    shown = examples[: cfg.evaluation.show_examples]
    results["samples"] = [
        {
            "prompt": tokenizer.decode(prompt_ids(e["record"], cfg.task, tokenizer), skip_special_tokens=True),
            "reference": e["references"][0],
            "base": base["predictions"][i],
            "adapter": adapter["predictions"][i],
        }
        for i, e in enumerate(shown)
    ]
    return results


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Load the base and the run's adapter, score both on the recorded validation split, write the reports."""
    from distributed_peft.adapters import check_base_matches, load_adapter, read_adapter_metadata
    from distributed_peft.config import load_recorded_config
    from distributed_peft.data import collate_padded, prepare_task_data
    from distributed_peft.distributed import build_accelerator
    from distributed_peft.model import load_base_model, load_tokenizer, resolve_base
    from distributed_peft.reports import write_eval_reports
    from distributed_peft.tracking import quiet_library_progress

    quiet_library_progress()

    adapter_dir = Path(cfg.adapter) if cfg.adapter else Path(cfg.output_dir) / "adapter"
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter={str(adapter_dir)!r} does not exist; train first or pass adapter=PATH")
    metadata = read_adapter_metadata(adapter_dir)
    run_cfg = load_recorded_config(metadata["config"])  # the adapter's own task, model, peft and split
    run_cfg.evaluation = cfg.evaluation  # how to evaluate is this command's choice
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
    results = evaluate_base_and_adapter(model, loader, accelerator, run_cfg, tokenizer, data.eval)
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
