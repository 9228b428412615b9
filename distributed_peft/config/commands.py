"""The schemas of the commands that do not train (dpeft-generate, dpeft-merge, dpeft-explore, dpeft-bench), each
with the check its entry point runs before anything loads."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from distributed_peft.config.checks import Choice, check, check_choice, unknown_keys
from distributed_peft.config.model import ModelConfig, bundled_hub_configs
from distributed_peft.config.root import group_options
from distributed_peft.constants import CONF_DIR
from distributed_peft.errors import ConfigError, DpeftError
from distributed_peft.runtime.output_dirs import check_output_dir, run_dir

HOST_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[?[0-9A-Fa-f:.]+\]?")  # a host name or IP


class Device(Choice):
    AUTO = "auto"  # cuda when available, else cpu
    CPU = "cpu"
    CUDA = "cuda"


class BenchVariant(Choice):
    """dpeft-bench's variants, on the same job: TRL's SFTTrainer padded (the baseline) and padding-free, and ours."""

    TRL_PADDED = "trl_padded"
    OURS_PADDED = "ours_padded"
    OURS_GROUP_BY_LENGTH = "ours_group_by_length"
    OURS_PADDING_FREE = "ours_padding_free"
    TRL_PADDING_FREE = "trl_padding_free"


class BenchTable(Choice):
    """dpeft-bench's tables: packing (the variants against TRL) and joint (one-task jobs against one joint job)."""

    PACKING = "packing"
    JOINT = "joint"


@dataclass
class GenerateConfig:
    """dpeft-generate: one base, several adapters, the same input through each."""

    adapters: list[str] = field(default_factory=list)  # empty: every adapter in adapters_prebuilt/
    prompt: str = "???"  # fills each task's main input field (detox: toxic, sql: question, instruct: instruction)
    inputs: dict[str, str] = field(default_factory=dict)  # other fields: +inputs.context='CREATE TABLE ...'
    max_new_tokens: int = 64
    device: str = "auto"  # auto: cuda when available, else cpu
    allow_base_mismatch: bool = False


@dataclass
class MergeConfig:
    """dpeft-merge: an adapter merged into a full-precision copy of its base, saved as a plain transformers model."""

    adapter: str = "???"
    output: str = "???"
    device: str = "auto"  # where the base is loaded and merged; auto: cuda when available, else cpu
    allow_base_mismatch: bool = False


@dataclass
class ExploreConfig:
    """dpeft-explore: a web page that puts every adapter beside the base they share, loaded once."""

    adapters: list[str] = field(default_factory=list)  # empty: every adapter in adapters_prebuilt/
    model: Optional[ModelConfig] = None  # `model=NAME`: the base to load; null: the base the adapters record
    host: str = "127.0.0.1"  # 0.0.0.0 to serve other machines
    port: int = 7860
    device: str = "auto"  # auto: cuda when available, else cpu
    max_new_tokens: int = 64  # the page's default; requests may ask for up to max_new_tokens_limit
    max_new_tokens_limit: int = 256
    examples_per_task: int = 5  # validation examples offered per task
    allow_base_mismatch: bool = False


@dataclass
class JointBenchConfig:
    """dpeft-bench's joint table: these tasks as one-task jobs one after the other against one `tasks=[...]` job."""

    tasks: list[str] = field(default_factory=lambda: ["sql", "detox", "instruct"])
    max_steps: int = 20  # optimizer steps per task, in each one-task job and for each task of the joint job


@dataclass
class BenchConfig:
    """dpeft-bench: our packing against TRL's SFTTrainer on the same tiny-llama QLoRA job, and several one-task jobs
    against one joint job (benchmarks/harness.py, benchmarks/joint.py)."""

    tables: list[str] = field(default_factory=BenchTable.values)  # packing, joint
    tasks: list[str] = field(default_factory=lambda: ["detox", "instruct"])  # the packing table's
    model: ModelConfig = field(default_factory=ModelConfig)  # the packing table's base: model=tiny-llama|smollm2-135m
    repeats: int = 3  # every variant, interleaved with the others (both tables)
    examples: int = 400  # per task, train + validation
    variants: list[str] = field(default_factory=BenchVariant.values)  # trl_padded always runs
    # with CUDA, a table per model: these Hub architectures with random weights, plus flash attention and Liger
    gpu_models: list[str] = field(default_factory=lambda: ["llama-3.2-1b", "bloom-1b1"])
    joint: JointBenchConfig = field(default_factory=JointBenchConfig)  # the joint table's tasks and steps
    output_dir: str = run_dir("bench")  # bench.json, bench.md


def validate_bench(cfg: DictConfig) -> None:
    problems = unknown_keys(cfg, BenchConfig)
    bundled = [
        t for t in group_options("task") if OmegaConf.load(CONF_DIR / "task" / f"{t}.yaml").data.get("sample_file")
    ]
    allowed = f"{', '.join(bundled)} (the tasks with bundled data)"
    check(
        problems,
        len(cfg.tables) > 0,
        "tables",
        list(cfg.tables),
        f"a non-empty list of: {', '.join(BenchTable.values())}",
    )
    for table in cfg.tables:
        if table not in BenchTable.values():
            problems.append(f"tables: {table!r} is not a table; allowed: {', '.join(BenchTable.values())}")
    check(problems, len(cfg.tasks) > 0, "tasks", list(cfg.tasks), f"a non-empty list of: {allowed}")
    for key, tasks in (("tasks", cfg.tasks), ("joint.tasks", cfg.joint.tasks)):
        for task in tasks:
            if task not in bundled:
                problems.append(f"{key}: {task!r} is not a task dpeft-bench runs; allowed: {allowed}")
    joint_tasks = list(cfg.joint.tasks)
    distinct = len(joint_tasks) >= 2 and len(set(joint_tasks)) == len(joint_tasks)
    check(problems, distinct, "joint.tasks", joint_tasks, f"a list of two or more different tasks of: {allowed}")
    check(problems, cfg.joint.max_steps >= 1, "joint.max_steps", cfg.joint.max_steps, "an integer >= 1")
    check(problems, len(cfg.variants) > 0, "variants", list(cfg.variants), "a non-empty list")
    for variant in cfg.variants:
        if variant not in BenchVariant.values():
            problems.append(f"variants: {variant!r} is not a variant; allowed: {', '.join(BenchVariant.values())}")
    if cfg.model.weights == "random":
        problems.append("model.weights='random' is invalid for dpeft-bench's CPU table; allowed: pretrained")
    for model in cfg.gpu_models:
        if model not in bundled_hub_configs():
            problems.append(
                f"gpu_models: {model!r} has no bundled Hub config; allowed: {', '.join(bundled_hub_configs())}"
            )
    check(problems, cfg.repeats >= 1, "repeats", cfg.repeats, "an integer >= 1")
    check(problems, cfg.examples >= 2, "examples", cfg.examples, "an integer >= 2 (one to train on, one to evaluate)")
    try:  # known before an hour of runs
        check_output_dir(cfg.output_dir)
    except DpeftError as error:
        problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)


def _check_adapter_dirs(cfg: DictConfig, problems: list[str]) -> None:
    for adapter in cfg.adapters:
        if not Path(adapter).is_dir():
            problems.append(f"adapters: {adapter!r} is not a directory; allowed: adapter directories")


def _check_device(cfg: DictConfig, problems: list[str]) -> None:
    import torch

    check_choice(problems, "device", cfg.device, Device)
    if cfg.device == Device.CUDA and not torch.cuda.is_available():
        problems.append("device='cuda' but no CUDA device is visible here; allowed: auto, cpu")


def validate_generate(cfg: DictConfig) -> None:
    problems = unknown_keys(cfg, GenerateConfig)
    _check_adapter_dirs(cfg, problems)
    _check_device(cfg, problems)
    check(problems, cfg.max_new_tokens >= 1, "max_new_tokens", cfg.max_new_tokens, "an integer >= 1")
    if problems:
        raise ConfigError(problems)


def validate_explore(cfg: DictConfig) -> None:
    problems = unknown_keys(cfg, ExploreConfig)
    _check_adapter_dirs(cfg, problems)
    check(problems, 0 < cfg.port < 65536, "port", cfg.port, "a TCP port in [1, 65535]")
    host_ok = bool(HOST_PATTERN.fullmatch(cfg.host))
    check(problems, host_ok, "host", cfg.host, "a host name or IP address such as 127.0.0.1 or 0.0.0.0")
    _check_device(cfg, problems)
    check(problems, cfg.max_new_tokens_limit >= 1, "max_new_tokens_limit", cfg.max_new_tokens_limit, "an integer >= 1")
    check(
        problems,
        1 <= cfg.max_new_tokens <= cfg.max_new_tokens_limit,
        "max_new_tokens",
        cfg.max_new_tokens,
        f"in [1, {cfg.max_new_tokens_limit}] (max_new_tokens_limit)",
    )
    check(problems, cfg.examples_per_task >= 1, "examples_per_task", cfg.examples_per_task, "an integer >= 1")
    if problems:
        raise ConfigError(problems)


def validate_merge(cfg: DictConfig) -> None:
    problems = unknown_keys(cfg, MergeConfig)
    if not Path(cfg.adapter).is_dir():
        problems.append(f"adapter={cfg.adapter!r} is not a directory; allowed: an adapter directory")
    _check_device(cfg, problems)
    if problems:
        raise ConfigError(problems)


def check_heldout_options(cfg: DictConfig, problems: list[str]) -> None:
    """dpeft-eval heldout=true's keys (in the root schema, beside `adapter`)."""
    rows = cfg.heldout_rows
    check(problems, rows is None or rows >= 1, "heldout_rows", rows, "an integer >= 1, or null for every held-out row")
