"""make gpu-check (benchmarks/gpu_check.py). On CPU: the no-CUDA line, the report and exit code from fake items, and
the checks' pure functions. With CUDA (`pytest -m gpu`): the real check, one test per item."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import PROJECT_ROOT

from benchmarks import gpu_check
from benchmarks.gpu_check import (
    Failed,
    Item,
    RunFigures,
    Skipped,
    check_adapter_complete,
    describe_training,
    loss_fell,
    main,
    max_relative_loss_difference,
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the command would run the real check")
def test_the_command_without_cuda_says_so_in_one_line_exits_0_and_writes_nothing():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        f"gpu-check: no CUDA device here (torch {torch.__version__}): nothing to check, nothing written"
    ]


def test_no_cuda_writes_nothing_even_into_its_own_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu-check"
    assert main(["--out", str(out)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert not out.exists()


def test_any_directory_but_gpu_check_is_refused_in_one_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip().endswith("is refused; allowed: a directory named gpu-check")
    assert list(tmp_path.iterdir()) == []


def test_every_item_runs_after_a_failure_and_the_report_says_which_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(gpu_check, "device_line", lambda: "2 x Fake GPU")
    out = tmp_path / "gpu-check"
    (out / "runs" / "old").mkdir(parents=True)  # a previous check's run: removed, else it would be resumed
    ran = []

    def item(name, outcome):
        def check(ctx):
            ran.append((name, ctx.gpus, ctx.install))
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        return Item(name, check)

    items = [
        item("trains", "loss 11.8 -> 7.2 over 16 steps"),
        item("falls", Failed("loss 11.8 -> 11.9 over 16 steps: the loss did not fall by 2%")),
        item("liger", Skipped("liger-kernel not installed: no network")),
        item("crashes", RuntimeError("CUDA error: an illegal\nmemory access | was encountered")),
        item("after", "ran after the failures"),
    ]
    assert main(["--out", str(out), "--no-install"], items=items) == 1
    assert ran == [(name, 2, False) for name in ("trains", "falls", "liger", "crashes", "after")]
    assert not (out / "runs" / "old").exists() and (out / "runs").is_dir()

    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["device"] == "2 x Fake GPU" and report["budget_seconds"] == 480
    assert [(i["item"], i["status"], i["figure"]) for i in report["items"]] == [
        ("trains", "pass", "loss 11.8 -> 7.2 over 16 steps"),
        ("falls", "fail", "loss 11.8 -> 11.9 over 16 steps: the loss did not fall by 2%"),
        ("liger", "skip", "liger-kernel not installed: no network"),
        ("crashes", "fail", "RuntimeError: CUDA error: an illegal memory access | was encountered"),
        ("after", "pass", "ran after the failures"),
    ]
    assert all(isinstance(i["seconds"], float) and i["seconds"] >= 0 for i in report["items"])
    markdown = (out / "report.md").read_text()
    assert "| item | result | figure | seconds |" in markdown
    assert "| liger | skip | liger-kernel not installed: no network |" in markdown
    assert "| crashes | fail | RuntimeError: CUDA error: an illegal memory access / was encountered |" in markdown
    assert "FAIL: falls, crashes; total" in markdown
    printed = capsys.readouterr().out
    assert markdown in printed and "falls: FAIL" in printed and printed.startswith("[")  # progress with elapsed time


def test_passes_and_skips_alone_exit_0(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "device_line", lambda: "1 x Fake GPU")
    out = tmp_path / "gpu-check"

    def skip(ctx):
        raise Skipped("flash-attn: no wheel")

    assert main(["--out", str(out)], items=[Item("ok", lambda ctx: "fine"), Item("skipped", skip)]) == 0
    assert json.loads((out / "report.json").read_text())["passed"] is True
    assert "PASS; total" in (out / "report.md").read_text()


def test_the_loss_must_fall_by_two_percent_between_the_first_and_last_quarter():
    assert loss_fell([12.0, 11.0, 10.0, 9.0]) == (True, 12.0, 9.0)
    assert loss_fell([10.0, 10.0, 9.9, 9.85])[0] is False  # 1.5% lower: not a fall
    assert loss_fell([10.0] * 4 + [9.0] * 4) == (True, 10.0, 9.0)  # quarters of 2 steps


def test_a_training_run_without_its_measurements_fails_naming_them():
    losses = {step: 12.0 - step for step in range(1, 9)}
    good = RunFigures(losses, tokens_per_s=12_345.6, mfu=0.234, peak_memory_mib=5120.0)
    assert describe_training(good) == "loss 10.500 -> 4.500 over 8 steps, 12,346 tok/s, MFU 23.4%, peak 5,120 MiB"
    with pytest.raises(Failed, match=r"missing in metrics.jsonl: train/mfu, train/peak_memory_mib$"):
        describe_training(RunFigures(losses, 100.0, None, None))
    with pytest.raises(Failed, match="did not fall"):
        describe_training(RunFigures(dict.fromkeys(range(1, 9), 11.0), 100.0, 0.1, 10.0))
    with pytest.raises(Failed, match="MFU 1.5 is not in"):
        describe_training(RunFigures(losses, 100.0, 1.5, 10.0))
    nan_steps = {**losses, 3: float("nan")}
    assert "(1 non-finite skipped)" in describe_training(RunFigures(nan_steps, 100.0, 0.1, 10.0))


def test_loss_comparison_is_relative_per_step_and_needs_the_same_steps():
    assert max_relative_loss_difference({1: 10.1, 2: 5.0}, {1: 10.0, 2: 5.0}) == pytest.approx(0.01)
    with pytest.raises(Failed, match="logged steps differ"):
        max_relative_loss_difference({1: 1.0}, {1: 1.0, 2: 1.0})


def test_an_adapter_is_complete_only_with_every_tensor_non_empty_finite_and_trained():
    reference = {"l0.lora_A": torch.ones(4, 8), "l0.lora_B": torch.ones(8, 4)}
    assert check_adapter_complete(dict(reference), reference).startswith("2 tensors complete and non-zero")
    cases = {
        "tensors empty": {**reference, "l0.lora_A": torch.empty(0)},
        "lora_B all zero": {**reference, "l0.lora_B": torch.zeros(8, 4)},
        "not finite": {**reference, "l0.lora_A": torch.full((4, 8), float("nan"))},
        "keys/shapes differ": {"l0.lora_A": torch.ones(4, 8)},
    }
    for problem, tensors in cases.items():
        with pytest.raises(Failed, match=problem):
            check_adapter_complete(tensors, reference)


GPU_ITEMS = [item.name for item in gpu_check.gpu_items()]


@pytest.fixture(scope="module")
def gpu_report() -> dict[str, dict]:
    """The real check, run once as `make gpu-check` runs it; its report's items by name."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=1800)  # fmt: skip
    report = PROJECT_ROOT / gpu_check.OUT_NAME / "report.json"
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return {item["item"]: item for item in json.loads(report.read_text())["items"]}


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run make gpu-check or pytest -m gpu on a GPU")
@pytest.mark.parametrize("name", GPU_ITEMS)
def test_gpu_check_item(gpu_report, name):
    item = gpu_report[name]
    if item["status"] == "skip":
        pytest.skip(item["figure"])
    assert item["status"] == "pass", item["figure"]


def test_every_command_line_of_the_check_composes_and_validates(tmp_path):
    from distributed_peft.cli.preflight import check_overrides

    lines = {name: [*gpu_check.TRAIN, *extra] for name, extra in gpu_check.TRAINING_RUNS.items()}
    for strategy in gpu_check.DISTRIBUTED_STRATEGIES:
        lines[strategy] = gpu_check.distributed_overrides(strategy, gpu_check.CHECKPOINT_STEP)
    lines["fsdp_joint"] = gpu_check.joint_overrides(gpu_check.distributed_overrides("fsdp"))
    lines["packed_vs_unpacked"] = gpu_check.PACKED_CHECK
    for name, overrides in lines.items():
        cfg = check_overrides([*overrides, f"output_dir={tmp_path / name}"])
        assert cfg.model.weights == "random" and cfg.model.name == "llama-3.2-1b", name
    assert cfg.training.packing == "padding_free" and cfg.peft.method == "lora"
    joint = check_overrides([*lines["fsdp_joint"], f"output_dir={tmp_path / 'joint'}"])
    assert list(joint.tasks) == ["sql", "detox"] and joint.distributed.strategy == "fsdp"
    zero3 = check_overrides([*lines["zero3"], f"output_dir={tmp_path}"])
    assert (zero3.distributed.strategy, zero3.training.checkpoint_every, zero3.training.max_steps) == ("zero3", 4, 8)


# llama-3.2-1b shrunk (tests/test_random_weights.py's copy): the check's own training command, read back as it reads it
SHRUNK = ["hidden_size=128", "intermediate_size=256", "num_hidden_layers=2", "num_attention_heads=4",
          "num_key_value_heads=2", "head_dim=32", "vocab_size=4096"]  # fmt: skip


@pytest.mark.slow
def test_a_real_training_run_is_read_back_as_the_check_reads_it(tmp_path, monkeypatch, bases):
    """dpeft-train with the check's training line on a shrunk llama-3.2-1b on CPU: every step's loss, tokens/s and
    peak memory are found under the names the check reads; only MFU is missing (a CPU has no peak to divide by)."""
    steps = 4
    line = [o for o in gpu_check.TRAIN if not o.startswith(("training.max_steps", "training.tokens_per_batch"))]
    monkeypatch.setattr(gpu_check, "TRAIN", [*line, f"training.max_steps={steps}", "training.tokens_per_batch=512",
                                             *[f"+model.config_overrides.{kv}" for kv in SHRUNK]])  # fmt: skip
    ctx = gpu_check.Context(tmp_path / "gpu-check")
    (ctx.out / "runs").mkdir(parents=True)
    run_dir = gpu_check.train(ctx, "cpu_run", [])
    figures = gpu_check.run_figures(run_dir)
    assert sorted(figures.losses) == list(range(1, steps + 1))
    assert figures.tokens_per_s > 0 and figures.peak_memory_mib > 0 and figures.mfu is None
    with pytest.raises(Failed, match=r"missing in metrics.jsonl: train/mfu$"):
        describe_training(figures)
    assert check_adapter_complete(gpu_check.adapter_tensors(run_dir)).startswith("28 tensors complete")
    assert (ctx.out / "runs" / "cpu_run.log").read_text().startswith("$ ")


def test_packed_logits_match_each_example_alone_and_the_unbounded_row_is_a_control_that_differs(tmp_path, bases):
    """The packed item's measurement on CPU (our packed sdpa kernel, float32) on the shrunk llama-3.2-1b."""
    from distributed_peft.cli.preflight import check_overrides
    from distributed_peft.modeling.loading import load_base_model, resolve_base

    overrides = [*gpu_check.PACKED_CHECK, *[f"+model.config_overrides.{kv}" for kv in SHRUNK]]
    cfg = check_overrides([*overrides, f"output_dir={tmp_path}"])
    model = load_base_model(cfg, resolve_base(cfg.model)[0]).eval()
    difference, leak, tolerance = gpu_check.packed_logit_differences(model, "cpu")
    assert difference < 1e-4 < tolerance < leak, (difference, tolerance, leak)


def test_a_failed_command_is_summed_up_by_the_line_that_says_why():
    launch = """dpeft-launch: 1 node(s) x 1 worker(s), strategy zero3
Traceback (most recent call last):
  File "random_base.py", line 65, in parameter_count
NotImplementedError: Cannot copy out of meta tensor; no data!
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
subprocess.CalledProcessError: Command '['python', '-m', 'distributed_peft.cli.train']' returned 1.
dpeft-launch: training exited 1
"""
    assert gpu_check.error_line(launch) == "NotImplementedError: Cannot copy out of meta tensor; no data!"
    ours = "dpeft-train: loading\ndpeft-train: error: training.lr=5 is invalid; allowed: > 0 and <= 1\n"
    assert gpu_check.error_line(ours) == "dpeft-train: error: training.lr=5 is invalid; allowed: > 0 and <= 1"
    assert gpu_check.error_line("Killed\n") == "Killed" and gpu_check.error_line("") == "no output"
