"""Scaling benchmark: the same QLoRA run on 1 and on 2 workers (DDP), tokens/s per worker and scaling efficiency.

    python benchmarks/scaling.py                       # tiny-llama, sql, CPU processes here; GPUs where present
    python benchmarks/scaling.py --repeats 3 --steps 40 --strategy zero2 -- model=tiny-bloom

Runs alternate (1, 2, 1, 2, ...) so drift on a shared machine hits both; the table reports the median and range of
each. Weak scaling: the micro batch per worker is fixed, so 2 workers process twice the tokens per step.
Efficiency = per-worker tokens/s with 2 workers / tokens/s with 1 worker. Writes bench_scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from distributed_peft.constants import METRICS_FILE
from distributed_peft.errors import StorageError
from distributed_peft.runtime.output_dirs import check_output_dir, claim_output_dir

BIN = Path(sys.executable).parent


def run_once(workers: int, args: argparse.Namespace, extra: list[str], out: Path, port: int) -> float:
    """Global completion tokens/s over the training loop (setup and final evaluation excluded)."""
    cmd = [
        str(BIN / "dpeft-launch"),
        f"distributed={args.strategy}",
        f"num_gpu_workers={workers}",
        "task=sql",
        "model=tiny-llama",
        "peft=qlora",
        "training=demo",
        f"training.max_steps={args.steps}",
        "training.eval_steps=0",
        "training.max_eval_examples=16",
        "peft.dropout=0",
        "logging.progress_bar=false",
        f"main_process_port={port}",
        f"output_dir={out}",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed ({workers} workers):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    return [r for r in rows if "train/tokens_per_s" in r][-1]["train/tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "zero2", "zero3"])
    parser.add_argument("--output", type=Path, default=Path("runs/bench-scaling"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    try:  # checked before minutes of runs: only an absent, empty or earlier distributed-peft directory is written
        check_output_dir(args.output, key="--output")
    except StorageError as error:
        sys.exit(f"bench_scaling: error: {error.problems[0]}")

    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for workers in (1, 2):
                out = Path(scratch) / f"w{workers}-r{repeat}"
                rate = run_once(workers, args, args.overrides, out, port=29700 + 10 * repeat + workers)
                rates[workers].append(rate)
                print(f"  repeat {repeat + 1}/{args.repeats}: {workers} worker(s) {rate:,.0f} tok/s", flush=True)

    one = statistics.median(rates[1])
    rows, table = (
        [],
        [
            "| workers | global tok/s (median, range) | per-worker tok/s | scaling efficiency |",
            "| --- | --- | --- | --- |",
        ],
    )
    for workers, samples in rates.items():
        median = statistics.median(samples)
        per_worker = median / workers
        rows.append(
            {
                "workers": workers,
                "tokens_per_s": samples,
                "median": median,
                "per_worker": per_worker,
                "efficiency": per_worker / one,
            }
        )
        table.append(
            f"| {workers} | {median:,.0f} ({min(samples):,.0f}-{max(samples):,.0f}) | {per_worker:,.0f} | "
            f"{per_worker / one:.2f} |"
        )
    claim_output_dir(args.output, key="--output", command="bench_scaling.py")
    header = f"Scaling, {args.strategy}, tiny-llama QLoRA on sql, {args.steps} steps x {args.repeats} repeats"
    (args.output / "bench_scaling.json").write_text(json.dumps({"setup": header, "rows": rows}, indent=2))
    (args.output / "bench_scaling.md").write_text(f"# {header}\n\n" + "\n".join(table) + "\n")
    print(f"\n{header}\n" + "\n".join(table))
    print(f"\nwritten: {args.output / 'bench_scaling.md'}")


if __name__ == "__main__":
    main()
