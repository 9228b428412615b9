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

    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a backend on a single process would make accelerate wait for peers
        timeout = timedelta(seconds=cfg.distributed.timeout_s)
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
    return Accelerator(
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(cfg.training.mixed_precision),
        kwargs_handlers=handlers,
    )


def global_sum(accelerator, value: float | int) -> float:
    """Sum of a number over all processes (itself on a single process)."""
    if accelerator.num_processes == 1:
        return float(value)
    tensor = torch.tensor([float(value)], device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(tensor, reduction="sum").item())
