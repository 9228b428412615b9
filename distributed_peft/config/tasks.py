"""Several task adapters in one job: `tasks=[sql,detox,instruct]` and each task's own settings under `per_task`.

    dpeft-train tasks=[sql,detox,instruct]                                   # one base load, one adapter per task
    dpeft-train tasks=[detox,custom] per_task.custom.task.data.path=my.jsonl per_task.detox.training.max_steps=200
    dpeft-train tasks=[sql,detox] training.interleave=proportional           # steps spread by each task's length

Each task's run config is the job's config with that task's group file (conf/task/<name>.yaml) as `task`, its
`per_task.<name>` overrides merged over `task`, `training` and `evaluation`, and `<output_dir>/<name>` as its own
output directory: the config the task would have had trained alone, recorded as such in its adapter. Settings that
the shared base, optimizer and process group make common (model, peft, distributed, the batch shape, packing,
precision, checkpoints) are the job's, and setting them per task is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distributed_peft.config.checks import Choice
from distributed_peft.constants import CONF_DIR

PER_TASK_SECTIONS = ("task", "training", "evaluation")
# training keys a task may set for itself: its schedule, length and data split (each adapter has its own optimizer
# state and schedule); the rest shapes the shared micro batches, process group or checkpoints
PER_TASK_TRAINING_KEYS = (
    "lr",
    "lr_scheduler",
    "warmup_ratio",
    "weight_decay",
    "epochs",
    "max_steps",
    "max_seq_len",
    "truncation",
    "eval_fraction",
    "max_eval_examples",
    "eval_steps",
    "seed",
)


class Interleave(Choice):
    """How a job's optimizer steps go round its tasks (each step is one task's window of micro batches)."""

    ROUND_ROBIN = "round_robin"  # one step of each unfinished task in turn
    PROPORTIONAL = "proportional"  # each task's steps spread evenly over the job: a longer task steps more often


def task_group_file(name: str, config_dirs: tuple[str | Path, ...] = ()) -> Path | None:
    """conf/task/<name>.yaml in a user's config directories (first) or the package's."""
    for root in (*map(Path, config_dirs), CONF_DIR):
        path = Path(root) / "task" / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def check_tasks(cfg: DictConfig, options: list[str], problems: list[str]) -> None:
    """The job-level keys of a multi-task run: known, distinct tasks; per_task entries that name one of them and only
    the keys a task may set."""
    tasks = list(cfg.tasks)
    unknown = [t for t in tasks if t not in options]
    if unknown:
        problems.append(f"tasks={tasks} names unknown task(s) {', '.join(unknown)}; allowed: {', '.join(options)}")
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        problems.append(f"tasks={tasks} lists {', '.join(repeated)} twice; allowed: each task once")
    for name, overrides in (cfg.per_task or {}).items():
        if name not in tasks:
            problems.append(f"per_task.{name} names a task that is not in tasks={tasks}; allowed: {', '.join(tasks)}")
            continue
        if not isinstance(overrides, DictConfig):
            problems.append(f"per_task.{name}={overrides!r} is invalid; it must hold task, training, evaluation keys")
            continue
        for section, values in overrides.items():
            if section not in PER_TASK_SECTIONS:
                problems.append(
                    f"per_task.{name}.{section} is not a per-task setting (the job's, shared by every task); "
                    f"allowed: {', '.join(f'per_task.{name}.{s}' for s in PER_TASK_SECTIONS)}"
                )
            elif section == "training" and isinstance(values, DictConfig):
                for key in values:
                    if key not in PER_TASK_TRAINING_KEYS:
                        problems.append(
                            f"per_task.{name}.training.{key} is the job's setting, shared by every task "
                            f"(set training.{key} instead); allowed per task: {', '.join(PER_TASK_TRAINING_KEYS)}"
                        )


def task_run_config(job: dict[str, Any], name: str, task_file: Path) -> dict[str, Any]:
    """One task's run config (a plain dict) from the job's resolved config: as if that task were trained alone."""
    run = {k: v for k, v in job.items() if k not in ("tasks", "per_task")}
    overrides = (job.get("per_task") or {}).get(name) or {}
    task = OmegaConf.to_container(OmegaConf.load(task_file), resolve=False)
    run["task"] = OmegaConf.to_container(OmegaConf.merge(task, overrides.get("task") or {}))
    for section in ("training", "evaluation"):
        run[section] = {**job[section], **(overrides.get(section) or {})}
    run["output_dir"] = str(Path(job["output_dir"]) / name)
    return run


def task_run_configs(cfg: DictConfig, config_dirs: tuple[str | Path, ...] = ()) -> dict[str, dict[str, Any]]:
    """Every task's run config of a multi-task job, in the order of `tasks` (plain dicts, resolved)."""
    job = OmegaConf.to_container(cfg, resolve=True)
    configs = {}
    for name in cfg.tasks:
        task_file = task_group_file(name, config_dirs)
        if task_file is not None:
            configs[name] = task_run_config(job, name, task_file)
    return configs
