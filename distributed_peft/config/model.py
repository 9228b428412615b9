"""The `model` group: the base model (hub id, local directory or an embedded base built here) and its LoRA targets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig

from distributed_peft.config.checks import Choice, check, check_choice
from distributed_peft.config.gguf import checked_header
from distributed_peft.constants import HUB_CONFIGS_DIR
from distributed_peft.errors import ConfigError


class ModelFamily(Choice):
    LLAMA = "llama"
    BLOOM = "bloom"
    MISTRAL = "mistral"


class Weights(Choice):
    """Where the base's weights come from: its checkpoint, or a seeded random init of its bundled Hub config.json."""

    PRETRAINED = "pretrained"
    RANDOM = "random"


class Dtype(Choice):
    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


@dataclass
class EmbeddedBaseConfig:
    """Shape and pretraining of a tiny base built locally by `dpeft-build-base` (no hub needed)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    seed: int = 0
    pretrain_steps: int = 400
    pretrain_batch_size: int = 16
    pretrain_seq_len: int = 128
    pretrain_lr: float = 3e-3
    pretrain_copy_share: float = 0.8  # share of each batch that is `X <sep> X` copy blocks (loss on the copy only)
    pretrain_copy_separator: str = "<sep>"  # a special token of the base's tokenizer between X and its copy
    copy_circuit_init: bool = False  # Llama: start from weights that already copy (modeling/copy_circuit.py)


@dataclass
class ModelConfig:
    name: str = "???"
    family: str = "???"
    name_or_path: str = "???"  # hub id, local dir, or the embedded base's name
    embedded: bool = False
    context_length: int = 2048
    torch_dtype: str = "auto"
    attn_implementation: str = "sdpa"
    lora_target_modules: list[str] = field(default_factory=list)
    trust_remote_code: bool = False
    base: Optional[EmbeddedBaseConfig] = None
    weights: str = "pretrained"  # random: the architecture from resources/hub_configs/<name>.json, no download
    init_seed: int = 0  # the random init's seed (weights=random)
    config_overrides: dict[str, Any] = field(default_factory=dict)  # weights=random: config.json keys replaced
    # A GGUF checkpoint (llama.cpp's format) to start from: a local path, or pkg:MODULE/FILE inside an installed Python
    # package; converted once into a cached transformers checkpoint (modeling/gguf_base.py). name_or_path then names
    # the original it was quantized from (cards, portable names); nothing is downloaded.
    gguf_file: Optional[str] = None
    gguf_requirement: Optional[str] = None  # the pip requirement of gguf_file's package, named when it is missing


def bundled_hub_configs() -> list[str]:
    """The models whose Hub config.json ships with the package (model.weights=random builds them)."""
    return sorted(path.stem for path in HUB_CONFIGS_DIR.glob("*.json"))


def _check_random_weights(model: DictConfig, problems: list[str]) -> None:
    """weights=random needs a bundled config.json; config_overrides may only replace keys that config has."""
    if model.weights != "random":
        if model.config_overrides:
            problems.append(
                f"model.config_overrides={dict(model.config_overrides)!r} is invalid with "
                f"model.weights={model.weights!r}; allowed: overrides only with model.weights=random"
            )
        return
    bundled = bundled_hub_configs()
    if model.embedded or model.name not in bundled:
        problems.append(
            f"model.weights='random' is invalid for model {model.name!r}; allowed: pretrained, or random for a model "
            f"with a bundled Hub config: {', '.join(bundled)}"
        )
        return
    known = json.loads((HUB_CONFIGS_DIR / f"{model.name}.json").read_text())["config"]
    for key in model.config_overrides:
        if key not in known:
            problems.append(
                f"model.config_overrides.{key} is not a key of {model.name}'s config.json; allowed: {', '.join(known)}"
            )


COPY_CIRCUIT_PREVIOUS_TOKEN_PAIRS = 8  # RoPE's fastest frequency pairs that place the previous token first


def copy_circuit_problem(hidden_size: int, num_heads: int, num_layers: int) -> str | None:
    """What a Llama of this shape lacks to take the copying circuit (modeling/copy_circuit.py), or None."""
    head_dim = hidden_size // num_heads
    if num_layers < 2:
        return "num_layers >= 2 (an induction head needs two layers)"
    if 2 * head_dim > hidden_size:
        return "num_heads >= 2 (the previous token needs head_dim dims of the residual stream of its own)"
    if head_dim < 4 * COPY_CIRCUIT_PREVIOUS_TOKEN_PAIRS:
        return f"hidden_size / num_heads >= {4 * COPY_CIRCUIT_PREVIOUS_TOKEN_PAIRS}"
    return None


def _check_copy_circuit(base: DictConfig, family: str, problems: list[str]) -> None:
    if not base.copy_circuit_init or min(base.hidden_size, base.num_heads, base.num_layers) < 1:
        return
    if family == "bloom":  # another unknown family is check_model's one line already
        problems.append(
            f"model.base.copy_circuit_init=True is invalid for family {family!r}; allowed: false, or true for llama "
            "(the circuit's previous-token head is placed by RoPE; BLOOM's ALiBi always favours the token itself)"
        )
        return
    why = copy_circuit_problem(base.hidden_size, base.num_heads, base.num_layers)
    if why:
        problems.append(f"model.base.copy_circuit_init=True is invalid for this base's shape; it needs {why}")


def _check_embedded_base(base: DictConfig, family: str, problems: list[str]) -> None:
    """The shape of an embedded base (model.base.*) must build: positive sizes, heads that divide the width."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "pretrain_batch_size", "pretrain_seq_len"):  # fmt: skip
        check(problems, base[key] >= 1, f"model.base.{key}", base[key], "an integer >= 1")
    check(problems, base.pretrain_steps >= 0, "model.base.pretrain_steps", base.pretrain_steps, "an integer >= 0")
    check(problems, 0 < base.pretrain_lr <= 1, "model.base.pretrain_lr", base.pretrain_lr, "> 0 and <= 1")
    share = base.pretrain_copy_share
    check(problems, 0 <= share <= 1, "model.base.pretrain_copy_share", share, "a number from 0 to 1")
    separator = base.pretrain_copy_separator
    reserved = separator in ("<pad>", "<s>", "</s>")
    check(
        problems,
        bool(separator) and separator == "".join(separator.split()) and not reserved,
        "model.base.pretrain_copy_separator",
        separator,
        "a non-empty token without whitespace other than <pad>, <s>, </s> (e.g. <sep>)",
    )
    _check_copy_circuit(base, family, problems)
    if base.num_heads >= 1 and base.hidden_size >= 1 and base.hidden_size % base.num_heads:
        problems.append(
            f"model.base.hidden_size={base.hidden_size!r} is invalid; it must be a multiple of model.base.num_heads "
            f"({base.num_heads})"
        )
    if base.num_kv_heads >= 1 and base.num_heads >= 1 and base.num_heads % base.num_kv_heads:
        problems.append(
            f"model.base.num_kv_heads={base.num_kv_heads!r} is invalid; it must divide model.base.num_heads "
            f"({base.num_heads})"
        )


def check_model(cfg: DictConfig, problems: list[str]) -> None:
    model = cfg.model
    check_choice(problems, "model.family", model.family, ModelFamily)
    check_choice(problems, "model.torch_dtype", model.torch_dtype, Dtype)
    check_choice(problems, "model.weights", model.weights, Weights)
    _check_random_weights(model, problems)
    check(problems, model.context_length > 0, "model.context_length", model.context_length, "> 0")
    if model.embedded and model.base is None:
        problems.append(f"model.base=None is invalid for embedded model {model.name!r}; it must describe its shape")
    if model.base is not None:
        _check_embedded_base(model.base, model.family, problems)
    _check_gguf(model, problems)


def _check_gguf(model: DictConfig, problems: list[str]) -> None:
    """model.gguf_file: a GGUF that transformers converts, of the model's family, long enough a context (its header
    only is read); not beside an embedded or random-weight base."""
    if not model.get("gguf_file"):
        return
    if model.embedded or model.weights == "random":
        kind = "an embedded" if model.embedded else "a model.weights='random'"
        problems.append(
            f"model.gguf_file={model.gguf_file!r} is invalid for {kind} base; allowed: null, or a GGUF file for a "
            "pretrained base (e.g. model=smollm2-135m)"
        )
        return
    if any(p.startswith(("model.family", "model.context_length")) for p in problems):
        return  # the header is checked against a family and a context length that are valid
    try:
        checked_header(model)
    except ConfigError as error:
        problems.extend(error.problems)
