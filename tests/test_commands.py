"""One way to call every command: each console script in pyproject.toml answers `--help` with what it does, the
config groups it composes (with their options) and its main keys, and `--cfg job` with the config it composes."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SCRIPTS

from distributed_peft.config import group_options

BIN = Path(sys.executable).parent


def call(monkeypatch, capsys, name: str, argv: list[str]) -> tuple[int, str, str]:
    """Run console script `name` in this process as its wrapper would: (exit code, stdout, stderr)."""
    from hydra.core.global_hydra import GlobalHydra

    module, function = SCRIPTS[name].split(":")
    entry = getattr(importlib.import_module(module), function)
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", [name, *argv])
    try:
        code = entry()
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        GlobalHydra.instance().clear()
    out, err = capsys.readouterr()
    return code or 0, out, err


def sections(help_text: str) -> tuple[str, str]:
    """The config groups and the main keys of a --help."""
    groups = help_text.split("== Config groups ==")[1].split("== Main keys ==")[0]
    return groups, help_text.split("== Main keys ==")[1]


def has_key(cfg: dict, dotted: str) -> bool:
    """`a.b.c` is a key of the composed config (an upper-case part, `inputs.FIELD`, is a placeholder)."""
    node = cfg
    for part in dotted.split("."):
        if part.isupper():
            return True
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_command_answers_help_and_cfg_job(name, monkeypatch, capsys):
    code, help_text, _ = call(monkeypatch, capsys, name, ["--help"])
    assert code == 0
    assert help_text.startswith(f"{name}: ") and "Usage:" in help_text and f"\n  {name}" in help_text
    assert len(help_text.splitlines()) < 50, "the main keys, not a dump of the whole config"
    code, job, _ = call(monkeypatch, capsys, name, ["--cfg", "job"])
    assert code == 0
    cfg = yaml.safe_load(job)
    assert isinstance(cfg, dict) and cfg, f"--cfg job printed no config: {job!r}"

    groups, keys = sections(help_text)
    listed = re.findall(r"^(\w+): (.+) \(default: (\S+)\)$", groups, re.M)
    for group, options, default in listed:  # the groups this command composes (an overlay chosen: not a key)
        assert options.split(", ") == group_options(group) and (group in cfg or default == "none"), group
    if not listed:
        assert "(none: every setting is a key)" in groups
    columns = [line.split("  ")[0] for line in keys.splitlines() if re.match(r"[a-z_][\w.]*=", line)]
    main_keys = [key for column in columns for key in re.findall(r"([a-z_][\w.]*)=", column)]
    assert len(main_keys) >= 2
    assert [k for k in main_keys if not has_key(cfg, k)] == [], "--help names keys its config does not have"


def test_a_train_run_composes_the_groups_its_help_lists(monkeypatch, capsys):
    _, help_text, _ = call(monkeypatch, capsys, "dpeft-train", ["--help"])
    groups, _ = sections(help_text)
    for group in ("task", "model", "peft", "distributed", "training", "logging", "experiment"):
        assert f"\n{group}: " in groups
    _, chosen, _ = call(monkeypatch, capsys, "dpeft-eval", ["--help", "task=sql", "model=tiny-bloom"])
    assert "task: custom, detox, instruct, sql (chosen: sql)" in chosen and "(chosen: tiny-bloom)" in chosen
    assert chosen.startswith("dpeft-eval: ") and "adapter=DIR" in chosen


@pytest.mark.parametrize(
    "name,argv,line",
    [
        ("dpeft-train", ["--cfg", "job", "task=nope"], "task='nope' is not a known task; allowed: custom, detox"),
        ("dpeft-launch", ["--help", "model=nope"], "model='nope' is not a known model; allowed: bloom-1b1"),
        ("dpeft-bench", ["--cfg", "job", "repeats=x"], "repeats: Value 'x' of type 'str' could not be converted"),
    ],
)
def test_a_mistake_beside_help_or_cfg_is_one_line(name, argv, line, monkeypatch, capsys):
    code, out, err = call(monkeypatch, capsys, name, argv)
    assert code == 2 and out == ""
    (printed,) = err.splitlines()
    assert printed.startswith(f"{name}: error: {line}")


def test_the_installed_scripts_answer_the_same(tmp_path):
    """The console scripts themselves (not only their functions): dpeft-launch is not a Hydra app, dpeft-bench is."""
    launch = subprocess.run([BIN / "dpeft-launch", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert launch.returncode == 0 and launch.stdout.startswith("dpeft-launch: "), launch.stderr[-2000:]
    assert "num_gpu_workers=N" in launch.stdout and "\ndistributed: auto, ddp," in launch.stdout
    bench = subprocess.run(
        [BIN / "dpeft-bench", "--cfg", "job", "tasks=[sql]", "repeats=1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert bench.returncode == 0, bench.stderr[-2000:]
    printed = yaml.safe_load(bench.stdout)
    assert printed.pop("model")["name"] == "tiny-llama"  # the packing table's base (model=smollm2-135m: the real one)
    assert printed | {"variants": None} == {
        "tables": ["packing", "joint"],
        "tasks": ["sql"],
        "repeats": 1,
        "examples": 400,
        "variants": None,
        "gpu_models": ["llama-3.2-1b", "bloom-1b1"],
        "joint": {"tasks": ["sql", "detox", "instruct"], "max_steps": 20},
        "output_dir": "runs/bench",
    }


def test_cfg_job_after_the_overrides_prints_the_config_they_compose(monkeypatch, capsys, tmp_path):
    """`dpeft-train task=sql training.lr=1e-4 --cfg job` (the README's order) as well as with --cfg first."""
    (tmp_path / "task").mkdir()  # a user's config directory
    for argv in (
        ["task=sql", "training.lr=1e-4", "--cfg", "job"],
        ["--cfg", "job", "task=sql", "training.lr=1e-4"],
        ["--config-dir", str(tmp_path), "task=sql", "--cfg=job", "training.lr=1e-4", "--resolve"],
    ):
        code, job, err = call(monkeypatch, capsys, "dpeft-train", argv)
        assert code == 0, (job, err)
        cfg = yaml.safe_load(job)
        assert (cfg["task"]["name"], cfg["training"]["lr"]) == ("sql", 1e-4)
