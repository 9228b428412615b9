"""Per-task adapters: save them gathered and complete, record their base, load them back onto a matching base."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distributed_peft.cli import hydra_app
from distributed_peft.config import validate_merge
from distributed_peft.errors import AdapterError
from distributed_peft.model import BaseIdentity

ADAPTER_METADATA = "dpeft_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(accelerator, model, tokenizer, directory: Path, metadata: dict[str, Any]) -> Path:
    """Save the LoRA weights, gathered from every rank first (ZeRO-3 shards would otherwise save empty)."""
    from distributed_peft.atomic_files import atomic_directory
    from distributed_peft.redaction import redact

    state_dict = accelerator.get_state_dict(model)  # collective: every rank must call it
    if accelerator.is_main_process:
        # written whole under a temporary name, then renamed: a crash never leaves a partial adapter behind
        with atomic_directory(directory) as staging:
            accelerator.unwrap_model(model).save_pretrained(
                staging, state_dict=state_dict, safe_serialization=True, is_main_process=True
            )
            tokenizer.save_pretrained(staging)
            (staging / ADAPTER_METADATA).write_text(redact(json.dumps(metadata, indent=2, default=str)))
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


def recorded_recipe(metadata: dict[str, Any]) -> str | None:
    """The recipe digest of the embedded base an adapter's recorded run config names, None for any other base."""
    from distributed_peft.config import load_recorded_config
    from distributed_peft.embedded_base import recipe_digest

    if not metadata.get("config"):
        return None
    model_cfg = load_recorded_config(metadata["config"]).model
    return recipe_digest(model_cfg) if model_cfg.embedded else None


def check_base_matches(metadata: dict[str, Any], base: BaseIdentity, allow_mismatch: bool = False) -> None:
    """Refuse an adapter trained on another base (architecture or weights), unless the user insists.

    An embedded base is defined by its recipe: the same recipe built on another CPU has other last bits, so another
    weights fingerprint. Such an adapter is accepted, with a one-line note on stderr.
    """
    recorded = metadata["base"]
    problems = []
    note = None
    if recorded["family"] != base.family:
        problems.append(f"architecture {recorded['family']!r} != base {base.family!r}")
    if recorded["fingerprint"] != base.fingerprint:
        same_recipe = (
            base.recipe is not None
            and recorded["name"] == base.name
            and recorded["family"] == base.family
            and recorded_recipe(metadata) == base.recipe
        )
        if same_recipe:
            note = (
                f"note: adapter {metadata.get('task', '?')} was trained on embedded base {base.name} built on another "
                f"machine (weights fingerprint {recorded['fingerprint'][:8]}... != {base.fingerprint[:8]}...); "
                f"same recipe {base.recipe}, loading it"
            )
        else:
            problems.append(f"base fingerprint {recorded['fingerprint'][:16]} != {base.fingerprint[:16]}")
    if problems and not allow_mismatch:
        raise AdapterError(
            f"adapter trained on {recorded['name']} does not match base {base.name}: {'; '.join(problems)}; "
            "pass allow_base_mismatch=true to load it anyway"
        )
    if note and not problems:
        print(note, file=sys.stderr, flush=True)


def load_adapter(base_model, directory: str | Path, adapter_name: str = "default"):
    """Attach a saved adapter to a base model, frozen, for evaluation or generation."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(directory), adapter_name=adapter_name, is_trainable=False)


def adapter_names(metadatas: list[dict[str, Any]]) -> list[str]:
    """Unique peft adapter names: the task names, numbered when two adapters share a task."""
    names: list[str] = []
    for metadata in metadatas:
        name = metadata["task"]
        names.append(name if name not in names else f"{name}-{len(names)}")
    return names


def recorded_base(metadata: dict[str, Any]):
    """The run config an adapter records, where its base loads from and that base's identity (nothing loaded)."""
    from distributed_peft.config import load_recorded_config
    from distributed_peft.model import resolve_base

    run_cfg = load_recorded_config(metadata["config"])
    return (run_cfg, *resolve_base(run_cfg.model))


def load_matching_base(adapter_dirs: list[str | Path], allow_mismatch: bool = False, device: str = "cpu"):
    """The base the adapters were trained on, loaded once as the first was trained (4-bit for QLoRA).

    Returns (base, tokenizer, metadatas); every adapter must record this base's fingerprint (or, for an embedded
    base, its recipe) and architecture.
    """
    from distributed_peft.model import load_base_model, load_tokenizer

    if not adapter_dirs:
        raise AdapterError("adapters=[] is empty; allowed: one or more adapter directories")
    metadatas = [read_adapter_metadata(directory) for directory in adapter_dirs]
    run_cfg, path, identity = recorded_base(metadatas[0])
    for metadata in metadatas:
        check_base_matches(metadata, identity, allow_mismatch)
    return load_base_model(run_cfg, path, device=device), load_tokenizer(path), metadatas


def load_base_with_adapters(adapter_dirs: list[str | Path], allow_mismatch: bool = False, device: str = "cpu"):
    """Load the adapters' shared base once and attach every adapter to it (peft multi-adapter).

    Returns (model, tokenizer, names, metadatas), the first adapter active.
    """
    base, tokenizer, metadatas = load_matching_base(adapter_dirs, allow_mismatch, device)
    names = adapter_names(metadatas)
    model = load_adapter(base, adapter_dirs[0], adapter_name=names[0])
    for directory, name in zip(adapter_dirs[1:], names[1:], strict=True):
        model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
    return model, tokenizer, names, metadatas


def merge_adapter(adapter_dir: str | Path, output: str | Path, allow_mismatch: bool = False) -> Path:
    """Merge an adapter into a full-precision copy of its base and save a standard transformers model.

    A QLoRA adapter learned against the 4-bit weights, so its base is dequantized (not reloaded from the original
    weights): the merged model then computes what base + adapter computed.
    """
    base, tokenizer, metadatas = load_matching_base([adapter_dir], allow_mismatch)
    if metadatas[0]["peft"]["method"] == "qlora":
        base = base.dequantize()
    merged = load_adapter(base, adapter_dir).merge_and_unload()
    output = Path(output)
    merged.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    (output / "dpeft_merged.json").write_text(json.dumps({"adapter": str(adapter_dir), **metadatas[0]}, indent=2))
    return output


@hydra_app("dpeft-merge", config_name="merge", validator=validate_merge)
def main(cfg: DictConfig) -> None:
    output = merge_adapter(cfg.adapter, cfg.output, cfg.allow_base_mismatch)
    print(f"merged {cfg.adapter} into its base: {output}")


if __name__ == "__main__":
    main()
