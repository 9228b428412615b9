"""dpeft-bench runs end to end on a tiny budget and writes its table; speed itself is measured by the script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import PROJECT_ROOT


@pytest.mark.slow
def test_bench_runs_every_kind_of_variant_and_writes_its_files(tmp_path, bases):
    cmd = [
        sys.executable,
        "-m",
        "distributed_peft.benchmark",
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
    assert rows["trl_padded"]["ratio"] == 1.0
    assert rows["ours_padding_free"]["padding_waste"] == 0.0 < rows["trl_padded"]["padding_waste"]
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["eval_loss"] > 0 for r in rows.values())
    assert "| ours_padding_free |" in (tmp_path / "bench.md").read_text()
