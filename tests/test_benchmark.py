"""dpeft-bench runs end to end on a tiny budget and writes its table; speed itself is measured by the script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

from benchmarks.harness import summarize


@pytest.mark.slow
def test_bench_runs_every_kind_of_variant_and_writes_its_files(tmp_path, bases):
    cmd = [
        str(Path(sys.executable).parent / "dpeft-bench"),  # the command; its harness is benchmarks/ of the checkout
        "tables=[packing]",  # the joint table: tests/test_bench_joint.py
        "tasks=[detox]",
        "repeats=1",
        "examples=48",
        "variants=[trl_padded,ours_padding_free,ours_group_by_length]",
        f"output_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["variant"]: r for r in report["tables"]["detox"]}
    assert set(rows) == {"trl_padded", "ours_padding_free", "ours_group_by_length"}
    runs = report["runs"]
    assert sorted(r["variant"] for r in runs) == sorted(rows) and all(r["task"] == "detox" for r in runs)
    for run in runs:  # the rate is the run's own non-pad tokens over its own training time
        assert run["nonpad_tokens"] > 0 and run["seconds"] > 0
        assert run["tokens_per_s"] == pytest.approx(run["nonpad_tokens"] / run["seconds"])
    base = rows["trl_padded"]
    md = (tmp_path / "bench.md").read_text()
    for variant, row in rows.items():  # the table is read from the runs, and each ratio from its own variant's rate
        (run,) = [r for r in runs if r["variant"] == variant]
        assert (row["tokens_per_s"], row["padding_waste"], row["eval_loss"]) == (
            run["tokens_per_s"], run["padding_waste"], run["eval_loss"]
        )  # fmt: skip
        assert row["ratio"] == pytest.approx(run["tokens_per_s"] / base["tokens_per_s"])
        assert f"| {variant} | {row['tokens_per_s']:,.0f} " in md and f" | {row['ratio']:.2f}x | " in md
    # padding-free batches carry no pad; grouping by length pads less than TRL's plain padded batches
    waste = {v: r["padding_waste"] for v, r in rows.items()}
    assert waste["ours_padding_free"] == 0.0 < waste["ours_group_by_length"] < waste["trl_padded"], waste
    assert all(r["peak_rss_mb"] > 0 and r["eval_loss"] > 0 for r in rows.values())


def test_summary_takes_medians_per_variant_and_ratios_to_the_baselines_median():
    """Two repeats of three variants (and another task's run that must not leak in): every number is recomputed here."""

    def run(variant, task, tokens_per_s, waste, loss, rss=100.0):
        return {"variant": variant, "task": task, "tokens_per_s": tokens_per_s, "padding_waste": waste,
                "eval_loss": loss, "peak_rss_mb": rss}  # fmt: skip

    runs = [
        run("trl_padded", "detox", 100.0, 0.40, 2.0), run("ours_padding_free", "detox", 300.0, 0.0, 1.9),
        run("ours_group_by_length", "detox", 150.0, 0.10, 2.2), run("trl_padded", "detox", 200.0, 0.30, 2.0),
        run("ours_padding_free", "detox", 500.0, 0.0, 2.1), run("ours_group_by_length", "detox", 250.0, 0.20, 2.2),
        run("ours_padding_free", "sql", 10_000.0, 0.0, 9.0),
    ]  # fmt: skip
    rows, table = summarize(runs, "detox")
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"trl_padded", "ours_padding_free", "ours_group_by_length"}
    assert by["trl_padded"]["tokens_per_s"] == 150.0 and by["ours_padding_free"]["tokens_per_s"] == 400.0
    assert (by["ours_padding_free"]["min"], by["ours_padding_free"]["max"], by["ours_padding_free"]["runs"]) == (
        300.0, 500.0, 2
    )  # fmt: skip
    assert by["ours_padding_free"]["ratio"] == pytest.approx(400 / 150)
    assert by["ours_group_by_length"]["ratio"] == pytest.approx(200 / 150)
    assert by["trl_padded"]["padding_waste"] == pytest.approx(0.35)
    assert by["ours_group_by_length"]["padding_waste"] == pytest.approx(0.15)
    assert by["ours_group_by_length"]["eval_loss_delta"] == pytest.approx(0.1)
    assert "| ours_padding_free | 400 (300-500) | 2.67x | 0.0% |" in table
