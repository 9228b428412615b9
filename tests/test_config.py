"""Every shipped config composes and validates; every user mistake is one clear line and exit code 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, compose_config

from distributed_peft.config import CONFIG_GROUPS, group_options
from distributed_peft.errors import ConfigError


def _custom_file(tmp_path, records=({"prompt": "2+2=", "completion": "4"},), name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_every_shipped_config_composes_and_validates(tmp_path):
    custom = _custom_file(tmp_path)
    composed = 0
    for group in CONFIG_GROUPS:
        options = group_options(group)
        assert options, f"conf/{group}/ has no option"
        for option in options:
            extra = [f"task.data.path={custom}"] if (group, option) == ("task", "custom") else []
            cfg = compose_config([f"{group}={option}", *extra])
            assert cfg[group if group != "experiment" else "task"] is not None
            composed += 1
    assert composed >= 4 + 7 + 2 + 1 + 2 + 3 + 3


def test_experiment_overlays_reproduce_the_amp_recipe():
    cfg = compose_config(["experiment=amp_instruct"])
    assert (cfg.model.name, cfg.task.name, cfg.peft.r, cfg.peft.alpha) == ("bloom-1b1", "instruct", 16, 32)
    assert (cfg.training.lr, cfg.training.lr_scheduler, cfg.training.max_grad_norm) == (2e-4, "constant", 0.3)
    assert (cfg.training.micro_batch_size, cfg.training.gradient_accumulation_steps) == (1, 4)
    assert (cfg.training.max_seq_len, cfg.training.epochs, cfg.task.data.fraction) == (1024, 1, 0.3)
    assert compose_config(["experiment=amp_sql"]).training.epochs == 2
    assert compose_config(["experiment=amp_detox"]).training.epochs == 4


def test_model_configs_carry_their_lora_targets():
    assert compose_config(["model=bloom-1b1"]).model.lora_target_modules[0] == "query_key_value"
    llama = compose_config(["model=llama-3.2-1b"]).model
    assert set(llama.lora_target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


# (overrides, a fragment the single error line must contain). The key and the bad value are always named.
BAD_CONFIGS = [
    (["task=nope"], "task='nope' is not a known task; allowed: custom, detox, instruct, sql"),
    (["model=gpt-17"], "model='gpt-17' is not a known model; allowed:"),
    (["peft=dora"], "peft='dora' is not a known peft; allowed: lora, qlora"),
    (["peft.r=0"], "peft.r=0 is invalid; it must be a positive integer"),
    (["peft.r=-4"], "peft.r=-4 is invalid"),
    (["peft.alpha=0"], "peft.alpha=0 is invalid"),
    (["peft.dropout=1.5"], "peft.dropout=1.5 is invalid; it must be in [0, 1)"),
    (["peft.r=sixteen"], "peft.r: Value 'sixteen'"),
    (["peft.quantization.quant_type=int3"], "peft.quantization.quant_type='int3' is not allowed; allowed: nf4, fp4"),
    (["training.lr=0"], "training.lr=0.0 is invalid; it must be > 0"),
    (["training.lr=-1e-4"], "training.lr=-0.0001 is invalid"),
    (["training.max_seq_len=100000"], "training.max_seq_len=100000 is invalid; it must be in [1, 512]"),
    (["training.micro_batch_size=0"], "training.micro_batch_size=0 is invalid"),
    (["training.gradient_accumulation_steps=0"], "training.gradient_accumulation_steps=0 is invalid"),
    (["training.lr_scheduler=exponential"], "training.lr_scheduler='exponential' is not allowed; allowed: constant"),
    (["training.optimizer=sgd"], "training.optimizer='sgd' is not allowed"),
    (["training.eval_fraction=1.5"], "training.eval_fraction=1.5 is invalid; it must be in (0, 1)"),
    (["training.truncation=wrap"], "training.truncation='wrap' is not allowed; allowed: truncate, drop"),
    (["training.epochs=0"], "training.epochs=0.0 is invalid; it must be > 0 when training.max_steps <= 0"),
    (["training.no_such_key=1"], "training.no_such_key"),
    (["logging.wandb_mode=sometimes"], "logging.wandb_mode='sometimes' is not allowed; allowed: offline, online"),
    (["task=custom"], "task.data.path=None is invalid; it must be a local data file"),
    (["task=custom", "task.data.path=/no/such/file.jsonl"], "task.data.path='/no/such/file.jsonl' does not exist"),
    (["task=custom", "task.data.path=data.xlsx"], "task.data.format='xlsx' (from 'data.xlsx') is not supported"),
    (["task.data.sample_file=missing.jsonl"], "task.data.sample_file='missing.jsonl' is not a bundled sample"),
    (["task.data.source=hub", "task.data.hub_id=null"], "task.data.hub_id=None is invalid"),
    (["task.data.fraction=0"], "task.data.fraction=0.0 is invalid; it must be in (0, 1]"),
    (["task.prompt_template='{toxic} {mood}'"], "has no column for template field(s) mood"),
    (["model.lora_target_modules=[]"], "peft.target_modules=None is invalid: model family 'llama'"),
    (["model.family=gpt2"], "model.family='gpt2' is not allowed; allowed: llama, bloom, mistral"),
]


@pytest.mark.parametrize("overrides,expected", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_value_is_one_line_naming_key_value_and_allowed(overrides, expected):
    with pytest.raises(ConfigError) as error:
        compose_config(overrides)
    assert len(error.value.problems) == 1, error.value.problems
    (line,) = error.value.problems
    assert expected in line
    assert "\n" not in line


def test_custom_file_without_the_needed_columns(tmp_path):
    path = _custom_file(tmp_path, [{"question": "2+2=", "answer": "4"}])
    with pytest.raises(ConfigError) as error:
        compose_config(["task=custom", f"task.data.path={path}"])
    assert error.value.problems == [
        f"task.data.path='{path}' lacks column(s) completion, prompt; allowed: its columns question, answer "
        "(map them with task.data.columns.FIELD=COLUMN)"
    ]
    cfg = compose_config(
        [
            "task=custom",
            f"task.data.path={path}",
            "task.data.columns.prompt=question",
            "task.data.columns.completion=answer",
        ]
    )
    assert cfg.task.data.columns.prompt == "question"


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as error:
        compose_config(["peft.r=0", "training.lr=0", "training.micro_batch_size=0"])
    assert [p.split("=")[0] for p in error.value.problems] == ["peft.r", "training.lr", "training.micro_batch_size"]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["task=nope"], "dpeft-train: error: task='nope' is not a known task"),
        (["peft.r=0", "training.lr=-1"], "dpeft-train: error: peft.r=0 is invalid"),
        (["training.max_seq_len=4096"], "dpeft-train: error: training.max_seq_len=4096 is invalid"),
        (["task=custom", "task.data.path=/nope.csv"], "dpeft-train: error: task.data.path='/nope.csv' does not exist"),
    ],
)
def test_cli_exits_2_with_one_line_per_problem_and_no_traceback(args, expected, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "distributed_peft.cli.train", *args, f"output_dir={out}"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == expected or lines[0].startswith(expected)
    assert all(line.startswith("dpeft-train: error: ") for line in lines)
    assert "Traceback" not in proc.stderr
    assert not out.exists(), "nothing may be written (or loaded) for a bad config"


def test_generate_and_merge_apps_compose_and_check_their_inputs(tmp_path):
    from distributed_peft.cli.preflight import check_overrides
    from distributed_peft.config import validate_generate, validate_merge

    cfg = check_overrides(
        [f"adapters=[{tmp_path}]", "prompt=hello", "+inputs.context=x"], "generate", validate_generate
    )
    assert (list(cfg.adapters), cfg.prompt, dict(cfg.inputs)) == ([str(tmp_path)], "hello", {"context": "x"})
    with pytest.raises(ConfigError, match="adapters: '/nope' is not a directory"):
        check_overrides(["adapters=[/nope]", "prompt=hi"], "generate", validate_generate)
    with pytest.raises(ConfigError, match="adapter='/nope' is not a directory"):
        check_overrides(["adapter=/nope", f"output={tmp_path}"], "merge", validate_merge)


def test_a_config_recorded_before_newer_options_reads_them_as_defaults():
    from omegaconf import OmegaConf

    from distributed_peft.config import load_recorded_config

    recorded = OmegaConf.to_container(compose_config([]), resolve=True)
    del recorded["training"]["packing"], recorded["evaluation"]
    cfg = load_recorded_config(recorded)
    assert cfg.training.packing == "none" and cfg.evaluation.generate is True
    assert cfg.task.name == "detox" and cfg.training.lr == recorded["training"]["lr"]


def readme_user_config(tmp_path) -> Path:
    """The README's own config directory (each yaml block after `my_conf/...`:), written out as a user would."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    blocks = dict(re.findall(r"`(my_conf/[\w/.]+)`:\n+```yaml\n(.*?)```", readme, re.S))
    assert set(blocks) >= {"my_conf/task/reviews.yaml", "my_conf/experiment/reviews_small.yaml"}
    for name, block in blocks.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block)
    rows = [("The battery lasts two days and the screen is bright.", "Great battery"), ("Broke in a week.", "Broke")]
    _custom_file(tmp_path, [{"text": t, "title": s} for t, s in rows * 12], name="reviews.jsonl")
    return tmp_path / "my_conf"


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_a_users_config_dir_composes_with_the_shipped_tree(tmp_path, monkeypatch, how):
    conf = readme_user_config(tmp_path)
    monkeypatch.chdir(tmp_path)  # task.data.path=reviews.jsonl, relative as in the README
    flags = ["--config-dir", str(conf)] if how == "--config-dir" else [f"hydra.searchpath=[file://{conf}]"]
    cfg = compose_config([*flags, "task=reviews", "model=tiny-bloom"])
    assert (cfg.task.name, cfg.task.data.columns.review, cfg.model.name) == ("reviews", "text", "tiny-bloom")
    assert cfg.task.prompt_template == "Review: {review}\nSummary:"
    overlay = compose_config([*flags, "experiment=reviews_small"])
    assert (overlay.task.name, overlay.training.max_steps, overlay.training.lr) == ("reviews", 100, 3e-3)
    with pytest.raises(ConfigError, match=r"task='review' is not a known task; allowed: custom, .*reviews"):
        compose_config([*flags, "task=review"])
    with pytest.raises(ConfigError, match="is not a known task"):  # without the directory, the option is unknown
        compose_config(["task=reviews"])


def test_a_missing_config_dir_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config directory .*absent.* does not exist"):
        compose_config(["--config-dir", str(tmp_path / "absent"), "task=detox"])


@pytest.mark.slow
def test_a_users_task_from_their_config_dir_trains_from_their_file(tmp_path, monkeypatch, bases):
    """The real entry point (Hydra parses --config-dir itself), run in this process."""
    from hydra.core.global_hydra import GlobalHydra

    from distributed_peft.cli.train import main

    conf = readme_user_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["--config-dir", str(conf), "experiment=reviews_small", "training.max_steps=2", "evaluation.generate=false"]
    monkeypatch.setattr(sys, "argv", ["dpeft-train", *args, "logging.progress_bar=false", "output_dir=run"])
    GlobalHydra.instance().clear()
    main()
    GlobalHydra.instance().clear()
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: reviews" in recorded and "Review: {review}" in recorded
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").stat().st_size > 0


def test_one_rule_names_every_default_directory(tmp_path, monkeypatch):
    """runs/<task>-<model> for a run, runs/bench and runs/reproduce, and a new runs/eval-<task>-<time>-N per report."""
    from distributed_peft.config import BenchConfig, Config
    from distributed_peft.runtime.output_dirs import RUNS_DIR, default_output_dir, new_report_dir, run_dir
    from distributed_peft.training.reproduce import ReproduceConfig

    assert str(RUNS_DIR) == "runs"
    assert Config().output_dir == "runs/${task.name}-${model.name}"
    assert (BenchConfig().output_dir, ReproduceConfig().output_dir) == ("runs/bench", "runs/reproduce")
    assert run_dir("x") == default_output_dir("x") == "runs/x"  # not in a multirun
    assert compose_config(["task=sql", "model=tiny-bloom"]).output_dir == "runs/sql-tiny-bloom"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("distributed_peft.runtime.output_dirs.time.strftime", lambda _: "20240102-030405")
    first = new_report_dir("my task/1")
    assert first == Path("runs/eval-my-task-1-20240102-030405")
    first.mkdir(parents=True)
    assert new_report_dir("my task/1") == Path("runs/eval-my-task-1-20240102-030405-2")
