"""The step loop's mechanics beneath the recipe's order: how many steps, the optimizer and its schedule, the windows
of micro batches the loop consumes, what one window does to the weights, and when the loop stops early.

- `build_optimizer`, `TaskSchedule`: one parameter group per task adapter, stepped only while its task is active,
  and each task's own learning-rate schedule over its own steps (a one-task run: one group, one schedule).
- `WindowStream`: gradient-accumulation windows epoch after epoch, from where a checkpoint stopped (the same epoch
  order, its first micro batches skipped); its `position` is what the next checkpoint records.
- `backward_window`, `clip_gradients`, `step_optimizer`: the loss of a window is (sum of token losses) / (labelled
  tokens in the window on all ranks); a NaN/inf loss on any rank backpropagates zero and the step is skipped.
- `stop_requested`, `preempted`, `diverged`: SIGTERM on any rank stops every rank at the same step after a
  checkpoint (exit 75); more NaN/inf steps than `training.max_nonfinite_steps` stops with the last good checkpoint
  named (exit 3).
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from distributed_peft.config import Optimizer
from distributed_peft.errors import DataError, Preempted, TrainingDiverged
from distributed_peft.runtime import termination
from distributed_peft.runtime.distributed import global_sum
from distributed_peft.training.checkpoints import decode_generator_state, encode_generator_state, list_checkpoints

if TYPE_CHECKING:
    from distributed_peft.modeling.objective import CompletionLoss

Window = list[dict[str, torch.Tensor]]


def count_steps(micro_steps_per_epoch: int, training) -> int:
    """training.max_steps, or the epochs' optimizer steps; an epoch's last, shorter window is a step too."""
    if micro_steps_per_epoch == 0:
        raise DataError("task.data: no training micro batch on this process; allowed: more training examples")
    steps_per_epoch = math.ceil(micro_steps_per_epoch / training.gradient_accumulation_steps)
    return training.max_steps if training.max_steps > 0 else math.ceil(training.epochs * steps_per_epoch)


def seed_step(seed: int, step: int) -> None:
    """Seed torch for a task's `step` from (its seed, the step): its dropout masks then depend on nothing that ran
    before it (another task's steps in a multi-task job, the steps before a resume), so a task trains the same in a
    joint job as alone, and a resumed run as an uninterrupted one."""
    torch.manual_seed((seed * 1_000_003 + step) % 2**63)


def build_optimizer(groups: list[tuple[str, list[torch.nn.Parameter], DictConfig]], training) -> torch.optim.Optimizer:
    """training.optimizer with one parameter group per task adapter: (task, its parameters, its training config),
    each with its own lr and weight decay. It steps only the active task's group (`optimizer.active_task`): the
    other adapters' weights and moments stay as they were, as if each task trained alone."""
    param_groups = [
        {"params": params, "lr": own.lr, "weight_decay": own.weight_decay, "task": task} for task, params, own in groups
    ]
    if training.optimizer == "adamw_torch":
        optimizer = torch.optim.AdamW(param_groups, lr=training.lr, weight_decay=training.weight_decay)
    else:
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if training.optimizer == Optimizer.PAGED_ADAMW_8BIT else bnb.optim.AdamW8bit
        optimizer = cls(param_groups, lr=training.lr, weight_decay=training.weight_decay)
    return step_active_task_only(optimizer, groups[0][0])


def step_active_task_only(optimizer: torch.optim.Optimizer, active: str) -> torch.optim.Optimizer:
    """The optimizer's step limited to the groups of `optimizer.active_task`. Set on the instance, so its type stays
    the library's (DeepSpeed's ZeRO accepts the optimizers it knows by type): ZeRO steps this optimizer over its own
    flat partitions of the same groups, and the filter applies there too."""
    step = optimizer.step
    optimizer.active_task = active

    def step_active(closure=None):
        groups = optimizer.param_groups
        optimizer.param_groups = [g for g in groups if g.get("task", optimizer.active_task) == optimizer.active_task]
        try:
            return step(closure) if optimizer.param_groups else None
        finally:
            optimizer.param_groups = groups

    optimizer.step = step_active
    return optimizer


class TaskSchedule:
    """training.lr_scheduler with warmup over training.warmup_ratio of a task's own steps, setting the lr of that
    task's parameter group only, and advanced only by that task's steps (transformers' schedules, run on a stand-in
    optimizer). Registered with accelerate for checkpointing (state_dict / load_state_dict)."""

    def __init__(self, optimizer, task: str, training, total_steps: int):
        from transformers import get_scheduler

        self.optimizer, self.task = optimizer, task
        stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=training.lr)
        warmup = int(training.warmup_ratio * total_steps)
        self.schedule = get_scheduler(training.lr_scheduler, stand_in, warmup, total_steps)
        self.group["lr"] = self.get_last_lr()[0]

    @property
    def group(self) -> dict:
        """The task's parameter group, looked up each time: loading an optimizer's state replaces its group dicts."""
        return next(g for g in self.optimizer.param_groups if g.get("task") == self.task)

    def get_last_lr(self) -> list[float]:
        return self.schedule.get_last_lr()

    def step(self) -> None:
        with warnings.catch_warnings():  # the stand-in optimizer never steps, on purpose
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"), UserWarning)
            self.schedule.step()
        self.group["lr"] = self.get_last_lr()[0]

    def set_base_lr(self, lr: float) -> None:
        """training.resume=force with another lr: the schedule continues from the new one."""
        self.schedule.base_lrs = [lr]
        self.group["lr"] = self.get_last_lr()[0]

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)
        self.group["lr"] = self.get_last_lr()[0]


class WindowStream:
    """Endless stream of gradient-accumulation windows (lists of micro batches), epoch after epoch."""

    def __init__(self, accelerator, train_loader, accumulation: int, sampler_generator, length_sampler, start=None):
        self.accelerator, self.train_loader, self.accumulation = accelerator, train_loader, accumulation
        self.sampler_generator = sampler_generator  # a shuffled DataLoader: its order comes from this generator
        self.length_sampler = length_sampler  # grouped or packed batches: accelerate's set_epoch does not reach it
        self.start = start or (0, 0, None)  # a checkpoint's epoch, micro batches done in it, the epoch's generator
        self.position: tuple[int, int] = (self.start[0], self.start[1])
        self.epoch_generator_state: str | None = None

    def __iter__(self) -> Iterator[Window]:
        epoch, skip, generator_state = self.start
        while True:
            self._start_epoch(epoch, generator_state)
            done, window = skip, []
            for batch in self._batches(skip):
                window.append(batch)
                done += 1
                if len(window) == self.accumulation:
                    self.position = (epoch, done)
                    yield window
                    window = []
            if window:  # the epoch's last, partial window is a step of its own, never dropped
                self.position = (epoch, done)
                yield window
            elif done == 0:
                raise DataError("task.data: an epoch produced no micro batch; allowed: more training examples")
            epoch, skip, generator_state = epoch + 1, 0, None

    def _batches(self, skip: int) -> Iterator:
        """The epoch's micro batches after the first `skip`. An uninterrupted run set up this epoch's iterator before
        its checkpoint saved the RNG; a resumed run sets it up after restoring it, and the set-up draws from torch's
        generator (a DataLoader without its own generator takes its base seed there, at the first batch). That draw
        must not move the RNG, or every dropout mask after a resume differs from the uninterrupted run's."""
        if not skip:
            yield from self.train_loader
            return
        batches = iter(self.accelerator.skip_first_batches(self.train_loader, skip))
        with torch.random.fork_rng(devices=[]):  # the DataLoader draws on the CPU generator
            first = next(batches, None)
        if first is not None:
            yield first
            yield from batches

    def _start_epoch(self, epoch: int, generator_state: str | None) -> None:
        """The epoch's order: the samplers' epoch, and the shuffling generator as the checkpoint left it."""
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        if self.length_sampler is not None:
            self.length_sampler.set_epoch(epoch)
        if self.sampler_generator is not None:
            if generator_state is not None:
                self.sampler_generator.set_state(decode_generator_state(generator_state))
            self.epoch_generator_state = encode_generator_state(self.sampler_generator)


@contextmanager
def accumulation_step(accelerator, model, sync: bool):
    """One micro batch of an accumulation window: gradients are reduced across ranks (and DeepSpeed steps) only on
    the window's last one. The window's length is ours to say: accelerate's own counter would take an epoch's
    last, shorter window for a full one, or step on every micro batch at the end of the dataloader."""
    accelerator.sync_gradients = sync
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        yield


def backward_window(
    accelerator, model, window: Window, window_tokens: float, loss: CompletionLoss
) -> tuple[float, bool]:
    """Backward through each micro batch; returns this process's loss sum and whether a loss was NaN/inf on any rank.

    `loss` is the run's summed completion-only loss (from logits, or Liger's fused one). A NaN/inf micro batch
    backpropagates zero instead (every rank still runs its collectives); DeepSpeed steps inside backward, so there
    only that micro batch's gradient is dropped.
    """
    # accelerate divides by the accumulation steps and DDP averages over ranks: undo both so the
    # gradient is that of (sum of token losses) / (tokens in the global window), whatever the window's length.
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / max(window_tokens, 1.0)
    loss_sum, skipped = 0.0, False
    for index, batch in enumerate(window):
        with accumulation_step(accelerator, model, sync=index == len(window) - 1):
            batch_loss_sum = loss(model, batch)
            if global_sum(accelerator, not math.isfinite(batch_loss_sum.item())) > 0:
                skipped, batch_loss_sum = True, zero_loss(model)
            accelerator.backward(batch_loss_sum * scale)
            loss_sum += batch_loss_sum.item()
    return loss_sum, skipped


def zero_loss(model) -> torch.Tensor:
    """A zero loss that reaches every trainable parameter, so DDP's and DeepSpeed's gradient hooks still fire."""
    return sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad)


def clip_gradients(accelerator, model, max_grad_norm: float):
    """The gradient norm before clipping to max_grad_norm (DeepSpeed clips in its own step and reports it)."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    if grad_norm is None and hasattr(model, "get_global_grad_norm"):
        grad_norm = model.get_global_grad_norm()
    return grad_norm


def step_optimizer(optimizer, schedule: TaskSchedule, skipped: bool) -> None:
    """The optimizer steps (the active task's group) unless the step is skipped; the task's schedule steps either
    way."""
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()


def stop_requested(accelerator) -> bool:
    """Whether SIGTERM reached any rank (a collective: every rank asks at the same point and gets one answer)."""
    return global_sum(accelerator, termination.requested()) > 0


def preempted(step: int, total_steps: int, checkpoint: Path) -> Preempted:
    """The stop after SIGTERM, once the checkpoint of `step` is saved."""
    return Preempted(
        f"SIGTERM: stopped at step {step} of {total_steps}, checkpoint {checkpoint}; rerun the same command to resume"
    )


def diverged(run_dir: Path, max_nonfinite_steps: int, nonfinite_steps: int, step: int) -> TrainingDiverged | None:
    """The stop once more than `max_nonfinite_steps` steps had a NaN/inf loss; None while within the limit."""
    if nonfinite_steps <= max_nonfinite_steps:
        return None
    last = next(iter(list_checkpoints(run_dir)), None)
    return TrainingDiverged(
        f"training.max_nonfinite_steps={max_nonfinite_steps}: the loss was NaN/inf at {nonfinite_steps} steps "
        f"(the last at step {step}); stopped. Last good checkpoint: {last or 'none'}; "
        "lower training.lr or check the data"
    )
