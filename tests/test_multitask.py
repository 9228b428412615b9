"""Several task adapters in one job (`tasks=[...]`): each task ends exactly as if trained alone, a killed job resumes
every adapter exactly, and a task's mistake stops the job before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config, run_entry
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_resume import kill_tree, run, start, train_command, wait_for_checkpoint

from distributed_peft.errors import ConfigError
from distributed_peft.training.task_runs import step_order

# Two tasks of different lengths (sql 3 steps, detox 5), with dropout: each step of a task draws its masks from a
# generator seeded by (its seed, its step), so each adapter of the joint job must equal the one trained alone.
SHARED = [
    "model=tiny-llama",
    "peft=qlora",
    "training=demo",
    "peft.dropout=0.1",
    "training.eval_steps=0",
    "training.max_eval_examples=16",
    "evaluation.generate=false",
    "logging.progress_bar=false",
    "logging.log_every_steps=1",
]
PER_TASK = {
    "sql": ["task.data.max_examples=80", "training.max_steps=3"],
    "detox": ["task.data.max_examples=80", "training.max_steps=5", "training.lr=2e-3"],
}
JOINT = ["tasks=[sql,detox]", *(f"per_task.{t}.{o}" for t, opts in PER_TASK.items() for o in opts)]
STEPS = {"sql": 3, "detox": 5}
TOLERANCE = 1e-5  # absolute, on every adapter tensor


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def joint(tmp_path_factory, bases) -> Path:
    """The joint job in one go, checkpointing (as the killed one does) but never interrupted."""
    out = tmp_path_factory.mktemp("joint")
    run(joint_command(out))
    return out


def joint_command(out: Path, checkpoint_every: int = 4, program: str = "dpeft-train") -> list[str]:
    binary = Path(train_command(out)[0]).with_name(program)
    return [str(binary), *SHARED, *JOINT, f"output_dir={out}", f"training.checkpoint_every={checkpoint_every}"]


def test_round_robin_and_proportional_orders():
    assert step_order({"a": 2, "b": 4, "c": 1}, "round_robin") == ["a", "b", "c", "a", "b", "b", "b"]
    order = step_order({"a": 2, "b": 4}, "proportional")
    assert sorted(order) == ["a", "a", "b", "b", "b", "b"]
    assert order == ["b", "a", "b", "b", "a", "b"]  # a at 1/4 and 3/4 of the job, b at 1/8, 3/8, 5/8, 7/8


@pytest.fixture(scope="module")
def alone(tmp_path_factory, bases) -> dict[str, Path]:
    """Each task trained alone, in this process, with the settings it has in the joint job."""
    from distributed_peft.training.recipe import run_training

    runs = {}
    for task, options in PER_TASK.items():
        runs[task] = tmp_path_factory.mktemp(f"alone-{task}")
        run_training(compose_config([f"task={task}", *SHARED, *options, f"output_dir={runs[task]}"]))
    return runs


@pytest.mark.slow
def test_each_adapter_of_the_joint_job_equals_the_one_trained_alone(joint, alone):
    summary = (joint / "tasks.md").read_text()
    assert "| sql | 3 |" in summary and "| detox | 5 |" in summary, summary
    for task in PER_TASK:
        together, by_itself = adapter_tensors(joint / task), adapter_tensors(alone[task])
        assert max(t.abs().max().item() for k, t in together.items() if "lora_B" in k) > 0, "the adapter never trained"
        difference = max_difference(together, by_itself)
        assert difference <= TOLERANCE, f"{task}: joint and alone adapters differ by {difference:.2e}"
        # the task's own record: its steps, and the config it would have trained with alone
        metadata = json.loads((joint / task / "adapter" / "dpeft_adapter.json").read_text())
        assert metadata["run"]["optimizer_steps"] == STEPS[task]
        recorded = OmegaConf.load(joint / task / "config.yaml")
        assert recorded.tasks == [] and recorded.task.name == task and recorded.output_dir == str(joint / task)
        for name in ("eval.json", "eval.md", "README.md", "loss.png", "metrics.jsonl"):
            assert (joint / task / name).is_file(), f"{task}: {name} missing"
        evaluation = json.loads((joint / task / "eval.json").read_text())
        alone_eval = json.loads((alone[task] / "eval.json").read_text())
        assert evaluation["adapter"]["loss"] == pytest.approx(alone_eval["adapter"]["loss"], abs=1e-4)


@pytest.mark.slow
def test_under_zero3_the_joint_adapter_equals_the_one_trained_alone_under_zero3(tmp_path):
    """DeepSpeed's ZeRO-3 (one rank: its partitioned gradients and optimizer, the same batches), detox trained in the
    joint job and alone. ZeRO keeps the gradient of a parameter that got none from its last step: without the other
    adapters in the graph at scale 0, their stale gradients entered the clipping norm and the joint detox adapter
    differed by 4.4e-4 (against the plain one-process run ZeRO's float sums differ by up to 3e-5: hence ZeRO alone)."""
    launch = [*joint_command(tmp_path / "joint", checkpoint_every=0, program="dpeft-launch"), "distributed=zero3",
              "num_gpu_workers=1"]  # fmt: skip
    run([*launch, "main_process_port=29741"])
    alone = [a for a in launch if not a.startswith(("tasks=", "per_task.", "output_dir="))]
    detox = [o.split(".", 2)[2] for o in JOINT if o.startswith("per_task.detox.")]
    run([*alone, "task=detox", *detox, f"output_dir={tmp_path / 'alone'}", "main_process_port=29742"])
    difference = max_difference(adapter_tensors(tmp_path / "joint" / "detox"), adapter_tensors(tmp_path / "alone"))
    assert difference <= 1e-6, f"detox: ZeRO-3 joint and alone adapters differ by {difference:.2e}"
    assert max(t.abs().max().item() for k, t in adapter_tensors(tmp_path / "joint" / "sql").items() if "lora_B" in k)


@pytest.mark.slow
def test_a_killed_joint_job_resumes_every_adapter_exactly(joint, tmp_path):
    out = tmp_path / "killed"
    proc = start(joint_command(out))
    wait_for_checkpoint(out, 4, proc)
    kill_tree(proc)
    resumed = run(joint_command(out))
    assert "resume: continuing from" in resumed.stdout and "step 4 of 8" in resumed.stdout
    for task in PER_TASK:
        difference = max_difference(adapter_tensors(out / task), adapter_tensors(joint / task))
        assert difference <= 1e-6, f"{task}: resumed and uninterrupted adapters differ by {difference:.2e}"
        steps = [json.loads(line)["step"] for line in (out / task / "metrics.jsonl").read_text().splitlines()]
        assert sorted(set(steps)) == list(range(1, STEPS[task] + 1))


def test_a_task_that_fails_validation_stops_the_job_before_any_model_loads(monkeypatch, tmp_path):
    out = tmp_path / "never"
    code, lines = run_entry(
        monkeypatch,
        "dpeft-train",
        ["tasks=[sql,detox]", "per_task.detox.training.lr=7", "per_task.sql.task.data.path=/no/such.jsonl",
         "per_task.sql.task.data.source=local", f"output_dir={out}"],
    )  # fmt: skip
    assert code == 2 and not out.exists()
    assert any("task detox: training.lr=7.0 is invalid" in line for line in lines), lines
    assert any("task sql: task.data.path='/no/such.jsonl' does not exist" in line for line in lines), lines


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["tasks=[sql,nope]"], "names unknown task(s) nope; allowed: custom, detox, instruct, sql"),
        (["tasks=[sql,sql]"], "lists sql twice"),
        (["tasks=[sql,detox]", "per_task.detox.training.micro_batch_size=3"], "is the job's setting"),
        (["tasks=[sql,detox]", "per_task.instruct.training.lr=0.1"], "per_task.instruct names a task that is not in"),
        (["tasks=[sql,detox]", "per_task.detox.model.name=x"], "per_task.detox.model is not a per-task setting"),
        (["tasks=[sql,detox]", "per_task.detox.task.data.pth=x"], "per_task.detox: Key 'pth' not in 'DataConfig'"),
        (["tasks=[sql,detox]", "task.data.path=x"], "applies to a one-task run"),
        (["tasks=[sql,detox]", "training.interleave=zigzag"], "allowed: round_robin, proportional"),
    ],
)
def test_a_multitask_mistake_is_one_line(overrides, expected, tmp_path):
    from distributed_peft.data.prompts import literal_overrides

    with pytest.raises(ConfigError) as error:
        compose_config(literal_overrides([*overrides, f"output_dir={tmp_path / 'o'}"]))
    assert len(error.value.problems) == 1 and expected in error.value.problems[0], error.value.problems


def test_each_task_gets_its_own_settings_and_directory(tmp_path):
    from distributed_peft.config import task_configs
    from distributed_peft.data.prompts import literal_overrides

    cfg = compose_config(literal_overrides([*JOINT, "training.lr=1e-3", f"output_dir={tmp_path}"]))
    configs = task_configs(cfg)
    assert list(configs) == ["sql", "detox"]
    assert (configs["sql"].training.lr, configs["detox"].training.lr) == (1e-3, 2e-3)
    assert (configs["sql"].training.max_steps, configs["detox"].training.max_steps) == (3, 5)
    assert configs["detox"].task.prompt_template.startswith("<Toxic>")
    assert configs["sql"].output_dir == str(tmp_path / "sql") and configs["sql"].tasks == []
    default = compose_config(literal_overrides(["tasks=[sql,detox]"]))
    assert default.output_dir.endswith("sql+detox-tiny-llama")
