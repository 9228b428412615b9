"""The tasks of a job: each task adapter's own config, data, batches, schedule, counters and metrics log, and the
order in which the job's optimizer steps go round them.

A one-task run (`task=detox`) is a job of one TaskRun, adapter "default", writing into output_dir itself; a multi-task
job (`tasks=[sql,detox,instruct]`) has one TaskRun per task, adapter named after it, writing into output_dir/<task>.
Each step is one task's window of micro batches and updates that task's adapter alone, so every task's batches,
schedule and optimizer state are those it would have had trained alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distributed_peft.config import Interleave


@dataclass
class TaskRun:
    """One task adapter within a job."""

    name: str  # the adapter's name in the peft model
    cfg: DictConfig  # the config it trains with, as if alone (its output_dir is run_dir)
    run_dir: Path
    total_steps: int = 0
    start_step: int = 0  # steps done before this process started (a resumed checkpoint)
    step_done: int = 0
    nonfinite_steps: int = 0
    tokens_seen: float = 0.0
    inputs_seen: float = 0.0
    resume_position: tuple[int, int, str | None] | None = None  # epoch, micro batches done, its generator
    # set up by the recipe
    data: Any = None
    train_loader: Any = None
    eval_loader: Any = None
    sampler_generator: Any = None
    length_sampler: Any = None
    schedule: Any = None
    windows: Any = None
    log: Any = None

    def state(self) -> dict[str, Any]:
        """What a checkpoint records of this task: its steps, counters and position in its data."""
        epoch, done = self.windows.position
        return {
            "step": self.step_done,
            "epoch": epoch,
            "micro_batches_done": done,
            "epoch_generator_state": self.windows.epoch_generator_state,
            "tokens_seen": self.tokens_seen,
            "input_tokens_seen": self.inputs_seen,
            "nonfinite_steps": self.nonfinite_steps,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.start_step = self.step_done = state["step"]
        self.nonfinite_steps = state["nonfinite_steps"]
        self.tokens_seen, self.inputs_seen = state["tokens_seen"], state["input_tokens_seen"]
        self.resume_position = (state["epoch"], state["micro_batches_done"], state["epoch_generator_state"])


def task_states(trainer_state: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """Each task's recorded state (a checkpoint of a one-task run from before multi-task jobs kept it flat)."""
    return trainer_state.get("tasks") or {names[0]: trainer_state}


def step_order(totals: dict[str, int], interleave: str) -> list[str]:
    """The task of each optimizer step of the job, the same on every rank.

    round_robin: one step of each unfinished task in turn (in the order of `tasks`). proportional: each task's k-th
    step at the fraction (k + 1/2) / its steps of the job, so that every task runs until the end and a task with
    more steps (more data, for epochs) steps more often.
    """
    if interleave == Interleave.PROPORTIONAL:
        slots = [((k + 0.5) / total, index, name) for index, (name, total) in enumerate(totals.items()) for k in
                 range(total)]  # fmt: skip
        return [name for _, _, name in sorted(slots)]
    order, left = [], dict(totals)
    while any(left.values()):
        for name in totals:
            if left[name]:
                order.append(name)
                left[name] -= 1
    return order
