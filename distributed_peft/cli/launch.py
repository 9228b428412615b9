"""dpeft-launch: resolve a run's config, write its accelerate (and DeepSpeed) config, start `accelerate launch`.

    dpeft-launch task=sql distributed=zero3 num_gpu_workers=4                 # 1 node x 4 GPUs
    NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 dpeft-launch task=sql distributed=zero3 num_gpu_workers=8
    dpeft-launch --dry-run task=sql distributed=ddp num_gpu_workers=4        # print the command and configs only
    dpeft-launch --print-config zero3 > zero3.yaml                            # a shipped template, to edit
    dpeft-launch --help                     # its groups and main keys; --cfg job prints the composed config

`num_gpu_workers` is the number of workers per node; the job has num_gpu_workers x num_machines processes. On a
machine without GPUs the same launch runs on CPU processes with gloo, so every mode but FSDP can be tried there.
The node layout comes from the overrides, else from NUM_GPU_WORKERS, NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP and
MAIN_PROCESS_PORT, else one node with one worker; only this command reads those variables. A real launch writes its
files into <output_dir>/launch, and only into an output_dir that is absent, empty or made by distributed-peft; a dry
run writes nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from distributed_peft.cli.help import print_only, report_user_error
from distributed_peft.cli.preflight import check_overrides
from distributed_peft.config import HOST_PATTERN
from distributed_peft.constants import PACKAGE_DIR
from distributed_peft.errors import PREEMPTED_EXIT_CODE, USER_ERROR_EXIT_CODE, ConfigError, DpeftError
from distributed_peft.runtime.output_dirs import ClaimedDir, check_not_locked, check_output_dir

PROG = "dpeft-launch"
LAUNCH_TEMPLATES = PACKAGE_DIR / "launch"  # shipped in the package: accelerate/, deepspeed/, slurm/
# config key -> (the environment variable read when the key is null, the default when neither is set, what is allowed,
# an example value)
LAUNCH_KEYS = {
    "num_gpu_workers": ("NUM_GPU_WORKERS", 1, "a positive integer", "4"),
    "num_machines": ("NUM_MACHINES", 1, "a positive integer", "2"),
    "machine_rank": ("MACHINE_RANK", 0, "an integer >= 0", "0"),
    "main_process_ip": ("MAIN_PROCESS_IP", "127.0.0.1", "a host name or IP address", "10.0.0.1"),
    "main_process_port": ("MAIN_PROCESS_PORT", 29500, "a TCP port in [1, 65535]", "29500"),
}


@dataclass(frozen=True)
class LaunchLayout:
    """The node layout of a launch, resolved from the overrides, the environment and the defaults."""

    num_gpu_workers: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    main_process_port: int = 29500

    @property
    def world_size(self) -> int:
        return self.num_gpu_workers * self.num_machines


def _in_range(key: str, value: Any) -> bool:
    if key == "main_process_ip":
        return bool(HOST_PATTERN.fullmatch(value))
    low, high = {"machine_rank": (0, None), "main_process_port": (1, 65535)}.get(key, (1, None))
    return low <= value and (high is None or value <= high)


def _resolve_launch_key(cfg: DictConfig, key: str, environ: Mapping[str, str], problems: list[str]) -> tuple[Any, str]:
    """The override, else the environment variable, else the default; and how to name it (`NUM_MACHINES='2'`)."""
    variable, default, allowed, example = LAUNCH_KEYS[key]
    if cfg.get(key) is not None:
        value, shown, hint = cfg[key], f"{key}={cfg[key]!r}", f"{allowed} such as {key}={example}"
    elif variable in environ:
        raw = environ[variable]
        value, shown, hint = raw.strip(), f"{variable}={raw!r}", f"{allowed} such as {variable}={example}"
        if key != "main_process_ip":
            try:
                value = int(value)
            except ValueError:
                kind = "a whole number" if re.fullmatch(r"[+-]?\d*\.\d*(e[+-]?\d+)?", value, re.I) else "a number"
                problems.append(f"{shown} is not {kind}; allowed: {hint}")
                return None, shown
    else:
        return default, f"{key}={default!r}"
    if not _in_range(key, value):
        problems.append(f"{shown} is invalid; allowed: {hint}")
        return None, shown
    return value, shown


def launch_layout(cfg: DictConfig, environ: Mapping[str, str] | None = None) -> LaunchLayout:
    """Resolve and check the node layout; raise ConfigError naming every bad override or environment variable."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    resolved = {key: _resolve_launch_key(cfg, key, environ, problems) for key in LAUNCH_KEYS}
    (machines, machines_shown), (rank, rank_shown) = resolved["num_machines"], resolved["machine_rank"]
    if machines is not None and rank is not None and rank >= machines:
        problems.append(
            f"{rank_shown} is invalid; allowed: an integer in [0, {machines - 1}] ({machines_shown}: nodes are "
            "ranked from 0)"
        )
    if problems:
        raise ConfigError(problems)
    return LaunchLayout(**{key: value for key, (value, _) in resolved.items()})


def cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def launch_configs(
    cfg: DictConfig, gpus: int, layout: LaunchLayout | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The accelerate config (and DeepSpeed json) for this run's strategy and node layout."""
    from distributed_peft.runtime.distributed import fill_deepspeed_config, resolve_mixed_precision

    layout = layout or launch_layout(cfg)
    strategy = cfg.distributed.strategy
    template = "ddp" if strategy == "auto" else strategy
    accelerate = yaml.safe_load((LAUNCH_TEMPLATES / "accelerate" / f"{template}.yaml").read_text())
    use_cpu = gpus == 0
    if use_cpu and strategy == "fsdp":
        raise ConfigError(
            "distributed='fsdp' needs CUDA GPUs (accelerate runs no FSDP on CPU); allowed on this machine: "
            "auto, ddp, zero2, zero3, zero3_offload"
        )
    if not use_cpu and layout.num_gpu_workers > gpus:
        raise ConfigError(f"num_gpu_workers={layout.num_gpu_workers} is invalid; this node has {gpus} GPU(s)")
    total = layout.world_size
    accelerate.update(
        num_processes=total,
        num_machines=layout.num_machines,
        machine_rank=layout.machine_rank,
        main_process_ip=layout.main_process_ip,
        main_process_port=layout.main_process_port,
        use_cpu=use_cpu,
    )
    if accelerate["distributed_type"] == "MULTI_GPU" and total == 1:
        accelerate["distributed_type"] = "NO"
    if use_cpu:
        accelerate.pop("gpu_ids", None)
    mixed_precision = resolve_mixed_precision(cfg.training.mixed_precision)  # as the training processes resolve it
    accelerate["mixed_precision"] = mixed_precision
    deepspeed = None
    if accelerate["distributed_type"] == "DEEPSPEED":
        template_path = PACKAGE_DIR / accelerate["deepspeed_config"]["deepspeed_config_file"]
        deepspeed = json.loads(template_path.read_text())
        deepspeed.pop("_comment", None)
        fill_deepspeed_config(deepspeed, cfg, mixed_precision, total)  # the training processes find nothing to fill
        del accelerate["mixed_precision"]  # DeepSpeed takes it from its json; accelerate refuses both
        if use_cpu:
            # accelerate's --cpu drops DeepSpeed; without it DeepSpeed finds no GPU and runs its CPU accelerator
            accelerate["use_cpu"] = False
            accelerate["deepspeed_config"]["zero3_init_flag"] = False
    return accelerate, deepspeed


@dataclass
class LaunchPlan:
    """What a launch runs and the files it needs, before anything is written."""

    layout: LaunchLayout
    overrides: list[str]
    command: list[str]
    env: dict[str, str]
    files: dict[Path, str] = field(default_factory=dict)  # path -> content; the accelerate config first


def plan_launch(cfg: DictConfig, overrides: list[str], gpus: int) -> LaunchPlan:
    """The command, its environment and the launch files for <output_dir>/launch; writes nothing."""
    layout = launch_layout(cfg)
    accelerate, deepspeed = launch_configs(cfg, gpus, layout)
    launch_dir = Path(cfg.output_dir) / "launch"
    acc_path = launch_dir / f"accelerate-node{layout.machine_rank}.yaml"  # nodes may share a filesystem
    files = {}
    if deepspeed is not None:
        ds_path = launch_dir / "deepspeed.json"
        accelerate["deepspeed_config"]["deepspeed_config_file"] = str(ds_path.resolve())
        files[ds_path] = json.dumps(deepspeed, indent=2) + "\n"
    files = {acc_path: yaml.safe_dump(accelerate, sort_keys=False), **files}
    accelerate_bin = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [accelerate_bin, "launch", "--config_file", str(acc_path), "-m", "distributed_peft.cli.train", *overrides]
    env = dict(os.environ)
    if gpus == 0:
        if deepspeed is None:
            env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("DS_ACCELERATOR", "cpu")  # said, not guessed: DeepSpeed's "Setting accelerator to CPU" notice
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // layout.num_gpu_workers)))
    return LaunchPlan(layout, overrides, command, env, files)


def write_launch_files(plan: LaunchPlan, output_dir: str | Path) -> ClaimedDir:
    """Claim output_dir (absent, empty or ours; another node's claim counts as ours) and write the launch files."""
    from distributed_peft.runtime.atomic_files import atomic_write_text, storage_error
    from distributed_peft.runtime.output_dirs import claim_output_dir

    claimed = claim_output_dir(output_dir, command=shlex.join(["dpeft-launch", *plan.overrides]))
    try:
        for path, text in plan.files.items():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise storage_error(path.parent, exc) from exc
            atomic_write_text(path, text)
    except DpeftError:
        claimed.release()
        raise
    return claimed


def launch_command(cfg: DictConfig, overrides: list[str], gpus: int) -> tuple[list[str], dict[str, str], list[Path]]:
    """Write the run's launch files into <output_dir>/launch and return the command, its env and the files."""
    plan = plan_launch(cfg, overrides, gpus)
    write_launch_files(plan, cfg.output_dir)
    return plan.command, plan.env, list(plan.files)


def launch_templates() -> dict[str, Path]:
    """The shipped templates by name: `accelerate/zero3` (also just `zero3`), `deepspeed/zero3`, `slurm/multinode`."""
    files = sorted(p for p in LAUNCH_TEMPLATES.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".sbatch"))
    named = {str(p.relative_to(LAUNCH_TEMPLATES).with_suffix("")): p for p in files}
    return {**named, **{name.split("/")[-1]: p for name, p in named.items() if name.startswith("accelerate/")}}


def print_template(name: str | None) -> int:
    """`--print-config NAME`: one shipped template on stdout; without a name, the list of them."""
    templates = launch_templates()
    if not name:
        print("\n".join(n for n in templates if "/" in n))
        return 0
    if name not in templates:
        allowed = ", ".join(n for n in templates if "/" in n)
        report_user_error(ConfigError(f"--print-config {name!r} is not a launch template; allowed: {allowed}"), PROG)
        return USER_ERROR_EXIT_CODE
    print(templates[name].read_text(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].split("=")[0] == "--print-config":
        _, equals, name = argv[0].partition("=")
        return print_template(name if equals else (argv[1] if len(argv) > 1 else None))
    dry_run = "--dry-run" in argv
    overrides = [a for a in argv if a != "--dry-run"]
    printed = print_only(PROG, "config", overrides)  # --help, --cfg job: as every dpeft-* command answers them
    if printed is not None:
        return printed
    try:
        cfg = check_overrides(overrides)
        if cfg is None:
            raise ConfigError("dpeft-launch takes key=value overrides only (no Hydra flags or sweeps)")
        gpus = cuda_device_count()
        plan = plan_launch(cfg, overrides, gpus)
        if plan.layout.machine_rank == 0:  # other nodes join the run node 0 started, which holds the lock
            check_not_locked(cfg.output_dir)
        if dry_run:  # refused where the launch would be, without writing anything
            check_output_dir(cfg.output_dir)
        else:
            claimed = write_launch_files(plan, cfg.output_dir)
    except DpeftError as error:
        report_user_error(error, PROG)
        return USER_ERROR_EXIT_CODE
    layout = plan.layout
    where = f"{gpus} GPU(s)" if gpus else "no GPU: CPU processes with gloo"
    print(
        f"dpeft-launch: {layout.num_machines} node(s) x {layout.num_gpu_workers} worker(s), strategy "
        f"{cfg.distributed.strategy}, this node rank {layout.machine_rank} ({where})"
    )
    for path, text in plan.files.items():
        print(f"--- {path}{' (dry run: not written)' if dry_run else ''}\n{text.rstrip()}")
    print("command: " + shlex.join(plan.command))
    if dry_run:
        return 0
    sys.stdout.flush()
    code = run_forwarding_sigterm(plan.command, plan.env, Path(cfg.output_dir))
    if code not in (0, PREEMPTED_EXIT_CODE):
        _remove_if_only_launch_files(claimed)
    return code


def _remove_if_only_launch_files(claimed: ClaimedDir) -> None:
    """A launch that failed before its run wrote anything leaves no directory it created behind."""
    from distributed_peft.runtime.output_dirs import LOCK_FILE, OWNER_MARKER

    if claimed.created is None or not claimed.path.is_dir():
        return
    if {p.name for p in claimed.path.iterdir()} <= {OWNER_MARKER, LOCK_FILE, "launch"}:
        claimed.release()


def run_forwarding_sigterm(command: list[str], env: dict[str, str], output_dir: Path) -> int:
    """Run the launch; a SIGTERM (SLURM pre-emption, `scancel`) is passed on so every rank checkpoints and stops.

    Returns the launch's exit code, or PREEMPTED_EXIT_CODE when a SIGTERM stopped it after its checkpoint.
    """
    from distributed_peft.training.checkpoints import TRAINER_STATE, list_checkpoints

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
