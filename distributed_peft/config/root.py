"""The root schema of a run (dpeft-train, dpeft-eval): one section per config group, where the run writes, and the
launch layout; `validate` checks a composed config, every problem collected and reported together."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distributed_peft.config.checks import missing_extra, unknown_keys
from distributed_peft.config.distributed import DistributedConfig, check_distributed
from distributed_peft.config.evaluation import EvaluationConfig, check_evaluation
from distributed_peft.config.logging import LoggingConfig, check_logging
from distributed_peft.config.model import ModelConfig, check_model
from distributed_peft.config.peft import PeftConfig, PeftMethod, check_peft
from distributed_peft.config.task import TaskConfig, check_task_data, check_task_metrics
from distributed_peft.config.tasks import check_tasks, task_run_configs
from distributed_peft.config.training import EIGHT_BIT_OPTIMIZERS, TrainingConfig, check_training
from distributed_peft.constants import CONF_DIR
from distributed_peft.errors import ConfigError, DpeftError
from distributed_peft.runtime.atomic_files import check_writable
from distributed_peft.runtime.output_dirs import check_output_dir, run_dir

CONFIG_GROUPS = ("task", "model", "peft", "distributed", "training", "logging", "experiment")

# A check a layer above config adds to `validate` (data/'s reading of the data file's columns): it appends problems.
Check = Callable[[DictConfig, list[str]], None]


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output_dir: str = run_dir("${task.name}-${model.name}")  # conf/config.yaml: the same rule, multirun-aware
    adapter: Optional[str] = None  # dpeft-eval: a trained run's adapter directory
    heldout: bool = False  # dpeft-eval: score on the bundled held-out real text, beside baselines (evaluation/heldout)
    heldout_rows: Optional[int] = None  # dpeft-eval heldout=true: the first N held-out rows; null: all of them
    # dpeft-launch: workers per node and the node layout. null: the environment variable (NUM_GPU_WORKERS,
    # NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT), else 1 node x 1 worker on 127.0.0.1:29500.
    # Only dpeft-launch reads and checks them (distributed_peft/cli/launch.py: launch_layout).
    num_gpu_workers: Optional[int] = None
    num_machines: Optional[int] = None
    machine_rank: Optional[int] = None
    main_process_ip: Optional[str] = None
    main_process_port: Optional[int] = None
    allow_base_mismatch: bool = False  # load an adapter onto a base other than the one it was trained on
    # several task adapters in one job on one base load (config/tasks.py): tasks=[sql,detox,instruct], and each
    # task's own task/training/evaluation keys under per_task.<task>; empty: the one task of the `task` group
    tasks: list[str] = field(default_factory=list)
    per_task: dict[str, Any] = field(default_factory=dict)


def group_options(group: str, config_dirs: Sequence[str | Path] = ()) -> list[str]:
    """Option names of a config group: `conf/<group>/*.yaml` in the package and in a user's config directories."""
    return sorted({p.stem for root in (CONF_DIR, *map(Path, config_dirs)) for p in (root / group).glob("*.yaml")})


def _check_extras(cfg: DictConfig, problems: list[str]) -> None:
    """Optional features whose package (an extra of distributed-peft) is missing, before any model loads."""
    needs = []
    if cfg.peft.method == PeftMethod.QLORA:
        needs.append(("bitsandbytes", "qlora", "peft.method='qlora' (4-bit base)"))
    if cfg.training.optimizer in EIGHT_BIT_OPTIMIZERS:
        needs.append(("bitsandbytes", "qlora", f"training.optimizer={cfg.training.optimizer!r}"))
    if cfg.distributed.strategy.startswith("zero"):
        needs.append(("deepspeed", "deepspeed", f"distributed.strategy={cfg.distributed.strategy!r}"))
    if cfg.logging.wandb:
        needs.append(("wandb", "wandb", "logging.wandb=true"))
    if cfg.logging.tensorboard:
        needs.append(("tensorboard", "tensorboard", "logging.tensorboard=true"))
    for module, extra, needed_by in needs:
        problem = missing_extra(module, extra, needed_by)
        if problem and problem not in problems:
            problems.append(problem)


def _task_problems(cfg: DictConfig, checks: Sequence[Check]) -> list[str]:
    """The problems of one task's settings: its training keys, metrics, evaluation and data."""
    problems: list[str] = []
    check_training(cfg, problems)
    check_task_metrics(cfg, problems)
    check_evaluation(cfg, problems)
    check_task_data(cfg, problems)
    for extra_check in checks:
        extra_check(cfg, problems)
    return problems


def task_configs(cfg: DictConfig, config_dirs: Sequence[str | Path] = ()) -> dict[str, DictConfig]:
    """Each task's own run config of a multi-task job (`tasks=[...]`), typed by the schema: the config it would have
    trained with alone, its output_dir `<output_dir>/<task>`. Raises ConfigError on a per-task key the schema lacks."""
    configs, problems = {}, []
    for name, run in task_run_configs(cfg, tuple(config_dirs)).items():
        try:
            configs[name] = OmegaConf.merge(OmegaConf.structured(Config), run)
        except OmegaConfBaseException as exc:
            problems.append(f"per_task.{name}: {str(exc).splitlines()[0]}")
    if problems:
        raise ConfigError(problems)
    return configs


def validate(cfg: DictConfig, checks: Sequence[Check] = (), config_dirs: Sequence[str | Path] = ()) -> None:
    """Raise ConfigError listing every invalid value of a composed config; load nothing heavy.

    `checks` (from the layers above, e.g. data.files.check_data_file) add their problems after the task's data
    settings, into the same report. A multi-task job checks the shared settings once and each task's own settings
    (its task group, per_task keys, data) as `task NAME: ...` lines.
    """
    problems = unknown_keys(cfg, Config)
    check_model(cfg, problems)
    check_peft(cfg, problems)
    check_distributed(cfg, problems)
    if cfg.tasks:
        check_training(cfg, problems)
        check_tasks(cfg, group_options("task", config_dirs), problems)
        if not problems:
            try:
                for name, task_cfg in task_configs(cfg, config_dirs).items():
                    problems += [f"task {name}: {p}" for p in _task_problems(task_cfg, checks) if p not in problems]
            except ConfigError as error:
                problems += error.problems
    else:
        problems += _task_problems(cfg, checks)
    check_logging(cfg, problems)
    _check_extras(cfg, problems)
    try:  # output_dir: absent, empty or ours, and writable, known before torch is imported
        check_output_dir(cfg.output_dir)
        check_writable(cfg.output_dir)
    except DpeftError as error:
        problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)
