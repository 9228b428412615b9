"""dpeft-launch: the exact accelerate command and config files for a node layout, and the SLURM job wiring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT_ROOT

import distributed_peft.cli.launch as launcher

BIN = Path(sys.executable).parent


def dry_run(monkeypatch, capsys, gpus: int, *overrides: str) -> tuple[int, str]:
    """Run `dpeft-launch --dry-run` as on a node with `gpus` GPUs; return its exit code and stdout + stderr."""
    monkeypatch.setattr(launcher, "cuda_device_count", lambda: gpus)
    code = launcher.main(["--dry-run", *overrides])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def printed_files(printed: str) -> dict[str, str]:
    """The launch files a dry run printed (`--- PATH (dry run: not written)` then the content), by path."""
    files: dict[str, list[str]] = {}
    current = None
    for line in printed.splitlines():
        if line.startswith("--- "):
            current = files.setdefault(line[4:].removesuffix(" (dry run: not written)"), [])
        elif line.startswith("command: "):
            current = None
        elif current is not None:
            current.append(line)
    return {path: "\n".join(lines) for path, lines in files.items()}


def test_dry_run_one_node_four_gpus(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    code, printed = dry_run(
        monkeypatch, capsys, 4, "task=sql", "distributed=zero3", "num_gpu_workers=4", f"output_dir={out}"
    )
    config = out / "launch" / "accelerate-node0.yaml"
    assert code == 0
    assert not out.exists(), "a dry run writes nothing"
    assert (
        printed.splitlines()[0] == "dpeft-launch: 1 node(s) x 4 worker(s), strategy zero3, this node rank 0 (4 GPU(s))"
    )
    assert printed.splitlines()[-1] == (
        f"command: {BIN / 'accelerate'} launch --config_file {config} -m distributed_peft.cli.train task=sql "
        f"distributed=zero3 num_gpu_workers=4 output_dir={out}"
    )
    files = printed_files(printed)
    accelerate = yaml.safe_load(files[str(config)])
    assert (accelerate["num_processes"], accelerate["num_machines"], accelerate["distributed_type"]) == (
        4,
        1,
        "DEEPSPEED",
    )
    deepspeed = out / "launch" / "deepspeed.json"
    assert accelerate["deepspeed_config"]["deepspeed_config_file"] == str(deepspeed.resolve())
    assert json.loads(files[str(deepspeed)])["train_batch_size"] == 4 * 1 * 4


def test_dry_run_two_nodes_eight_gpus_from_the_environment(monkeypatch, capsys, tmp_path):
    for key, value in {
        "NUM_GPU_WORKERS": "8",
        "NUM_MACHINES": "2",
        "MACHINE_RANK": "1",
        "MAIN_PROCESS_IP": "10.1.2.3",
        "MAIN_PROCESS_PORT": "29555",
    }.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    code, printed = dry_run(monkeypatch, capsys, 8, "task=instruct", "distributed=ddp", f"output_dir={out}")
    assert code == 0
    assert "2 node(s) x 8 worker(s), strategy ddp, this node rank 1 (8 GPU(s))" in printed
    accelerate = yaml.safe_load(printed_files(printed)[str(out / "launch" / "accelerate-node1.yaml")])
    assert accelerate["num_processes"] == 16 and accelerate["num_machines"] == 2 and accelerate["machine_rank"] == 1
    assert (accelerate["main_process_ip"], accelerate["main_process_port"]) == ("10.1.2.3", 29555)
    assert accelerate["distributed_type"] == "MULTI_GPU" and accelerate["use_cpu"] is False


def test_dry_run_without_gpus_plans_cpu_processes_and_refuses_fsdp(monkeypatch, capsys, tmp_path):
    code, printed = dry_run(monkeypatch, capsys, 0, "distributed=ddp", "num_gpu_workers=2", f"output_dir={tmp_path}")
    assert code == 0 and "(no GPU: CPU processes with gloo)" in printed
    assert yaml.safe_load(printed_files(printed)[str(tmp_path / "launch" / "accelerate-node0.yaml")])["use_cpu"] is True
    code, printed = dry_run(monkeypatch, capsys, 0, "distributed=fsdp", f"output_dir={tmp_path}")
    assert code == 2
    assert printed.startswith("dpeft-launch: error: distributed='fsdp' needs CUDA GPUs")


def test_more_workers_than_gpus_is_refused(monkeypatch, capsys, tmp_path):
    code, printed = dry_run(monkeypatch, capsys, 2, "num_gpu_workers=4", f"output_dir={tmp_path}")
    assert code == 2
    assert "dpeft-launch: error: num_gpu_workers=4 is invalid; this node has 2 GPU(s)" in printed


@pytest.mark.slow
def test_slurm_job_starts_one_launcher_per_node_with_rank_and_main_address(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text('#!/bin/bash\nfor node in 0 1; do SLURM_NODEID=$node "${@:3}" || exit $?; done\n')
    (stubs / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-node-7\\ngpu-node-8\\n'\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{stubs}:{BIN}:{os.environ['PATH']}",
        SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="8",
        SLURM_JOB_NODELIST="gpu-node-[7-8]",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="dpeft",
        RUN_DIR=str(tmp_path / "run"),
    )
    proc = subprocess.run(
        ["bash", "launch/slurm/multinode.sbatch", "--dry-run", "task=sql", "distributed=ddp"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 node(s) x 8 worker(s), strategy ddp, this node rank 0" in proc.stdout
    assert "2 node(s) x 8 worker(s), strategy ddp, this node rank 1" in proc.stdout
    files = printed_files(proc.stdout)
    for rank in (0, 1):
        accelerate = yaml.safe_load(files[str(tmp_path / "run" / "launch" / f"accelerate-node{rank}.yaml")])
        assert (accelerate["machine_rank"], accelerate["main_process_ip"]) == (rank, "gpu-node-7")
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_print_config_shows_a_shipped_template_and_a_wrong_name_is_one_line(capsys):
    assert launcher.main(["--print-config"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"accelerate/zero3", "deepspeed/zero3", "slurm/multinode", "skypilot/train"} <= set(listed)
    assert launcher.main(["--print-config", "zero3"]) == 0  # accelerate/zero3, named short
    accelerate = yaml.safe_load(capsys.readouterr().out)
    assert accelerate["deepspeed_config"]["deepspeed_config_file"] == "launch/deepspeed/zero3.json"
    assert launcher.main(["--print-config=deepspeed/zero3"]) == 0
    assert json.loads(capsys.readouterr().out)["zero_optimization"]["stage"] == 3
    assert launcher.main(["--print-config", "zero9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'zero9' is not a launch template; allowed: accelerate/ddp" in err[0]
