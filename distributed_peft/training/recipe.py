"""The fine-tuning recipe: task adapters on one base, with QLoRA or LoRA, on one or many processes.

    dpeft-train task=sql model=tiny-bloom peft=qlora training.max_steps=50 output_dir=runs/sql
    dpeft-train tasks=[sql,detox,instruct] output_dir=runs/three            # one base load, an adapter per task
    python -m distributed_peft.cli.train task=detox training=demo
    accelerate launch -m distributed_peft.cli.train task=sql                      # every process runs the same loop
    accelerate launch --multi_gpu --num_processes 4 -m distributed_peft.cli.train task=instruct model=llama-3.2-1b

The loop does not know the strategy: `accelerate launch` and the `distributed` group set it up. Nor how many tasks
it trains: each step is one task's window of micro batches through that task's adapter (training/task_runs.py).
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distributed_peft.config import to_yaml
from distributed_peft.errors import ConfigError
from distributed_peft.runtime import termination
from distributed_peft.runtime.atomic_files import atomic_write_text, remove_leftovers
from distributed_peft.training.loop import (
    TaskSchedule,
    Window,
    WindowStream,
    backward_window,
    build_optimizer,
    clip_gradients,
    count_steps,
    diverged,
    preempted,
    seed_step,
    step_optimizer,
    stop_requested,
)
from distributed_peft.training.run_report import adapter_metadata, write_run_report
from distributed_peft.training.task_runs import TaskRun, step_order, task_states


class FinetuneRecipe:
    """setup() -> train() -> save() -> cleanup(), like torchtune's recipes."""

    def __init__(self, cfg: DictConfig):
        from distributed_peft.config import task_configs

        self.cfg = cfg  # the job's config; each task's own is its TaskRun's
        self.run_dir = Path(cfg.output_dir)
        self.start_step, self.nonfinite_steps = 0, 0
        self.tokens_seen = self.inputs_seen = self.seconds_before = 0.0
        if cfg.tasks:
            self.runs = [TaskRun(name, c, Path(c.output_dir)) for name, c in task_configs(cfg).items()]
        else:
            self.runs = [TaskRun("default", cfg, self.run_dir)]
        self.claim = None
        self.resume_changes: list[str] = []
        self.step_done = 0
        self.forced_resumes: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Each part in the order that lets a user's mistake surface before the slow parts load."""
        from accelerate.utils import set_seed

        from distributed_peft.runtime.tracking import quiet_library_progress

        quiet_library_progress()
        self._setup_distributed()
        set_seed(self.cfg.training.seed)
        self._setup_base()
        self._setup_data()
        model = self._setup_model()
        self._setup_optimizer(model)
        self._setup_checkpoints()
        self._setup_tracking()

    def _setup_distributed(self) -> None:
        """The Accelerator, this run's claim on output_dir, and the checkpoint it resumes (if any)."""
        from distributed_peft.config import EIGHT_BIT_OPTIMIZERS
        from distributed_peft.runtime.distributed import build_accelerator, check_launch_matches
        from distributed_peft.runtime.output_dirs import claim_on_main_process
        from distributed_peft.training.checkpoints import resolve_resume, run_fingerprint

        cfg, training = self.cfg, self.cfg.training
        if training.optimizer in EIGHT_BIT_OPTIMIZERS and not torch.cuda.is_available():
            raise ConfigError(f"training.optimizer={training.optimizer!r} needs CUDA; allowed here: adamw_torch")
        self.accelerator = build_accelerator(cfg)
        self.strategy = check_launch_matches(cfg, self.accelerator)
        self.claim = claim_on_main_process(self.accelerator, self.run_dir)  # before output_dir is read or written
        self.resume_from = resolve_resume(cfg, say=self.print)  # a bad resume path fails before any model loads
        self.fingerprint = self._job_fingerprint(run_fingerprint)
        self._check_same_run()

    def _job_fingerprint(self, run_fingerprint) -> dict[str, Any]:
        """What makes a checkpoint this job's: the run fingerprint of each task (by task in a multi-task job)."""
        world, strategy = self.accelerator.num_processes, self.strategy
        if not self.cfg.tasks:
            return run_fingerprint(self.cfg, world, strategy)
        fingerprint: dict[str, Any] = {
            "tasks": list(self.cfg.tasks),
            "training.interleave": self.cfg.training.interleave,
        }
        for run in self.runs:
            fingerprint.update({f"{run.name}:{k}": v for k, v in run_fingerprint(run.cfg, world, strategy).items()})
        return fingerprint

    def _check_same_run(self) -> None:
        """A checkpoint made with other settings belongs to another run: refused, unless training.resume=force."""
        from distributed_peft.training.checkpoints import check_same_run, read_trainer_state

        if self.resume_from is not None:
            recorded = read_trainer_state(self.resume_from)["run"]
            force = str(self.cfg.training.resume) == "force"
            self.resume_changes = check_same_run(recorded, self.fingerprint, self.resume_from, force)

    def _setup_base(self) -> None:
        """The base's files (rank 0 builds an embedded one) and identity, checked against LoRA and the checkpoint."""
        from distributed_peft.modeling.loading import resolve_base

        with termination.phase("preparing the base model"), self.accelerator.main_process_first():
            self.base_path, self.base_identity = resolve_base(self.cfg.model)
        self.fingerprint["base.fingerprint"] = self.base_identity.fingerprint
        if not self.cfg.model.embedded:  # an embedded base's width is in its config, checked already
            self._check_lora_rank()
        self._check_same_run()  # the same settings on another base is another run too
        if self.resume_changes:
            self.print(f"resume: training.resume=force: continuing although {'; '.join(self.resume_changes)}")

    def _check_lora_rank(self) -> None:
        """peft.r must not exceed the width the base's config.json declares (read before any weight loads)."""
        from transformers import AutoConfig

        from distributed_peft.config import check_lora_rank

        model_config = AutoConfig.from_pretrained(self.base_path, trust_remote_code=self.cfg.model.trust_remote_code)
        width = getattr(model_config, "hidden_size", None)
        if isinstance(width, int):
            check_lora_rank(self.cfg, width)

    def _setup_data(self) -> None:
        """The tokenizer and each task's tokenized splits: data problems surface before the model loads."""
        from distributed_peft.data.task_data import prepare_task_data
        from distributed_peft.modeling.loading import load_tokenizer

        self.tokenizer = load_tokenizer(self.base_path)
        for run in self.runs:
            with termination.phase("loading and tokenizing the data"):
                self.print(f"data: loading task {run.cfg.task.name} ...")
                run.data = prepare_task_data(run.cfg, self.tokenizer)
            self.print(run.data.stats.summary())

    def _setup_model(self) -> torch.nn.Module:
        """The base, quantized for QLoRA, with the LoRA adapter attached: only the adapter trains."""
        from distributed_peft.config import SHARDED_PARAMETER_STRATEGIES
        from distributed_peft.modeling.loading import apply_liger_kernel, attach_lora, load_base_model
        from distributed_peft.modeling.objective import CompletionLoss

        cfg, training = self.cfg, self.cfg.training
        sharded = self.strategy in SHARDED_PARAMETER_STRATEGIES
        base = load_base_model(cfg, self.base_path, device=self.accelerator.device, sharded_parameters=sharded)
        fused_loss = training.liger_kernel and apply_liger_kernel(base)
        adapters = [(run.name, run.cfg.training.seed) for run in self.runs]  # each adapter starts as it would alone
        model = attach_lora(base, cfg, gradient_checkpointing=training.gradient_checkpointing, adapters=adapters)
        self.loss = CompletionLoss(model, fused=fused_loss)  # Liger's fused cross-entropy when its kernels are on
        self.trainable_params, total = model.get_nb_trainable_parameters()
        adapters_said = f" in {len(self.runs)} adapters" if len(self.runs) > 1 else ""
        self.print(
            f"model: {cfg.model.name} ({cfg.peft.method}), {self.trainable_params:,} trainable{adapters_said} of "
            f"{total:,} parameters"
        )
        return model

    def _setup_optimizer(self, model: torch.nn.Module) -> None:
        """Optimizer, data loaders and model through accelerate's prepare (together: DeepSpeed needs them so), then
        each task's number of optimizer steps and learning-rate schedule, and the order the job's steps take."""
        training, accelerator = self.cfg.training, self.accelerator
        loaders = [loader for run in self.runs for loader in self._dataloaders(run)]
        groups = [(run.name, self._adapter_parameters(model, run.name), run.cfg.training) for run in self.runs]
        self.task_optimizer = build_optimizer(groups, training)  # steps the active task's group alone
        self.model, self.optimizer, *loaders = accelerator.prepare(model, self.task_optimizer, *loaders)
        for run, train_loader, eval_loader in zip(self.runs, loaders[::2], loaders[1::2], strict=True):
            run.train_loader, run.eval_loader = train_loader, eval_loader
            run.total_steps = count_steps(len(train_loader), run.cfg.training)
            run.schedule = TaskSchedule(self.task_optimizer, run.name, run.cfg.training, run.total_steps)
        self.order = step_order({run.name: run.total_steps for run in self.runs}, training.interleave)
        self.total_steps = len(self.order)
        self.effective_batch = (
            training.micro_batch_size * training.gradient_accumulation_steps * accelerator.num_processes
        )
        micro = (f"micro batch of up to {training.tokens_per_batch} tokens" if training.tokens_per_batch
                 else f"micro batch {training.micro_batch_size}")  # fmt: skip
        steps = f"{self.total_steps} optimizer steps"
        if self.cfg.tasks:
            each = ", ".join(f"{run.name} {run.total_steps}" for run in self.runs)
            steps += f" ({each}; {training.interleave})"
        self.print(
            f"effective batch {self.effective_batch} = {micro} x gradient accumulation "
            f"{training.gradient_accumulation_steps} x world size {accelerator.num_processes}; "
            f"{steps}; strategy {self.strategy}; packing {training.packing}"
        )

    def _adapter_parameters(self, model: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
        """The trainable parameters of adapter `name` (all of them in a one-task run)."""
        if len(self.runs) == 1:
            return [p for p in model.parameters() if p.requires_grad]
        return [p for n, p in model.named_parameters() if p.requires_grad and f".{name}." in f"{n}."]

    def _dataloaders(self, run: TaskRun) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
        """Training batches as `training.packing` says, in an order a checkpoint can restore; padded eval batches."""
        from distributed_peft.data import batching
        from distributed_peft.data.task_data import collate_padded

        train_loader = batching.train_loader(run.data.train, run.cfg, self.tokenizer)
        run.sampler_generator = getattr(train_loader.sampler, "generator", None)  # plain shuffled batches
        # accelerate's set_epoch does not reach a batch sampler wrapped in its BatchSamplerShard: keep a handle
        run.length_sampler = train_loader.batch_sampler if hasattr(train_loader.batch_sampler, "set_epoch") else None
        eval_loader = torch.utils.data.DataLoader(
            run.data.eval,
            batch_size=self.cfg.training.eval_batch_size,
            collate_fn=lambda batch: collate_padded(batch, self.tokenizer),
        )
        return train_loader, eval_loader

    def _setup_checkpoints(self) -> None:
        """Periodic checkpoints; the resume, or a fresh start that clears an earlier run's checkpoints."""
        from distributed_peft.training.checkpoints import Checkpointer, check_disk_space

        cfg = self.cfg
        check_disk_space(self.run_dir, self.trainable_params, cfg.training.keep_checkpoints)
        self.checkpoints = Checkpointer(self.accelerator, self.run_dir, cfg.training.keep_checkpoints)
        for run in self.runs:
            self.accelerator.register_for_checkpointing(run.schedule)
        if self.resume_from is not None:
            self._resume()
            return
        removed = self.checkpoints.remove_all() if str(cfg.training.resume) != "auto" else 0
        if removed:
            self.print(f"training.resume={cfg.training.resume}: removed {removed} checkpoint(s) of an earlier run")

    def _resume(self) -> None:
        """Weights, optimizer, scheduler and RNG from the checkpoint; the counters and data position it recorded."""
        from distributed_peft.training.checkpoints import read_trainer_state

        recorded = read_trainer_state(self.resume_from)
        step = recorded["step"]
        if step > self.total_steps or any(
            state["step"] > run.total_steps
            for run, state in zip(self.runs, task_states(recorded, [r.name for r in self.runs]).values(), strict=False)
        ):
            raise ConfigError(
                f"training.resume: checkpoint {self.resume_from} is at step {step}, past this run's "
                f"{self.total_steps} optimizer steps; allowed: training.resume=false to start over, or more steps"
            )
        state = self.checkpoints.load(self.resume_from)
        self.forced_resumes = [*state.get("forced_resumes", [])]
        if self.resume_changes:  # forced: the optimizer's and schedule's saved settings yield to this run's
            self.forced_resumes.append({"checkpoint": str(self.resume_from), "changed": self.resume_changes})
            self._apply_optimizer_settings()
        self.start_step, self.nonfinite_steps = state["step"], state["nonfinite_steps"]
        self.tokens_seen, self.inputs_seen = state["tokens_seen"], state["input_tokens_seen"]
        self.seconds_before = state["seconds"]
        tasks = task_states(state, [run.name for run in self.runs])
        for run in self.runs:
            run.restore(tasks[run.name])
        where = "; ".join(
            f"{run.name + ': ' if self.cfg.tasks else ''}epoch {tasks[run.name]['epoch']}, "
            f"{tasks[run.name]['micro_batches_done']} micro batches into it"
            for run in self.runs
        )
        self.print(
            f"resume: continuing from {self.resume_from} (step {self.start_step} of {self.total_steps}, {where})"
        )

    def _apply_optimizer_settings(self) -> None:
        """Learning rate and weight decay from each task's config (a loaded checkpoint restores its own)."""
        for run in self.runs:
            run.schedule.group["weight_decay"] = run.cfg.training.weight_decay
            run.schedule.set_base_lr(run.cfg.training.lr)

    def _setup_tracking(self) -> None:
        """The run's first files, now that settings, data and model are known to be usable; the metrics log and the
        throughput meter (model FLOPs of this architecture, the device's peak)."""
        from distributed_peft.config import lora_targets
        from distributed_peft.modeling.loading import compute_dtype
        from distributed_peft.runtime.tracking import RunLog
        from distributed_peft.training.throughput import matmul_precision, throughput_meter

        if self.accelerator.is_main_process:
            remove_leftovers(self.run_dir)
            atomic_write_text(self.run_dir / "config.yaml", to_yaml(self.cfg))
            for run in self.runs:
                run.run_dir.mkdir(parents=True, exist_ok=True)
                remove_leftovers(run.run_dir)
                atomic_write_text(run.run_dir / "config.yaml", to_yaml(run.cfg))  # as if trained alone
                atomic_write_text(run.run_dir / "split.json", run.data.stats.to_json())
        for run in self.runs:
            main = self.accelerator.is_main_process
            run.log = RunLog(run.cfg, run.run_dir, main, resume_step=run.start_step or None)
        accelerator = self.accelerator
        precision = matmul_precision(compute_dtype(self.cfg), accelerator.mixed_precision)
        model_config = accelerator.unwrap_model(self.model).config
        self.meter = throughput_meter(
            model_config, lora_targets(self.cfg), self.cfg.peft.r, accelerator.device, precision,
            accelerator.num_processes,
        )  # fmt: skip

    def abandon(self) -> None:
        """After a failed setup: release the lock and remove only what this run created in output_dir."""
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def print(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------------ train
    def train(self) -> None:
        """Steps start_step+1 .. total_steps; checkpoints every N steps; SIGTERM saves one and stops (Preempted)."""
        self.model.train()
        self.progress = self._progress_bar()
        self.clock = (time.perf_counter(), self.tokens_seen, self.inputs_seen)  # this process's rates start here
        self.flops_done, self.last_rates = 0.0, {}  # model FLOPs of every rank since the clock started
        self.step_done = self.start_step
        windows = {run.name: self._windows(run) for run in self.runs}
        runs = {run.name: run for run in self.runs}
        with termination.deferred(), termination.phase("training"):
            for step in range(self.start_step + 1, self.total_steps + 1):
                run = runs[self.order[step - 1]]
                self._activate(run)
                seed_step(run.cfg.training.seed, run.step_done + 1)
                window = next(windows[run.name])
                metrics = self.train_step(window, run)
                self.step_done, run.step_done = step, run.step_done + 1
                elapsed = self._count_throughput(metrics, window, run)
                skipped = metrics["train/skipped_nonfinite"] > 0
                self.nonfinite_steps += int(skipped)
                run.nonfinite_steps += int(skipped)
                metrics.update(self._evaluate_if_due(run))
                self._log_step(run, metrics, skipped)
                self._stop_if_diverged(step)
                self._show_progress(run, metrics)
                self._checkpoint_or_stop(step, skipped, elapsed)
        self.progress.close()
        self.train_tokens = self.tokens_seen
        self.train_seconds = self.seconds_before + time.perf_counter() - self.clock[0]
        self.throughput = self._throughput_summary()

    def _activate(self, run: TaskRun) -> None:
        """The forward goes through this task's adapter; the optimizer steps its group alone."""
        from distributed_peft.modeling.loading import activate_adapter

        if len(self.runs) > 1:
            sharded = self.accelerator.distributed_type.name in ("DEEPSPEED", "FSDP")  # every hook fires each step
            activate_adapter(self.accelerator.unwrap_model(self.model), run.name, others_at_zero=sharded)
            self.task_optimizer.active_task = run.name

    def _windows(self, run: TaskRun | None = None) -> Iterator[Window]:
        """A task's (the first's) training windows, from where a resumed checkpoint stopped; the next checkpoint
        records their position."""
        run = run or self.runs[0]
        accumulation = self.cfg.training.gradient_accumulation_steps
        run.windows = WindowStream(
            self.accelerator,
            run.train_loader,
            accumulation,
            run.sampler_generator,
            run.length_sampler,
            start=run.resume_position,
        )
        return iter(run.windows)

    def train_step(self, window: Window, run: TaskRun | None = None) -> dict[str, float]:
        """One optimizer step over a window of micro batches, loss weighted by tokens across the window and ranks.

        A micro batch whose loss is NaN/inf on any rank backpropagates zero instead (every rank still runs its
        collectives) and the optimizer step is skipped; DeepSpeed steps inside backward, so there only that micro
        batch's gradient is dropped.
        """
        from distributed_peft.data.batching import real_tokens
        from distributed_peft.modeling.objective import count_label_tokens
        from distributed_peft.runtime.distributed import global_sum

        accelerator, model = self.accelerator, self.model
        window_tokens = global_sum(accelerator, sum(count_label_tokens(b["labels"]) for b in window))
        loss_sum, skipped = backward_window(accelerator, model, window, window_tokens, self.loss)
        grad_norm = None if skipped else clip_gradients(accelerator, model, self.cfg.training.max_grad_norm)
        overflow = grad_norm is not None and not math.isfinite(float(grad_norm))
        skipped = skipped or (overflow and accelerator.scaler is None)  # fp16's scaler skips it and lowers its scale
        run = run or self.runs[0]
        step_optimizer(self.optimizer, run.schedule, skipped)
        processed = global_sum(accelerator, sum(b["input_ids"].numel() for b in window))
        real = global_sum(accelerator, sum(real_tokens(b) for b in window))
        return {
            "train/loss": float("nan") if skipped else global_sum(accelerator, loss_sum) / max(window_tokens, 1.0),
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/lr": run.schedule.get_last_lr()[0],
            "train/tokens": window_tokens,
            "train/input_tokens": real,
            "train/padding_waste": 1.0 - real / processed,
            "train/skipped_nonfinite": float(skipped),
        }

    def evaluate(self, run: TaskRun | None = None) -> dict[str, float]:
        """Eval loss and token accuracy of a task's adapter as it trains (the active one); empty when SIGTERM stopped
        the evaluation."""
        from distributed_peft.evaluation.evaluator import evaluate_loss

        run = run or self.runs[0]
        # SIGTERM during an evaluation between steps: every rank leaves it at the same batch
        result = evaluate_loss(
            self.model, run.eval_loader, self.accelerator, stop=lambda: stop_requested(self.accelerator)
        )
        if result.get("stopped"):
            return {}
        return {"eval/loss": result["loss"], "eval/token_accuracy": result["token_accuracy"]}

    def _evaluate_if_due(self, run: TaskRun) -> dict[str, float]:
        """Every training.eval_steps of the task's steps, but not at its last: save() evaluates the final adapter."""
        every, step = run.cfg.training.eval_steps, run.step_done
        if not every or step % every != 0 or step >= run.total_steps:
            return {}
        with termination.phase("evaluating"):
            return self.evaluate(run)

    def _count_throughput(self, metrics: dict[str, float], window: Window, run: TaskRun) -> float:
        """Count the step's tokens and model FLOPs and add the rates since train() started (a resumed run's earlier
        part excluded), MFU where the device's peak is known, and the peak memory to the step's metrics; returns the
        seconds since train() started."""
        from distributed_peft.runtime.distributed import global_sum

        self.tokens_seen += metrics["train/tokens"]
        self.inputs_seen += metrics["train/input_tokens"]
        run.tokens_seen += metrics["train/tokens"]
        run.inputs_seen += metrics["train/input_tokens"]
        if self.meter.flops is not None:
            self.flops_done += global_sum(self.accelerator, self.meter.flops.of_batches(window))
        started, tokens_at_start, inputs_at_start = self.clock
        elapsed = time.perf_counter() - started
        metrics["train/tokens_per_s"] = (self.tokens_seen - tokens_at_start) / elapsed
        metrics["train/input_tokens_per_s"] = (self.inputs_seen - inputs_at_start) / elapsed
        metrics["train/tokens_per_s_per_worker"] = metrics["train/tokens_per_s"] / self.accelerator.num_processes
        metrics.update(self.meter.step_metrics(self.flops_done, elapsed))
        self.last_rates = metrics
        return elapsed

    def _throughput_summary(self) -> dict[str, Any]:
        """The last step's rates and MFU, and the highest peak memory of any rank (every rank takes part)."""
        from distributed_peft.training.throughput import peak_memory_mib, throughput_summary

        mine = torch.tensor([peak_memory_mib(self.accelerator.device)[0]], device=self.accelerator.device)
        peak = float(self.accelerator.gather(mine).max()) if self.accelerator.num_processes > 1 else float(mine)
        return throughput_summary(self.meter, self.last_rates, peak)

    def _log_step(self, run: TaskRun, metrics: dict[str, float], skipped: bool) -> None:
        """Into the task's metrics log, at its own step: every logging.log_every_steps steps, and every step that
        evaluated, was skipped, or is its last."""
        step = run.step_done
        due = step % self.cfg.logging.log_every_steps == 0
        if due or "eval/loss" in metrics or step == run.total_steps or skipped:
            run.log.log(metrics, step)

    def _stop_if_diverged(self, step: int) -> None:
        stop = diverged(self.run_dir, self.cfg.training.max_nonfinite_steps, self.nonfinite_steps, step)
        if stop is not None:
            raise stop

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.total_steps,
            initial=self.start_step,
            desc=f"train {'+'.join(self.cfg.tasks) if self.cfg.tasks else self.cfg.task.name}",
            unit="step",
            disable=not (self.accelerator.is_main_process and self.cfg.logging.progress_bar),
            mininterval=0.5 if sys.stderr.isatty() else 10.0,
        )

    def _show_progress(self, run: TaskRun, metrics: dict[str, float]) -> None:
        shown = {"task": run.name} if self.cfg.tasks else {}
        shown.update({"loss": f"{metrics['train/loss']:.3f}", "tok_s": f"{metrics['train/tokens_per_s']:,.0f}",
                      "pad": f"{metrics['train/padding_waste']:.0%}"})  # fmt: skip
        if "train/mfu" in metrics:
            shown["mfu"] = f"{metrics['train/mfu']:.1%}"
        self.progress.set_postfix(shown)
        self.progress.update(1)

    def _checkpoint_or_stop(self, step: int, skipped: bool, elapsed: float) -> None:
        """A periodic checkpoint (never of a skipped step); after SIGTERM on any rank, a checkpoint and Preempted."""
        stop = stop_requested(self.accelerator)  # every rank stops at the same step
        every = self.cfg.training.checkpoint_every
        if (every and step % every == 0 and not skipped) or stop:
            saved = self.save_checkpoint(step, elapsed, reason="sigterm" if stop else "periodic")
        if stop:
            self.progress.close()
            raise preempted(step, self.total_steps, saved)

    def save_checkpoint(self, step: int, elapsed: float, reason: str) -> Path:
        state = {
            "reason": reason,
            "tasks": {run.name: run.state() for run in self.runs},
            "tokens_seen": self.tokens_seen,
            "input_tokens_seen": self.inputs_seen,
            "seconds": self.seconds_before + elapsed,
            "nonfinite_steps": self.nonfinite_steps,
            "run": self.fingerprint,
            "forced_resumes": self.forced_resumes,
        }
        with termination.deferred(), termination.phase("saving a checkpoint"):
            return self.checkpoints.save(step, state)

    # ------------------------------------------------------------------------------------------------ save
    def save(self) -> dict[str, Any]:
        """Every adapter first (nothing after training may lose one), then each task's base-vs-adapter evaluation,
        reports, loss curve and model card in its run directory. Returns the evaluation (a multi-task job's: by
        task)."""
        from distributed_peft.adapters.storage import save_adapter

        adapters = {}
        for run in self.runs:
            metadata = adapter_metadata(run.cfg, self.base_identity, self._run_summary(run))
            with termination.deferred(), termination.phase("saving the adapter"):
                adapter_dir = save_adapter(
                    self.accelerator, self.model, self.tokenizer, run.run_dir / "adapter", metadata, run.name
                )
            adapters[run.name] = adapter_dir, metadata
            self.print(f"adapter: {adapter_dir} ({metadata['run']['optimizer_steps']} optimizer steps)")
        termination.raise_if_requested()
        results = {run.name: self._report(run, *adapters[run.name]) for run in self.runs}
        if not self.cfg.tasks:
            return results[self.runs[0].name]
        if self.accelerator.is_main_process:
            self._write_tasks_summary(results)
        return results

    def _write_tasks_summary(self, results: dict[str, Any]) -> None:
        """<output_dir>/tasks.md: every task of the job in one table, printed too."""
        from distributed_peft.adapters.metric_table import tasks_table

        table = tasks_table(results, {run.name: run.step_done for run in self.runs})
        title = f"# {len(self.runs)} task adapters on {self.cfg.model.name}, one job"
        atomic_write_text(self.run_dir / "tasks.md", f"{title}\n\n{table}\n")
        self.print(f"{table}\nsummary: {self.run_dir / 'tasks.md'}")

    def _report(self, run: TaskRun, adapter_dir: Path, metadata: dict[str, Any]) -> dict[str, Any]:
        """A task's final evaluation, logged and written into its run directory."""
        self._activate(run)
        results = self._evaluate_final(run, adapter_dir)
        adapter, base = results["adapter"], results["base"]
        final = {
            "eval/loss": adapter["loss"],
            "eval/token_accuracy": adapter["token_accuracy"],
            "eval/base_loss": base["loss"],
        }
        run.log.log(final, run.step_done)
        if self.accelerator.is_main_process:
            write_run_report(run.cfg, run.run_dir, adapter_dir, metadata, results)
        return results

    def _evaluate_final(self, run: TaskRun, adapter_dir: Path) -> dict[str, Any]:
        """Base and adapter on the eval split; if it fails, the line that says the adapter is saved all the same."""
        from distributed_peft.evaluation.evaluator import evaluate_base_and_adapter

        try:
            with termination.phase("evaluating the adapter against the base"):
                return evaluate_base_and_adapter(
                    self.model, run.eval_loader, self.accelerator, run.cfg, self.tokenizer, run.data.eval
                )
        except BaseException:
            self.print(
                f"note: the adapter is saved in {adapter_dir}; evaluate it with dpeft-eval adapter={adapter_dir}"
            )
            raise

    def _run_summary(self, task: TaskRun) -> dict[str, Any]:
        """A task's true counts for its adapter's record: steps taken (resumed ones included), tokens, time (a
        multi-task job's: the job's time and throughput, and the job it was part of)."""
        from distributed_peft.runtime.redaction import redact

        run = {
            "optimizer_steps": task.step_done,
            "planned_steps": task.total_steps,
            "effective_batch": self.effective_batch,
            "world_size": self.accelerator.num_processes,
            "train_tokens": int(task.tokens_seen),
            "resumed_from_step": task.start_step,
            "skipped_nonfinite_steps": task.nonfinite_steps,
            "seconds": self.train_seconds,
            "throughput": self.throughput,
            "data": task.data.stats.summary().removeprefix("data: "),
            "command": redact(shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])),
        }
        if self.cfg.tasks:
            run["job"] = {"tasks": list(self.cfg.tasks), "interleave": self.cfg.training.interleave,
                          "output_dir": str(self.run_dir), "optimizer_steps": self.step_done}  # fmt: skip
        if self.forced_resumes:
            run["forced_resumes"] = self.forced_resumes  # training.resume=force over changed settings
        return run

    def cleanup(self) -> None:
        for run in self.runs:
            if run.log is not None:
                run.log.close()
        # every rank leaves together: a rank that destroys the process group while another is still finishing its
        # last collective aborts (gloo: "terminate called without an active exception")
        self.accelerator.wait_for_everyone()
        if self.claim is not None:
            self.claim.unlock()
        self.accelerator.end_training()  # destroys the process group so the launcher exits cleanly


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole recipe and return the final base-vs-adapter evaluation."""
    recipe = FinetuneRecipe(cfg)
    try:
        recipe.setup()
    except BaseException:
        recipe.abandon()  # nothing was trained: leave output_dir as it was
        raise
    try:
        recipe.train()
        return recipe.save()
    finally:
        recipe.cleanup()
