"""The Accelerator for a run: process group backend and timeout, mixed precision, gradient accumulation, and the
DeepSpeed config's numbers.

The training loop never asks which strategy runs it; `accelerate launch` and the `distributed` group decide.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from distributed_peft.errors import ConfigError

BF16_MIN_CAPABILITY = 8  # Ampere (A100, A10, RTX 30xx) and later: bf16 tensor cores; older GPUs only emulate bf16
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}  # what each one computes in


def bf16_supported() -> bool:
    """Whether this process's GPU computes bf16 natively (ROCm GPUs do); False without CUDA.

    Not torch.cuda.is_bf16_supported(): by default it also says True where bf16 is only emulated (a V100), very slowly.
    """
    if not torch.cuda.is_available():
        return False
    return bool(torch.version.hip) or torch.cuda.get_device_capability()[0] >= BF16_MIN_CAPABILITY


def auto_precision() -> str:
    """The mixed precision this machine trains in: bf16 on bf16 GPUs, fp16 (with a loss scaler) on older ones, none on
    CPU."""
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if bf16_supported() else "fp16"


def resolve_mixed_precision(requested: str) -> str:
    """`training.mixed_precision` for this machine: auto decided here; bf16 on a GPU without it is refused."""
    if requested == "auto":
        return auto_precision()
    if requested == "bf16" and torch.cuda.is_available() and not bf16_supported():
        major, minor = torch.cuda.get_device_capability()
        raise ConfigError(
            f"training.mixed_precision='bf16' is not possible on {torch.cuda.get_device_name()} (compute capability "
            f"{major}.{minor}; bf16 needs {BF16_MIN_CAPABILITY}.0 or later); allowed here: fp16 (with a loss scaler, "
            "what auto picks), no"
        )
    return requested


def deepspeed_run_values(cfg: DictConfig, mixed_precision: str, world_size: int) -> dict[str, tuple[Any, str]]:
    """The DeepSpeed config keys a run decides: dotted key -> (value, the training config it comes from)."""
    training = cfg.training
    micro, accumulation = training.micro_batch_size, training.gradient_accumulation_steps
    precision = f"training.mixed_precision={training.mixed_precision!r} ({mixed_precision} here)"
    return {
        "train_micro_batch_size_per_gpu": (micro, f"training.micro_batch_size={micro}"),
        "gradient_accumulation_steps": (accumulation, f"training.gradient_accumulation_steps={accumulation}"),
        "train_batch_size": (
            micro * accumulation * world_size,
            f"training.micro_batch_size x training.gradient_accumulation_steps x world size = {micro} x {accumulation} "
            f"x {world_size}",
        ),
        "gradient_clipping": (training.max_grad_norm, f"training.max_grad_norm={training.max_grad_norm}"),
        "bf16.enabled": (mixed_precision == "bf16", precision),
        "fp16.enabled": (mixed_precision == "fp16", precision),
    }


def fill_deepspeed_config(ds: dict[str, Any], cfg: DictConfig, mixed_precision: str, world_size: int) -> dict[str, Any]:
    """The run's numbers in a DeepSpeed config, in place: each "auto" (or absent) one filled from the training config,
    each one written that contradicts it refused (ConfigError, one line per key). Returns `ds`.

    The "auto" sizes that follow the model's width (reduce_bucket_size, stage3_*) are left to accelerate, which fills
    them from model.config.hidden_size when the model is prepared.
    """
    problems = []
    for path, (value, source) in deepspeed_run_values(cfg, mixed_precision, world_size).items():
        *parents, key = path.split(".")
        node = ds
        for parent in parents:
            node = node.setdefault(parent, {})
        written = node.get(key, "auto")
        if written == "auto":
            node[key] = value
        elif written != value:
            problems.append(
                f"the DeepSpeed config's {path}={written!r} contradicts {source}; allowed: 'auto' (filled from the "
                f"run's config) or {value!r}"
            )
    if problems:
        raise ConfigError(problems)
    return ds


def deepspeed_plugin_for(cfg: DictConfig, mixed_precision: str):
    """The DeepSpeed plugin `accelerate launch` asked for (its config file named by the environment), with the run's
    numbers filled in before the Accelerator, DeepSpeed or transformers read it; None when not launched with DeepSpeed.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()  # what Accelerator() would build from the same environment
    fill_deepspeed_config(plugin.deepspeed_config, cfg, mixed_precision, int(os.environ.get("WORLD_SIZE", "1")))
    return plugin


def resolve_device(choice: str) -> str:
    """Where a command that does not train (generate, merge, explore) loads the base: auto is cuda when visible."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def build_accelerator(cfg: DictConfig):
    """An Accelerator whose collectives fail after `distributed.timeout_s` instead of hanging, in this machine's mixed
    precision, with the run's numbers in its DeepSpeed config."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from distributed_peft.runtime.tracking import quiet_deepspeed_setup

    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a backend on a single process would make accelerate wait for peers
        timeout = timedelta(seconds=cfg.distributed.timeout_s)
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
    if len(OmegaConf.select(cfg, "tasks", default=[]) or []) > 1:  # a step trains one task's adapter, not the others'
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    mixed_precision = resolve_mixed_precision(cfg.training.mixed_precision)
    with quiet_deepspeed_setup(debug=cfg.logging.debug):  # its op probe's compiler lines (`gcc ...`) and notices
        return Accelerator(
            gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
            mixed_precision=mixed_precision,
            deepspeed_plugin=deepspeed_plugin_for(cfg, mixed_precision),
            kwargs_handlers=handlers,
        )


def launched_strategy(accelerator) -> str:
    """The strategy this process actually runs under, named like the `distributed` group's options."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        offloaded = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
        return {2: "zero2", 3: "zero3_offload" if offloaded else "zero3"}.get(
            plugin.zero_stage, f"zero{plugin.zero_stage}"
        )
    if kind == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def check_launch_matches(cfg: DictConfig, accelerator) -> str:
    """Refuse a run whose `distributed` choice differs from how it was launched (a silent DDP instead of ZeRO-3)."""
    wanted, actual = cfg.distributed.strategy, launched_strategy(accelerator)
    if wanted not in ("auto", actual) and not (wanted == "ddp" and actual == "single"):
        raise ConfigError(
            f"distributed={wanted!r} but this process was launched as {actual!r}; launch it with "
            f"`dpeft-launch distributed={wanted} ...` or `accelerate launch --config_file "
            f"launch/accelerate/{wanted}.yaml -m distributed_peft.cli.train distributed={wanted} ...`"
        )
    return actual


def global_sum(accelerator, value: float | int) -> float:
    """Sum of a number over all processes (itself on a single process)."""
    if accelerator.num_processes == 1:
        return float(value)
    tensor = torch.tensor([float(value)], device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(tensor, reduction="sum").item())
