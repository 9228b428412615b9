"""The `peft` group: the adapter method (QLoRA or LoRA), its rank, alpha, dropout, targets, and 4-bit quantization."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig

from distributed_peft.config.checks import Choice, check, check_choice
from distributed_peft.config.model import Dtype
from distributed_peft.errors import ConfigError


class PeftMethod(Choice):
    QLORA = "qlora"  # a 4-bit base (bitsandbytes)
    LORA = "lora"


class QuantType(Choice):
    NF4 = "nf4"
    FP4 = "fp4"


class LoraBias(Choice):
    NONE = "none"
    ALL = "all"
    LORA_ONLY = "lora_only"


QUANT_STORAGE_DTYPES = (*Dtype.values(), "uint8")  # the 4-bit weights' storage: a dtype or packed bytes


@dataclass
class QuantizationConfig:
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto: bfloat16 on CUDA with bf16 support, float16 on older GPUs, float32 on CPU
    quant_storage: str = "auto"  # auto: the compute dtype when parameters are sharded (ZeRO-3/FSDP), else uint8


@dataclass
class PeftConfig:
    method: str = "qlora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None  # null: the model config's lora_target_modules
    bias: str = "none"
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)


def lora_targets(cfg: DictConfig) -> list[str]:
    """The modules LoRA attaches to: the peft override, else the model family's targets."""
    targets = cfg.peft.target_modules if cfg.peft.target_modules is not None else cfg.model.lora_target_modules
    return list(targets)


def _lora_rank_problem(cfg: DictConfig, hidden_size: int) -> str:
    return (
        f"peft.r={cfg.peft.r!r} is invalid; it must be <= {hidden_size}, the width (hidden size) of model "
        f"{cfg.model.name}: a LoRA rank above the layers' width adds parameters and no capacity"
    )


def check_lora_rank(cfg: DictConfig, hidden_size: int) -> None:
    """Raise ConfigError when peft.r exceeds the model's width (read from its config.json for hub models)."""
    if cfg.peft.r > hidden_size:
        raise ConfigError(_lora_rank_problem(cfg, hidden_size))


def check_peft(cfg: DictConfig, problems: list[str]) -> None:
    model, peft = cfg.model, cfg.peft
    check_choice(problems, "peft.method", peft.method, PeftMethod)
    check(problems, peft.r > 0, "peft.r", peft.r, "a positive integer")
    if model.embedded and model.base is not None and 0 < model.base.hidden_size < peft.r:
        problems.append(_lora_rank_problem(cfg, model.base.hidden_size))
    check(problems, peft.alpha > 0, "peft.alpha", peft.alpha, "a positive integer")
    check(problems, 0 <= peft.dropout < 1, "peft.dropout", peft.dropout, "in [0, 1)")
    check_choice(problems, "peft.bias", peft.bias, LoraBias)
    check_choice(problems, "peft.quantization.quant_type", peft.quantization.quant_type, QuantType)
    check_choice(problems, "peft.quantization.compute_dtype", peft.quantization.compute_dtype, Dtype)
    check_choice(problems, "peft.quantization.quant_storage", peft.quantization.quant_storage, QUANT_STORAGE_DTYPES)
    if not lora_targets(cfg):
        problems.append(
            f"peft.target_modules={peft.target_modules!r} is invalid: model family {model.family!r} "
            f"({model.name}) defines no LoRA targets; allowed: a non-empty list such as [q_proj,v_proj]"
        )
