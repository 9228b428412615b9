"""A user's mistake is one line and a nonzero exit in every command, before a model loads: broken adapter
directories, dpeft-merge and dpeft-reproduce writing where they must not, dpeft-reproduce's own command line and
SIGTERM, an unreachable Hub, and a read-only or full cache of embedded bases."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, TINY_ADAPTERS, compose_config, patch_everywhere, run_entry

from distributed_peft.runtime.output_dirs import OWNER_MARKER

BIN = Path(sys.executable).parent
WEIGHTS = "adapter_model.safetensors"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and mtime: what 'touching nothing' compares."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a command gets as far as loading a model or training."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded (or training started) before the mistake was reported")

    for name in ("load_base_model", "load_tokenizer"):
        patch_everywhere(monkeypatch, "distributed_peft.modeling.loading", name, refuse)
    patch_everywhere(monkeypatch, "distributed_peft.training.recipe", "run_training", refuse)


# ---------------------------------------------------------------------------------------------------------------------
# Adapter directories with missing, truncated or malformed files


def _edit_metadata(directory: Path) -> None:
    metadata = json.loads((directory / "dpeft_adapter.json").read_text())
    del metadata["base"]
    (directory / "dpeft_adapter.json").write_text(json.dumps(metadata))


BROKEN_ADAPTERS = {  # name -> (how the copy of the tiny detox adapter is broken, what the one line says)
    "weights_missing": (lambda d: (d / WEIGHTS).unlink(), "adapter_model.safetensors missing"),
    "weights_truncated": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:1000]), "is truncated"),
    "weights_cut_short": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-10]), "is truncated"),
    "weights_not_safetensors": (lambda d: (d / WEIGHTS).write_bytes(b"<html>not found</html>" * 9), "malformed"),
    "config_missing": (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json missing"),
    "config_not_json": (lambda d: (d / "adapter_config.json").write_text("{r: 16"), "adapter_config.json is not valid"),
    "metadata_missing": (lambda d: (d / "dpeft_adapter.json").unlink(), "dpeft_adapter.json missing"),
    "metadata_not_json": (lambda d: (d / "dpeft_adapter.json").write_text('{"task": '), "dpeft_adapter.json is not"),
    "metadata_lacks_keys": (_edit_metadata, "dpeft_adapter.json lacks base"),
}


def broken_adapter(tmp_path: Path, name: str) -> Path:
    directory = shutil.copytree(TINY_ADAPTERS / "detox", tmp_path / f"adapter-{name}")
    BROKEN_ADAPTERS[name][0](directory)
    return directory


@pytest.mark.parametrize("name", list(BROKEN_ADAPTERS))
def test_each_missing_truncated_or_malformed_file_is_named_in_one_line(name, tmp_path):
    from distributed_peft.adapters.storage import read_adapter_metadata
    from distributed_peft.errors import AdapterError

    adapter = broken_adapter(tmp_path, name)
    with pytest.raises(AdapterError) as error:
        read_adapter_metadata(adapter)  # what every command calls first
    assert len(error.value.problems) == 1 and "\n" not in error.value.problems[0]
    assert error.value.problems[0].startswith(f"adapter={str(adapter)!r}") and BROKEN_ADAPTERS[name][1] in str(
        error.value
    )
    assert "copy the adapter directory again whole, or retrain it" in error.value.problems[0], "how to fix it"


def test_a_broken_adapter_is_one_line_in_every_command_before_a_model_loads(tmp_path, monkeypatch, no_model_loads):
    adapters = {name: broken_adapter(tmp_path, name) for name in BROKEN_ADAPTERS}
    commands = [  # (program, which broken adapter, its arguments): every command, several kinds of damage
        ("dpeft-eval", "weights_truncated", ["adapter={a}", f"output_dir={tmp_path}/eval"]),
        ("dpeft-generate", "metadata_lacks_keys", ["adapters=[{a}]", "prompt=hi"]),
        ("dpeft-merge", "config_not_json", ["adapter={a}", f"output={tmp_path}/merged"]),
        ("dpeft-explore", "weights_missing", ["adapters=[{a}]", f"port={free_port()}"]),
        ("dpeft-reproduce", "metadata_not_json", ["prebuilt={a}", f"output_dir={tmp_path}/reproduce"]),
    ]
    before = tree(tmp_path)
    for prog, name, args in commands:
        code, lines = run_entry(monkeypatch, prog, [arg.format(a=adapters[name]) for arg in args])
        assert code == 2 and len(lines) == 1, (prog, lines)
        assert lines[0].startswith(f"{prog}: error: ") and BROKEN_ADAPTERS[name][1] in lines[0], (prog, lines[0])
        assert f"adapter={str(adapters[name])!r}" in lines[0], "the line names the adapter directory"
        assert tree(tmp_path) == before, f"{prog} wrote something"


def test_the_explorer_lists_a_broken_adapter_as_unavailable_and_keeps_the_others(tmp_path, bases):
    from distributed_peft.cli.preflight import check_overrides
    from distributed_peft.config import validate_explore
    from distributed_peft.serving.explorer import describe_adapters

    broken = broken_adapter(tmp_path, "weights_truncated")
    good = TINY_ADAPTERS / "sql"
    cfg = check_overrides([f"adapters=[{good},{broken}]", "examples_per_task=1"], "explore", validate_explore)
    adapters, _, _ = describe_adapters([str(good), str(broken)], cfg)
    by_directory = {Path(a.directory): a for a in adapters}
    assert by_directory[good].available and by_directory[good].name == "sql"
    assert not by_directory[broken].available
    assert by_directory[broken].reason.startswith(f"adapter={str(broken)!r}: {WEIGHTS} is truncated")


# ---------------------------------------------------------------------------------------------------------------------
# dpeft-merge output=: absent, empty or an earlier merged model only; atomic; a failure removes only what it made


def test_merge_refuses_a_checkout_a_home_or_a_run_directory_touching_nothing(tmp_path, monkeypatch, no_model_loads):
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    (checkout / "src").mkdir()
    (checkout / "src" / "main.py").write_text("print('mine')\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export PATH\n")
    (home / "notes.txt").write_text("mine\n")
    run = tmp_path / "run"  # a training run of ours: replacing it would delete its adapter
    shutil.copytree(TINY_ADAPTERS / "detox", run / "adapter")
    (run / "config.yaml").write_text("task: {}\n")
    (run / OWNER_MARKER).write_text("{}\n")
    adapter = f"adapter={TINY_ADAPTERS / 'detox'}"
    cases = [
        (checkout, [adapter, "output=."], "output='.' holds files distributed-peft did not write (.git, "),
        (tmp_path, [adapter, f"output={home}"], "holds files distributed-peft did not write (.bashrc, notes.txt)"),
        (tmp_path, [adapter, f"output={run}"], "holds a distributed-peft run (adapter, config.yaml), not a merged"),
    ]
    before = tree(tmp_path)
    for cwd, argv, expected in cases:
        monkeypatch.chdir(cwd)
        code, lines = run_entry(monkeypatch, "dpeft-merge", argv)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("dpeft-merge: error: ") and expected in lines[0], lines[0]
        assert "nothing was touched" in lines[0]
        assert tree(tmp_path) == before, f"dpeft-merge {argv} touched something"


def test_merge_writes_a_marked_model_atomically_and_a_failed_merge_removes_only_what_it_made(
    tmp_path, monkeypatch, bases
):
    import distributed_peft.adapters.storage as adapters

    detox = TINY_ADAPTERS / "detox"
    merged = adapters.merge_adapter(detox, tmp_path / "models" / "detox")
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", adapters.MERGED_METADATA, OWNER_MARKER} <= names
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "models").iterdir()), "no staging leftover"
    assert adapters.merge_adapter(detox, merged) == merged, "an earlier merged model is replaced whole"
    earlier = tree(merged)

    def crash(*args, **kwargs):
        raise RuntimeError("merge crashed")

    monkeypatch.setattr(adapters, "load_adapter", crash)
    empty = tmp_path / "empty"
    empty.mkdir()
    for output in (tmp_path / "new" / "nested", empty, merged):
        with pytest.raises(RuntimeError, match="merge crashed"):
            adapters.merge_adapter(detox, output)
    assert not (tmp_path / "new").exists(), "the directories the failed merge created are gone"
    assert empty.is_dir() and not list(empty.iterdir()), "a directory that existed before stays, as it was"
    assert tree(merged) == earlier, "the earlier merged model is untouched by a failed merge"


# ---------------------------------------------------------------------------------------------------------------------
# dpeft-reproduce: a Hydra app; unknown keys, non-prebuilt directories, foreign output_dir; SIGTERM exits 75


def test_reproduce_refuses_unknown_keys_and_directories_that_are_not_prebuilt(tmp_path, monkeypatch, no_model_loads):
    adapter_only = tmp_path / "adapter-only"
    adapter_only.mkdir()
    for name in (WEIGHTS, "adapter_config.json", "dpeft_adapter.json"):
        shutil.copy2(TINY_ADAPTERS / "detox" / name, adapter_only / name)
    (tmp_path / "mine.txt").write_text("the user's file\n")
    out = f"output_dir={tmp_path}/out"
    cases = [
        (["+epochs=3", out], "epochs=3 is not a known option; allowed: output_dir, prebuilt, task"),
        (["epochs=3", out], "epochs"),
        (["+task.foo=1", "task=detox", out], "task.foo=1 is not a known option"),
        (["task=custom", out], "task=custom has no prebuilt adapter; allowed: detox, instruct, sql"),
        (["task=detox", "task.data.path=x.jsonl", out], "task.* overrides are not used"),
        ([f"prebuilt={adapter_only}", out], "is not a prebuilt adapter: config.yaml, metrics.json missing"),
        ([f"prebuilt={tmp_path}/nowhere", out], "is not a directory"),
        (["task=detox", f"prebuilt={TINY_ADAPTERS / 'detox'}", out], "both name what to reproduce"),
        (
            ["task=detox", f"output_dir={tmp_path}"],
            "holds files distributed-peft did not write (adapter-only, mine.txt",
        ),
    ]
    before = tree(tmp_path)
    for argv, expected in cases:
        code, lines = run_entry(monkeypatch, "dpeft-reproduce", argv)
        assert code == 2 and len(lines) == 1, (argv, lines)
        assert lines[0].startswith("dpeft-reproduce: error: ") and expected in lines[0], (argv, lines[0])
        assert tree(tmp_path) == before, f"dpeft-reproduce {argv} wrote something"


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"dpeft-reproduce exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


@pytest.mark.parametrize("when", ["before_training", pytest.param("while_training", marks=pytest.mark.slow)])
def test_reproduce_under_sigterm_exits_75_with_one_line(when, tmp_path, bases):
    out = tmp_path / "out"
    stdout = (tmp_path / "stdout.txt").open("w+")
    proc = subprocess.Popen(
        [str(BIN / "dpeft-reproduce"), f"prebuilt={TINY_ADAPTERS / 'detox'}", f"output_dir={out}"],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        started = lambda: "dpeft-reproduce: retraining" in (tmp_path / "stdout.txt").read_text()  # noqa: E731
        metrics = out / "detox" / "metrics.jsonl"
        stepped = lambda: metrics.is_file() and '"step"' in metrics.read_text()  # noqa: E731
        _wait_for(started if when == "before_training" else stepped, proc, 240, when.replace("_", " "))
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        stdout.close()
    lines = [line for line in stderr.splitlines() if line.strip() and "Warning" not in line]
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("dpeft-reproduce: preempted: SIGTERM"), lines
    if when == "while_training":
        assert list((out / "detox" / "checkpoints").glob("step-*")), "the rerun resumes from a checkpoint"


def test_a_rerun_resumes_an_interrupted_reproduction_and_retrains_a_finished_one(tmp_path):
    from distributed_peft.training.reproduce import finished_earlier

    run = tmp_path / "detox"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    assert not finished_earlier(run), "SIGTERM before the adapter was saved: the rerun resumes"
    (run / "adapter").mkdir()
    os.utime(run / "checkpoints" / "step-000002", (1_000, 1_000))
    assert finished_earlier(run), "an adapter newer than every checkpoint: the rerun trains again"
    (run / "checkpoints" / "step-000005").mkdir()
    os.utime(run / "adapter", (500, 500))
    assert not finished_earlier(run), "a retraining interrupted after its first checkpoint: the rerun resumes it"


# ---------------------------------------------------------------------------------------------------------------------
# A Hub that cannot be reached: one line within 15 s, with the way to work offline


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """HF_ENDPOINT on a closed local port and an empty Hub cache: deterministic, no network needed."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return tmp_path / "hub-cache"


def test_an_unreachable_hub_is_one_line_within_15_s(unreachable_hub, tmp_path, monkeypatch):
    from distributed_peft.errors import DataError
    from distributed_peft.runtime import hub

    # neither the probe's timeout nor its deadline bounds this run: a refused port must be answered at once
    monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 60.0)
    monkeypatch.setattr(hub, "PROBE_DEADLINE_S", 60.0)
    start = time.monotonic()
    code, lines = run_entry(
        monkeypatch, "dpeft-train", ["model=llama-3.2-1b", f"output_dir={tmp_path}/run", "logging.progress_bar=false"]
    )
    elapsed = time.monotonic() - start
    assert elapsed < 15, f"{elapsed:.1f} s"
    assert code == 2 and len(lines) == 1, lines
    assert "no answer within" not in lines[0], lines[0]  # the refusal itself, not the deadline, ended the probe
    assert lines[0].startswith("dpeft-train: error: model.name_or_path='meta-llama/Llama-3.2-1B': the Hugging Face Hub")
    for advice in (
        "cannot be reached",
        "hf download meta-llama/Llama-3.2-1B",
        "HF_HUB_OFFLINE=1",
        "model.name_or_path",
    ):
        assert advice in lines[0], lines[0]
    assert not (tmp_path / "run").exists()

    start = time.monotonic()  # the same for a Hub dataset (task.data.source=hub)
    with pytest.raises(DataError) as error:
        hub.check_hub_dataset("s-nlp/paradetox")
    assert time.monotonic() - start < 15
    assert len(error.value.problems) == 1 and "cannot be reached" in error.value.problems[0]
    assert "no answer within" not in error.value.problems[0]
    assert "hf download s-nlp/paradetox --repo-type dataset" in error.value.problems[0]

    with socket.socket() as silent:  # a Hub that accepts the connection and never answers: bounded too
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 60.0)  # the request's own timeout would not end it in time
        monkeypatch.setattr(hub, "PROBE_DEADLINE_S", 1.0)  # the deadline must
        start = time.monotonic()
        with pytest.raises(hub.ConfigError, match=r"cannot be reached \(no answer within 1 s\)"):
            hub.resolve_hub_model("meta-llama/Llama-3.2-1B")
        assert time.monotonic() - start < 5


def test_offline_mode_needs_a_cached_copy_and_a_cached_model_loads_when_the_hub_is_down(
    unreachable_hub, monkeypatch, capsys
):
    from distributed_peft.errors import ConfigError, DataError
    from distributed_peft.runtime import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"is not in the local Hub cache and HF_HUB_OFFLINE=1; run `hf download"):
        hub.resolve_hub_model("meta-llama/Llama-3.2-1B")
    with pytest.raises(DataError, match="is not in the local cache and HF_HUB_OFFLINE=1"):
        hub.check_hub_dataset("s-nlp/paradetox")

    snapshot = unreachable_hub / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    (unreachable_hub / "models--meta-llama--Llama-3.2-1B" / "refs").mkdir()
    (unreachable_hub / "models--meta-llama--Llama-3.2-1B" / "refs" / "main").write_text("abc123")
    assert hub.resolve_hub_model("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B", "offline: from the cache"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    capsys.readouterr()
    assert hub.resolve_hub_model("meta-llama/Llama-3.2-1B") == str(snapshot), "Hub down: the cached snapshot"
    assert "cannot be reached" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# A read-only or full cache of embedded bases: refused before the minute of pretraining


@pytest.mark.parametrize("problem", ["under_a_file", "read_only", "full"])
def test_an_unwritable_or_full_cache_is_refused_before_pretraining(problem, tmp_path, monkeypatch):
    import distributed_peft.modeling.embedded_base as embedded_base

    def too_late(*args, **kwargs):
        raise AssertionError("the base started building before the cache was checked")

    monkeypatch.setattr(embedded_base, "train_tokenizer", too_late)
    monkeypatch.setattr(embedded_base, "pretrain", too_late)
    home = tmp_path / "home"
    if problem == "under_a_file":
        (tmp_path / "a-file").write_text("not a directory")
        home = tmp_path / "a-file" / "home"
    elif problem == "read_only":  # tests run as root, where chmod stops no write: the probe meets EROFS instead

        def read_only(directory):
            raise OSError(errno.EROFS, "Read-only file system", str(directory))

        monkeypatch.setattr(embedded_base, "_write_probe", read_only)
    else:
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=3 * 2**20))
    monkeypatch.setenv("DPEFT_HOME", str(home))
    needed = -(-embedded_base.bytes_needed(compose_config(["model=tiny-llama"]).model) // 2**20)

    code, lines = run_entry(monkeypatch, "dpeft-build-base", ["model=tiny-llama", f"output_dir={tmp_path}/run"])

    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"dpeft-build-base: error: DPEFT_HOME={str(home)!r}"), lines[0]
    assert lines[0].endswith(f"set DPEFT_HOME to a writable directory with {needed} MiB free"), lines[0]
    reason = {"under_a_file": "cannot be written (Not a directory)", "read_only": "(Read-only file system)"}
    assert reason.get(problem, "has 3 MiB free, building base tiny-llama needs") in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_an_error_omegaconf_re_raises_with_its_key_is_still_printed_as_one_line(capsys):
    """SIGTERM's Preempted raised while OmegaConf code runs comes back as a new Preempted whose message has
    `full_key: ...` lines appended (the SIGTERM test of dpeft-reproduce met it); the original line is printed."""
    from omegaconf import OmegaConf
    from omegaconf._utils import format_and_raise

    from distributed_peft.cli.help import report_user_error
    from distributed_peft.errors import Preempted

    cfg = OmegaConf.create({"training": {"max_steps": 3}})
    with pytest.raises(Preempted) as raised:
        try:
            raise Preempted("stopped by SIGTERM before training started; rerun the same command")
        except Preempted as cause:
            format_and_raise(node=cfg, key="training", value=None, msg=str(cause), cause=cause)
    assert len(str(raised.value).splitlines()) > 1  # what OmegaConf makes of it
    report_user_error(raised.value, "dpeft-reproduce")
    assert capsys.readouterr().err == (
        "dpeft-reproduce: preempted: stopped by SIGTERM before training started; rerun the same command\n"
    )
