"""The `logging` group: how often a run logs, and to which trackers (TensorBoard, Weights & Biases)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from distributed_peft.config.checks import Choice, check, check_choice


class WandbMode(Choice):
    OFFLINE = "offline"
    ONLINE = "online"
    DISABLED = "disabled"


@dataclass
class LoggingConfig:
    log_every_steps: int = 1
    progress_bar: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "distributed-peft"
    wandb_mode: str = "offline"  # online only when the user asks; a wandb failure never stops a run
    debug: bool = False  # also show third-party notices (bitsandbytes, DeepSpeed, FutureWarnings); or DPEFT_DEBUG=1


def check_logging(cfg: DictConfig, problems: list[str]) -> None:
    logging = cfg.logging
    check_choice(problems, "logging.wandb_mode", logging.wandb_mode, WandbMode)
    check(problems, logging.log_every_steps >= 1, "logging.log_every_steps", logging.log_every_steps, ">= 1")
