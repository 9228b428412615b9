"""Where users' clusters are: SLURM through Hydra's submitit launcher, SkyPilot's task YAML, a DVC pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT_ROOT, TEST_HOME, run_entry

from distributed_peft.errors import USER_ERROR_EXIT_CODE

BIN = Path(sys.executable).parent
# The cheapest run that trains, evaluates and writes an adapter (the embedded base, cached in the test home).
TINY = [
    "model=tiny-llama",
    "training=demo",
    "training.max_steps=2",
    "training.eval_steps=0",
    "training.max_eval_examples=4",
    "evaluation.generate=false",
    "logging.progress_bar=false",
]


def command_env() -> dict[str, str]:
    env = dict(os.environ, DPEFT_HOME=str(TEST_HOME), OMP_NUM_THREADS="1", DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def run(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=command_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


# ------------------------------------------------------------------------------------------------ SLURM (submitit)


def hydra_launcher(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="distributed_peft.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra.launcher


def test_slurm_preset_asks_one_task_per_gpu_and_requeues_after_a_checkpoint():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launcher = hydra_launcher("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8", "hydra.launcher.nodes=2")
    assert launcher._target_ == "hydra_plugins.dpeft_launchers.training_jobs.SlurmLauncher"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)
    assert launcher.signal_delay_s >= 60 and launcher.max_num_timeout > 0 and launcher.additional_parameters.requeue
    assert launcher.partition is None  # the cluster's, chosen by the user
    local = hydra_launcher("hydra/launcher=local")
    assert local._target_ == "hydra_plugins.dpeft_launchers.training_jobs.LocalLauncher"

    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    found = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}
    assert {launcher._target_, local._target_} <= found  # Hydra loads launchers only from hydra_plugins


def test_a_launcher_passes_preflight_and_a_mistyped_one_is_one_line(monkeypatch):
    from distributed_peft.cli.preflight import check_overrides

    assert check_overrides(["hydra/launcher=slurm", "task=sql"]).task.name == "sql"
    assert check_overrides(["-m", "hydra/launcher=slurm", "task=sql,detox"]) is None  # Hydra expands the sweep
    code, lines = run_entry(monkeypatch, "dpeft-train", ["-m", "hydra/launcher=slurmm", "task=sql,detox"])
    assert code == USER_ERROR_EXIT_CODE and len(lines) == 1, lines
    assert lines[0].startswith("dpeft-train: error: hydra/launcher='slurmm' is not a known hydra/launcher; allowed:")
    assert "local, slurm, submitit_local, submitit_slurm" in lines[0]


@pytest.mark.slow
def test_a_sweep_through_submitit_runs_one_job_per_task_each_into_its_own_directory(tmp_path, bases):
    """The same code path as hydra/launcher=slurm (pickled Hydra job, submitit's job environment), on this machine."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = [str(BIN / "dpeft-train"), "-m", "hydra/launcher=local", "task=sql,detox", *TINY, "output_dir=sweep"]
    run(args, cwd=tmp_path)
    for job, task in (("0", "sql"), ("1", "detox")):
        adapter = tmp_path / "sweep" / job / "adapter"
        recorded = json.loads((adapter / "dpeft_adapter.json").read_text())["config"]
        assert recorded["task"]["name"] == task and recorded["output_dir"] == f"sweep/{job}"
        assert (adapter / "adapter_model.safetensors").is_file()
    logs = sorted(tmp_path.glob("runs/multirun/*/.submitit/*/*_0_log.out"))
    assert len(logs) == 2 and all("adapter: sweep/" in log.read_text() for log in logs)


# ------------------------------------------------------------------------------------------------------------- SkyPilot

SKYPILOT_TASK = PROJECT_ROOT / "distributed_peft" / "launch" / "skypilot" / "train.yaml"


def test_skypilot_task_is_a_spot_job_that_resumes_from_its_bucket():
    sky = pytest.importorskip("sky")
    config = yaml.safe_load(SKYPILOT_TASK.read_text())
    with pytest.raises(ValueError, match="BUCKET"):  # the bucket is the user's: required
        sky.Task.from_yaml_config(dict(config))
    task = sky.Task.from_yaml_config(config, env_overrides=[("BUCKET", "my-dpeft-runs"), ("TASK", "instruct")])
    (resources,) = task.resources
    assert resources.use_spot and resources.accelerators == {"A100": 1} and task.num_nodes == 1
    assert resources.job_recovery["strategy"] == "FAILOVER"
    mount = task.storage_mounts["/outputs"]
    assert mount.name == "my-dpeft-runs" and mount.mode.value == "MOUNT"
    assert task.envs["TASK"] == "instruct"
    for needed in ("SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_GPUS_PER_NODE", "SKYPILOT_NUM_NODES"):
        assert needed in task.run
    assert 'output_dir="${RUN_DIR}" training.resume=auto' in task.run and 'RUN_DIR="/outputs/' in task.run
    assert "sky jobs launch" in SKYPILOT_TASK.read_text()  # the managed job that recovers from pre-emption


# ------------------------------------------------------------------------------------------------------------------ DVC

DVC_EXAMPLE = PROJECT_ROOT / "examples" / "dvc"


@pytest.mark.slow
def test_the_dvc_pipeline_composes_its_params_with_hydra_and_runs_every_stage(tmp_path, bases):
    if shutil.which("dvc", path=str(BIN)) is None:
        pytest.skip("dvc is not installed (pip install 'distributed-peft[dvc]')")
    dvc, git = str(BIN / "dvc"), shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    shutil.copytree(DVC_EXAMPLE, tmp_path, dirs_exist_ok=True)
    run([git, "init", "-q"], tmp_path)
    run([dvc, "init", "-q"], tmp_path)
    hydra = {"enabled": "true", "config_module": "distributed_peft.conf", "config_name": "config"}
    with (tmp_path / ".dvc" / "config").open("a") as config:  # what `dvc config hydra.KEY VALUE` writes
        config.write("[hydra]\n" + "".join(f"    {key} = {value}\n" for key, value in hydra.items()))
    run([git, "add", "-A"], tmp_path)
    run([git, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline"], tmp_path)

    overrides = ["task=sql", *TINY[1:]]
    ran = run([dvc, "exp", "run", *(a for o in overrides for a in ("--set-param", o))], tmp_path, timeout=300)
    for stage in ("base", "train", "evaluate", "merge"):
        assert f"Running stage '{stage}'" in ran.stdout, ran.stdout
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())  # Hydra's composition of our tree
    assert params["task"]["name"] == "sql" and params["training"]["max_steps"] == 2
    assert params["model"]["name"] == "tiny-llama" and params["peft"]["method"] == "qlora"
    assert (tmp_path / "runs" / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "runs" / "merged" / "config.json").is_file()
    recorded = json.loads((tmp_path / "runs" / "train" / "adapter" / "dpeft_adapter.json").read_text())["config"]
    assert recorded["task"]["name"] == "sql" and recorded["training"]["max_steps"] == 2

    metrics = json.loads(run([dvc, "metrics", "show", "--json"], tmp_path).stdout)[""]["data"]
    evaluated = metrics["runs/eval/eval.json"]["data"]
    assert evaluated["adapter"]["loss"] < evaluated["base"]["loss"]
    assert "loss" in metrics["runs/train/eval.json"]["data"]["adapter"]
    loss = json.loads((tmp_path / "loss.json").read_text())
    assert [row["step"] for row in loss] == [1, 2]
    plots = json.loads(run([dvc, "plots", "show", "--json"], tmp_path).stdout)
    assert "loss.json" in plots["data"]
    assert "up to date" in run([dvc, "status"], tmp_path).stdout
    changed = json.loads(run([dvc, "params", "diff", "--all", "--json"], tmp_path).stdout)["params.yaml"]
    assert changed["training.max_steps"]["new"] == 2 and changed["task.name"]["new"] == "sql"
