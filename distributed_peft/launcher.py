"""dpeft-launch: resolve a run's config, write its accelerate (and DeepSpeed) config, start `accelerate launch`.

    dpeft-launch task=sql distributed=zero3 num_gpu_workers=4                 # 1 node x 4 GPUs
    NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 dpeft-launch task=sql distributed=zero3 num_gpu_workers=8
    dpeft-launch --dry-run task=sql distributed=ddp num_gpu_workers=4        # print the command and configs only

`num_gpu_workers` is the number of workers per node; the job has num_gpu_workers x num_machines processes. On a
machine without GPUs the same launch runs on CPU processes with gloo, so every mode but FSDP can be tried there.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from distributed_peft.cli import check_overrides, report_user_error
from distributed_peft.config import PROJECT_ROOT
from distributed_peft.errors import PREEMPTED_EXIT_CODE, USER_ERROR_EXIT_CODE, ConfigError, DpeftError

LAUNCH_TEMPLATES = PROJECT_ROOT / "launch"


def cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _fill_deepspeed_config(template: dict[str, Any], cfg: DictConfig, mixed_precision: str) -> dict[str, Any]:
    """The DeepSpeed json of a run: the template with its "auto" values resolved from the training config."""
    ds = copy.deepcopy(template)
    ds.pop("_comment", None)
    training = cfg.training
    world = cfg.num_gpu_workers * cfg.num_machines
    ds["train_micro_batch_size_per_gpu"] = training.micro_batch_size
    ds["gradient_accumulation_steps"] = training.gradient_accumulation_steps
    ds["train_batch_size"] = training.micro_batch_size * training.gradient_accumulation_steps * world
    ds["gradient_clipping"] = training.max_grad_norm
    ds["bf16"] = {"enabled": mixed_precision == "bf16"}
    ds["fp16"] = {"enabled": mixed_precision == "fp16"}
    return ds


def launch_configs(cfg: DictConfig, gpus: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The accelerate config (and DeepSpeed json) for this run's strategy and node layout."""
    from distributed_peft.distributed import resolve_mixed_precision

    strategy = cfg.distributed.strategy
    template = "ddp" if strategy == "auto" else strategy
    accelerate = yaml.safe_load((LAUNCH_TEMPLATES / "accelerate" / f"{template}.yaml").read_text())
    use_cpu = gpus == 0
    if use_cpu and strategy == "fsdp":
        raise ConfigError(
            "distributed='fsdp' needs CUDA GPUs (accelerate runs no FSDP on CPU); allowed on this machine: "
            "auto, ddp, zero2, zero3, zero3_offload"
        )
    if not use_cpu and cfg.num_gpu_workers > gpus:
        raise ConfigError(f"num_gpu_workers={cfg.num_gpu_workers} is invalid; this node has {gpus} GPU(s)")
    total = cfg.num_gpu_workers * cfg.num_machines
    accelerate.update(
        num_processes=total,
        num_machines=cfg.num_machines,
        machine_rank=cfg.machine_rank,
        main_process_ip=cfg.main_process_ip,
        main_process_port=cfg.main_process_port,
        use_cpu=use_cpu,
    )
    if accelerate["distributed_type"] == "MULTI_GPU" and total == 1:
        accelerate["distributed_type"] = "NO"
    if use_cpu:
        accelerate.pop("gpu_ids", None)
    mixed_precision = "no" if use_cpu else resolve_mixed_precision(cfg.training.mixed_precision)
    accelerate["mixed_precision"] = mixed_precision
    deepspeed = None
    if accelerate["distributed_type"] == "DEEPSPEED":
        template_path = PROJECT_ROOT / accelerate["deepspeed_config"]["deepspeed_config_file"]
        deepspeed = _fill_deepspeed_config(json.loads(template_path.read_text()), cfg, mixed_precision)
        del accelerate["mixed_precision"]  # DeepSpeed takes it from its json; accelerate refuses both
        if use_cpu:
            # accelerate's --cpu drops DeepSpeed; without it DeepSpeed finds no GPU and runs its CPU accelerator
            accelerate["use_cpu"] = False
            accelerate["deepspeed_config"]["zero3_init_flag"] = False
    return accelerate, deepspeed


def launch_command(cfg: DictConfig, overrides: list[str], gpus: int) -> tuple[list[str], dict[str, str], list[Path]]:
    """Write the run's launch files into <output_dir>/launch and return the command, its env and the files."""
    accelerate, deepspeed = launch_configs(cfg, gpus)
    launch_dir = Path(cfg.output_dir) / "launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    files = []
    if deepspeed is not None:
        ds_path = launch_dir / "deepspeed.json"
        ds_path.write_text(json.dumps(deepspeed, indent=2) + "\n")
        accelerate["deepspeed_config"]["deepspeed_config_file"] = str(ds_path.resolve())
        files.append(ds_path)
    acc_path = launch_dir / f"accelerate-node{cfg.machine_rank}.yaml"  # nodes may share a filesystem
    acc_path.write_text(yaml.safe_dump(accelerate, sort_keys=False))
    files.insert(0, acc_path)
    accelerate_bin = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [accelerate_bin, "launch", "--config_file", str(acc_path), "-m", "distributed_peft.train", *overrides]
    env = dict(os.environ)
    if gpus == 0:
        if deepspeed is None:
            env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.num_gpu_workers)))
    return command, env, files


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--dry-run" in argv
    overrides = [a for a in argv if a != "--dry-run"]
    try:
        cfg = check_overrides(overrides)
        if cfg is None:
            raise ConfigError("dpeft-launch takes key=value overrides only (no Hydra flags or sweeps)")
        gpus = cuda_device_count()
        command, env, files = launch_command(cfg, overrides, gpus)
    except DpeftError as error:
        report_user_error(error, "dpeft-launch")
        return USER_ERROR_EXIT_CODE
    where = f"{gpus} GPU(s)" if gpus else "no GPU: CPU processes with gloo"
    print(
        f"dpeft-launch: {cfg.num_machines} node(s) x {cfg.num_gpu_workers} worker(s), strategy "
        f"{cfg.distributed.strategy}, this node rank {cfg.machine_rank} ({where})"
    )
    for path in files:
        print(f"--- {path}\n{path.read_text().rstrip()}")
    print("command: " + shlex.join(command))
    if dry_run:
        return 0
    sys.stdout.flush()
    return run_forwarding_sigterm(command, env, Path(cfg.output_dir))


def run_forwarding_sigterm(command: list[str], env: dict[str, str], output_dir: Path) -> int:
    """Run the launch; a SIGTERM (SLURM pre-emption, `scancel`) is passed on so every rank checkpoints and stops.

    Returns the launch's exit code, or PREEMPTED_EXIT_CODE when a SIGTERM stopped it after its checkpoint.
    """
    from distributed_peft.checkpoint import TRAINER_STATE, list_checkpoints

    started = time.time()
    process = subprocess.Popen(command, env=env)
    terminated = []

    def forward(signum, frame):
        terminated.append(signum)
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if terminated:
        newest = next(iter(list_checkpoints(output_dir)), None)
        if newest is not None and newest.stat().st_mtime >= started:
            state = json.loads((newest / TRAINER_STATE).read_text())
            if state.get("reason") == "sigterm":
                print(f"dpeft-launch: preempted: checkpoint {newest}; rerun the same command to resume", flush=True)
                return PREEMPTED_EXIT_CODE
    return code


if __name__ == "__main__":
    sys.exit(main())
