"""Sharded training on CPU processes (gloo): DDP, ZeRO-2 and ZeRO-3 agree with one process, multi-node works,
a dead rank ends the job, and the FSDP / ZeRO-3-offload launch configs are what accelerate expects."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, compose_config
from safetensors.torch import load_file

from distributed_peft.cli.launch import launch_command
from distributed_peft.training.recipe import run_training

BIN = Path(sys.executable).parent
# dropout 0 so every rank computes what one process would; 8 steps of global batch 16.
RUN = [
    "task=sql",
    "model=tiny-llama",
    "training=demo",
    "training.max_steps=8",
    "training.eval_steps=4",
    "training.max_eval_examples=64",
    "peft.dropout=0",
    "evaluation.max_generate_examples=8",  # the generation path runs under every mode; its metrics are not compared
    "logging.progress_bar=false",
]
# DDP and ZeRO-2 accumulate 2 micro batches of 4 per worker: 2 x 4 x 2 = the 16 rows of one process's batch.
TWO_WORKER_LAYOUT = {"ddp": (4, 2), "zero2": (4, 2), "zero3": (8, 1)}
TOLERANCE = 1e-3  # relative, on the final eval loss (float sums differ in order across ranks)
# Third-party lines a normal run must not print (silenced where they arise; logging.debug=true shows them): DeepSpeed's
# op-builder probe (compiler lines, "[WARNING] async_io requires ..."), its comm op and accelerator notices.
NOISE = re.compile(r" -o /tmp/|built successfully|async_io|op builder|\[WARNING\]|accelerator to|FutureWarning|kernels")


def launch(out: Path, *extra: str, port: int, env: dict | None = None, wait: bool = True):
    cmd = [str(BIN / "dpeft-launch"), *RUN, f"output_dir={out}", f"main_process_port={port}", *extra]
    if not wait:
        return subprocess.Popen(
            cmd,
            cwd=PROJECT_ROOT,
            env=env or dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def eval_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "eval.json").read_text())["adapter"]["loss"]


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory, bases) -> Path:
    """One process with micro batch 16: the same global batch as 2 workers x 8."""
    out = tmp_path_factory.mktemp("single")
    run_training(compose_config([*RUN, "training.micro_batch_size=16", f"output_dir={out}"]))
    return out


@pytest.fixture(scope="module")
def single_process_packed_reference(tmp_path_factory, bases) -> Path:
    """The same job packed padding-free, for ZeRO-2 (its batches are not the padded loader's: another adapter)."""
    out = tmp_path_factory.mktemp("single-packed")
    run_training(
        compose_config([*RUN, "training.micro_batch_size=16", "training.packing=padding_free", f"output_dir={out}"])
    )
    return out


def layout(strategy: str) -> list[str]:
    micro, accumulation = TWO_WORKER_LAYOUT[strategy]
    return [f"training.micro_batch_size={micro}", f"training.gradient_accumulation_steps={accumulation}"]


def launch_two_workers(out: Path, strategy: str, port: int) -> subprocess.CompletedProcess:
    return launch(out, f"distributed={strategy}", "num_gpu_workers=2", "peft=qlora", *layout(strategy), port=port)


def accelerate_launch_two_workers(out: Path, strategy: str, port: int) -> subprocess.CompletedProcess:
    """The shipped template as a user launches it, without dpeft-launch: its DeepSpeed json says "auto" for the batch
    numbers, and padding-free batches (a DataLoader without a batch_size) leave accelerate nothing to fill them from;
    the training process fills them from the run's config. No --cpu: accelerate's --cpu drops DeepSpeed, which runs
    on its CPU accelerator here (DS_ACCELERATOR=cpu, as dpeft-launch sets it on a machine without GPUs)."""
    template = ["--config_file", f"launch/accelerate/{strategy}.yaml", "--num_processes", "2"]
    cmd = [str(BIN / "accelerate"), "launch", *template, "--main_process_port", str(port), "-m",
           "distributed_peft.cli.train", *RUN, f"distributed={strategy}", "peft=qlora", *layout(strategy),
           "training.packing=padding_free", f"output_dir={out}"]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def ddp_two_workers(tmp_path_factory, bases) -> tuple[Path, subprocess.CompletedProcess]:
    """One 2-worker DDP run, compared with one process and with the same job split over two nodes."""
    out = tmp_path_factory.mktemp("ddp") / "ddp"
    return out, launch_two_workers(out, "ddp", port=29611)


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.parametrize("strategy,port", [("ddp", None), ("zero2", 29621), ("zero3", 29631)])
def test_two_workers_match_one_process(strategy, port, single_process_reference, request, tmp_path):
    """QLoRA under ZeRO-3 runs on CPU: bitsandbytes' CPU 4-bit path shards once stored in the compute dtype. ZeRO-2
    is launched with the shipped template and raw `accelerate launch`, packed padding-free.

    DDP and ZeRO-2 also accumulate 2 micro batches of 4: each window's loss is normalised by the labelled tokens of
    the window summed over both ranks, so 2 workers x 4 x 2 is the update of one process with 16 rows."""
    if strategy == "ddp":
        out, proc = request.getfixturevalue("ddp_two_workers")
    elif strategy == "zero2":  # dpeft-launch's ZeRO-2 path: tests/test_resume.py
        out = tmp_path / strategy
        proc = accelerate_launch_two_workers(out, strategy, port)
        single_process_reference = request.getfixturevalue("single_process_packed_reference")
    else:
        out = tmp_path / strategy
        proc = launch_two_workers(out, strategy, port)
    micro, accumulation = TWO_WORKER_LAYOUT[strategy]
    effective = f"effective batch 16 = micro batch {micro} x gradient accumulation {accumulation} x world size 2"
    assert proc.stdout.count(effective) == 1, "rank 0 alone reports"
    assert f"strategy {strategy}" in proc.stdout
    assert f"adapter: {out / 'adapter'}" in proc.stdout and "eval loss: base" in proc.stdout
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if NOISE.search(line)]
    assert not noise, f"a normal {strategy} run prints our progress and results, not third-party notices: {noise}"
    assert eval_loss(out) == pytest.approx(eval_loss(single_process_reference), rel=TOLERANCE)

    reference, tensors = adapter_tensors(single_process_reference), adapter_tensors(out)
    assert tensors.keys() == reference.keys()
    for name, tensor in tensors.items():
        assert tensor.shape == reference[name].shape, f"{name} not gathered to its full shape under {strategy}"
        if "lora_B" in name:
            assert tensor.abs().sum() > 0, f"{name} saved empty under {strategy}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 9)), "one metrics line per step, rank 0"
    assert all(
        r["train/tokens_per_s_per_worker"] * 2 == pytest.approx(r["train/tokens_per_s"])
        for r in rows
        if "train/loss" in r
    )


@pytest.mark.slow
@pytest.mark.processes
def test_every_rank_of_a_launch_stops_when_another_run_holds_the_directory(tmp_path):
    """Rank 0 takes the lock for the whole launch; when it cannot, every rank stops, with one line between them."""
    from distributed_peft.runtime.output_dirs import DirectoryLock

    out = tmp_path / "busy"
    out.mkdir()
    with DirectoryLock(out):
        started = time.monotonic()
        proc = launch(out, "distributed=ddp", "num_gpu_workers=2", port=29661, wait=False)
        output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and time.monotonic() - started < 120, output[-3000:]
    refusals = [line for line in output.splitlines() if "is in use by another run" in line]
    assert len(refusals) == 1 and f"(PID {os.getpid()} on" in refusals[0], output[-3000:]
    assert "Traceback" not in output
    assert not {"config.yaml", "checkpoints", "adapter", "metrics.jsonl"} & {p.name for p in out.iterdir()}


@pytest.mark.slow
@pytest.mark.processes
def test_two_nodes_on_one_machine_train_the_same_adapter_as_one_node(ddp_two_workers, tmp_path):
    one_node, _ = ddp_two_workers  # 1 node x 2 workers
    two_nodes = tmp_path / "two-nodes"
    nodes = [
        launch(
            two_nodes,
            "distributed=ddp",
            "peft=qlora",
            *layout("ddp"),
            "num_gpu_workers=1",
            "num_machines=2",
            f"machine_rank={rank}",
            "main_process_ip=127.0.0.1",
            port=29651,
            wait=False,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "2 node(s) x 1 worker(s)" in outputs[0] and "this node rank 1" in outputs[1]
    assert eval_loss(two_nodes) == pytest.approx(eval_loss(one_node), rel=1e-5)
    a, b = adapter_tensors(one_node), adapter_tensors(two_nodes)
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)


@pytest.mark.slow
@pytest.mark.processes
def test_a_dead_rank_ends_the_job_within_60_seconds(tmp_path):
    import psutil

    out = tmp_path / "killed"
    job = launch(out, "distributed=ddp", "num_gpu_workers=2", "training.max_steps=2000", port=29661, wait=False)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
            assert job.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.5)
        workers = [
            p
            for p in psutil.Process(job.pid).children(recursive=True)
            if "distributed_peft.cli.train" in " ".join(p.cmdline()) and "accelerate" not in p.cmdline()[1]
        ]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        killed_at = time.monotonic()
        workers[1].send_signal(signal.SIGKILL)
        output, _ = job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the job still ran 60 s after one rank died")
    finally:
        if job.poll() is None:  # a failed check must not leave a 2000-step job running beside the next tests
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode != 0
    assert time.monotonic() - killed_at < 60
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*-9", output), output[-3000:]


def _accelerate_view(config_file: Path):
    """Parse a launch config with accelerate's own launcher code, as `accelerate launch` would."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "distributed_peft.cli.train"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_fsdp_launch_config_is_valid_for_accelerate(tmp_path):
    from accelerate.utils.launch import prepare_multi_gpu_env

    cfg = compose_config(["distributed=fsdp", "model=llama-3.2-1b", "num_gpu_workers=8", f"output_dir={tmp_path}"])
    _, _, files = launch_command(cfg, [], gpus=8)
    args, _ = _accelerate_view(files[0])
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_USE_ORIG_PARAMS"] == "true", "QLoRA mixes frozen 4-bit and trainable params in one unit"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true" and env["FSDP_SYNC_MODULE_STATES"] == "true"
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert args.num_processes == 8


def test_zero3_offload_launch_config_is_valid_for_deepspeed(tmp_path, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    cfg = compose_config(["distributed=zero3_offload", "num_gpu_workers=4", "num_machines=2", f"output_dir={tmp_path}"])
    _, _, files = launch_command(cfg, [], gpus=4)
    args, defaults = _accelerate_view(files[0])
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["stage3_gather_16bit_weights_on_model_save"]
    assert plugin.deepspeed_config["train_batch_size"] == 4 * 1 * 8  # micro batch x accumulation x 2 nodes x 4
    assert plugin.deepspeed_config["gradient_clipping"] == cfg.training.max_grad_norm


@pytest.mark.slow
def test_launching_zero3_without_deepspeed_is_refused_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "distributed_peft.cli.train", *RUN, "distributed=zero3", f"output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dpeft-train: error: distributed='zero3' but this process was launched as 'single'; launch it with "
        "`dpeft-launch distributed=zero3 ...` or `accelerate launch --config_file launch/accelerate/zero3.yaml "
        "-m distributed_peft.cli.train distributed=zero3 ...`"
    ]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 CUDA GPUs (accelerate runs no FSDP on CPU)")
def test_fsdp_qlora_trains_and_saves_a_full_adapter(single_process_reference, tmp_path):
    out = tmp_path / "fsdp"
    launch(out, "distributed=fsdp", "num_gpu_workers=2", port=29671)
    assert eval_loss(out) == pytest.approx(eval_loss(single_process_reference), rel=5e-2)
    assert all(t.numel() for t in adapter_tensors(out).values())
