"""dpeft-bench's GPU table, planned without running it: its rows, what it skips and why, and its summary."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from benchmarks import harness
from benchmarks.harness import Job, plan, summarize

ALL = ["trl_padded", "ours_padded", "ours_group_by_length", "ours_padding_free", "trl_padding_free"]
OURS = ["ours_padded", "ours_group_by_length", "ours_padding_free"]
LLAMA = ("model=llama-3.2-1b", "model.weights=random")
BLOOM = ("model=bloom-1b1", "model.weights=random")


def bench_cfg(**values):
    defaults = {"variants": ALL, "gpu_models": ["llama-3.2-1b", "bloom-1b1"], "model": {"name": "tiny-llama"}}
    return OmegaConf.create({**defaults, **values})


def test_with_cuda_each_model_runs_every_variant_and_ours_with_each_kernel_its_family_supports():
    jobs, skipped = plan(bench_cfg(), cuda=True, installed={"flash_attn", "liger_kernel"})
    assert jobs == [
        *[Job(v, v) for v in ALL],
        *[Job(v, v, "llama-3.2-1b", LLAMA) for v in ALL],
        *[Job(v, f"{v}+flash_attn", "llama-3.2-1b", (*LLAMA, "model.attn_implementation=flash_attention_2"))
          for v in OURS],
        *[Job(v, f"{v}+liger", "llama-3.2-1b", (*LLAMA, "training.liger_kernel=true")) for v in OURS],
        *[Job(v, v, "bloom-1b1", BLOOM) for v in ALL],
    ]  # fmt: skip
    assert skipped == ["bloom-1b1: +flash_attn skipped: not supported for bloom",
                       "bloom-1b1: +liger skipped: not supported for bloom"]  # fmt: skip


def test_without_cuda_the_gpu_table_is_one_line_and_missing_kernels_are_named():
    jobs, skipped = plan(bench_cfg(variants=["ours_padding_free"]), cuda=False, installed={"flash_attn"})
    assert jobs == [Job("trl_padded", "trl_padded"), Job("ours_padding_free", "ours_padding_free")]
    assert skipped == ["GPU table skipped: no CUDA device (llama-3.2-1b, bloom-1b1 with random weights need one)"]
    assert plan(bench_cfg(gpu_models=[]), cuda=True, installed=set())[1] == []

    jobs, _ = plan(
        bench_cfg(variants=["ours_padding_free"], model={"name": "smollm2-135m"}), cuda=False, installed=set()
    )
    assert jobs == [
        Job("trl_padded", "trl_padded", "smollm2-135m"),
        Job("ours_padding_free", "ours_padding_free", "smollm2-135m"),
    ]  # dpeft-bench model=smollm2-135m: the CPU table on the real base

    jobs, skipped = plan(bench_cfg(variants=["ours_padding_free"], gpu_models=["llama-3.2-1b"]), True, set())
    assert [j.label for j in jobs if j.model == "llama-3.2-1b"] == ["trl_padded", "ours_padding_free"]
    assert skipped == ["llama-3.2-1b: +flash_attn skipped: flash_attn is not installed",
                       "llama-3.2-1b: +liger skipped: liger_kernel is not installed"]  # fmt: skip


def test_a_child_gets_back_the_job_its_command_line_names(monkeypatch, tmp_path):
    got = []
    monkeypatch.setattr(harness, "child", lambda job, task, examples, result: got.append((job, task, examples)))
    job = Job("ours_padded", "ours_padded+liger", "llama-3.2-1b", (*LLAMA, "training.liger_kernel=true"))
    harness.child_main(["ours_padded", "sql", "40", str(tmp_path / "r.json"), job.label, job.model, *job.overrides])
    harness.child_main(["trl_padded", "sql", "40", str(tmp_path / "r.json")])  # the CPU table's form
    assert got == [(job, "sql", 40), (Job("trl_padded", "trl_padded"), "sql", 40)]


def test_a_gpu_table_takes_its_own_models_baseline_and_device_memory():
    def run(variant, model, rate, gpu_mb=None):
        row = {"variant": variant, "task": "sql", "model": model, "tokens_per_s": rate, "padding_waste": 0.1,
               "eval_loss": 2.0, "peak_rss_mb": 900.0}  # fmt: skip
        return row if gpu_mb is None else {**row, "peak_gpu_mb": gpu_mb}

    runs = [run("trl_padded", "tiny-llama", 100.0), run("ours_padding_free", "tiny-llama", 300.0),
            run("trl_padded", "llama-3.2-1b", 1000.0, 5000.0), run("ours_padding_free", "llama-3.2-1b", 1500.0, 4000.0),
            run("ours_padding_free+liger", "llama-3.2-1b", 2000.0, 3000.0)]  # fmt: skip
    rows, table = summarize(runs, "sql", "llama-3.2-1b", random_weights=True)
    by = {r["variant"]: r for r in rows}
    assert list(by) == ["trl_padded", "ours_padding_free", "ours_padding_free+liger"]
    assert by["ours_padding_free+liger"]["ratio"] == pytest.approx(2.0) and by["ours_padding_free"]["ratio"] == 1.5
    assert table.splitlines()[0] == "## sql: llama-3.2-1b, random weights" and "peak GPU MB" in table
    assert "| ours_padding_free+liger | 2,000 (2,000-2,000) | 2.00x | 10.0% | 3,000 |" in table
    cpu_rows, _ = summarize(runs, "sql")
    assert [r["ratio"] for r in cpu_rows] == [1.0, 3.0]


def test_a_gpu_model_without_a_bundled_config_is_one_line():
    from distributed_peft.cli.preflight import check_overrides
    from distributed_peft.config import validate_bench
    from distributed_peft.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        check_overrides(["gpu_models=[llama-3.2-1b,gpt-9]"], "bench", validate_bench)
    assert error.value.problems == [
        "gpu_models: 'gpt-9' has no bundled Hub config; allowed: bloom-1b1, bloom-560m, llama-2-7b, llama-3.2-1b, "
        "mistral-7b"
    ]
