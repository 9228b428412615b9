"""The `training` group: optimizer and schedule, batching and packing, evaluation during training, checkpoints and
resuming."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from distributed_peft.config.checks import Choice, check, check_choice
from distributed_peft.config.model import ModelFamily
from distributed_peft.config.tasks import Interleave


class LrScheduler(Choice):
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    LINEAR = "linear"
    COSINE = "cosine"


class Optimizer(Choice):
    ADAMW_TORCH = "adamw_torch"
    PAGED_ADAMW_8BIT = "paged_adamw_8bit"
    ADAMW_8BIT = "adamw_8bit"


EIGHT_BIT_OPTIMIZERS = (Optimizer.PAGED_ADAMW_8BIT, Optimizer.ADAMW_8BIT)  # bitsandbytes' optimizers


class Truncation(Choice):
    TRUNCATE = "truncate"
    DROP = "drop"


class MixedPrecision(Choice):
    AUTO = "auto"
    NO = "no"
    BF16 = "bf16"
    FP16 = "fp16"


class PackingMode(Choice):
    NONE = "none"
    GROUP_BY_LENGTH = "group_by_length"
    PADDING_FREE = "padding_free"  # Llama family with sdpa/flash attention


class PaddingFreeAttention(Choice):
    """The attention implementations that keep packed examples apart (padding-free packing)."""

    SDPA = "sdpa"
    FLASH_ATTENTION_2 = "flash_attention_2"
    FLASH_ATTENTION_3 = "flash_attention_3"


RESUME_OFF = ("false", "no", "none", "off", "never")
RESUME_FORCE = "force"  # continue from the newest checkpoint even when the run's settings changed
MAX_SEED = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)


@dataclass
class TrainingConfig:
    lr: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = -1  # optimizer steps; > 0 overrides epochs
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    max_seq_len: int = 256
    truncation: str = "truncate"  # or drop
    eval_fraction: float = 0.1
    max_eval_examples: Optional[int] = 256
    eval_steps: int = 50  # 0: only at the end
    eval_batch_size: int = 8
    seed: int = 42
    optimizer: str = "adamw_torch"
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    packing: str = "none"  # none | group_by_length | padding_free (Llama family with sdpa/flash attention)
    tokens_per_batch: Optional[int] = None  # a token budget per micro batch instead of micro_batch_size examples
    liger_kernel: bool = False  # fused Liger kernels on CUDA when the package is installed; ignored elsewhere
    checkpoint_every: int = 100  # optimizer steps between checkpoints (0: none); SIGTERM always saves one
    keep_checkpoints: int = 2  # the newest K complete checkpoints are kept
    # auto: continue from output_dir's newest complete checkpoint of the same run; false: start over; force: continue
    # from the newest checkpoint even when settings changed (recorded in the run's metadata); or a checkpoint path
    resume: str = "auto"
    max_nonfinite_steps: int = 10  # steps with a NaN/inf loss skipped before the run stops (exit code 3)
    interleave: str = "round_robin"  # tasks=[...]: round_robin (one step of each task in turn) or proportional


def _check_packing(cfg: DictConfig, problems: list[str]) -> None:
    model, training = cfg.model, cfg.training
    check_choice(problems, "training.packing", training.packing, PackingMode)
    padding_free = training.packing == PackingMode.PADDING_FREE
    if padding_free and model.family == ModelFamily.BLOOM:
        problems.append(
            f"training.packing='padding_free' is not possible on model {model.name!r}: BLOOM's ALiBi attention "
            "cannot keep packed examples apart; allowed: group_by_length, none"
        )
    elif padding_free and model.attn_implementation not in PaddingFreeAttention.values():
        problems.append(
            f"training.packing='padding_free' needs model.attn_implementation in "
            f"{', '.join(PaddingFreeAttention.values())} (got {model.attn_implementation!r}); "
            "allowed: group_by_length, none"
        )
    if training.tokens_per_batch is not None:
        check(
            problems,
            training.tokens_per_batch >= training.max_seq_len,
            "training.tokens_per_batch",
            training.tokens_per_batch,
            f">= training.max_seq_len ({training.max_seq_len}) or null",
        )


def check_training(cfg: DictConfig, problems: list[str]) -> None:
    model, training = cfg.model, cfg.training
    check(problems, 0 < training.lr <= 1, "training.lr", training.lr, "> 0 and <= 1 (e.g. 2e-4)")
    check_choice(problems, "training.lr_scheduler", training.lr_scheduler, LrScheduler)
    check(problems, 0 <= training.warmup_ratio < 1, "training.warmup_ratio", training.warmup_ratio, "in [0, 1)")
    check(problems, training.weight_decay >= 0, "training.weight_decay", training.weight_decay, ">= 0")
    check(problems, training.max_steps == -1 or training.max_steps > 0, "training.max_steps", training.max_steps,
          "a positive number of optimizer steps, or -1 to train for training.epochs")  # fmt: skip
    if training.max_steps <= 0:
        check(problems, training.epochs > 0, "training.epochs", training.epochs, "> 0 when training.max_steps <= 0")
    for key in ("micro_batch_size", "gradient_accumulation_steps", "eval_batch_size"):
        check(problems, training[key] >= 1, f"training.{key}", training[key], "an integer >= 1")
    check(problems, training.max_grad_norm > 0, "training.max_grad_norm", training.max_grad_norm, "> 0")
    check(
        problems,
        0 < training.max_seq_len <= model.context_length,
        "training.max_seq_len",
        training.max_seq_len,
        f"in [1, {model.context_length}] (the context length of model {model.name})",
    )
    check_choice(problems, "training.truncation", training.truncation, Truncation)
    check(problems, 0 < training.eval_fraction < 1, "training.eval_fraction", training.eval_fraction, "in (0, 1)")
    if training.max_eval_examples is not None:
        check(problems, training.max_eval_examples > 0, "training.max_eval_examples", training.max_eval_examples, "> 0")
    check(problems, training.eval_steps >= 0, "training.eval_steps", training.eval_steps, ">= 0 (0: only at the end)")
    check_choice(problems, "training.optimizer", training.optimizer, Optimizer)
    check(problems, 0 <= training.seed <= MAX_SEED, "training.seed", training.seed, f"in [0, {MAX_SEED}]")
    _check_packing(cfg, problems)
    check_choice(problems, "training.mixed_precision", training.mixed_precision, MixedPrecision)
    check_choice(problems, "training.interleave", training.interleave, Interleave)
    for key, minimum in (("checkpoint_every", 0), ("keep_checkpoints", 1), ("max_nonfinite_steps", 0)):
        check(problems, training[key] >= minimum, f"training.{key}", training[key], f"an integer >= {minimum}")
    resume = str(training.resume)
    if resume not in ("auto", RESUME_FORCE) and resume.lower() not in RESUME_OFF and not Path(resume).is_dir():
        problems.append(
            f"training.resume={resume!r} does not exist; allowed: auto, false, force (continue even when settings "
            "changed), or a checkpoint (or run) directory"
        )
