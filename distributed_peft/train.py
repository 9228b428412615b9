"""The fine-tuning recipe: one task adapter on one base, with QLoRA or LoRA, on one or many processes.

    dpeft-train task=sql model=tiny-bloom peft=qlora training.max_steps=50 output_dir=runs/sql
    python -m distributed_peft.train task=detox training=demo
    accelerate launch -m distributed_peft.train task=sql                      # every process runs the same loop
    accelerate launch --multi_gpu --num_processes 4 -m distributed_peft.train task=instruct model=llama-3.2-1b

The loop does not know the strategy: `accelerate launch` and the `distributed` group set it up.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from distributed_peft.cli import hydra_app
from distributed_peft.config import lora_targets, to_yaml
from distributed_peft.errors import ConfigError


class FinetuneRecipe:
    """setup() -> train() -> save() -> cleanup(), like torchtune's recipes."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate.utils import set_seed

        from distributed_peft import batching
        from distributed_peft.config import SHARDED_PARAMETER_STRATEGIES
        from distributed_peft.data import collate_padded, prepare_task_data
        from distributed_peft.distributed import build_accelerator, check_launch_matches
        from distributed_peft.model import (
            apply_liger_kernel,
            attach_lora,
            load_base_model,
            load_tokenizer,
            resolve_base,
        )
        from distributed_peft.tracking import RunLog, quiet_library_progress

        quiet_library_progress()
        cfg, training = self.cfg, self.cfg.training
        if training.optimizer in ("paged_adamw_8bit", "adamw_8bit") and not torch.cuda.is_available():
            raise ConfigError(f"training.optimizer={training.optimizer!r} needs CUDA; allowed here: adamw_torch")
        self.accelerator = accelerator = build_accelerator(cfg)
        self.strategy = check_launch_matches(cfg, accelerator)
        set_seed(training.seed)
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        with accelerator.main_process_first():  # rank 0 builds the embedded base, the others find it cached
            self.base_path, self.base_identity = resolve_base(cfg.model)
        self.tokenizer = load_tokenizer(self.base_path)
        self.data = prepare_task_data(cfg, self.tokenizer)  # data problems surface before the model loads
        self.print(self.data.stats.summary())
        if accelerator.is_main_process:
            (self.run_dir / "split.json").write_text(self.data.stats.to_json())

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

        train_loader = batching.train_loader(self.data.train, cfg, self.tokenizer.pad_token_id)
        eval_loader = torch.utils.data.DataLoader(
            self.data.eval,
            batch_size=training.eval_batch_size,
            collate_fn=lambda batch: collate_padded(batch, self.tokenizer.pad_token_id),
        )
        optimizer = self._optimizer(model)
        self.model, self.optimizer, self.train_loader, self.eval_loader = accelerator.prepare(
            model, optimizer, train_loader, eval_loader
        )
        micro_steps_per_epoch = len(self.train_loader)
        steps_per_epoch = max(1, micro_steps_per_epoch // training.gradient_accumulation_steps)
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
        self.log = RunLog(cfg, self.run_dir, accelerator.is_main_process)

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
        """Endless stream of gradient-accumulation windows (lists of micro batches), epoch after epoch."""
        epoch = 0
        while True:
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(epoch)
            window = []
            for batch in self.train_loader:
                window.append(batch)
                if len(window) == self.cfg.training.gradient_accumulation_steps:
                    yield window
                    window = []
            epoch += 1

    def train_step(self, window: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over a window of micro batches, loss weighted by tokens across the window and ranks."""
        from distributed_peft.batching import model_inputs, real_tokens
        from distributed_peft.distributed import global_sum
        from distributed_peft.objective import count_label_tokens, loss_positions, token_stats

        accelerator, model = self.accelerator, self.model
        local_tokens = sum(count_label_tokens(b["labels"]) for b in window)
        window_tokens = global_sum(accelerator, local_tokens)
        # accelerate divides by the accumulation steps and DDP averages over ranks: undo both so the
        # gradient is that of (sum of token losses) / (tokens in the global batch).
        scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / max(window_tokens, 1.0)
        loss_sum = 0.0
        for batch in window:
            with accelerator.accumulate(model):
                keep = loss_positions(batch["labels"])  # no vocabulary projection for prompt positions
                logits = model(**model_inputs(batch), logits_to_keep=keep).logits
                batch_loss_sum = token_stats(logits, batch["labels"][:, keep + 1])["loss_sum"].sum()
                accelerator.backward(batch_loss_sum * scale)
                loss_sum += batch_loss_sum.item()
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), self.cfg.training.max_grad_norm)
                    if grad_norm is None and hasattr(model, "get_global_grad_norm"):  # DeepSpeed clips in its step
                        grad_norm = model.get_global_grad_norm()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        processed = global_sum(accelerator, sum(b["input_ids"].numel() for b in window))
        real = global_sum(accelerator, sum(real_tokens(b) for b in window))
        return {
            "train/loss": global_sum(accelerator, loss_sum) / max(window_tokens, 1.0),
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/tokens": window_tokens,
            "train/input_tokens": real,
            "train/padding_waste": 1.0 - real / processed,
        }

    def evaluate(self) -> dict[str, float]:
        from distributed_peft.evaluate import evaluate_loss

        result = evaluate_loss(self.model, self.eval_loader, self.accelerator)
        return {"eval/loss": result["loss"], "eval/token_accuracy": result["token_accuracy"]}

    def train(self) -> None:
        from tqdm.auto import tqdm

        training, log_every = self.cfg.training, self.cfg.logging.log_every_steps
        self.model.train()
        show = self.accelerator.is_main_process and self.cfg.logging.progress_bar
        bar = tqdm(
            total=self.total_steps,
            desc=f"train {self.cfg.task.name}",
            unit="step",
            disable=not show,
            mininterval=0.5 if sys.stderr.isatty() else 10.0,
        )
        start, tokens_seen, inputs_seen, self.train_tokens = time.perf_counter(), 0.0, 0.0, 0.0
        windows = self._windows()
        for step in range(1, self.total_steps + 1):
            metrics = self.train_step(next(windows))
            tokens_seen += metrics["train/tokens"]
            inputs_seen += metrics["train/input_tokens"]
            elapsed = time.perf_counter() - start
            metrics["train/tokens_per_s"] = tokens_seen / elapsed  # completion (loss-bearing) tokens
            metrics["train/input_tokens_per_s"] = inputs_seen / elapsed  # every non-pad token processed
            metrics["train/tokens_per_s_per_worker"] = metrics["train/tokens_per_s"] / self.accelerator.num_processes
            if training.eval_steps and step % training.eval_steps == 0 and step < self.total_steps:
                metrics.update(self.evaluate())
            if step % log_every == 0 or "eval/loss" in metrics or step == self.total_steps:
                self.log.log(metrics, step)
            bar.set_postfix(
                loss=f"{metrics['train/loss']:.3f}",
                tok_s=f"{metrics['train/tokens_per_s']:,.0f}",
                pad=f"{metrics['train/padding_waste']:.0%}",
            )
            bar.update(1)
        bar.close()
        self.train_tokens, self.train_seconds = tokens_seen, time.perf_counter() - start

    # ------------------------------------------------------------------------------------------------ save
    def save(self) -> dict[str, Any]:
        """Final base-vs-adapter evaluation, then the adapter, reports, loss curve and model card."""
        from distributed_peft.adapters import save_adapter
        from distributed_peft.evaluate import evaluate_base_and_adapter
        from distributed_peft.reports import plot_loss_curves, write_eval_reports, write_model_card

        cfg, accelerator = self.cfg, self.accelerator
        results = evaluate_base_and_adapter(
            self.model, self.eval_loader, accelerator, cfg, self.tokenizer, self.data.eval
        )
        self.log.log(
            {
                "eval/loss": results["adapter"]["loss"],
                "eval/token_accuracy": results["adapter"]["token_accuracy"],
                "eval/base_loss": results["base"]["loss"],
            },
            self.total_steps,
        )
        metadata = {
            "task": cfg.task.name,
            "task_description": cfg.task.description,
            "base": self.base_identity.to_dict(),
            "peft": {
                "method": cfg.peft.method,
                "r": cfg.peft.r,
                "alpha": cfg.peft.alpha,
                "target_modules": lora_targets(cfg),
            },
            "run": {
                "optimizer_steps": self.total_steps,
                "effective_batch": self.effective_batch,
                "world_size": accelerator.num_processes,
                "train_tokens": int(self.train_tokens),
                "seconds": self.train_seconds,
                "data": self.data.stats.summary().removeprefix("data: "),
                "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            },
            "eval": results,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        adapter_dir = save_adapter(accelerator, self.model, self.tokenizer, self.run_dir / "adapter", metadata)
        if accelerator.is_main_process:
            title = f"{cfg.task.name} adapter on {cfg.model.name}"
            write_eval_reports(self.run_dir, results, title)
            plot_loss_curves(self.run_dir, title)
            for card in (self.run_dir / "README.md", adapter_dir / "README.md"):
                write_model_card(card, metadata, results)
            self.print(f"eval loss: base {results['base']['loss']:.4f} -> adapter {results['adapter']['loss']:.4f}")
            self.print(f"adapter: {adapter_dir}\nreport:  {self.run_dir / 'eval.md'}  (loss curve: loss.png)")
        return results

    def cleanup(self) -> None:
        self.log.close()
        self.accelerator.end_training()  # destroys the process group so the launcher exits cleanly


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole recipe and return the final base-vs-adapter evaluation."""
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
        return recipe.save()
    finally:
        recipe.cleanup()


@hydra_app("dpeft-train")
def main(cfg: DictConfig) -> None:
    run_training(cfg)


if __name__ == "__main__":
    main()
