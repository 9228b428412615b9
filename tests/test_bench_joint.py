"""dpeft-bench's joint table without training: the commands it plans, its options' checks, what it measures of one
process, and its arithmetic and Markdown from a stub runner."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmarks import joint
from benchmarks.harness import run_tables
from benchmarks.joint import JOINT, RECIPE, SEQUENTIAL, Command, run_command, variant_commands, variant_order

TASKS = ["sql", "detox", "instruct"]


def test_joint_carries_every_task_and_each_one_task_job_one_with_the_same_steps_and_recipe(tmp_path):
    sequential = variant_commands(SEQUENTIAL, TASKS, 20, tmp_path)
    (together,) = variant_commands(JOINT, TASKS, 20, tmp_path)
    common = [*RECIPE, "training.max_steps=20"]
    assert [c.argv[1:] for c in sequential] == [
        (f"task={t}", *common, f"output_dir={tmp_path / f'sequential-{t}'}") for t in TASKS
    ]
    assert together.argv[1:] == ("tasks=[sql,detox,instruct]", *common, f"output_dir={tmp_path / 'joint'}")
    assert all(Path(c.argv[0]).name == "dpeft-train" for c in [*sequential, together])
    assert [c.adapters for c in sequential] == [{t: tmp_path / f"sequential-{t}" / "adapter"} for t in TASKS]
    assert together.adapters == {t: tmp_path / "joint" / t / "adapter" for t in TASKS}
    assert "evaluation.generate=false" in RECIPE and "logging.progress_bar=false" in RECIPE
    assert [variant_order(r) for r in range(3)] == [[SEQUENTIAL, JOINT], [JOINT, SEQUENTIAL], [SEQUENTIAL, JOINT]]


@pytest.mark.parametrize(
    "override, line",
    [
        ("tables=[joint,speed]", "tables: 'speed' is not a table; allowed: packing, joint"),
        ("joint.max_steps=0", "joint.max_steps=0 is invalid; it must be an integer >= 1"),
        ("joint.tasks=[sql,sql]", "joint.tasks=['sql', 'sql'] is invalid; it must be a list of two or more different "
         "tasks of: detox, instruct, sql (the tasks with bundled data)"),
        ("joint.tasks=[sql,poems]", "joint.tasks: 'poems' is not a task dpeft-bench runs; allowed: detox, instruct, "
         "sql (the tasks with bundled data)"),
    ],
)  # fmt: skip
def test_a_bad_joint_option_is_one_line(override, line):
    from distributed_peft.cli.preflight import check_overrides
    from distributed_peft.config import validate_bench
    from distributed_peft.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        check_overrides([override], "bench", validate_bench)
    assert error.value.problems == [line]


FAKE_TRAIN = """
import json, pathlib, sys
block = bytearray(int(sys.argv[1]) * 2**20)  # zeroed, so resident
out = pathlib.Path(sys.argv[2])
for task in sys.argv[3:]:
    (out / task).mkdir(parents=True)
    run = {"optimizer_steps": 7, "throughput": {"peak_memory_mib": 50.0 + len(task), "peak_memory_kind": "device"}}
    (out / task / "dpeft_adapter.json").write_text(json.dumps({"run": run}))
print("trained")
sys.exit(int(len(sys.argv) == 3))
"""


def test_a_process_is_measured_from_spawn_to_exit_with_its_own_peak_rss(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)

    def fake(mib: int, *tasks: str) -> Command:
        out = tmp_path / f"out-{mib}"
        return Command((sys.executable, str(script), str(mib), str(out), *tasks), out, {t: out / t for t in tasks})

    big = run_command(fake(400, "sql", "detox"), tmp_path / "big.log")
    small = run_command(fake(10, "sql"), tmp_path / "small.log")  # after the big one: its own peak, not the largest
    assert 350 < big["peak_rss_mb"] - small["peak_rss_mb"] < 450 and 0 < small["seconds"] < 30, (big, small)
    assert small["peak_rss_mb"] < 60, small  # not this test process's (a hundred MiB and more, with hydra loaded)
    assert big["steps"] == {"sql": 7, "detox": 7} and big["peak_gpu_mb"] == 55.0  # the larger of the two tasks'
    assert (tmp_path / "big.log").read_text() == "trained\n"
    with pytest.raises(SystemExit, match="(?s)failed \\(exit 1\\).*trained"):  # the log's tail in the message
        run_command(fake(1), tmp_path / "failed.log")


def test_the_table_from_a_stub_runner_sums_each_variant_and_takes_ratios_of_medians():
    # seconds per process (sql, detox, instruct one-task jobs, then the joint job) by repeat: sequential sums to 90,
    # 120, 60 and joint takes 40, 50, 60
    names = [*[f"sequential-{t}" for t in TASKS], "joint"]
    per_repeat = [(30, 30, 30, 40), (50, 40, 30, 50), (20, 20, 20, 60)]
    seconds = {(name, r): s for r, row in enumerate(per_repeat) for name, s in zip(names, row, strict=True)}
    rss = {"sequential-sql": 500.0, "sequential-detox": 700.0, "sequential-instruct": 600.0, "joint": 900.0}
    ran = []

    def stub(command: Command, log: Path) -> dict:
        name, repeat = command.output_dir.name, int(command.output_dir.parent.name.split("-")[1])
        ran.append((repeat, name))
        return {"seconds": seconds[name, repeat], "peak_rss_mb": rss[name], "steps": dict.fromkeys(command.adapters, 5)}

    cfg = OmegaConf.create({"tables": ["joint"], "repeats": 3, "joint": {"tasks": TASKS, "max_steps": 5}})
    report, markdown = run_tables(cfg, runner=stub)
    sequential = names[:3]
    assert ran == [*[(0, n) for n in [*sequential, "joint"]], *[(1, n) for n in ["joint", *sequential]],
                   *[(2, n) for n in [*sequential, "joint"]]]  # fmt: skip
    rows = report["joint"]["rows"]
    assert (rows[SEQUENTIAL]["seconds"], rows[SEQUENTIAL]["min"], rows[SEQUENTIAL]["max"]) == (90, 60, 120)
    assert (rows[JOINT]["seconds"], rows[JOINT]["min"], rows[JOINT]["max"]) == (50, 40, 60)
    assert report["joint"]["ratio"] == pytest.approx(90 / 50)
    assert report["joint"]["paired_ratios"] == pytest.approx([90 / 40, 120 / 50, 60 / 60])
    assert (rows[SEQUENTIAL]["peak_rss_mb"], rows[SEQUENTIAL]["sum_peak_rss_mb"], rows[JOINT]["peak_rss_mb"]) == (
        700.0, 1800.0, 900.0
    )  # fmt: skip
    assert all(r["steps"] == dict.fromkeys(TASKS, 5) for r in report["joint"]["runs"])
    assert (
        markdown[2]
        == "## joint: sql, detox, instruct as 3 one-task jobs vs one joint job (tiny-llama QLoRA, 5 steps per task)"
    )
    assert "| sequential | 3 | 90.0 (60.0-120.0) | 1.80x (1.00-2.40 per repeat) | 700 (sum 1,800) |" in markdown
    assert "| joint | 1 | 50.0 (40.0-60.0) | 1.00x | 900 |" in markdown
    assert any("1.80x means the joint job took 1.80 times less wall time" in line for line in markdown)
    assert "GPU" not in "\n".join(markdown)
    assert json.dumps(report)  # bench.json


def test_with_cuda_the_table_adds_each_variants_peak_gpu_memory(tmp_path):
    def stub(command: Command, log: Path) -> dict:
        gpu = 1000.0 if command.output_dir.name == "joint" else 800.0
        return {"seconds": 1.0, "peak_rss_mb": 100.0, "peak_gpu_mb": gpu, "steps": dict.fromkeys(command.adapters, 1)}

    measured = joint.run_joint_table(OmegaConf.create({"tasks": TASKS, "max_steps": 1}), 1, tmp_path, stub)
    summary, lines = joint.summarize_joint(measured)
    assert lines[2].endswith("| peak RSS MiB | peak GPU MiB |")
    assert (
        "| sequential | 3 | 3.0 (3.0-3.0) | 3.00x (3.00-3.00 per repeat) | 100 (sum 300) | 800 (sum 2,400) |" in lines
    )
    assert "| joint | 1 | 1.0 (1.0-1.0) | 1.00x | 100 | 1,000 |" in lines
