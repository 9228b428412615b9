"""dpeft-bench (make bench): our packing against the common recipe, TRL's SFTTrainer, on the same QLoRA job; and
(tables=[joint], benchmarks/joint.py) several tasks as one-task jobs against one joint job.

    dpeft-bench                                   # both tables; packing: detox and instruct, 3 interleaved repeats
    dpeft-bench tables=[packing] tasks=[detox] repeats=2 examples=200 output_dir=runs/bench-detox

Variants, on the same data, model, LoRA, optimizer, schedule and examples (one epoch, so the same completion tokens):
  trl_padded (the baseline: SFTTrainer with padded batches, as the seed notebooks use it), ours_padded,
  ours_group_by_length, ours_padding_free, trl_padding_free (TRL's own packing, the strongest peer recipe).
With CUDA, a GPU table per model of `gpu_models` (llama-3.2-1b, bloom-1b1 built from their bundled Hub configs with
`model.weights=random`: no download): the same variants, and ours with flash attention (`+flash_attn`) and with
Liger's kernels (`+liger`) where the architecture and the installed packages allow, each against that model's
trl_padded. Without CUDA that table is skipped with one line.
Each run is its own subprocess (peak RSS is per run; `python benchmarks/harness.py --child ...`, internal);
variants are interleaved and repeated, and the table gives the median and range of non-pad tokens/s, the ratio to
the baseline, padding waste, peak memory and the final eval loss (our completion-only evaluation on the same
validation split for every variant). Writes bench.json, bench.md into output_dir, which must be absent, empty or made
by distributed-peft (checked before the first run). Keys: conf/bench.yaml (BenchConfig in config/commands.py).
The command is distributed_peft/cli/bench.py;
this harness is a tool for us and is not in the wheel.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distributed_peft.config import missing_extra
from distributed_peft.config.commands import BenchTable
from distributed_peft.constants import PROJECT_ROOT
from distributed_peft.errors import ConfigError
from distributed_peft.runtime.atomic_files import atomic_write_text
from distributed_peft.runtime.output_dirs import claim_output_dir

BASELINE = "trl_padded"
CPU_MODEL = "tiny-llama"
# the GPU table's kernel switches: the overrides that turn each on, and the families transformers/Liger support it on
KERNELS = {
    "flash_attn": (["model.attn_implementation=flash_attention_2"], ("llama", "mistral"), "flash_attn"),
    "liger": (["training.liger_kernel=true"], ("llama", "mistral"), "liger_kernel"),
}
SHARED = PROJECT_ROOT.parent / "shared" / "datasets"
REAL_DATA = {
    "detox": [f"task.data.path={SHARED / 'paradetox' / 'paradetox.tsv'}", "task.data.columns.toxic=toxic",
              "task.data.columns.neutral=neutral1"],
    "instruct": [f"task.data.path={SHARED / 'gpteacher-codegen' / 'codegen-instruct.jsonl'}"],
}  # fmt: skip


@dataclass(frozen=True)
class Job:
    """One row of a table: a variant (what runs) on a model, with its label and extra overrides (kernels)."""

    variant: str
    label: str
    model: str = CPU_MODEL
    overrides: tuple[str, ...] = ()


def cpu_jobs(variants: list[str], model: str = CPU_MODEL) -> list[Job]:
    return [Job(v, v, model) for v in variants]


def gpu_jobs(variants: list[str], models: list[str], installed: set[str]) -> tuple[list[Job], list[str]]:
    """The GPU table's rows: every variant on each model with random weights, and ours with each kernel switched on
    where the family supports it and its package is installed; and one line per kernel left out, with the reason."""
    from distributed_peft.constants import CONF_DIR

    jobs, skipped = [], []
    for model in models:
        family = OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml").family
        random = (f"model={model}", "model.weights=random")
        jobs += [Job(v, v, model, random) for v in variants]
        for kernel, (overrides, families, package) in KERNELS.items():
            if family not in families:
                skipped.append(f"{model}: +{kernel} skipped: not supported for {family}")
            elif package not in installed:
                skipped.append(f"{model}: +{kernel} skipped: {package} is not installed")
            else:
                ours = [v for v in variants if v.startswith("ours")]
                jobs += [Job(v, f"{v}+{kernel}", model, (*random, *overrides)) for v in ours]
    return jobs, skipped


def installed_kernels() -> set[str]:
    import importlib.util

    return {package for _, _, package in KERNELS.values() if importlib.util.find_spec(package) is not None}


def bench_overrides(task: str, examples: int, packing: str, model: str = CPU_MODEL) -> list[str]:
    data = REAL_DATA[task] if task in REAL_DATA and SHARED.is_dir() else []
    return [f"task={task}", f"model={model}", "peft=qlora", *data, f"task.data.max_examples={examples}",
            "training.lr=1e-3", "training.lr_scheduler=cosine", "training.warmup_ratio=0.03", "training.epochs=1",
            "training.micro_batch_size=8", "training.max_seq_len=256", "training.eval_steps=0",
            "training.max_eval_examples=64", f"training.packing={packing}", "evaluation.generate=false",
            "logging.progress_bar=false"]  # fmt: skip


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory() -> dict[str, float]:
    """This process's peak RSS, and with CUDA its peak device memory."""
    import torch

    peaks = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        peaks["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def run_ours(cfg, out: Path) -> dict[str, Any]:
    from distributed_peft.evaluation.evaluator import evaluate_loss
    from distributed_peft.runtime.tracking import read_metrics
    from distributed_peft.training.recipe import FinetuneRecipe

    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    recipe.train()
    rows = [r for r in read_metrics(out) if "train/input_tokens" in r]
    eval_loss = evaluate_loss(recipe.model, recipe.runs[0].eval_loader, recipe.accelerator)["loss"]
    result = {"seconds": recipe.train_seconds, "nonpad_tokens": sum(r["train/input_tokens"] for r in rows),
              "padding_waste": statistics.fmean(r["train/padding_waste"] for r in rows),
              "eval_loss": eval_loss}  # fmt: skip
    recipe.cleanup()
    return result


def run_trl(cfg, out: Path, padding_free: bool) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from distributed_peft.config import lora_targets
    from distributed_peft.data.prompts import format_completion, format_prompt
    from distributed_peft.data.task_data import collate_padded, prepare_task_data
    from distributed_peft.evaluation.evaluator import evaluate_loss
    from distributed_peft.modeling.loading import compute_dtype, load_base_model, load_tokenizer, resolve_base

    path, _ = resolve_base(cfg.model)
    tokenizer = load_tokenizer(path)
    data = prepare_task_data(cfg, tokenizer, keep_train_text=True)
    pairs = [(format_prompt(cfg.task, e["record"]), format_completion(cfg.task, e["record"])) for e in data.train]
    dataset = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
    training = cfg.training
    warmup_steps = int(training.warmup_ratio * -(-len(pairs) // training.micro_batch_size))  # as our recipe counts
    cuda, dtype = torch.cuda.is_available(), compute_dtype(cfg)
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=training.micro_batch_size, gradient_accumulation_steps=1,
        learning_rate=training.lr, lr_scheduler_type=training.lr_scheduler, warmup_steps=warmup_steps,
        num_train_epochs=1, max_grad_norm=training.max_grad_norm, optim="adamw_torch", weight_decay=0.0,
        # TRL's padding-free collator does not truncate: it needs max_length=None (our data fits max_seq_len anyway)
        max_length=None if padding_free else training.max_seq_len, completion_only_loss=True,
        padding_free=padding_free, seed=training.seed,
        gradient_checkpointing=False, logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=not cuda,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, disable_tqdm=True,
    )  # fmt: skip
    lora = LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
                      target_modules=lora_targets(cfg), task_type="CAUSAL_LM")  # fmt: skip
    model = load_base_model(cfg, path, device="cuda" if cuda else "cpu")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    nonpad = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    processed = sum(batch["input_ids"].numel() for batch in trainer.get_train_dataloader())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    loader = torch.utils.data.DataLoader(
        data.eval, batch_size=training.eval_batch_size, collate_fn=lambda b: collate_padded(b, tokenizer)
    )
    eval_loss = evaluate_loss(trainer.model, loader, trainer.accelerator)["loss"]
    return {
        "seconds": seconds,
        "nonpad_tokens": nonpad,
        "padding_waste": 1 - nonpad / processed,
        "eval_loss": eval_loss,
    }


def child(job: Job, task: str, examples: int, result_file: Path) -> None:
    from distributed_peft.cli.preflight import check_overrides
    from distributed_peft.runtime.tracking import quiet_library_progress

    quiet_library_progress()
    variant = job.variant
    packing = {"ours_group_by_length": "group_by_length", "ours_padding_free": "padding_free"}.get(variant, "none")
    overrides = [o for o in job.overrides if not o.startswith("model=")]
    with tempfile.TemporaryDirectory() as out:
        cfg = check_overrides([*bench_overrides(task, examples, packing, job.model), *overrides, f"output_dir={out}"])
        if variant.startswith("trl"):
            result = run_trl(cfg, Path(out), padding_free=variant == "trl_padding_free")
        else:
            result = run_ours(cfg, Path(out))
    result.update(variant=job.label, model=job.model, task=task, **peak_memory(),
                  tokens_per_s=result["nonpad_tokens"] / result["seconds"])  # fmt: skip
    result_file.write_text(json.dumps(result))


def summarize(
    runs: list[dict[str, Any]], task: str, model: str = CPU_MODEL, random_weights: bool = False
) -> tuple[list[dict[str, Any]], str]:
    """One table: per row (variant label) the medians over its repeats, and ratios to that model's baseline."""
    mine = [r for r in runs if r["task"] == task and r.get("model", CPU_MODEL) == model]
    memory = "peak_gpu_mb" if all("peak_gpu_mb" in r for r in mine) else "peak_rss_mb"
    rows = []
    for label in dict.fromkeys(r["variant"] for r in mine):  # in the order they ran (the baseline first)
        same = [r for r in mine if r["variant"] == label]
        rates = [r["tokens_per_s"] for r in same]
        rows.append({"variant": label, "tokens_per_s": statistics.median(rates), "min": min(rates),
                     "max": max(rates), "padding_waste": statistics.median(r["padding_waste"] for r in same),
                     memory: statistics.median(r[memory] for r in same),
                     "eval_loss": statistics.median(r["eval_loss"] for r in same), "runs": len(same)})  # fmt: skip
    base = next(r for r in rows if r["variant"] == BASELINE)
    title = f"## {task}: {model}, random weights" if random_weights else f"## {task}"
    unit = "peak GPU MB" if memory == "peak_gpu_mb" else "peak RSS MB"
    lines = [title, "", f"| variant | non-pad tok/s median (range) | vs baseline | padding waste | {unit} | "
             "eval loss (vs baseline) |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["eval_loss_delta"] = r["eval_loss"] / base["eval_loss"] - 1
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f}) | "
                     f"{r['ratio']:.2f}x | {r['padding_waste']:.1%} | {r[memory]:,.0f} | "
                     f"{r['eval_loss']:.4f} ({r['eval_loss_delta']:+.1%}) |")  # fmt: skip
    return rows, "\n".join(lines)


def bench(cfg: DictConfig) -> None:
    """Every table of `tables` (every variant on every task; the joint table), into output_dir (claimed before the
    first run); the tables on stdout."""
    missing = missing_extra("trl", "bench", "dpeft-bench (TRL's SFTTrainer is its baseline)")
    if missing and BenchTable.PACKING in cfg.tables:
        raise ConfigError(missing)
    output = Path(cfg.output_dir)
    claimed = claim_output_dir(output, key="output_dir", command="dpeft-bench")
    try:
        report, markdown = run_tables(cfg)
        atomic_write_text(output / "bench.json", json.dumps(report, indent=2))
        atomic_write_text(output / "bench.md", "\n".join(markdown))
    except BaseException:  # a failed run or write, Ctrl-C: remove what this benchmark created, nothing else
        claimed.release()
        raise
    print("\n".join(markdown))
    print(f"written: {output / 'bench.md'}")


def run_tables(
    cfg: DictConfig, runner: Callable[..., dict[str, Any]] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The packing table when chosen, then the joint table when chosen (its processes run by `runner`: by default
    benchmarks/joint.py's run_command)."""
    from benchmarks import joint  # here: this file also runs as a script (a child), where benchmarks/ is not a package

    report: dict[str, Any] = {"setup": OmegaConf.to_container(cfg, resolve=True)}
    markdown = ["# dpeft-bench", ""]
    if BenchTable.PACKING in cfg.tables:
        packing, markdown = run_benchmark(cfg)
        report |= packing
    if BenchTable.JOINT in cfg.tables:
        with tempfile.TemporaryDirectory() as scratch:
            measured = joint.run_joint_table(cfg.joint, cfg.repeats, Path(scratch), runner or joint.run_command)
        summary, table = joint.summarize_joint(measured)
        report["joint"] = measured | summary
        markdown += [*table, ""]
    return report, markdown


def plan(cfg: DictConfig, cuda: bool, installed: set[str]) -> tuple[list[Job], list[str]]:
    """Every row to run (the CPU table's, then with CUDA the GPU tables'), and the lines saying what is left out."""
    variants = [BASELINE, *[v for v in cfg.variants if v != BASELINE]]
    jobs = cpu_jobs(variants, cfg.model.name)
    if not cfg.gpu_models:
        return jobs, []
    if not cuda:
        return jobs, [f"GPU table skipped: no CUDA device ({', '.join(cfg.gpu_models)} with random weights need one)"]
    extra, skipped = gpu_jobs(variants, list(cfg.gpu_models), installed)
    return jobs + extra, skipped


def run_benchmark(cfg: DictConfig) -> tuple[dict[str, Any], list[str]]:
    """Every row on every task, interleaved and repeated; the report and its markdown tables."""
    import torch

    jobs, skipped = plan(cfg, torch.cuda.is_available(), installed_kernels())
    for line in skipped:
        print(line, flush=True)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(cfg.repeats):
            for task in cfg.tasks:
                for i, job in enumerate(jobs):  # interleaved, so drift on a shared machine hits every variant
                    result = Path(scratch) / f"{task}-{i}-{repeat}.json"
                    cmd = [sys.executable, __file__, "--child", job.variant, task, str(cfg.examples), str(result),
                           job.label, job.model, *job.overrides]  # fmt: skip
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        sys.exit(f"{job.label} on {task} ({job.model}) failed:\n{proc.stderr[-3000:]}")
                    runs.append(json.loads(result.read_text()))
                    print(f"  [{repeat + 1}/{cfg.repeats}] {task:8s} {job.model:12s} {job.label:32s} "
                          f"{runs[-1]['tokens_per_s']:10,.0f} non-pad tok/s", flush=True)  # fmt: skip
    report = {"setup": OmegaConf.to_container(cfg, resolve=True), "runs": runs, "tables": {}, "gpu_tables": {},
              "skipped": skipped}  # fmt: skip
    markdown = ["# dpeft-bench: QLoRA, one epoch, non-pad tokens/s", ""]
    cpu_model = cfg.model.name
    for task in cfg.tasks:
        rows, table = summarize(runs, task, cpu_model)
        report["tables"][task] = rows
        markdown += [f"{table.splitlines()[0]} ({cpu_model})", *table.splitlines()[1:], ""]
    for model in dict.fromkeys(job.model for job in jobs if job.model != cpu_model):
        for task in cfg.tasks:
            rows, table = summarize(runs, task, model, random_weights=True)
            report["gpu_tables"][f"{task}/{model}"] = rows
            markdown += [table, ""]
    markdown += [f"- {line}" for line in skipped]
    return report, markdown


def child_main(argv: list[str]) -> None:
    """`python benchmarks/harness.py --child VARIANT TASK EXAMPLES RESULT [LABEL MODEL OVERRIDE...]`: one run."""
    variant, task, examples, result, *rest = argv
    label, model, *overrides = rest or [variant, CPU_MODEL]
    child(Job(variant, label, model, tuple(overrides)), task, int(examples), Path(result))


if __name__ == "__main__":
    child_main(sys.argv[2:])  # the one way it runs as a script: a child of run_benchmark
