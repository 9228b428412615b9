"""dpeft-bench's joint table: several tasks trained as one-task jobs one after the other against one joint job.

    dpeft-bench tables=[joint]                                    # sql, detox, instruct; 20 steps each; 3 repeats
    dpeft-bench tables=[joint] joint.tasks=[detox,instruct] joint.max_steps=50 repeats=2 output_dir=runs/bench-joint

Per repeat, `dpeft-train task=T` for each task one after the other ("sequential"), and one
`dpeft-train tasks=[...]` ("joint"), every task with the same steps, model (tiny-llama, QLoRA) and recipe
(training=demo), no generation, no checkpoints; the two variants alternate which goes first. Each is timed from spawn
to exit (start-up, data, base load, training, evaluation, saving) and its peak RSS is what the kernel reports for that
process when it is reaped (os.wait4 in a bare reaper process); with CUDA, also the runs' own peak device memory from
dpeft_adapter.json.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

SEQUENTIAL, JOINT = "sequential", "joint"
MODEL = "tiny-llama"
RECIPE = ("model=tiny-llama", "peft=qlora", "training=demo", "training.eval_steps=0", "training.checkpoint_every=0",
          "evaluation.generate=false", "logging.progress_bar=false")  # fmt: skip


@dataclass(frozen=True)
class Command:
    """One dpeft-train process: its argv, where it writes, and the adapter directories it leaves there."""

    argv: tuple[str, ...]
    output_dir: Path
    adapters: dict[str, Path]  # task -> its adapter directory


Runner = Callable[[Command, Path], dict[str, Any]]  # (command, log file) -> seconds, peak_rss_mb[, peak_gpu_mb], steps


def dpeft_train() -> str:
    return str(Path(sys.executable).parent / "dpeft-train")


def variant_commands(variant: str, tasks: list[str], max_steps: int, scratch: Path) -> list[Command]:
    """The processes of one variant: one `task=T` job per task, or one `tasks=[...]` job; the same steps per task."""
    common = (*RECIPE, f"training.max_steps={max_steps}")
    if variant == SEQUENTIAL:
        outs = {task: scratch / f"{SEQUENTIAL}-{task}" for task in tasks}
        return [
            Command((dpeft_train(), f"task={task}", *common, f"output_dir={out}"), out, {task: out / "adapter"})
            for task, out in outs.items()
        ]
    out = scratch / JOINT
    argv = (dpeft_train(), f"tasks=[{','.join(tasks)}]", *common, f"output_dir={out}")
    return [Command(argv, out, {task: out / task / "adapter" for task in tasks})]


def variant_order(repeat: int) -> list[str]:
    """Sequential first in the 1st, 3rd... repeat, joint first in the 2nd, 4th...: drift hits both alike."""
    return [SEQUENTIAL, JOINT] if repeat % 2 == 0 else [JOINT, SEQUENTIAL]


# A bare interpreter (python -I -S, a few MiB) spawns the command and reaps it: the command's ru_maxrss is its own
# peak RSS, with the reaper's small RSS as its floor (a child spawned straight from this process would start at ours:
# Linux carries the spawning process's peak RSS across exec); and the seconds from spawn to exit.
REAPER = (
    "import os, sys, time; start = time.perf_counter(); pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ); "
    "_, status, usage = os.wait4(pid, 0); seconds = time.perf_counter() - start; "
    "open(sys.argv[1], 'w').write(f'{seconds} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}')"
)


def run_command(command: Command, log: Path) -> dict[str, Any]:
    """Run one process to its end: wall seconds from spawn to exit, its peak RSS, and each adapter's recorded steps
    (and peak device memory when it trained on CUDA)."""
    reaped = log.with_suffix(".reaped")
    with log.open("w") as out:
        subprocess.run([sys.executable, "-I", "-S", "-c", REAPER, str(reaped), *command.argv], stdout=out, stderr=out,
                       check=True)  # fmt: skip
    seconds, max_rss_kib, code = reaped.read_text().split()
    if int(code) != 0:
        sys.exit(f"{' '.join(command.argv[1:3])} ... failed (exit {code}):\n{log.read_text()[-3000:]}")
    result: dict[str, Any] = {"seconds": float(seconds), "peak_rss_mb": int(max_rss_kib) / 1024, "steps": {}}
    for task, adapter in command.adapters.items():
        run = json.loads((adapter / "dpeft_adapter.json").read_text())["run"]
        result["steps"][task] = run["optimizer_steps"]
        if run["throughput"]["peak_memory_kind"] == "device":
            result["peak_gpu_mb"] = max(result.get("peak_gpu_mb", 0.0), run["throughput"]["peak_memory_mib"])
    return result


def measure_variant(commands: list[Command], runner: Runner, logs: Path) -> dict[str, Any]:
    """A variant's processes one after the other: wall time summed, peak memory the largest (one process at a time)
    and summed (what as many jobs side by side would hold), steps per task."""
    results = [runner(command, logs / f"{command.output_dir.name}.log") for command in commands]
    measured = {"seconds": sum(r["seconds"] for r in results), "processes": len(results),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                "sum_peak_rss_mb": sum(r["peak_rss_mb"] for r in results),
                "steps": {task: steps for r in results for task, steps in r["steps"].items()}}  # fmt: skip
    if all("peak_gpu_mb" in r for r in results):
        measured["peak_gpu_mb"] = max(r["peak_gpu_mb"] for r in results)
        measured["sum_peak_gpu_mb"] = sum(r["peak_gpu_mb"] for r in results)
    return measured


def run_joint_table(joint: DictConfig, repeats: int, scratch: Path, runner: Runner = run_command) -> dict[str, Any]:
    """Every repeat of both variants, alternating which goes first; the runs in the order they ran."""
    tasks = list(joint.tasks)
    runs = []
    for repeat in range(repeats):
        for variant in variant_order(repeat):
            where = scratch / f"joint-{repeat}"
            where.mkdir(parents=True, exist_ok=True)
            measured = measure_variant(variant_commands(variant, tasks, joint.max_steps, where), runner, where)
            runs.append({"variant": variant, "repeat": repeat, **measured})
            print(f"  [{repeat + 1}/{repeats}] joint table {variant:10s} {measured['seconds']:8.1f} s wall, "
                  f"peak RSS {measured['peak_rss_mb']:,.0f} MiB", flush=True)  # fmt: skip
    return {"tasks": tasks, "max_steps": joint.max_steps, "model": MODEL, "runs": runs}


def summarize_joint(report: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Medians and ranges over repeats per variant, sequential/joint wall time (of the medians, and per repeat),
    and the Markdown table with how to read it."""
    runs, tasks, steps = report["runs"], report["tasks"], report["max_steps"]
    by = {v: [r for r in runs if r["variant"] == v] for v in (SEQUENTIAL, JOINT)}
    gpu = all("peak_gpu_mb" in r for r in runs)
    rows = {}
    for variant, mine in by.items():
        rows[variant] = {"seconds": statistics.median(r["seconds"] for r in mine),
                         "min": min(r["seconds"] for r in mine), "max": max(r["seconds"] for r in mine),
                         "processes": mine[0]["processes"], "runs": len(mine),
                         "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in mine),
                         "sum_peak_rss_mb": statistics.median(r["sum_peak_rss_mb"] for r in mine)}  # fmt: skip
        if gpu:
            rows[variant]["peak_gpu_mb"] = statistics.median(r["peak_gpu_mb"] for r in mine)
            rows[variant]["sum_peak_gpu_mb"] = statistics.median(r["sum_peak_gpu_mb"] for r in mine)
    paired = [s["seconds"] / j["seconds"] for s in by[SEQUENTIAL] for j in by[JOINT] if s["repeat"] == j["repeat"]]
    ratio = rows[SEQUENTIAL]["seconds"] / rows[JOINT]["seconds"]
    summary = {"rows": rows, "ratio": ratio, "paired_ratios": paired}
    gpu_head, gpu_rule = (" peak GPU MiB |", " --- |") if gpu else ("", "")
    lines = [f"## joint: {', '.join(tasks)} as {len(tasks)} one-task jobs vs one joint job "
             f"({MODEL} QLoRA, {steps} steps per task)", "",
             f"| variant | processes | wall s median (range) | sequential / joint | peak RSS MiB |{gpu_head}",
             f"| --- | --- | --- | --- | --- |{gpu_rule}"]  # fmt: skip
    for variant, row in rows.items():
        times = f"{row['seconds']:.1f} ({row['min']:.1f}-{row['max']:.1f})"
        vs = f"{ratio:.2f}x ({min(paired):.2f}-{max(paired):.2f} per repeat)" if variant == SEQUENTIAL else "1.00x"
        memory = f"{row['peak_rss_mb']:,.0f}"
        gpu_cell = f" {row['peak_gpu_mb']:,.0f} |" if gpu else ""
        if variant == SEQUENTIAL:
            memory += f" (sum {row['sum_peak_rss_mb']:,.0f})"
            gpu_cell = f" {row['peak_gpu_mb']:,.0f} (sum {row['sum_peak_gpu_mb']:,.0f}) |" if gpu else ""
        lines.append(f"| {variant} | {row['processes']} | {times} | {vs} | {memory} |{gpu_cell}")
    lines += [
        "",
        f"Wall time runs from spawning each `dpeft-train` to its exit (Python and library start-up, data, "
        f"base load, training, evaluation, saving); sequential adds up its {len(tasks)} jobs. "
        f"`sequential / joint` is the ratio of the medians (and its range over paired repeats): "
        f"{ratio:.2f}x means the joint job took {ratio:.2f} times less wall time for the same {steps} steps per "
        f"task. Peak memory is per process; sequential's is its largest job, and `sum` is what its "
        f"{len(tasks)} jobs would hold side by side (as on a cluster), each with its own copy of the base.",
    ]
    return summary, lines
