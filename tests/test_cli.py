"""The entry points as users run them: console scripts, `python -m`, `accelerate launch -m`, dpeft-eval."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

BIN = Path(sys.executable).parent
QUICK = ["training=demo", "training.max_steps=8", "training.eval_steps=4", "training.max_eval_examples=32",
         "evaluation.max_generate_examples=8"]  # fmt: skip


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=timeout, env=os.environ)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


SQL_RUN = ["task=sql", "model=tiny-bloom", "peft=qlora", *QUICK]


@pytest.fixture(scope="module")
def console_script_run(tmp_path_factory, bases) -> tuple[Path, subprocess.CompletedProcess]:
    """One `dpeft-train` run, read by both tests below."""
    out = tmp_path_factory.mktemp("console") / "sql"
    return out, run([str(BIN / "dpeft-train"), *SQL_RUN, f"output_dir={out}"])


@pytest.mark.slow
def test_console_script_trains_and_dpeft_eval_reproduces_it(console_script_run):
    out, proc = console_script_run
    assert "effective batch 8 = micro batch 8 x gradient accumulation 1 x world size 1" in proc.stdout
    assert f"adapter: {out / 'adapter'}" in proc.stdout
    noise = ("kernels-community", "Setting accelerator to CPU", "FutureWarning")
    assert not [line for line in (proc.stdout + proc.stderr).splitlines() if any(n in line for n in noise)], (
        "a normal run prints our progress and results, not third-party notices"
    )
    trained = json.loads((out / "eval.json").read_text())
    evaluated_dir = out.parent / "evaluated"
    shutil.copytree(out, evaluated_dir)  # the fixture's run stays as trained for the next test
    (evaluated_dir / "eval.json").unlink()
    # the run's adapter, reports into that run; dpeft-eval chooses its own evaluation settings (default 64 generations)
    proc = run([str(BIN / "dpeft-eval"), f"output_dir={evaluated_dir}", "evaluation.max_generate_examples=8"])
    assert f"reports: {evaluated_dir / 'eval.md'}" in proc.stdout
    evaluated = json.loads((evaluated_dir / "eval.json").read_text())
    assert abs(evaluated["adapter"]["loss"] - trained["adapter"]["loss"]) < 1e-4
    assert "| loss |" in (evaluated_dir / "eval.md").read_text()


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_module_as_the_console_script(console_script_run, tmp_path):
    """`accelerate launch -m distributed_peft.cli.train` (so `python -m`) is dpeft-train: same seed, same adapter."""
    accelerate = shutil.which("accelerate", path=str(BIN))
    launched = [accelerate, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
                "no", "--dynamo_backend", "no", "-m", "distributed_peft.cli.train"]  # fmt: skip
    run([*launched, *SQL_RUN, f"output_dir={tmp_path / 'launched'}"])
    losses = [
        json.loads((d / "eval.json").read_text())["adapter"]["loss"]
        for d in (console_script_run[0], tmp_path / "launched")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5), "the same seed must give the same adapter either way"


def test_dpeft_eval_refuses_a_directory_that_is_not_an_adapter(tmp_path):
    proc = subprocess.run(
        [str(BIN / "dpeft-eval"), f"adapter={tmp_path}"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"dpeft-eval: error: adapter='{tmp_path}' is not a distributed-peft adapter directory: "
        "adapter_model.safetensors, adapter_config.json, dpeft_adapter.json missing; it must hold "
        "adapter_model.safetensors, adapter_config.json, dpeft_adapter.json; copy the adapter directory again whole, "
        "or retrain it"
    )
