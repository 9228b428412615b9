"""What a finished run leaves beside its adapter: the adapter's record (dpeft_adapter.json, with the run's throughput,
MFU and peak memory), eval.json and eval.md, the loss curve and the model card (in adapter/ and, as README.md, in the
run directory); the summary lines it prints last."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distributed_peft.config import lora_targets
from distributed_peft.runtime.atomic_files import atomic_write_text
from distributed_peft.training.throughput import throughput_line


def adapter_metadata(cfg: DictConfig, base_identity, run: dict[str, Any]) -> dict[str, Any]:
    """What dpeft_adapter.json records: task, base identity, LoRA options, the run's true counts, config.

    `eval` stays None until the final evaluation has run (an adapter saved before it is still complete).
    """
    return {
        "task": cfg.task.name,
        "task_description": cfg.task.description,
        "base": base_identity.to_dict(),
        "peft": {
            "method": cfg.peft.method,
            "r": cfg.peft.r,
            "alpha": cfg.peft.alpha,
            "target_modules": lora_targets(cfg),
        },
        "run": run,
        "eval": None,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def write_run_report(
    cfg: DictConfig, run_dir: Path, adapter_dir: Path, metadata: dict[str, Any], results: dict[str, Any]
) -> None:
    """The adapter's record with its evaluation, the reports, loss curve and model card (main process only)."""
    from distributed_peft.adapters.model_cards import CARD, write_model_card
    from distributed_peft.constants import ADAPTER_METADATA
    from distributed_peft.evaluation.reports import plot_loss_curves, write_eval_reports
    from distributed_peft.runtime.redaction import redact

    metadata["eval"] = results
    atomic_write_text(adapter_dir / ADAPTER_METADATA, redact(json.dumps(metadata, indent=2, default=str)))
    title = f"{cfg.task.name} adapter on {cfg.model.name}"
    write_eval_reports(run_dir, results, title)
    plot_loss_curves(run_dir, title)
    card = write_model_card(adapter_dir / CARD, metadata, results)  # peft wrote one: its metadata is kept
    atomic_write_text(run_dir / CARD, str(card))
    print(f"eval loss: base {results['base']['loss']:.4f} -> adapter {results['adapter']['loss']:.4f}", flush=True)
    print(f"report:  {run_dir / 'eval.md'}  (loss curve: loss.png)", flush=True)
    if metadata["run"].get("throughput"):
        print(throughput_line(metadata["run"]["throughput"]), flush=True)
