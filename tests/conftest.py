"""Shared fixtures: a DPEFT_HOME with the embedded bases built once per session, config composition."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import io
import os
import re
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"
# The tiny-llama adapters shipped in adapters_prebuilt/ until the real-base ones replaced them: fast example adapters
# (detox, instruct, sql) for tests that need some valid adapter of a task, not the shipped one.
TINY_ADAPTERS = PROJECT_ROOT / "tests" / "fixtures" / "tiny_llama_adapters"
# Bases built by the suite are cached here between local runs (CI starts from a clean clone).
# pyproject.toml's [project.scripts] (read as text: tomllib is Python 3.11+, the package supports 3.10)
SCRIPTS = dict(
    re.findall(
        r'^([\w-]+) = "([\w.:]+)"$',
        (PROJECT_ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0],
        re.M,
    )
)
TEST_HOME = Path(os.environ.get("DPEFT_TEST_HOME", PROJECT_ROOT / ".cache" / "test-home"))

os.environ["DPEFT_HOME"] = str(TEST_HOME)
# `make test` runs two pytest workers (pytest-xdist) on a 2-core machine. Each worker and every process it starts
# computes on one thread: two processes with torch's default two threads each oversubscribe the cores and run
# slower together than one after the other; with one thread each, two tiny training runs take half the time.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The longest files first (seconds on 2 cores, one process), so the two workers end together: the scheduler hands out
# whole files in collection order.
LONGEST_FILES = ["test_real_base.py", "test_distributed.py", "test_resume.py", "test_train_e2e.py", "test_adapters.py",
                 "test_package.py", "test_cluster_engines.py", "test_cli.py", "test_explorer.py",
                 "test_benchmark.py"]  # fmt: skip


def pytest_collection_modifyitems(config, items):
    if WORKER:
        rank = {name: i for i, name in enumerate(LONGEST_FILES)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep their own order


_turns: dict = {}  # this worker's lock files, and whether it still holds them from the previous test


def _runs_alone(item) -> bool:
    return item is not None and item.get_closest_marker("processes") is not None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest -n, a `processes` test (a 2-rank job whose ranks wait on each other in collectives) runs alone:
    beside another test its ranks are descheduled in turn and a 25 s ZeRO-2 job takes 140 s. The gate stops new tests
    from starting while one waits for the room; tests without the mark share the room. A worker keeps both across
    consecutive `processes` tests, and its own in-process work in them uses every core."""
    if not WORKER:
        yield
        return
    import torch

    if "bases" in item.fixturenames:  # before the locks: the other worker builds the other base meanwhile
        out, err = io.StringIO(), io.StringIO()  # outside a test pytest captures nothing
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.suppress(Exception):
            embedded_bases()  # a failed build fails again in the test's own setup, with its traceback
    if not _turns:
        locks = TEST_HOME / "pytest-locks"
        locks.mkdir(parents=True, exist_ok=True)
        _turns.update(gate=open(locks / "gate", "a"), room=open(locks / "room", "a"), held=False)
    gate, room, alone = _turns["gate"], _turns["room"], _runs_alone(item)
    if not _turns["held"]:
        fcntl.flock(gate, fcntl.LOCK_EX)
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
        fcntl.flock(room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
    torch.set_num_threads(os.cpu_count() if alone else 1)
    try:
        yield
    finally:
        _turns["held"] = alone and _runs_alone(nextitem)
        if not _turns["held"]:
            fcntl.flock(room, fcntl.LOCK_UN)
            if alone:
                fcntl.flock(gate, fcntl.LOCK_UN)
            torch.set_num_threads(1)


def compose_config(overrides: list[str]):
    """The config an entry point would run with these overrides, checked the way the CLI checks it."""
    from distributed_peft.cli.preflight import check_overrides

    return check_overrides(overrides)


def shared_dataset(relative: str) -> Path:
    """A file of ../shared/datasets, or a skip saying why the test cannot run without it."""
    path = SHARED_DATASETS / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent: ../shared (real ParaDetox / GPTeacher data) is only beside CI checkouts")
    return path


def run_entry(monkeypatch, prog: str, argv: list[str]) -> tuple[int, list[str]]:
    """Run a console entry point in this process; return its exit code and its stderr lines."""
    from hydra.core.global_hydra import GlobalHydra

    module, function = SCRIPTS[prog].split(":")  # pyproject's [project.scripts]
    main = getattr(importlib.import_module(module), function)
    GlobalHydra.instance().clear()
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "argv", [prog, *argv])
    monkeypatch.setattr(sys, "stderr", stderr)
    with pytest.raises(SystemExit) as exit_info:
        main()
    GlobalHydra.instance().clear()
    lines = [ln for ln in stderr.getvalue().splitlines() if ln.strip() and "Warning" not in ln]
    return exit_info.value.code, lines


_built_bases: dict[str, Path] = {}


def embedded_bases() -> dict[str, Path]:
    """Both embedded bases, built once (about a minute each on 2 cores) and cached in TEST_HOME. Each pytest worker
    starts with another base, so on a fresh clone two workers build them side by side (build_base locks each)."""
    if not _built_bases:
        from distributed_peft.modeling.embedded_base import build_base

        names = ["tiny-llama", "tiny-bloom"]
        if WORKER and int(WORKER.removeprefix("gw")) % 2:
            names.reverse()
        built = {name: build_base(compose_config([f"model={name}"]).model) for name in names}
        _built_bases.update((name, built[name]) for name in ("tiny-llama", "tiny-bloom"))
    return _built_bases


@pytest.fixture(scope="session")
def bases() -> dict[str, Path]:
    return embedded_bases()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run gets a fresh Accelerator state, as a new process would."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def packed_lora_llama(bases: dict[str, Path]):
    """A float32 LoRA model on tiny-llama with the CPU packed attention, B nudged off zero so LoRA matters, and six
    instruct examples: (cfg, model, examples, tokenizer)."""
    import torch

    from distributed_peft.data.task_data import prepare_task_data
    from distributed_peft.modeling.loading import attach_lora, load_base_model, load_tokenizer

    cfg = compose_config(["model=tiny-llama", "peft=lora", "peft.dropout=0", "training.packing=padding_free"])
    tokenizer = load_tokenizer(str(bases["tiny-llama"]))
    model = attach_lora(load_base_model(cfg, str(bases["tiny-llama"])), cfg)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    data = prepare_task_data(compose_config(["task=instruct", "task.data.max_examples=40"]), tokenizer)
    return cfg, model, data.train[:6], tokenizer


def patch_everywhere(monkeypatch, module: str, name: str, replacement) -> None:
    """monkeypatch `module.name` and every loaded module that imported it by name, so module-level
    `from x import name` imports see the replacement too (modules imported later read it from `module`)."""
    original = getattr(importlib.import_module(module), name)
    for holder in [m for m in list(sys.modules.values()) if getattr(m, name, None) is original]:
        monkeypatch.setattr(holder, name, replacement)
