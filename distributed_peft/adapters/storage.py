"""Per-task adapters: save them gathered and complete, record their base, load them back onto a matching base."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

from distributed_peft.constants import ADAPTER_CONFIG, ADAPTER_METADATA, ADAPTER_WEIGHTS
from distributed_peft.errors import AdapterError, StorageError
from distributed_peft.modeling.loading import BaseIdentity, portable_base_name
from distributed_peft.runtime.atomic_files import TMP_PREFIX, atomic_directory
from distributed_peft.runtime.output_dirs import LOCK_FILE, OWNER_MARKER, check_output_dir, claim_output_dir

MERGED_METADATA = "dpeft_merged.json"  # marks a dpeft-merge output: what was merged, onto which base
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, ADAPTER_METADATA)
# What commands read from dpeft_adapter.json: top-level keys with their JSON type, and the keys of the nested objects
METADATA_KEYS = {"task": str, "base": dict, "peft": dict, "config": dict}
JSON_KINDS = {str: "string", dict: "object"}
METADATA_NESTED_KEYS = {"base": ("name", "family", "fingerprint"), "peft": ("method",), "config": ("task", "model")}
MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors refuses larger headers
REPAIR = "copy the adapter directory again whole, or retrain it"


def save_adapter(
    accelerator, model, tokenizer, directory: Path, metadata: dict[str, Any], adapter_name: str = "default"
) -> Path:
    """Save the LoRA weights of one adapter, gathered from every rank first (ZeRO-3 shards would otherwise save
    empty). Another adapter than "default" (a multi-task job's) is saved the same way, its files at the top."""
    from distributed_peft.adapters.model_cards import CARD, write_model_card
    from distributed_peft.runtime.redaction import redact

    state_dict = _adapter_state_dict(accelerator, model, adapter_name)  # collective: every rank must call it
    if accelerator.is_main_process:
        # written whole under a temporary name, then renamed: a crash never leaves a partial adapter behind
        with atomic_directory(directory) as staging:
            accelerator.unwrap_model(model).save_pretrained(
                staging,
                state_dict=state_dict,
                safe_serialization=True,
                is_main_process=True,
                selected_adapters=[adapter_name],
            )
            if adapter_name != "default":  # peft writes any other adapter into a subdirectory of its name
                for path in (staging / adapter_name).iterdir():
                    path.rename(staging / path.name)
                (staging / adapter_name).rmdir()
            tokenizer.save_pretrained(staging)
            _portable_base_name(staging / ADAPTER_CONFIG, metadata["base"])
            write_model_card(staging / CARD, metadata, None)  # over peft's card (its base a local path), not yet rated
            (staging / ADAPTER_METADATA).write_text(redact(json.dumps(metadata, indent=2, default=str)))
    accelerator.wait_for_everyone()
    return directory


def _adapter_state_dict(accelerator, model, adapter_name: str) -> dict[str, Any]:
    """The weights `save_pretrained` picks the adapter's from, whole on the main process. Under ZeRO-3 only this
    adapter's parameters are gathered (a few MB): accelerate's `get_state_dict` would gather the whole model onto
    rank 0 first (about 14 GB in 16 bits for a 7B base, to save an adapter of some 20 MB). Elsewhere accelerate's
    state dict (unwrapped; FSDP gathers there)."""
    from distributed_peft.config import DistributedStrategy
    from distributed_peft.runtime.distributed import launched_strategy

    if launched_strategy(accelerator) not in (DistributedStrategy.ZERO3, DistributedStrategy.ZERO3_OFFLOAD):
        return accelerator.get_state_dict(model)
    import deepspeed

    marker = f".{adapter_name}."  # lora_A.<name>.weight, modules_to_save.<name>.weight, ...
    named = [(name, p) for name, p in accelerator.unwrap_model(model).named_parameters() if marker in name]
    with deepspeed.zero.GatheredParameters([p for _, p in named]):  # no modifier: every rank reads, none writes
        if not accelerator.is_main_process:
            return {}
        return {name: p.detach().to("cpu", copy=True) for name, p in named}


def _portable_base_name(config_path: Path, base: dict[str, Any]) -> None:
    """peft records the directory the base was loaded from (for an embedded base, a cache path on this machine):
    record its portable name instead."""
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = portable_base_name(base)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_safetensors(path: Path, where: str) -> None:
    """Raise AdapterError unless `path` has a readable safetensors header and is as long as that header says."""
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    malformed = f"{where}: {path.name} is not a safetensors file (malformed header); {REPAIR}"
    if size < 8:
        raise AdapterError(f"{where}: {path.name} is truncated ({size} bytes, not even a header); {REPAIR}")
    with path.open("rb") as f:
        header_size = struct.unpack("<Q", f.read(8))[0]
        if header_size > MAX_SAFETENSORS_HEADER:
            raise AdapterError(malformed)
        if header_size > size - 8:
            raise AdapterError(f"{where}: {path.name} is truncated ({size} bytes, shorter than its header); {REPAIR}")
        try:
            header = json.loads(f.read(header_size))
            ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise AdapterError(malformed) from exc
    expected = 8 + header_size + max(ends, default=0)
    if size < expected:
        raise AdapterError(f"{where}: {path.name} is truncated ({size} of {expected} bytes); {REPAIR}")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterError(f"{where}: {path.name} is not a readable safetensors file ({reason}); {REPAIR}") from exc


def _read_json_object(path: Path, where: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise AdapterError(f"{where}: {path.name} is not valid JSON ({reason}); {REPAIR}") from exc
    if not isinstance(value, dict):
        raise AdapterError(f"{where}: {path.name} is not a JSON object; {REPAIR}")
    return value


def check_adapter_dir(directory: str | Path) -> dict[str, Any]:
    """Raise AdapterError (one line) unless `directory` holds a complete, readable adapter; return its metadata.

    Reads only headers and JSON: a missing, truncated or malformed file is named before any model loads.
    """
    directory = Path(directory)
    where = f"adapter={str(directory)!r}"
    if not directory.is_dir():
        raise AdapterError(
            f"{where} is not a distributed-peft adapter directory (no such directory); "
            f"allowed: a directory holding {', '.join(ADAPTER_FILES)}"
        )
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise AdapterError(
            f"{where} is not a distributed-peft adapter directory: {', '.join(missing)} missing; "
            f"it must hold {', '.join(ADAPTER_FILES)}; {REPAIR}"
        )
    _check_safetensors(directory / ADAPTER_WEIGHTS, where)
    _read_json_object(directory / ADAPTER_CONFIG, where)
    metadata = _read_json_object(directory / ADAPTER_METADATA, where)
    problems = [
        f"{key} (a JSON {JSON_KINDS[kind]})"
        for key, kind in METADATA_KEYS.items()
        if not isinstance(metadata.get(key), kind)
    ]
    for key, nested in METADATA_NESTED_KEYS.items():
        if isinstance(metadata.get(key), dict):
            problems += [f"{key}.{name}" for name in nested if name not in metadata[key]]
    if problems:
        raise AdapterError(f"{where}: {ADAPTER_METADATA} lacks {', '.join(problems)}; {REPAIR}")
    return metadata


def read_adapter_metadata(directory: str | Path) -> dict[str, Any]:
    """The metadata an adapter was saved with, after checking its files (AdapterError, one line, if incomplete)."""
    return check_adapter_dir(directory)


def recorded_recipe(metadata: dict[str, Any]) -> str | None:
    """The recipe digest of the embedded base an adapter's recorded run config names, None for any other base."""
    from distributed_peft.config import load_recorded_config
    from distributed_peft.modeling.embedded_base import recipe_digest

    if not metadata.get("config"):
        return None
    model_cfg = load_recorded_config(metadata["config"]).model
    return recipe_digest(model_cfg) if model_cfg.embedded else None


def check_base_matches(metadata: dict[str, Any], base: BaseIdentity, allow_mismatch: bool = False) -> None:
    """Refuse an adapter trained on another base (architecture or weights), unless the user insists.

    An embedded base is defined by its recipe: the same recipe built on another CPU has other last bits, so another
    weights fingerprint (a GGUF base by the GGUF file's digest, should its dequantization round differently). Such an
    adapter is accepted, with a one-line note on stderr. The recipe is the digest the
    adapter recorded when it trained (its settings and the pretraining corpus then); only an adapter from before it
    was recorded has it recomputed from its config, over today's corpus.
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
            and (recorded.get("recipe") or recorded_recipe(metadata)) == base.recipe
        )
        if same_recipe:
            kind = "base" if base.weights == "gguf" else "embedded base"  # a GGUF: the same file, converted elsewhere
            note = (
                f"note: adapter {metadata.get('task', '?')} was trained on {kind} {base.name} built on another "
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
    from distributed_peft.modeling.loading import resolve_base

    run_cfg = load_recorded_config(metadata["config"])
    return (run_cfg, *resolve_base(run_cfg.model))


def load_matching_base(adapter_dirs: list[str | Path], allow_mismatch: bool = False, device: str = "cpu"):
    """The base the adapters were trained on, loaded once as the first was trained (4-bit for QLoRA).

    Returns (base, tokenizer, metadatas); every adapter must record this base's fingerprint (or, for an embedded
    base, its recipe) and architecture.
    """
    from distributed_peft.modeling.loading import load_base_model, load_tokenizer

    if not adapter_dirs:
        raise AdapterError("adapters=[] is empty; allowed: one or more adapter directories")
    metadatas = [read_adapter_metadata(directory) for directory in adapter_dirs]
    run_cfg, path, identity = recorded_base(metadatas[0])
    for metadata in metadatas:
        check_base_matches(metadata, identity, allow_mismatch)
    base = load_base_model(run_cfg, path, device=device)
    if run_cfg.peft.method != "qlora":  # a 4-bit base is placed on the device as it loads
        base.to(device)
    return base, load_tokenizer(path), metadatas


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


def check_merge_output(output: str | Path) -> None:
    """Refuse, in one line and touching nothing, an output that is not absent, empty or an earlier merged model.

    A run directory of ours (config.yaml, adapter/...) is refused too: replacing it would delete the run's adapter.
    """
    output = Path(output)
    check_output_dir(output, key="output")
    if not output.is_dir() or (output / MERGED_METADATA).is_file():
        return
    entries = sorted(p.name for p in output.iterdir() if p.name not in (OWNER_MARKER, LOCK_FILE))
    entries = [name for name in entries if not name.startswith(TMP_PREFIX)]
    if entries:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise StorageError(
            f"output={str(output)!r} holds a distributed-peft run ({shown}), not a merged model; nothing was touched; "
            "allowed: a new or empty directory, or an earlier dpeft-merge output"
        )


def merge_adapter(
    adapter_dir: str | Path, output: str | Path, allow_mismatch: bool = False, device: str = "cpu"
) -> Path:
    """Merge an adapter into a copy of its base and save a standard transformers model, with its tokenizer and card.

    A QLoRA adapter learned against the 4-bit weights, so its base is dequantized (not reloaded from the original
    weights): the merged model then computes what base + adapter computed. `output` must be absent, empty or an
    earlier merged model (checked before anything loads); the model appears there whole or not at all, marked as
    ours, and a failed merge removes only what it created.
    """
    from distributed_peft.adapters.model_cards import CARD, merged_card

    output = Path(output)
    check_adapter_dir(adapter_dir)
    check_merge_output(output)
    claim = claim_output_dir(output, key="output", command="dpeft-merge")
    try:
        base, tokenizer, metadatas = load_matching_base([adapter_dir], allow_mismatch, device)
        metadata = metadatas[0]
        quantized = metadata["peft"]["method"] == "qlora"
        if quantized:
            base = base.dequantize()  # in the dtype it computed in (model.config.dtype)
        peft_model = load_adapter(base, adapter_dir)
        delta_dtype = next(p.dtype for name, p in peft_model.named_parameters() if "lora_" in name)
        merged = peft_model.merge_and_unload()
        merged.config.use_cache = True  # training turned the KV cache off; a merged model is for inference
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in merged.parameters()})
        precision = merged_precision(metadata, "/".join(dtypes), delta_dtype, quantized)
        record = json.dumps({"adapter": str(adapter_dir), "precision": precision, **metadata}, indent=2)
        with atomic_directory(output) as staging:  # the earlier merged model (or our empty claim) steps aside
            merged.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            (staging / MERGED_METADATA).write_text(record)
            (staging / CARD).write_text(str(merged_card(metadata, precision)))
            shutil.copy2(output / OWNER_MARKER, staging / OWNER_MARKER)
    except BaseException:
        claim.release()
        raise
    return output


def merged_precision(metadata: dict[str, Any], weights: str, delta_dtype, quantized: bool) -> str:
    """One sentence: the dtype of the merged weights and how they came to be (said in the card and printed)."""
    delta = str(delta_dtype).removeprefix("torch.")
    if not quantized:
        return f"{weights} weights: the base as loaded for the adapter, with the LoRA delta ({delta}) added to them"
    quant = metadata.get("config", {}).get("peft", {}).get("quantization", {})
    scheme = quant.get("quant_type", "4-bit").upper() + (", double quant" if quant.get("double_quant") else "")
    return (
        f"{weights} weights, not 4-bit: the base was loaded 4-bit ({scheme}) as in training, dequantized to "
        f"{weights}, and the LoRA delta ({delta}) added to them; the base part is the dequantized 4-bit weights the "
        "adapter was trained against, not the original full-precision base"
    )
