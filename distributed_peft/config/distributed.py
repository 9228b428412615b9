"""The `distributed` group: the strategy a run expects (checked against what `accelerate launch` set up) and its
process group's backend and timeout."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from distributed_peft.config.checks import Choice, check, check_choice


class DistributedStrategy(Choice):
    AUTO = "auto"  # whatever `accelerate launch` set up
    DDP = "ddp"
    ZERO2 = "zero2"
    ZERO3 = "zero3"
    ZERO3_OFFLOAD = "zero3_offload"
    FSDP = "fsdp"


# Strategies that shard parameters: the 4-bit storage dtype must match the shards
SHARDED_PARAMETER_STRATEGIES = frozenset(
    {DistributedStrategy.ZERO3, DistributedStrategy.ZERO3_OFFLOAD, DistributedStrategy.FSDP}
)


class Backend(Choice):
    AUTO = "auto"  # nccl on CUDA, gloo on CPU
    GLOO = "gloo"
    NCCL = "nccl"


@dataclass
class DistributedConfig:
    strategy: str = "auto"  # auto: whatever `accelerate launch` set up; else checked against the launch
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    timeout_s: int = 600


def check_distributed(cfg: DictConfig, problems: list[str]) -> None:
    distributed = cfg.distributed
    check_choice(problems, "distributed.strategy", distributed.strategy, DistributedStrategy)
    check_choice(problems, "distributed.backend", distributed.backend, Backend)
    check(problems, distributed.timeout_s > 0, "distributed.timeout_s", distributed.timeout_s, "> 0")
    # num_gpu_workers, num_machines, machine_rank, main_process_*: only dpeft-launch reads them (launch_layout)
