"""User mistakes refused in one line before any model loads: unknown `+` keys, out-of-bounds values, launch variables
that are not numbers, settings that cannot work together; dpeft-launch and dpeft-bench write only where they may."""

from __future__ import annotations

import pytest
from conftest import compose_config, run_entry

import benchmarks.harness as benchmark
import distributed_peft.cli.launch as launcher
from distributed_peft.config import check_lora_rank
from distributed_peft.errors import ConfigError
from distributed_peft.runtime.output_dirs import OWNER_MARKER


def snapshot(directory) -> dict[str, bytes | None]:
    """Every path under `directory` with its bytes (None for a directory): equal snapshots, nothing written."""
    return {str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes() for p in directory.rglob("*")}


def foreign_directory(tmp_path):
    """A directory holding a user's file (not ours): no command may write into it."""
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "notes.txt").write_text("my notes")
    return directory


def problems_of(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as error:
        compose_config(overrides)
    return error.value.problems


# --- keys added with + that the schema does not know


def test_unknown_plus_key_is_one_line_with_a_suggestion_and_exit_2(monkeypatch, tmp_path):
    out = tmp_path / "run"
    code, lines = run_entry(monkeypatch, "dpeft-train", ["+training.lrr=1", f"output_dir={out}"])
    assert (code, lines) == (2, ["dpeft-train: error: training.lrr=1 is not a known option; did you mean training.lr?"])
    assert not out.exists()
    assert problems_of(["+training.dropout=0.1"]) == [
        "training.dropout=0.1 is not a known option in training; did you mean peft.dropout?"
    ]
    assert problems_of(["+model.base.hidden=64"]) == [
        "model.base.hidden=64 is not a known option; did you mean model.base.hidden_size?"
    ]
    (line,) = problems_of(["+colour=blue"])
    assert line.startswith("colour='blue' is not a known option; allowed: adapter, allow_base_mismatch, distributed")
    # free-form mappings stay free: a column map and dpeft-generate's extra inputs take any key
    cfg = compose_config(["+task.data.columns.comment=en_toxic_comment"])
    assert cfg.task.data.columns.comment == "en_toxic_comment"
    code, lines = run_entry(monkeypatch, "dpeft-generate", [f"adapters=[{tmp_path}]", "prompt=hi", "+max_tokens=3"])
    assert (code, lines) == (
        2,
        ["dpeft-generate: error: max_tokens=3 is not a known option; did you mean max_new_tokens?"],
    )


def test_unknown_plus_key_in_merge_and_generate_configs(tmp_path):
    from distributed_peft.cli.preflight import check_overrides
    from distributed_peft.config import validate_generate, validate_merge

    cfg = check_overrides([f"adapters=[{tmp_path}]", "prompt=hi", "+inputs.context=x"], "generate", validate_generate)
    assert dict(cfg.inputs) == {"context": "x"}
    with pytest.raises(ConfigError) as error:
        check_overrides([f"adapter={tmp_path}", f"output={tmp_path}/m", "+outptu=x"], "merge", validate_merge)
    assert error.value.problems == ["outptu='x' is not a known option; did you mean output?"]


@pytest.mark.parametrize("command", ["generate", "merge", "explore"])
def test_a_device_that_is_not_here_is_one_line_before_loading(command, tmp_path, monkeypatch):
    """generate, merge and explore load the base on `device` (auto: cuda when visible); cuda on a machine without it
    and a misspelt device are each one line."""
    import torch

    from distributed_peft.cli.preflight import check_overrides
    from distributed_peft.config import validate_explore, validate_generate, validate_merge
    from distributed_peft.runtime.distributed import resolve_device

    validator = {"generate": validate_generate, "merge": validate_merge, "explore": validate_explore}[command]
    args = {
        "generate": [f"adapters=[{tmp_path}]", "prompt=hi"],
        "merge": [f"adapter={tmp_path}", f"output={tmp_path}/m"],
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, problem in [
        ("cuda", "device='cuda' but no CUDA device is visible here; allowed: auto, cpu"),
        ("gpu", "device='gpu' is not allowed; allowed: auto, cpu, cuda"),
    ]:
        with pytest.raises(ConfigError) as error:
            check_overrides([*args.get(command, []), f"device={device}"], command, validator)
        assert error.value.problems == [problem]
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"
    check_overrides([*args.get(command, []), "device=cuda"], command, validator)


# --- values outside sane bounds


def test_lora_rank_above_the_model_width_and_absurd_values_are_refused():
    assert problems_of(["peft.r=256"]) == [
        "peft.r=256 is invalid; it must be <= 128, the width (hidden size) of model tiny-llama: a LoRA rank above the "
        "layers' width adds parameters and no capacity"
    ]
    assert compose_config(["peft.r=128"]).peft.r == 128
    assert problems_of(["training.lr=3"]) == ["training.lr=3.0 is invalid; it must be > 0 and <= 1 (e.g. 2e-4)"]
    assert problems_of(["training.seed=-1"]) == ["training.seed=-1 is invalid; it must be in [0, 4294967295]"]
    assert problems_of(["model.base.num_kv_heads=3"]) == [
        "model.base.num_kv_heads=3 is invalid; it must divide model.base.num_heads (2)"
    ]
    assert problems_of(["evaluation.max_new_tokens=1000"]) == [
        "evaluation.max_new_tokens=1000 is invalid; it must be <= 512 (the context length of model tiny-llama)"
    ]
    hub_model = compose_config(["model=llama-3.2-1b", "peft.r=4096"])  # the width is only known from config.json
    with pytest.raises(ConfigError, match=r"peft.r=4096 is invalid; it must be <= 2048, the width"):
        check_lora_rank(hub_model, 2048)
    check_lora_rank(hub_model, 4096)


# --- launch variables that are not numbers


def test_non_numeric_launch_variable_breaks_only_dpeft_launch(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("NUM_GPU_WORKERS", "abc")
    out = tmp_path / "run"
    monkeypatch.setattr(launcher, "cuda_device_count", lambda: 0)
    assert launcher.main(["--dry-run", f"output_dir={out}"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "dpeft-launch: error: NUM_GPU_WORKERS='abc' is not a number; allowed: a positive integer such as "
        "NUM_GPU_WORKERS=4"
    ]
    assert launcher.main(["--dry-run", "num_gpu_workers=2", f"output_dir={out}"]) == 0, "an override wins"
    assert "1 node(s) x 2 worker(s)" in capsys.readouterr().out

    assert compose_config([f"output_dir={out}"]).num_gpu_workers is None  # dpeft-train's preflight
    assert compose_config([f"adapter={tmp_path / 'adapter'}"]).adapter  # dpeft-eval's preflight
    code, lines = run_entry(monkeypatch, "dpeft-train", ["peft.r=0", f"output_dir={out}"])  # the only problem named
    assert (code, lines) == (2, ["dpeft-train: error: peft.r=0 is invalid; it must be a positive integer"])
    code, lines = run_entry(monkeypatch, "dpeft-eval", [f"adapter={tmp_path / 'none'}"])
    assert code == 2 and len(lines) == 1 and f"adapter='{tmp_path / 'none'}'" in lines[0], lines


@pytest.mark.parametrize(
    "environment,expected",
    [
        (
            {"NUM_MACHINES": "two"},
            "NUM_MACHINES='two' is not a number; allowed: a positive integer such as NUM_MACHINES=2",
        ),
        (
            {"NUM_GPU_WORKERS": "0"},
            "NUM_GPU_WORKERS='0' is invalid; allowed: a positive integer such as NUM_GPU_WORKERS=4",
        ),
        ({"NUM_GPU_WORKERS": "2.5"}, "NUM_GPU_WORKERS='2.5' is not a whole number; allowed: a positive integer"),
        ({"MACHINE_RANK": "-1"}, "MACHINE_RANK='-1' is invalid; allowed: an integer >= 0 such as MACHINE_RANK=0"),
        ({"MACHINE_RANK": "2", "NUM_MACHINES": "2"}, "MACHINE_RANK='2' is invalid; allowed: an integer in [0, 1]"),
        ({"MAIN_PROCESS_PORT": "http"}, "MAIN_PROCESS_PORT='http' is not a number; allowed: a TCP port in [1, 65535]"),
        ({"MAIN_PROCESS_PORT": "70000"}, "MAIN_PROCESS_PORT='70000' is invalid; allowed: a TCP port in [1, 65535]"),
        ({"MAIN_PROCESS_IP": "10.0.0.1;rm"}, "MAIN_PROCESS_IP='10.0.0.1;rm' is invalid; allowed: a host name or IP"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else None,
)
def test_bad_launch_variable_is_one_line_from_dpeft_launch(environment, expected, monkeypatch, capsys, tmp_path):
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(launcher, "cuda_device_count", lambda: 0)
    assert launcher.main(["--dry-run", f"output_dir={tmp_path / 'run'}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"dpeft-launch: error: {expected}"), line


# --- settings that cannot work together


def test_more_shown_examples_than_generated_ones_is_refused_before_loading(monkeypatch, tmp_path):
    out = tmp_path / "run"
    argv = ["evaluation.show_examples=5", "evaluation.max_generate_examples=4", f"output_dir={out}"]
    code, lines = run_entry(monkeypatch, "dpeft-train", argv)
    assert (code, lines) == (
        2,
        [
            "dpeft-train: error: evaluation.show_examples=5 is invalid with evaluation.max_generate_examples=4: "
            "eval.md shows generated examples only; allowed: evaluation.show_examples <= 4, or a larger "
            "max_generate_examples"
        ],
    )
    assert not out.exists()
    compose_config(["evaluation.show_examples=4", "evaluation.max_generate_examples=4"])
    compose_config(["evaluation.show_examples=5", "evaluation.max_generate_examples=4", "evaluation.generate=false"])


# --- training.resume=force


def test_resume_force_is_valid_and_an_unknown_word_is_refused():
    assert compose_config(["training.resume=force"]).training.resume == "force"
    for off in ("false", "no", "off"):
        compose_config([f"training.resume={off}"])
    assert problems_of(["training.resume=bogus"]) == [
        "training.resume='bogus' does not exist; allowed: auto, false, force (continue even when settings changed), "
        "or a checkpoint (or run) directory"
    ]


# --- dpeft-launch writes nothing in a dry run, and only into a directory it may use


def test_dry_run_leaves_the_directory_byte_for_byte_unchanged(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(launcher, "cuda_device_count", lambda: 2)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / OWNER_MARKER).write_text("{}\n")
    before = snapshot(tmp_path)
    for out in (tmp_path / "new-run", ours):
        overrides = ["distributed=zero3", "num_gpu_workers=2", f"output_dir={out}"]
        assert launcher.main(["--dry-run", *overrides]) == 0
        printed = capsys.readouterr().out
        assert f"--- {out / 'launch' / 'deepspeed.json'} (dry run: not written)" in printed
    assert snapshot(tmp_path) == before


def test_launch_into_a_foreign_directory_is_refused_and_touches_nothing(monkeypatch, capsys, tmp_path):
    started = []
    monkeypatch.setattr(launcher, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(launcher, "run_forwarding_sigterm", lambda *args: started.append(args) or 0)
    mine = foreign_directory(tmp_path)
    before = snapshot(tmp_path)
    for dry in ([], ["--dry-run"]):
        assert launcher.main([*dry, f"output_dir={mine}"]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"dpeft-launch: error: output_dir='{mine}' holds files distributed-peft did not write (notes.txt); "
            "nothing was touched; allowed: a new or empty directory, or one made by a distributed-peft command"
        ]
    assert snapshot(tmp_path) == before and not started


def test_every_node_of_a_launch_writes_into_the_directory_node_0_claimed(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(launcher, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(launcher, "run_forwarding_sigterm", lambda *args: 0)
    out = tmp_path / "run"
    layout = ["num_machines=2", "num_gpu_workers=1", f"output_dir={out}"]
    assert launcher.main([*layout, "machine_rank=0"]) == 0
    (out / "metrics.jsonl").write_text("{}\n")  # node 0's run has started writing
    assert launcher.main([*layout, "machine_rank=1"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (out / "launch").iterdir()) == ["accelerate-node0.yaml", "accelerate-node1.yaml"]
    assert (out / OWNER_MARKER).is_file()


def test_node_0_refuses_a_directory_another_run_holds_and_other_nodes_join_it(monkeypatch, capsys, tmp_path):
    import os

    from distributed_peft.runtime.output_dirs import DirectoryLock

    monkeypatch.setattr(launcher, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(launcher, "run_forwarding_sigterm", lambda *args: 0)
    out = tmp_path / "run"
    out.mkdir()
    (out / OWNER_MARKER).write_text("{}\n")
    layout = ["num_machines=2", f"output_dir={out}"]
    with DirectoryLock(out):  # node 0's run, already training
        before = snapshot(tmp_path)
        assert launcher.main([*layout, "machine_rank=0"]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(
            f"dpeft-launch: error: output_dir='{out}' is in use by another run (PID {os.getpid()} on"
        )
        assert snapshot(tmp_path) == before, "the running launch's files are not overwritten"
        assert launcher.main([*layout, "machine_rank=1"]) == 0
    assert (out / "launch" / "accelerate-node1.yaml").is_file()


def test_a_launch_that_fails_before_its_run_writes_removes_the_directory_it_created(monkeypatch, tmp_path):
    monkeypatch.setattr(launcher, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(launcher, "run_forwarding_sigterm", lambda *args: 2)
    out = tmp_path / "new" / "run"
    assert launcher.main([f"output_dir={out}"]) == 2
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    assert launcher.main([f"output_dir={kept}"]) == 2 and not kept.exists()
    kept.mkdir()
    (kept / "checkpoints").mkdir()  # a run's checkpoint from before: never removed
    (kept / OWNER_MARKER).write_text("{}\n")
    assert launcher.main([f"output_dir={kept}"]) == 2
    assert (kept / "checkpoints").is_dir() and (kept / "launch" / "accelerate-node0.yaml").is_file()


# --- dpeft-bench writes only into a directory it may use


def test_bench_into_a_foreign_directory_is_refused_before_any_run(monkeypatch, tmp_path):
    def no_run(*args, **kwargs):
        raise AssertionError("the benchmark started although its output directory is refused")

    monkeypatch.setattr(benchmark.subprocess, "run", no_run)
    mine = foreign_directory(tmp_path)
    before = snapshot(tmp_path)
    code, lines = run_entry(monkeypatch, "dpeft-bench", [f"output_dir={mine}"])
    assert code == 2
    assert lines == [
        f"dpeft-bench: error: output_dir='{mine}' holds files distributed-peft did not write (notes.txt); nothing "
        "was touched; allowed: a new or empty directory, or one made by a distributed-peft command"
    ]
    assert snapshot(tmp_path) == before


def test_config_and_data_file_problems_come_in_one_report_and_config_alone_reads_no_file(tmp_path):
    """The data file's columns are data/'s check, added to validate's report; config itself never opens the file."""
    from distributed_peft.config import validate
    from distributed_peft.data.files import check_data_file

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a", "clean": "b"}\n')
    cfg = compose_config(["task=detox", f"output_dir={tmp_path / 'run'}"])
    cfg.task.data.source, cfg.task.data.path, cfg.training.packing = "local", str(data), "bogus"

    with pytest.raises(ConfigError) as config_only:
        validate(cfg)
    assert config_only.value.problems == [
        "training.packing='bogus' is not allowed; allowed: none, group_by_length, padding_free"
    ]
    with pytest.raises(ConfigError) as both:
        validate(cfg, checks=[check_data_file])
    columns = sorted(set(cfg.task.data.columns.values()))
    assert both.value.problems == [
        "training.packing='bogus' is not allowed; allowed: none, group_by_length, padding_free",
        f"task.data.path={str(data)!r} lacks column(s) {', '.join(columns)}; allowed: its columns text, clean "
        "(map them with task.data.columns.FIELD=COLUMN)",
    ]


def test_every_choice_is_refused_in_one_line_naming_the_enum_values(tmp_path):
    from distributed_peft.config import DistributedStrategy, Dtype, MixedPrecision, PackingMode, TaskMetric

    cfg_args = [
        "distributed.strategy=zero9",
        "model.torch_dtype=int3",
        "training.mixed_precision=fp8",
        "training.packing=tight",
        "task.metrics=[chrf,perplexity]",
        f"output_dir={tmp_path / 'run'}",
    ]
    with pytest.raises(ConfigError) as error:
        compose_config(cfg_args)
    assert error.value.problems[:5] == [
        "model.torch_dtype='int3' is not allowed; allowed: auto, float32, bfloat16, float16",
        "distributed.strategy='zero9' is not allowed; allowed: auto, ddp, zero2, zero3, zero3_offload, fsdp",
        "training.packing='tight' is not allowed; allowed: none, group_by_length, padding_free",
        "training.mixed_precision='fp8' is not allowed; allowed: auto, no, bf16, fp16",
        "task.metrics='perplexity' is not allowed; allowed: exact_match, execution_accuracy, bleu, chrf, rouge_l, "
        "toxic_share, repeat_share",
    ]
    assert Dtype.values() == ["auto", "float32", "bfloat16", "float16"]
    assert "zero3" in DistributedStrategy.values() and "padding_free" in PackingMode.values()
    assert MixedPrecision("bf16") is MixedPrecision.BF16 and TaskMetric.CHRF == "chrf"


def test_a_train_target_with_nothing_to_choose_from_is_refused_in_one_line():
    with pytest.raises(ConfigError) as error:
        compose_config(["task=detox", "task.data.train_target=closest"])
    assert error.value.problems == [
        "task.data.train_target='closest' is not allowed; allowed: completion, closest_to_input"
    ]
    with pytest.raises(ConfigError) as error:
        compose_config(["task=detox", "task.data.train_target=closest_to_input"])
    assert error.value.problems == [
        "task.data.train_target=closest_to_input needs other rewrites to choose from (task.data.extra_references=[]) "
        "and a completion template that is one field (task.completion_template='{neutral}'); allowed: completion, "
        "or extra_references and a '{field}' template"
    ]
    compose_config(["task=detox", "task.data.train_target=closest_to_input", "task.data.extra_references=[neutral2]"])
