"""The Accelerator for a run: process group backend and timeout, mixed precision, gradient accumulation.

The training loop never asks which strategy runs it; `accelerate launch` and the `distributed` group decide.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from omegaconf import DictConfig


def resolve_mixed_precision(requested: str) -> str:
    """bf16 on bf16 GPUs, fp16 on older GPUs, none on CPU, unless the user chose."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def build_accelerator(cfg: DictConfig):
    """An Accelerator whose collectives fail after `distributed.timeout_s` instead of hanging."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from distributed_peft.runtime.tracking import quiet_deepspeed_setup

    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a backend on a single process would make accelerate wait for peers
        timeout = timedelta(seconds=cfg.distributed.timeout_s)
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
    with quiet_deepspeed_setup(debug=cfg.logging.debug):  # its op probe's compiler lines (`gcc ...`) and notices
        return Accelerator(
            gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
            mixed_precision=resolve_mixed_precision(cfg.training.mixed_precision),
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
    from distributed_peft.errors import ConfigError

    wanted, actual = cfg.distributed.strategy, launched_strategy(accelerator)
    if wanted not in ("auto", actual) and not (wanted == "ddp" and actual == "single"):
        raise ConfigError(
            f"distributed={wanted!r} but this process was launched as {actual!r}; launch it with "
            f"`dpeft-launch distributed={wanted} ...` or `accelerate launch --config_file "
            f"launch/accelerate/{wanted}.yaml -m distributed_peft.cli.train distributed={wanted} ...`"
        )
    if accelerator.distributed_type.name == "DEEPSPEED":
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("gradient_clipping") in (None, "auto"):
            ds_config["gradient_clipping"] = cfg.training.max_grad_norm  # DeepSpeed clips inside its step
    return actual


def global_sum(accelerator, value: float | int) -> float:
    """Sum of a number over all processes (itself on a single process)."""
    if accelerator.num_processes == 1:
        return float(value)
    tensor = torch.tensor([float(value)], device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(tensor, reduction="sum").item())
