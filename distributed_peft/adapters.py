"""Per-task adapters: save them gathered and complete, record their base, load them back onto a matching base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distributed_peft.errors import AdapterError
from distributed_peft.model import BaseIdentity

ADAPTER_METADATA = "dpeft_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(accelerator, model, tokenizer, directory: Path, metadata: dict[str, Any]) -> Path:
    """Save the LoRA weights, gathered from every rank first (ZeRO-3 shards would otherwise save empty)."""
    state_dict = accelerator.get_state_dict(model)  # collective: every rank must call it
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        accelerator.unwrap_model(model).save_pretrained(
            directory, state_dict=state_dict, safe_serialization=True, is_main_process=True
        )
        tokenizer.save_pretrained(directory)
        (directory / ADAPTER_METADATA).write_text(json.dumps(metadata, indent=2, default=str))
    accelerator.wait_for_everyone()
    return directory


def read_adapter_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_METADATA
    if not (Path(directory) / ADAPTER_WEIGHTS).is_file() or not path.is_file():
        raise AdapterError(
            f"adapter={str(directory)!r} is not a distributed-peft adapter directory; "
            f"it must hold {ADAPTER_WEIGHTS} and {ADAPTER_METADATA}"
        )
    return json.loads(path.read_text())


def check_base_matches(metadata: dict[str, Any], base: BaseIdentity, allow_mismatch: bool = False) -> None:
    """Refuse an adapter trained on another base (architecture or weights), unless the user insists."""
    recorded = metadata["base"]
    problems = []
    if recorded["family"] != base.family:
        problems.append(f"architecture {recorded['family']!r} != base {base.family!r}")
    if recorded["fingerprint"] != base.fingerprint:
        problems.append(f"base fingerprint {recorded['fingerprint'][:16]} != {base.fingerprint[:16]}")
    if problems and not allow_mismatch:
        raise AdapterError(
            f"adapter trained on {recorded['name']} does not match base {base.name}: {'; '.join(problems)}; "
            "pass allow_base_mismatch=true to load it anyway"
        )


def load_adapter(base_model, directory: str | Path, adapter_name: str = "default"):
    """Attach a saved adapter to a base model, frozen, for evaluation or generation."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(directory), adapter_name=adapter_name, is_trainable=False)


def write_model_card(path: Path, metadata: dict[str, Any], eval_results: dict[str, Any] | None) -> None:
    """A short README.md: base, its fingerprint, task, data, steps and metrics."""
    base, run = metadata["base"], metadata["run"]
    lines = [
        f"# {metadata['task']} adapter on {base['name']}",
        "",
        f"- task: `{metadata['task']}` ({metadata.get('task_description', '')})",
        f"- base: `{base['name_or_path']}` ({base['family']}), fingerprint `{base['fingerprint']}`",
        f"- method: {metadata['peft']['method']} r={metadata['peft']['r']} alpha={metadata['peft']['alpha']}, "
        f"targets {', '.join(metadata['peft']['target_modules'])}",
        f"- data: {run['data']}",
        f"- training: {run['optimizer_steps']} optimizer steps, effective batch {run['effective_batch']}, "
        f"{run['train_tokens']:,} completion tokens, {run['seconds']:.0f} s",
        "",
    ]
    if eval_results:
        lines += ["## Evaluation (validation split)", "", metrics_table(eval_results), ""]
    lines += ["## Reproduce", "", "```", run["command"], "```", ""]
    path.write_text("\n".join(lines))


def metrics_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per metric, base and adapter side by side."""
    rows = ["| metric | base | adapter |", "| --- | --- | --- |"]
    for metric in results["adapter"]:
        base, adapter = results["base"][metric], results["adapter"][metric]
        if float(base).is_integer() and float(adapter).is_integer():
            rows.append(f"| {metric} | {int(base):,} | {int(adapter):,} |")
        else:
            rows.append(f"| {metric} | {base:.4f} | {adapter:.4f} |")
    return "\n".join(rows)
