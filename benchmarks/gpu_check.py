"""make gpu-check: the GPU path proved in one command, every item reported at once (under 8 minutes on one GPU).

    make gpu-check                                        # installs, then runs every item below
    .venv/bin/python benchmarks/gpu_check.py              # the same without make's install step
    .venv/bin/python benchmarks/gpu_check.py --no-install # never calls pip (flash-attn, liger-kernel used if present)
    .venv/bin/python -m pytest -m gpu tests/test_gpu_check.py   # the same items as pytest tests

On a machine without CUDA it says so in one line and exits 0, writing nothing. With CUDA it runs every item, even
after one fails, on `model=llama-3.2-1b model.weights=random` (the real 1B architecture, random weights, no Hub):
  install flash-attn, install liger-kernel   a wheel if one exists (pip --only-binary), else skipped with pip's reason
  qlora_bf16, qlora_fp16     NF4 QLoRA training: the loss falls; tokens/s, MFU, peak memory from metrics.jsonl
  packed_vs_unpacked         one packed row's logits = each example's own (bf16 tolerance), flash attention when present
  paged_adamw_8bit           training with bitsandbytes' paged 8-bit AdamW: the loss falls
  gradient_checkpointing     the same losses as qlora_bf16 (within tolerance), its peak memory beside
  liger_kernel               Liger's fused loss on: the same losses as qlora_bf16 (within tolerance), not bit-identical
  fsdp_qlora, zero3_qlora    `dpeft-launch` on every visible GPU (one is a valid world size): the adapter complete and
                             non-zero; a run killed (-9) after its checkpoint resumes to the uninterrupted adapter
  fsdp_joint                 tasks=[sql,detox] in one FSDP job: its detox adapter equals the one trained alone
  generate, merge            dpeft-generate and dpeft-merge on the qlora_bf16 adapter; the merged model on CUDA
                             computes what base + adapter compute
Each item prints its progress with the elapsed time. Writes gpu-check/report.md (item, pass/fail/skip, figure,
seconds) and gpu-check/report.json, the runs and their logs into gpu-check/runs/; exits 1 when any item failed.
gpu-check/ (gitignored) is the only place it writes; this tool is for us and is not in the wheel.

Budget (one GPU): about twelve short processes; each spends most of its time starting and building the random base,
so the step counts below are small (the loss of a random-weight base falls fast) and each process has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distributed_peft.constants import ADAPTER_WEIGHTS, METRICS_FILE, PROJECT_ROOT

OUT_NAME = "gpu-check"  # the one directory this tool writes
DEFAULT_OUT = PROJECT_ROOT / OUT_NAME
BUDGET_S = 480
BIN = Path(sys.executable).parent
CONSTRAINTS = PROJECT_ROOT / "constraints.txt"
OPTIONAL_PACKAGES = {"flash-attn": "flash_attn", "liger-kernel": "liger_kernel"}  # pip name -> module

MODEL = ["model=llama-3.2-1b", "model.weights=random"]
BF16 = "training.mixed_precision=bf16"
STEPS = 16  # optimizer steps per single-GPU training run
TRAIN = [
    *MODEL,
    "task=detox",
    "peft=qlora",
    f"training.max_steps={STEPS}",
    "training.max_seq_len=256",
    "training.packing=padding_free",
    "training.tokens_per_batch=4096",
    "training.lr=1e-3",
    "training.lr_scheduler=constant",
    "training.eval_steps=0",
    "training.max_eval_examples=16",
    "training.checkpoint_every=0",
    "evaluation.generate=false",
    "logging.progress_bar=false",
    "logging.log_every_steps=1",
]
DISTRIBUTED_STEPS, CHECKPOINT_STEP = 8, 4  # the killed run dies after its step-4 checkpoint and resumes to step 8
DISTRIBUTED = [
    *[o for o in TRAIN if not o.startswith(("training.max_steps", "training.packing", "training.checkpoint_every"))],
    f"training.max_steps={DISTRIBUTED_STEPS}",
    "training.packing=group_by_length",  # a token-budget loader: DeepSpeed's micro batch comes from the run's config
]
# item -> what its single-GPU run adds to TRAIN
TRAINING_RUNS = {
    "qlora_bf16": [BF16],
    "qlora_fp16": ["training.mixed_precision=fp16", "peft.quantization.compute_dtype=float16"],
    "paged_adamw_8bit": [BF16, "training.optimizer=paged_adamw_8bit"],
    "gradient_checkpointing": [BF16, "training.gradient_checkpointing=true"],
    "liger_kernel": [BF16, "training.liger_kernel=true"],
}
DISTRIBUTED_STRATEGIES = ("fsdp", "zero3")
PACKED_CHECK = [*MODEL, "task=detox", "peft=lora", "training.packing=padding_free"]  # the in-process model
LOSS_DROP = 0.02  # the mean loss of the last quarter of the steps is at least 2% below the first quarter's
GC_LOSS_RTOL = 1e-2  # gradient checkpointing recomputes the same forward: per-step losses within 1%
LIGER_LOSS_RTOL = 2e-2  # Liger's chunked fused cross-entropy vs logits + cross-entropy, both bf16: within 2%
LOGITS_RTOL = 2e-2  # bf16: a max |difference| within 2% of the largest logit
RESUME_ATOL = 1e-4  # GPU kernels are not bit-deterministic run to run (the CPU suite holds 1e-6)
TIMEOUT_S = 240  # one process
PROMPT = "you are a complete idiot and everyone knows it"  # detox's input field


class Failed(Exception):
    """An item's check did not hold; the message is its figure."""


class Skipped(Exception):
    """An item that cannot run here; the message is the reason."""


@dataclass
class Context:
    out: Path
    gpus: int = 1
    install: bool = True
    started: float = field(default_factory=time.monotonic)
    runs: dict[str, Path] = field(default_factory=dict)  # item -> its finished run directory, for later items

    def note(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    def run_of(self, item: str) -> Path:
        if item not in self.runs:
            raise Skipped(f"needs {item}'s run, which did not finish")
        return self.runs[item]


@dataclass(frozen=True)
class Item:
    name: str
    check: Callable[[Context], str]  # returns the figure; raises Failed or Skipped


@dataclass
class Result:
    item: str
    status: str  # pass | fail | skip
    figure: str
    seconds: float


def run_item(item: Item, ctx: Context) -> Result:
    """One item, whatever it raises: a failure is recorded, never propagated."""
    ctx.note(f"{item.name}: started")
    start = time.monotonic()
    try:
        status, figure = "pass", item.check(ctx)
    except Failed as failed:
        status, figure = "fail", str(failed)
    except Skipped as skipped:
        status, figure = "skip", str(skipped)
    except Exception as error:  # a bug or a crash in one item must not hide the others
        status, figure = "fail", f"{type(error).__name__}: {one_line(str(error))}"
        if (ctx.out / "runs").is_dir():
            (ctx.out / "runs" / f"{item.name.replace(' ', '-')}.traceback").write_text(traceback.format_exc())
    result = Result(item.name, status, figure, round(time.monotonic() - start, 1))
    ctx.note(f"{item.name}: {status.upper()} ({result.seconds:.0f} s) {figure}")
    return result


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def markdown_report(results: Sequence[Result], device: str, total_s: float) -> str:
    rows = [f"| {r.item} | {r.status} | {r.figure.replace('|', '/')} | {r.seconds:.1f} |" for r in results]
    failed = [r.item for r in results if r.status == "fail"]
    verdict = f"FAIL: {', '.join(failed)}" if failed else "PASS"
    budget = f"budget {BUDGET_S} s on one GPU" + (": OVER" if total_s > BUDGET_S else "")
    return "\n".join([
        "# gpu-check", "", f"{device}", "", "| item | result | figure | seconds |", "| --- | --- | --- | --- |",
        *rows, "", f"{verdict}; total {total_s:.0f} s ({budget})", "",
    ])  # fmt: skip


def write_reports(results: Sequence[Result], out: Path, device: str, total_s: float) -> str:
    """report.md and report.json in `out`; returns the markdown."""
    from distributed_peft.runtime.atomic_files import atomic_write_text

    markdown = markdown_report(results, device, total_s)
    passed = not any(r.status == "fail" for r in results)
    record = {"device": device, "total_seconds": round(total_s, 1), "budget_seconds": BUDGET_S, "passed": passed,
              "items": [asdict(r) for r in results]}  # fmt: skip
    atomic_write_text(out / "report.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown)
    return markdown


def run_check(items: Sequence[Item], ctx: Context, device: str) -> int:
    """Every item in order, the reports written and printed; 1 when any item failed."""
    results = [run_item(item, ctx) for item in items]
    markdown = write_reports(results, ctx.out, device, time.monotonic() - ctx.started)
    print(markdown, flush=True)
    return 1 if any(r.status == "fail" for r in results) else 0


# ---- running our commands ------------------------------------------------------------------------------------------


def command_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}


OUR_ERROR = re.compile(r"^dpeft-[\w-]+: [\w ]*(error|preempted)\b")  # report_user_error's lines, and pre-emption
EXCEPTION = re.compile(r"^([\w.]+(Error|Exception)|AssertionError)\b: ")
LAUNCHER_WRAPPERS = ("ChildFailedError", "CalledProcessError")  # torchrun's and accelerate's: the rank said why


def error_line(output: str) -> str:
    """The line that says why a command failed: our one-line error, else the first exception a rank raised (the
    launcher's wrapper skipped), else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    ours = [line for line in lines if OUR_ERROR.match(line)]
    raised = [line for line in lines if EXCEPTION.match(line) and not line.split(":")[0].endswith(LAUNCHER_WRAPPERS)]
    return one_line((ours[-1:] or raised[:1] or lines[-1:] or ["no output"])[0])


def run_command(ctx: Context, name: str, args: list[str], timeout: float = TIMEOUT_S) -> str:
    """Run one of our commands, its output in runs/<name>.log; its stdout, or Failed with the reason."""
    log = ctx.out / "runs" / f"{name}.log"
    try:
        proc = subprocess.run(args, cwd=PROJECT_ROOT, env=command_env(), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        log.write_text(f"$ {' '.join(args)}\n{expired.stdout or ''}\n{expired.stderr or ''}")
        raise Failed(f"{name}: no result after {timeout:.0f} s") from None
    log.write_text(f"$ {' '.join(args)}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        raise Failed(f"{name} exited {proc.returncode}: {error_line(proc.stderr + proc.stdout)}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(run_dir: Path, overrides: list[str], gpus: int = 0) -> list[str]:
    """dpeft-train (one process), or dpeft-launch on `gpus` workers when gpus > 0."""
    if gpus:
        return [str(BIN / "dpeft-launch"), *overrides, f"num_gpu_workers={gpus}", f"main_process_port={free_port()}",
                f"output_dir={run_dir}"]  # fmt: skip
    return [str(BIN / "dpeft-train"), *overrides, f"output_dir={run_dir}"]


def train(ctx: Context, name: str, overrides: list[str]) -> Path:
    run_dir = ctx.out / "runs" / name
    run_command(ctx, name, train_command(run_dir, [*TRAIN, *overrides]))
    return run_dir


# ---- what a run left ----------------------------------------------------------------------------------------------


@dataclass
class RunFigures:
    losses: dict[int, float]  # step -> training loss
    tokens_per_s: float | None
    mfu: float | None
    peak_memory_mib: float | None


def run_figures(run_dir: Path) -> RunFigures:
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]

    def last(key: str) -> float | None:
        values = [row[key] for row in rows if row.get(key) is not None]
        return float(values[-1]) if values else None

    losses = {int(row["step"]): float(row["train/loss"]) for row in rows if "train/loss" in row}
    peaks = [float(row["train/peak_memory_mib"]) for row in rows if row.get("train/peak_memory_mib") is not None]
    return RunFigures(losses, last("train/tokens_per_s"), last("train/mfu"), max(peaks) if peaks else None)


def loss_fell(losses: Sequence[float]) -> tuple[bool, float, float]:
    """(fell, first, last): the mean of the first and last quarter of the steps; fell when last < first by LOSS_DROP."""
    quarter = max(1, len(losses) // 4)
    first, last = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
    return last < first * (1 - LOSS_DROP), first, last


def describe_training(figures: RunFigures) -> str:
    """The run's figures in one line; Failed when the loss did not fall or a measurement is missing."""
    logged = [figures.losses[s] for s in sorted(figures.losses)]
    losses = [loss for loss in logged if _finite(loss)]  # a step skipped for a non-finite loss logs NaN
    if len(losses) < 2 or len(losses) < 0.75 * len(logged):
        raise Failed(f"{len(logged) - len(losses)} of {len(logged)} steps had a non-finite loss")
    fell, first, last = loss_fell(losses)
    missing = [name for name, value in (("train/tokens_per_s", figures.tokens_per_s), ("train/mfu", figures.mfu),
               ("train/peak_memory_mib", figures.peak_memory_mib)) if value is None]  # fmt: skip
    text = (
        f"loss {first:.3f} -> {last:.3f} over {len(losses)} steps"
        + (f" ({len(logged) - len(losses)} non-finite skipped)" if len(losses) < len(logged) else "")
        + (f", {figures.tokens_per_s:,.0f} tok/s" if figures.tokens_per_s is not None else "")
        + (f", MFU {figures.mfu:.1%}" if figures.mfu is not None else "")
        + (f", peak {figures.peak_memory_mib:,.0f} MiB" if figures.peak_memory_mib is not None else "")
    )
    problems = [] if fell else [f"the loss did not fall by {LOSS_DROP:.0%}"]
    if missing:
        problems.append(f"missing in {METRICS_FILE}: {', '.join(missing)}")
    elif not 0 < figures.mfu <= 1:
        problems.append(f"MFU {figures.mfu} is not in (0, 1]")
    if problems:
        raise Failed(f"{text}: {'; '.join(problems)}")
    return text


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def max_relative_loss_difference(a: dict[int, float], b: dict[int, float]) -> float:
    if a.keys() != b.keys() or not a:
        raise Failed(f"logged steps differ: {sorted(a)[:5]}... vs {sorted(b)[:5]}...")
    return max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-8) for s in a)


def adapter_tensors(run_dir: Path):
    from safetensors.torch import load_file

    path = run_dir / "adapter" / ADAPTER_WEIGHTS
    if not path.is_file():
        raise Failed(f"no adapter at {path}")
    return load_file(str(path))


def check_adapter_complete(tensors, reference=None) -> str:
    """Every tensor non-empty and finite, every lora_B trained away from zero, the keys and shapes of `reference`
    (the single-process adapter) when given; Failed naming what is wrong."""
    import torch

    empty = [k for k, t in tensors.items() if t.numel() == 0]
    nonfinite = [k for k, t in tensors.items() if t.numel() and not torch.isfinite(t).all()]
    untrained = [k for k, t in tensors.items() if "lora_B" in k and t.numel() and not t.abs().sum() > 0]
    problems = []
    if not tensors:
        problems.append("the adapter has no tensors")
    for label, keys in (("empty", empty), ("not finite", nonfinite), ("lora_B all zero", untrained)):
        if keys:
            problems.append(f"{len(keys)} tensors {label} (e.g. {keys[0]})")
    if reference is not None:
        shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        expected = {k: tuple(t.shape) for k, t in reference.items()}
        if shapes != expected:
            differ = sorted(set(shapes.items()) ^ set(expected.items()))
            problems.append(f"keys/shapes differ from the single-process adapter ({len(differ)}, e.g. {differ[0]})")
    if problems:
        raise Failed("; ".join(problems))
    return f"{len(tensors)} tensors complete and non-zero" + (" (keys and shapes of qlora_bf16's)" if reference else "")


def max_adapter_difference(a, b) -> float:
    if a.keys() != b.keys():
        raise Failed(f"the adapters hold different tensors ({len(a)} vs {len(b)})")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---- the items ----------------------------------------------------------------------------------------------------


def install_item(package: str, module: str) -> Item:
    """An optional package: present, else installed from a wheel (never built from source), else skipped with why."""

    def check(ctx: Context) -> str:
        import importlib.metadata
        import importlib.util

        if importlib.util.find_spec(module) is not None:
            return f"{package} {importlib.metadata.version(package)} present"
        if not ctx.install:
            raise Skipped(f"{package} not installed (--no-install)")
        args = [sys.executable, "-m", "pip", "install", "--quiet", "--only-binary=:all:", "--retries", "0",
                "--timeout", "20", "-c", str(CONSTRAINTS), package]  # fmt: skip
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
        (ctx.out / "runs" / f"install-{package}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise Skipped(f"{package} not installed: {error_line(proc.stderr + proc.stdout)} (no wheel for this "
                          "platform, or no network; PIP_FIND_LINKS=<dir of wheels> offers one)")  # fmt: skip
        importlib.invalidate_caches()
        return f"{package} {importlib.metadata.version(package)} installed"

    return Item(f"install {package}", check)


def training_item(name: str) -> Item:
    overrides = TRAINING_RUNS[name]

    def check(ctx: Context) -> str:
        import torch

        if BF16 in overrides and not torch.cuda.is_bf16_supported():
            raise Skipped(f"{torch.cuda.get_device_name()} has no bf16 (the items that compare with qlora_bf16 skip)")
        run_dir = train(ctx, name, overrides)
        figure = describe_training(run_figures(run_dir))
        ctx.runs[name] = run_dir
        return figure

    return Item(name, check)


def same_losses_item(name: str, rtol: float, needs: str | None = None) -> Item:
    """A run that must compute what qlora_bf16 computed: per-step losses within `rtol`, and not bit-identical when
    the option changes the kernels (Liger), which shows that it took effect."""

    def check(ctx: Context) -> str:
        if needs is not None:
            import importlib.util

            if importlib.util.find_spec(needs) is None:
                raise Skipped(f"{needs} is not installed (see its install item)")
        reference = run_figures(ctx.run_of("qlora_bf16"))
        figures = run_figures(train(ctx, name, TRAINING_RUNS[name]))
        difference = max_relative_loss_difference(figures.losses, reference.losses)
        peak = f", peak {figures.peak_memory_mib:,.0f} MiB" if figures.peak_memory_mib is not None else ""
        ref_peak = f" (qlora_bf16 {reference.peak_memory_mib:,.0f})" if reference.peak_memory_mib is not None else ""
        text = f"losses within {difference:.2e} of qlora_bf16's (tolerance {rtol:g}){peak}{ref_peak}"
        if difference > rtol:
            raise Failed(text)
        if needs is not None and difference == 0:
            raise Failed(f"{text}: bit-identical, so {name} took no effect")
        return text

    return Item(name, check)


def packed_logit_differences(model, device: str) -> tuple[float, float, float]:
    """(max |packed - alone|, the same for the row without its boundaries, the bf16 tolerance) for four examples
    packed in one row by our collator (positions restarting, boundaries `cu_seq_lens_*`) and each run alone."""
    import torch

    from distributed_peft.data.batching import collate_packed, model_inputs

    generator = torch.Generator().manual_seed(0)
    examples = [torch.randint(100, model.config.vocab_size, (n,), generator=generator) for n in (37, 64, 101, 18)]
    batch = collate_packed([{"input_ids": x.tolist(), "labels": x.tolist()} for x in examples])
    with torch.no_grad():
        alone = torch.cat([model(input_ids=x[None].to(device)).logits[0].float() for x in examples])
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
        packed = model(**inputs).logits[0].float()
        crossing = model(input_ids=inputs["input_ids"]).logits[0].float()  # attention crosses the examples
    scale = alone.abs().max().item()
    return (packed - alone).abs().max().item(), (crossing - alone).abs().max().item(), LOGITS_RTOL * scale


def packed_vs_unpacked(ctx: Context) -> str:
    """A packed row's logits equal each example's own; the row without its boundaries is the control that must
    differ (else the check could not see attention leaking across examples)."""
    import gc

    import torch

    from distributed_peft.cli.preflight import check_overrides
    from distributed_peft.modeling.loading import load_base_model, resolve_base

    cfg = check_overrides(PACKED_CHECK)
    path, _ = resolve_base(cfg.model)
    model = load_base_model(cfg, path).to("cuda").eval()
    try:
        attention = model.config._attn_implementation
        difference, leak, tolerance = packed_logit_differences(model, "cuda")
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
    text = (f"max |packed - alone| {difference:.3g} <= {tolerance:.3g} ({attention}); the row without boundaries "
            f"differs by {leak:.3g}")  # fmt: skip
    if difference > tolerance:
        raise Failed(text.replace("<=", ">", 1))
    if leak <= tolerance:
        raise Failed(f"{text}: the control is within tolerance too, so this check cannot see a leak")
    return text


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int, log: Path, timeout: float = TIMEOUT_S):
    from distributed_peft.training.checkpoints import MARKER

    marker = run_dir / "checkpoints" / f"step-{step:06d}" / MARKER
    deadline = time.monotonic() + timeout
    while not marker.is_file():
        if proc.poll() is not None:
            reason = error_line(log.read_text()) if log.is_file() else "no log"
            raise Failed(f"the run exited {proc.returncode} before its step-{step} checkpoint: {reason}")
        if time.monotonic() > deadline:
            raise Failed(f"no step-{step} checkpoint after {timeout:.0f} s")
        time.sleep(0.1)


def kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 the launcher and every rank it started, as when the node dies."""
    import psutil

    if proc.poll() is not None:
        return
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for process in family:
        process.kill()
    psutil.wait_procs(family, timeout=30)
    proc.wait(timeout=30)


def distributed_overrides(strategy: str, checkpoint_every: int = 0) -> list[str]:
    return [*DISTRIBUTED, f"distributed={strategy}", f"training.checkpoint_every={checkpoint_every}"]


def distributed_item(strategy: str) -> Item:
    """`dpeft-launch distributed=STRATEGY` on every visible GPU: an uninterrupted run, and one killed (-9) after its
    checkpoint and rerun with the same command, which must resume to the uninterrupted adapter."""
    name = f"{strategy}_qlora"

    def check(ctx: Context) -> str:
        overrides = distributed_overrides(strategy)
        reference_dir = ctx.out / "runs" / f"{name}-uninterrupted"
        run_command(ctx, f"{name}-uninterrupted", train_command(reference_dir, overrides, ctx.gpus))
        reference = adapter_tensors(reference_dir)
        single = adapter_tensors(ctx.runs["qlora_bf16"]) if "qlora_bf16" in ctx.runs else None
        try:  # the resume is checked even when the adapter is not complete
            complete, passed = check_adapter_complete(reference, single), True
        except Failed as failed:
            complete, passed = f"adapter incomplete: {failed}", False
        ctx.note(f"{name}: uninterrupted run done: {complete}")

        run_dir = ctx.out / "runs" / f"{name}-killed"
        command = train_command(run_dir, distributed_overrides(strategy, CHECKPOINT_STEP), ctx.gpus)
        log = ctx.out / "runs" / f"{name}-killed.log"
        with open(log, "w") as output:
            proc = subprocess.Popen(command, cwd=PROJECT_ROOT, env=command_env(), stdout=output, stderr=output,
                                    start_new_session=True)  # fmt: skip
            try:
                wait_for_checkpoint(proc, run_dir, CHECKPOINT_STEP, log)
            finally:
                kill_tree(proc)
        if (run_dir / "adapter").exists():
            raise Failed(f"{complete}; the run finished before it was killed (no resume to check)")
        ctx.note(f"{name}: killed after its step-{CHECKPOINT_STEP} checkpoint; rerunning the same command")
        stdout = run_command(ctx, f"{name}-resumed", command)
        if "resume: continuing from" not in stdout:
            raise Failed(f"{complete}; the rerun did not resume (no 'resume: continuing from' in its output)")
        difference = max_adapter_difference(adapter_tensors(run_dir), reference)
        text = (f"world size {ctx.gpus}; {complete}; killed at step {CHECKPOINT_STEP}, resumed: max |adapter - "
                f"uninterrupted| {difference:.2e} (tolerance {RESUME_ATOL:g})")  # fmt: skip
        if difference > RESUME_ATOL or not passed:
            raise Failed(text)
        return text

    return Item(name, check)


def joint_overrides(overrides: list[str]) -> list[str]:
    """The same run as a two-task job: sql beside detox, each with the run's settings."""
    return [o for o in overrides if not o.startswith("task=")] + ["tasks=[sql,detox]"]


def fsdp_joint(ctx: Context) -> str:
    """Two task adapters in one FSDP job (`tasks=[sql,detox]`) on every visible GPU: the detox adapter equals the one
    an FSDP job trains alone (the other adapter in the graph at scale 0 adds exact zeros)."""
    alone_dir, joint_dir = ctx.out / "runs" / "fsdp_alone", ctx.out / "runs" / "fsdp_joint"
    overrides = distributed_overrides("fsdp")
    run_command(ctx, "fsdp_alone", train_command(alone_dir, overrides, ctx.gpus))
    run_command(ctx, "fsdp_joint", train_command(joint_dir, joint_overrides(overrides), ctx.gpus))
    together = adapter_tensors(joint_dir / "detox")
    complete = check_adapter_complete(together, adapter_tensors(alone_dir))
    check_adapter_complete(adapter_tensors(joint_dir / "sql"))
    difference = max_adapter_difference(together, adapter_tensors(alone_dir))
    text = f"world size {ctx.gpus}; {complete}; max |joint detox - alone| {difference:.2e} (tolerance {RESUME_ATOL:g})"
    if difference > RESUME_ATOL:
        raise Failed(text)
    return text


def generate(ctx: Context) -> str:
    adapter = ctx.run_of("qlora_bf16") / "adapter"
    stdout = run_command(ctx, "generate", [str(BIN / "dpeft-generate"), f"adapters=[{adapter}]", f"prompt={PROMPT}",
                                           "max_new_tokens=16"])  # fmt: skip
    answers = [line.split(":", 1)[1].strip() for line in stdout.splitlines() if line.strip().startswith("adapter:")]
    if not answers:
        raise Failed("dpeft-generate printed no 'adapter:' answer")
    return f"dpeft-generate answered ({len(answers[0])} characters from the adapter)"


def merge(ctx: Context) -> str:
    """dpeft-merge, then the merged model on CUDA against the 4-bit base + adapter on CUDA: the same logits."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from distributed_peft.adapters.storage import load_base_with_adapters

    adapter = ctx.run_of("qlora_bf16") / "adapter"
    output = ctx.out / "runs" / "merged"
    stdout = run_command(ctx, "merge", [str(BIN / "dpeft-merge"), f"adapter={adapter}", f"output={output}"])
    precision = next((line for line in stdout.splitlines() if line.startswith("precision:")), "precision: ?")
    ctx.note(f"merge: merged ({precision[:60]}...); comparing on CUDA")
    ids = torch.randint(100, 10_000, (1, 48), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        model, *_ = load_base_with_adapters([adapter], device="cuda")
        with_adapter = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            base = model(input_ids=ids).logits.float()
        del model
        gc.collect()
        merged_model = AutoModelForCausalLM.from_pretrained(output, device_map={"": "cuda"})
        dtype = next(merged_model.parameters()).dtype
        merged = merged_model(input_ids=ids).logits.float()
        del merged_model
    gc.collect()
    torch.cuda.empty_cache()
    difference = (merged - with_adapter).abs().max().item()
    tolerance = LOGITS_RTOL * with_adapter.abs().max().item()
    effect = (with_adapter - base).abs().max().item()
    text = (f"merged ({str(dtype).removeprefix('torch.')}) vs base + adapter on CUDA: max |logit difference| "
            f"{difference:.3g} (tolerance {tolerance:.3g}; the adapter moves them by {effect:.3g})")  # fmt: skip
    if difference > tolerance:
        raise Failed(text)
    return text


def gpu_items() -> list[Item]:
    return [
        *[install_item(package, module) for package, module in OPTIONAL_PACKAGES.items()],
        training_item("qlora_bf16"),
        training_item("qlora_fp16"),
        Item("packed_vs_unpacked", packed_vs_unpacked),
        training_item("paged_adamw_8bit"),
        same_losses_item("gradient_checkpointing", GC_LOSS_RTOL),
        same_losses_item("liger_kernel", LIGER_LOSS_RTOL, needs="liger_kernel"),
        *[distributed_item(strategy) for strategy in DISTRIBUTED_STRATEGIES],
        Item("fsdp_joint", fsdp_joint),
        Item("generate", generate),
        Item("merge", merge),
    ]


def device_line() -> str:
    import torch

    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} x {', '.join(sorted(set(names)))}; torch {torch.__version__}, CUDA {torch.version.cuda}"


def main(argv: Sequence[str] | None = None, items: Sequence[Item] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"a directory named {OUT_NAME} (the default)")
    parser.add_argument("--no-install", action="store_true", help="never call pip (optional packages used if present)")
    args = parser.parse_args(argv)
    if args.out.name != OUT_NAME:
        print(f"gpu-check: --out={str(args.out)!r} is refused; allowed: a directory named {OUT_NAME}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}): nothing to check, nothing written")
        return 0
    shutil.rmtree(args.out / "runs", ignore_errors=True)  # a previous check's runs would be resumed, not rerun
    (args.out / "runs").mkdir(parents=True)
    ctx = Context(args.out, gpus=torch.cuda.device_count(), install=not args.no_install)
    device = device_line()
    ctx.note(f"gpu-check on {device}; writing {args.out}")
    return run_check(gpu_items() if items is None else items, ctx, device)


if __name__ == "__main__":
    sys.exit(main())
