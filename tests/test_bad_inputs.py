"""Bad inputs across config, data, checkpoints and adapters, through the real entry points: each is one line on
stderr naming what is wrong, a nonzero exit, no traceback, and nothing written where the run would write."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY_ADAPTERS, run_entry

from distributed_peft.training.checkpoints import MARKER, TRAINER_STATE, _manifest

GOOD = {"prompt": "Translate: hello", "completion": "bonjour"}


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


# name -> (file name, file bytes) for the data cases: the file is written into the test's tmp dir
DATA_FILES = {
    "malformed_jsonl_line": ("data.jsonl", jsonl([GOOD]) + b'{"prompt": "x", "completion\n' + jsonl([GOOD] * 5)),
    "wrong_columns": ("data.jsonl", jsonl([{"question": "q", "answer": "a"}] * 8)),
    "empty_file": ("data.jsonl", b""),
    "non_utf8_bytes": ("data.jsonl", jsonl([GOOD] * 30) + b'{"prompt": "caf\xe9", "completion": "x"}\n'),
    "all_longer_than_max_seq_len": ("data.jsonl", jsonl([{"prompt": "word " * 400, "completion": "x"}] * 8)),
    "only_empty_completions": ("data.jsonl", jsonl([{"prompt": "p", "completion": "  "}] * 8)),
    "csv_unterminated_quote": ("data.csv", b'prompt,completion\nhello,world\n"open quote,x\n' + b"a,b\n" * 5),
    "not_a_parquet_file": ("data.parquet", b"this is not parquet"),
    "json_without_records": ("data.json", b"42"),
    "unsupported_format": ("data.xlsx", b"PK\x03\x04"),
}

# (name, program, arguments, the fragment the one line must hold). {tmp}: the test's tmp dir; {data}: its data file.
CASES = [
    ("malformed_jsonl_line", "dpeft-train", ["task=custom", "task.data.path={data}"], "line 2 is not valid JSON"),
    ("wrong_columns", "dpeft-train", ["task=custom", "task.data.path={data}"], "lacks column(s) completion, prompt"),
    ("empty_file", "dpeft-train", ["task=custom", "task.data.path={data}"], "holds no record"),
    ("non_utf8_bytes", "dpeft-train", ["task=custom", "task.data.path={data}"], "line 31 is not UTF-8"),
    (
        "all_longer_than_max_seq_len",
        "dpeft-train",
        ["task=custom", "task.data.path={data}", "training.truncation=drop", "training.max_seq_len=64"],
        "training.max_seq_len=64: no train example left (truncation='drop', 8 dropped as too long)",
    ),
    ("only_empty_completions", "dpeft-train", ["task=custom", "task.data.path={data}"], "0 usable example(s)"),
    ("csv_unterminated_quote", "dpeft-train", ["task=custom", "task.data.path={data}"], "cannot be parsed as csv"),
    ("not_a_parquet_file", "dpeft-train", ["task=custom", "task.data.path={data}"], "cannot be read as parquet"),
    ("json_without_records", "dpeft-train", ["task=custom", "task.data.path={data}"], "holds no record"),
    ("unsupported_format", "dpeft-train", ["task=custom", "task.data.path={data}"], "format='xlsx'"),
    ("missing_data_file", "dpeft-train", ["task=custom", "task.data.path={tmp}/no.jsonl"], "does not exist"),
    ("negative_steps", "dpeft-train", ["training.max_steps=-5"], "training.max_steps=-5 is invalid"),
    ("negative_checkpoint_every", "dpeft-train", ["training.checkpoint_every=-1"], "training.checkpoint_every=-1"),
    ("zero_checkpoints_kept", "dpeft-train", ["training.keep_checkpoints=0"], "training.keep_checkpoints=0"),
    ("unknown_override_key", "dpeft-train", ["training.lrr=0.1"], "training.lrr"),
    ("unknown_model", "dpeft-train", ["model=gpt-17"], "model='gpt-17' is not a known model"),
    ("padding_free_on_bloom", "dpeft-train", ["model=tiny-bloom", "training.packing=padding_free"], "ALiBi"),
    ("token_budget_below_seq_len", "dpeft-train", ["training.tokens_per_batch=10"], "training.tokens_per_batch=10"),
    ("missing_resume_path", "dpeft-train", ["training.resume={tmp}/no-ckpt"], "does not exist; allowed: auto, false"),
    ("resume_from_non_checkpoint", "dpeft-train", ["training.resume={tmp}"], "is not a complete checkpoint: no"),
    ("checkpoint_of_another_run", "dpeft-train", ["training.resume={tmp}/other"], "other settings (task.name"),
    ("output_dir_under_a_file", "dpeft-train", ["output_dir={tmp}/a-file/run"], "is not writable"),
    ("missing_adapter_path", "dpeft-eval", ["adapter={tmp}/no-adapter"], "is not a distributed-peft adapter directory"),
    ("missing_generate_adapter", "dpeft-generate", ["adapters=[{tmp}/none]", "prompt=hi"], "is not a directory"),
    ("mismatched_base", "dpeft-generate", ["adapters=[{tmp}/mismatched]", "prompt=hi"], "does not match base"),
]


@pytest.mark.parametrize("name,prog,args,expected", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_nonzero_exit_and_no_partial_output(
    name, prog, args, expected, tmp_path, monkeypatch, request
):
    if name in DATA_FILES:
        file_name, content = DATA_FILES[name]
        (tmp_path / file_name).write_bytes(content)
    if name == "output_dir_under_a_file":
        (tmp_path / "a-file").write_text("not a directory")
    if name == "checkpoint_of_another_run":  # a complete checkpoint, made by an sql run with another batch size
        other = tmp_path / "other"
        other.mkdir()
        run = {"task": "sql", "model": "tiny-llama", "micro_batch_size": 2}
        (other / TRAINER_STATE).write_text(json.dumps({"step": 4, "run": run}))
        (other / MARKER).write_text(json.dumps({"step": 4, "files": _manifest(other)}))
    if name == "mismatched_base":
        copy = shutil.copytree(TINY_ADAPTERS / "sql", tmp_path / "mismatched")
        metadata = json.loads((copy / "dpeft_adapter.json").read_text())
        metadata["base"].update(family="bloom", fingerprint="0" * 64)  # trained on another architecture
        (copy / "dpeft_adapter.json").write_text(json.dumps(metadata))
    if name in DATA_FILES or name == "mismatched_base":
        request.getfixturevalue("bases")  # these get past the config check and load the base's tokenizer
    data = tmp_path / DATA_FILES.get(name, ("none",))[0]
    out = tmp_path / "run"
    argv = [a.format(tmp=tmp_path, data=data) for a in args]
    if prog == "dpeft-train":
        argv.append("logging.progress_bar=false")
        if not any(a.startswith("output_dir=") for a in argv):
            argv.append(f"output_dir={out}")
    before = sorted(p.name for p in tmp_path.iterdir())

    code, lines = run_entry(monkeypatch, prog, argv)

    assert code != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "the failed run wrote something"
