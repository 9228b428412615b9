"""The fine-tuning recipe: one task adapter on one base, with QLoRA or LoRA, on one or many processes.

    dpeft-train task=sql model=tiny-bloom peft=qlora training.max_steps=50 output_dir=runs/sql
    python -m distributed_peft.cli.train task=detox training=demo
    accelerate launch -m distributed_peft.cli.train task=sql                      # every process runs the same loop
    accelerate launch --multi_gpu --num_processes 4 -m distributed_peft.cli.train task=instruct model=llama-3.2-1b

The loop does not know the strategy: `accelerate launch` and the `distributed` group set it up.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from distributed_peft.config import lora_targets, to_yaml
from distributed_peft.errors import ConfigError, DataError, Preempted, TrainingDiverged
from distributed_peft.runtime import termination
from distributed_peft.runtime.atomic_files import atomic_write_text, remove_leftovers


class FinetuneRecipe:
    """setup() -> train() -> save() -> cleanup(), like torchtune's recipes."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.history: list[dict[str, Any]] = []
        self.start_step, self.nonfinite_steps = 0, 0
        self.tokens_seen = self.inputs_seen = self.seconds_before = 0.0
        self.epoch_generator_state: str | None = None
        self.claim = None
        self.resume_changes: list[str] = []
        self.step_done = 0
        self.forced_resumes: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate.utils import set_seed

        from distributed_peft.config import SHARDED_PARAMETER_STRATEGIES
        from distributed_peft.data import batching
        from distributed_peft.data.task_data import collate_padded, prepare_task_data
        from distributed_peft.modeling.loading import (
            apply_liger_kernel,
            attach_lora,
            load_base_model,
            load_tokenizer,
            resolve_base,
        )
        from distributed_peft.runtime.distributed import build_accelerator, check_launch_matches
        from distributed_peft.runtime.output_dirs import claim_on_main_process
        from distributed_peft.runtime.tracking import RunLog, quiet_library_progress
        from distributed_peft.training.checkpoints import (
            check_same_run,
            read_trainer_state,
            resolve_resume,
            run_fingerprint,
        )

        quiet_library_progress()
        cfg, training = self.cfg, self.cfg.training
        if training.optimizer in ("paged_adamw_8bit", "adamw_8bit") and not torch.cuda.is_available():
            raise ConfigError(f"training.optimizer={training.optimizer!r} needs CUDA; allowed here: adamw_torch")
        self.accelerator = accelerator = build_accelerator(cfg)
        self.strategy = check_launch_matches(cfg, accelerator)
        self.claim = claim_on_main_process(accelerator, self.run_dir)  # before output_dir is read or written
        self.resume_from = resolve_resume(cfg, say=self.print)  # a bad resume path fails before any model loads
        self.fingerprint = run_fingerprint(cfg, accelerator.num_processes, self.strategy)
        force = str(training.resume) == "force"
        if self.resume_from is not None:
            recorded = read_trainer_state(self.resume_from)
            self.resume_changes = check_same_run(recorded["run"], self.fingerprint, self.resume_from, force)
        set_seed(training.seed)
        with termination.phase("preparing the base model"), accelerator.main_process_first():
            self.base_path, self.base_identity = resolve_base(cfg.model)  # rank 0 builds an embedded base
        self.fingerprint["base.fingerprint"] = self.base_identity.fingerprint
        if not cfg.model.embedded:  # an embedded base's width is in its config, checked already
            self._check_lora_rank()
        if self.resume_from is not None:  # the same settings on another base is another run too
            self.resume_changes = check_same_run(recorded["run"], self.fingerprint, self.resume_from, force)
            if self.resume_changes:
                self.print(f"resume: training.resume=force: continuing although {'; '.join(self.resume_changes)}")
        self.tokenizer = load_tokenizer(self.base_path)
        with termination.phase("loading and tokenizing the data"):
            self.print(f"data: loading task {cfg.task.name} ...")
            self.data = prepare_task_data(cfg, self.tokenizer)  # data problems surface before the model loads
        self.print(self.data.stats.summary())

        base = load_base_model(
            cfg,
            self.base_path,
            device=accelerator.device,
            sharded_parameters=self.strategy in SHARDED_PARAMETER_STRATEGIES,
        )
        if training.liger_kernel:
            apply_liger_kernel(base)
        model = attach_lora(base, cfg, gradient_checkpointing=training.gradient_checkpointing)
        trainable, total = model.get_nb_trainable_parameters()
        self.print(f"model: {cfg.model.name} ({cfg.peft.method}), {trainable:,} trainable of {total:,} parameters")

        train_loader = batching.train_loader(self.data.train, cfg, self.tokenizer)
        self.sampler_generator = getattr(train_loader.sampler, "generator", None)  # plain shuffled batches
        # accelerate's set_epoch does not reach a batch sampler wrapped in its BatchSamplerShard: keep a handle
        self.length_sampler = train_loader.batch_sampler if hasattr(train_loader.batch_sampler, "set_epoch") else None
        eval_loader = torch.utils.data.DataLoader(
            self.data.eval,
            batch_size=training.eval_batch_size,
            collate_fn=lambda batch: collate_padded(batch, self.tokenizer),
        )
        optimizer = self._optimizer(model)
        self.model, self.optimizer, self.train_loader, self.eval_loader = accelerator.prepare(
            model, optimizer, train_loader, eval_loader
        )
        micro_steps_per_epoch = len(self.train_loader)
        if micro_steps_per_epoch == 0:
            raise DataError("task.data: no training micro batch on this process; allowed: more training examples")
        # the last window of an epoch may hold fewer micro batches than gradient_accumulation_steps: still a step
        steps_per_epoch = math.ceil(micro_steps_per_epoch / training.gradient_accumulation_steps)
        self.total_steps = (
            training.max_steps if training.max_steps > 0 else math.ceil(training.epochs * steps_per_epoch)
        )
        self.scheduler = self._scheduler(self.optimizer)
        self.effective_batch = (
            training.micro_batch_size * training.gradient_accumulation_steps * accelerator.num_processes
        )
        micro = (f"micro batch of up to {training.tokens_per_batch} tokens" if training.tokens_per_batch
                 else f"micro batch {training.micro_batch_size}")  # fmt: skip
        self.print(
            f"effective batch {self.effective_batch} = {micro} x gradient accumulation "
            f"{training.gradient_accumulation_steps} x world size {accelerator.num_processes}; "
            f"{self.total_steps} optimizer steps; strategy {self.strategy}; packing {training.packing}"
        )
        self._setup_checkpoints(trainable)
        if accelerator.is_main_process:  # the run's first files: settings, data and model are known to be usable
            remove_leftovers(self.run_dir)
            atomic_write_text(self.run_dir / "config.yaml", to_yaml(cfg))
            atomic_write_text(self.run_dir / "split.json", self.data.stats.to_json())
        self.log = RunLog(cfg, self.run_dir, accelerator.is_main_process, resume_step=self.start_step or None)

    def abandon(self) -> None:
        """After a failed setup: release the lock and remove only what this run created in output_dir."""
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def _setup_checkpoints(self, trainable_params: int) -> None:
        """Periodic checkpoints, and the resume: weights, optimizer, scheduler, RNG and the data position."""
        from distributed_peft.training.checkpoints import Checkpointer, check_disk_space, read_trainer_state

        cfg, accelerator = self.cfg, self.accelerator
        check_disk_space(self.run_dir, trainable_params, cfg.training.keep_checkpoints)
        self.checkpoints = Checkpointer(accelerator, self.run_dir, cfg.training.keep_checkpoints)
        accelerator.register_for_checkpointing(self.scheduler)
        if self.resume_from is None:
            removed = self.checkpoints.remove_all() if str(cfg.training.resume) != "auto" else 0
            if removed:
                self.print(f"training.resume={cfg.training.resume}: removed {removed} checkpoint(s) of an earlier run")
            return
        state = read_trainer_state(self.resume_from)
        if state["step"] > self.total_steps:
            raise ConfigError(
                f"training.resume: checkpoint {self.resume_from} is at step {state['step']}, past this run's "
                f"{self.total_steps} optimizer steps; allowed: training.resume=false to start over, or more steps"
            )
        state = self.checkpoints.load(self.resume_from)
        self.forced_resumes = [*state.get("forced_resumes", [])]
        if self.resume_changes:
            self.forced_resumes.append({"checkpoint": str(self.resume_from), "changed": self.resume_changes})
        if self.resume_changes:  # forced: the optimizer's and schedule's saved settings yield to this run's
            self._apply_optimizer_settings()
        self.start_step, self.nonfinite_steps = state["step"], state["nonfinite_steps"]
        self.tokens_seen, self.inputs_seen = state["tokens_seen"], state["input_tokens_seen"]
        self.seconds_before = state["seconds"]
        self.resume_position = (state["epoch"], state["micro_batches_done"], state["epoch_generator_state"])
        self.print(
            f"resume: continuing from {self.resume_from} (step {self.start_step} of {self.total_steps}, "
            f"epoch {state['epoch']}, {state['micro_batches_done']} micro batches into it)"
        )

    def _check_lora_rank(self) -> None:
        """peft.r must not exceed the width the base's config.json declares (read before any weight loads)."""
        from transformers import AutoConfig

        from distributed_peft.config import check_lora_rank

        model_config = AutoConfig.from_pretrained(self.base_path, trust_remote_code=self.cfg.model.trust_remote_code)
        width = getattr(model_config, "hidden_size", None)
        if isinstance(width, int):
            check_lora_rank(self.cfg, width)

    def _apply_optimizer_settings(self) -> None:
        """Learning rate and weight decay from this run's config (a loaded checkpoint restores its own)."""
        training = self.cfg.training
        for group in self.optimizer.param_groups:
            group.update(initial_lr=training.lr, lr=training.lr, weight_decay=training.weight_decay)
        self.scheduler.base_lrs = [training.lr for _ in self.scheduler.base_lrs]

    def _optimizer(self, model) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        training = self.cfg.training
        if training.optimizer == "adamw_torch":
            return torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if training.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=training.lr, weight_decay=training.weight_decay)

    def _scheduler(self, optimizer):
        from transformers import get_scheduler

        warmup = int(self.cfg.training.warmup_ratio * self.total_steps)
        return get_scheduler(self.cfg.training.lr_scheduler, optimizer, warmup, self.total_steps)

    def print(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------------ train
    def _windows(self):
        """Endless stream of gradient-accumulation windows (lists of micro batches), epoch after epoch.

        Starts where a resumed checkpoint stopped: the same epoch order, its first micro batches skipped.
        """
        from distributed_peft.training.checkpoints import decode_generator_state, encode_generator_state

        epoch, skip, generator_state = getattr(self, "resume_position", (0, 0, None))
        accumulation = self.cfg.training.gradient_accumulation_steps
        while True:
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(epoch)
            if self.length_sampler is not None:  # grouped or packed batches: the epoch's plan
                self.length_sampler.set_epoch(epoch)
            if self.sampler_generator is not None:  # a shuffled DataLoader: its order comes from this generator
                if generator_state is not None:
                    self.sampler_generator.set_state(decode_generator_state(generator_state))
                self.epoch_generator_state = encode_generator_state(self.sampler_generator)
            loader = self.accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
            done, window = skip, []
            for batch in loader:
                window.append(batch)
                done += 1
                if len(window) == accumulation:
                    self.position = (epoch, done)
                    yield window
                    window = []
            if window:  # the epoch's last, partial window is a step of its own, never dropped
                self.position = (epoch, done)
                yield window
            elif done == 0:
                raise DataError("task.data: an epoch produced no micro batch; allowed: more training examples")
            epoch, skip, generator_state = epoch + 1, 0, None

    def train_step(self, window: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over a window of micro batches, loss weighted by tokens across the window and ranks.

        A micro batch whose loss is NaN/inf on any rank backpropagates zero instead (every rank still runs its
        collectives) and the optimizer step is skipped; DeepSpeed steps inside backward, so there only that micro
        batch's gradient is dropped.
        """
        from distributed_peft.data.batching import model_inputs, real_tokens
        from distributed_peft.runtime.distributed import global_sum
        from distributed_peft.modeling.objective import count_label_tokens, loss_positions, token_stats

        accelerator, model = self.accelerator, self.model
        local_tokens = sum(count_label_tokens(b["labels"]) for b in window)
        window_tokens = global_sum(accelerator, local_tokens)
        # accelerate divides by the accumulation steps and DDP averages over ranks: undo both so the
        # gradient is that of (sum of token losses) / (tokens in the global window), whatever the window's length.
        scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / max(window_tokens, 1.0)
        loss_sum, skipped, grad_norm = 0.0, False, None
        for index, batch in enumerate(window):
            last = index == len(window) - 1
            with accumulation_step(accelerator, model, sync=last):
                keep = loss_positions(batch["labels"])  # no vocabulary projection for prompt positions
                logits = model(**model_inputs(batch), logits_to_keep=keep).logits
                batch_loss_sum = token_stats(logits, batch["labels"][:, keep + 1], accuracy=False)["loss_sum"].sum()
                finite = math.isfinite(batch_loss_sum.item())
                if global_sum(accelerator, not finite) > 0:
                    skipped = True
                    batch_loss_sum = self._zero_loss()
                accelerator.backward(batch_loss_sum * scale)
                loss_sum += batch_loss_sum.item()
        if not skipped:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), self.cfg.training.max_grad_norm)
            if grad_norm is None and hasattr(model, "get_global_grad_norm"):  # DeepSpeed clips in its step
                grad_norm = model.get_global_grad_norm()
            skipped = grad_norm is not None and not math.isfinite(float(grad_norm))
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step steps the schedule without the optimizer, on purpose
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()` before", UserWarning)
            self.scheduler.step()
        processed = global_sum(accelerator, sum(b["input_ids"].numel() for b in window))
        real = global_sum(accelerator, sum(real_tokens(b) for b in window))
        return {
            "train/loss": float("nan") if skipped else global_sum(accelerator, loss_sum) / max(window_tokens, 1.0),
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/tokens": window_tokens,
            "train/input_tokens": real,
            "train/padding_waste": 1.0 - real / processed,
            "train/skipped_nonfinite": float(skipped),
        }

    def _zero_loss(self) -> torch.Tensor:
        """A zero loss that reaches every trainable parameter, so DDP's and DeepSpeed's gradient hooks still fire."""
        return sum((p * 0.0).sum() for p in self.model.parameters() if p.requires_grad)

    def evaluate(self) -> dict[str, float]:
        from distributed_peft.evaluation.evaluator import evaluate_loss
        from distributed_peft.runtime.distributed import global_sum

        def stop() -> bool:  # SIGTERM during an evaluation between steps: every rank leaves it at the same batch
            return global_sum(self.accelerator, termination.requested()) > 0

        result = evaluate_loss(self.model, self.eval_loader, self.accelerator, stop=stop)
        if result.get("stopped"):
            return {}
        return {"eval/loss": result["loss"], "eval/token_accuracy": result["token_accuracy"]}

    def train(self) -> None:
        """Steps start_step+1 .. total_steps; checkpoints every N steps; SIGTERM saves one and stops (Preempted)."""
        from tqdm.auto import tqdm

        from distributed_peft.runtime.distributed import global_sum

        training, log_every = self.cfg.training, self.cfg.logging.log_every_steps
        self.model.train()
        show = self.accelerator.is_main_process and self.cfg.logging.progress_bar
        bar = tqdm(
            total=self.total_steps,
            initial=self.start_step,
            desc=f"train {self.cfg.task.name}",
            unit="step",
            disable=not show,
            mininterval=0.5 if sys.stderr.isatty() else 10.0,
        )
        start, tokens_at_start, inputs_at_start = time.perf_counter(), self.tokens_seen, self.inputs_seen
        self.step_done = self.start_step
        windows = self._windows()
        with termination.deferred(), termination.phase("training"):
            for step in range(self.start_step + 1, self.total_steps + 1):
                metrics = self.train_step(next(windows))
                self.step_done = step
                self.tokens_seen += metrics["train/tokens"]
                self.inputs_seen += metrics["train/input_tokens"]
                elapsed = time.perf_counter() - start  # this process's rate (a resumed run's earlier part excluded)
                metrics["train/tokens_per_s"] = (self.tokens_seen - tokens_at_start) / elapsed
                metrics["train/input_tokens_per_s"] = (self.inputs_seen - inputs_at_start) / elapsed
                metrics["train/tokens_per_s_per_worker"] = (
                    metrics["train/tokens_per_s"] / self.accelerator.num_processes
                )
                skipped = metrics["train/skipped_nonfinite"] > 0
                self.nonfinite_steps += int(skipped)
                if training.eval_steps and step % training.eval_steps == 0 and step < self.total_steps:
                    with termination.phase("evaluating"):
                        metrics.update(self.evaluate())
                if step % log_every == 0 or "eval/loss" in metrics or step == self.total_steps or skipped:
                    self.log.log(metrics, step)
                if self.nonfinite_steps > training.max_nonfinite_steps:
                    raise self._diverged(step)
                bar.set_postfix(
                    loss=f"{metrics['train/loss']:.3f}",
                    tok_s=f"{metrics['train/tokens_per_s']:,.0f}",
                    pad=f"{metrics['train/padding_waste']:.0%}",
                )
                bar.update(1)
                stop = global_sum(self.accelerator, termination.requested()) > 0  # every rank stops at the same step
                due = training.checkpoint_every and step % training.checkpoint_every == 0
                if (due and not skipped) or stop:
                    saved = self.save_checkpoint(step, elapsed, reason="sigterm" if stop else "periodic")
                if stop:
                    bar.close()
                    raise Preempted(
                        f"SIGTERM: stopped at step {step} of {self.total_steps}, checkpoint {saved}; "
                        "rerun the same command to resume"
                    )
        bar.close()
        self.train_tokens, self.train_seconds = self.tokens_seen, self.seconds_before + time.perf_counter() - start

    def _diverged(self, step: int) -> TrainingDiverged:
        from distributed_peft.training.checkpoints import list_checkpoints

        last = next(iter(list_checkpoints(self.run_dir)), None)
        return TrainingDiverged(
            f"training.max_nonfinite_steps={self.cfg.training.max_nonfinite_steps}: the loss was NaN/inf at "
            f"{self.nonfinite_steps} steps (the last at step {step}); stopped. Last good checkpoint: "
            f"{last or 'none'}; lower training.lr or check the data"
        )

    def save_checkpoint(self, step: int, elapsed: float, reason: str):
        epoch, done = self.position
        state = {
            "reason": reason,
            "epoch": epoch,
            "micro_batches_done": done,
            "epoch_generator_state": self.epoch_generator_state,
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
        """The adapter first (nothing after training may lose it), then the base-vs-adapter evaluation, reports,
        loss curve and model card."""
        from distributed_peft.adapters.model_cards import CARD, write_model_card
        from distributed_peft.adapters.storage import ADAPTER_METADATA, save_adapter
        from distributed_peft.evaluation.evaluator import evaluate_base_and_adapter
        from distributed_peft.evaluation.reports import plot_loss_curves, write_eval_reports
        from distributed_peft.runtime.redaction import redact

        cfg, accelerator = self.cfg, self.accelerator
        metadata = self._adapter_metadata()
        with termination.deferred(), termination.phase("saving the adapter"):
            adapter_dir = save_adapter(accelerator, self.model, self.tokenizer, self.run_dir / "adapter", metadata)
        self.print(f"adapter: {adapter_dir} ({metadata['run']['optimizer_steps']} optimizer steps)")
        termination.raise_if_requested()
        try:
            with termination.phase("evaluating the adapter against the base"):
                results = evaluate_base_and_adapter(
                    self.model, self.eval_loader, accelerator, cfg, self.tokenizer, self.data.eval
                )
        except BaseException:
            self.print(
                f"note: the adapter is saved in {adapter_dir}; evaluate it with dpeft-eval adapter={adapter_dir}"
            )
            raise
        self.log.log(
            {
                "eval/loss": results["adapter"]["loss"],
                "eval/token_accuracy": results["adapter"]["token_accuracy"],
                "eval/base_loss": results["base"]["loss"],
            },
            self.step_done,
        )
        metadata["eval"] = results
        if accelerator.is_main_process:
            atomic_write_text(adapter_dir / ADAPTER_METADATA, redact(json.dumps(metadata, indent=2, default=str)))
            title = f"{cfg.task.name} adapter on {cfg.model.name}"
            write_eval_reports(self.run_dir, results, title)
            plot_loss_curves(self.run_dir, title)
            card = write_model_card(adapter_dir / CARD, metadata, results)  # peft wrote one: its metadata is kept
            atomic_write_text(self.run_dir / CARD, str(card))
            self.print(f"eval loss: base {results['base']['loss']:.4f} -> adapter {results['adapter']['loss']:.4f}")
            self.print(f"report:  {self.run_dir / 'eval.md'}  (loss curve: loss.png)")
        return results

    def _adapter_metadata(self) -> dict[str, Any]:
        """What dpeft_adapter.json records: task, base identity, LoRA options, the run's true counts, config."""
        from distributed_peft.runtime.redaction import redact

        cfg = self.cfg
        run = {
            "optimizer_steps": self.step_done,  # steps actually taken, resumed ones included
            "planned_steps": self.total_steps,
            "effective_batch": self.effective_batch,
            "world_size": self.accelerator.num_processes,
            "train_tokens": int(self.train_tokens),
            "resumed_from_step": self.start_step,
            "skipped_nonfinite_steps": self.nonfinite_steps,
            "seconds": self.train_seconds,
            "data": self.data.stats.summary().removeprefix("data: "),
            "command": redact(shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])),
        }
        if self.forced_resumes:
            run["forced_resumes"] = self.forced_resumes  # training.resume=force over changed settings
        return {
            "task": cfg.task.name,
            "task_description": cfg.task.description,
            "base": self.base_identity.to_dict(),
            "peft": {
                "method": cfg.peft.method,
                "r": cfg.peft.r,
                "alpha": cfg.peft.alpha,
                "target_modules": lora_targets(cfg),
            },
            "run": run,
            "eval": None,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }

    def cleanup(self) -> None:
        self.log.close()
        # every rank leaves together: a rank that destroys the process group while another is still finishing its
        # last collective aborts (gloo: "terminate called without an active exception")
        self.accelerator.wait_for_everyone()
        if self.claim is not None:
            self.claim.unlock()
        self.accelerator.end_training()  # destroys the process group so the launcher exits cleanly


@contextmanager
def accumulation_step(accelerator, model, sync: bool):
    """One micro batch of an accumulation window: gradients are reduced across ranks (and DeepSpeed steps) only on
    the window's last one. The window's length is ours to say: accelerate's own counter would take an epoch's
    last, shorter window for a full one, or step on every micro batch at the end of the dataloader."""
    accelerator.sync_gradients = sync
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        yield


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
