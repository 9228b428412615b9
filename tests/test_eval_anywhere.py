"""dpeft-eval on any file, with the adapter's recorded task as the default, and reports only where they belong."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from conftest import TINY_ADAPTERS, run_entry

from distributed_peft.cli import evaluate

DETOX = TINY_ADAPTERS / "detox"
QUICK = ["evaluation.max_generate_examples=4", "evaluation.max_new_tokens=8", "evaluation.show_examples=2"]


def run_eval(monkeypatch, argv: list[str]) -> int:
    """dpeft-eval in this process, as its console script runs it; returns the exit code."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["dpeft-eval", *argv])
    try:
        evaluate.main()
    except SystemExit as exit_info:
        return exit_info.code
    finally:
        GlobalHydra.instance().clear()
    return 0


def snapshot(directory) -> dict[str, int]:
    """Every entry of a directory (and the directory itself) with its mtime: what must not change."""
    return {".": directory.stat().st_mtime_ns, **{p.name: p.stat().st_mtime_ns for p in directory.iterdir()}}


def write_jsonl(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_new_file_with_renamed_columns_is_evaluated_row_by_row(tmp_path, monkeypatch, capsys, bases):
    """Bullet 1: `task.data.path=NEW_FILE task.data.columns.*` evaluates every row of that file, not the split."""
    from transformers import AutoTokenizer

    rows = [
        {"comment": f"zanzibar parrot {i} is a stupid clown", "rewrite": f"zanzibar parrot {i} talks a lot", "n": i}
        for i in range(7)
    ]
    data = tmp_path / "fresh.jsonl"
    write_jsonl(data, rows)
    out = tmp_path / "report"
    columns = ["task.data.columns.toxic=comment", "task.data.columns.neutral=rewrite"]

    code, lines = run_entry(monkeypatch, "dpeft-eval", [f"adapter={DETOX}", f"task.data.path={data}", *QUICK])
    assert code == 2 and len(lines) == 1, lines  # the recorded columns are not in this file: one line, as in training
    assert "lacks column(s) en_neutral_comment, en_toxic_comment" in lines[0] and "task.data.columns" in lines[0]

    assert (
        run_eval(monkeypatch, [f"adapter={DETOX}", f"task.data.path={data}", *columns, *QUICK, f"output_dir={out}"])
        == 0
    )
    results = json.loads((out / "eval.json").read_text())
    assert results["data"]["path"] == str(data) and results["data"]["split"] == "all rows"
    assert results["data"]["rows"] == results["data"]["loaded"] == 7
    tokenizer = AutoTokenizer.from_pretrained(DETOX)
    completion_tokens = sum(len(tokenizer(r["rewrite"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    assert results["adapter"]["tokens"] == results["base"]["tokens"] == completion_tokens  # the loss saw every row
    assert results["adapter"]["generated_examples"] == 4
    assert [s["reference"] for s in results["samples"]] == [rows[0]["rewrite"], rows[1]["rewrite"]]  # file order
    assert rows[0]["comment"] in results["samples"][0]["prompt"]
    report = (out / "eval.md").read_text()
    assert f"every row of {data}: 7 of 7 rows" in report and f"adapter: `{DETOX}`" in report
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"reports: {out / 'eval.md'}")


def test_moved_training_file_is_one_line_naming_the_way_on(tmp_path, monkeypatch):
    """Bullet 1: the recorded training file is gone and no new file is given: one line, exit 2, nothing written."""
    adapter = shutil.copytree(DETOX, tmp_path / "adapter")
    train_file = tmp_path / "train.jsonl"
    metadata = json.loads((adapter / "dpeft_adapter.json").read_text())
    metadata["config"]["task"]["data"].update(source="local", path=str(train_file))
    (adapter / "dpeft_adapter.json").write_text(json.dumps(metadata))  # trained on a file that has since moved
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())

    code, lines = run_entry(monkeypatch, "dpeft-eval", [f"adapter={adapter}", *QUICK])

    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"dpeft-eval: error: task.data.path={str(train_file)!r}, the file adapter")
    assert "is gone" in lines[0] and "pass task.data.path=NEW_FILE" in lines[0] and "Traceback" not in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.slow
def test_reports_go_to_a_new_run_directory_never_beside_the_adapter(tmp_path, monkeypatch, capsys, bases):
    """Bullet 2: without output_dir= the reports go to a new runs/eval-<task>-<time>; the adapter's folders are
    untouched. Without a data override the recorded validation split is evaluated."""
    prebuilt = DETOX.parent
    before = snapshot(DETOX), sorted(p.name for p in prebuilt.iterdir())
    monkeypatch.chdir(tmp_path)

    assert run_eval(monkeypatch, [f"adapter={DETOX}", *QUICK]) == 0

    assert (snapshot(DETOX), sorted(p.name for p in prebuilt.iterdir())) == before
    [run] = (tmp_path / "runs").iterdir()
    assert run.name.startswith("eval-detox-")
    assert {"eval.json", "eval.md", "eval_metrics.png"} <= {p.name for p in run.iterdir()}
    results = json.loads((run / "eval.json").read_text())
    assert results["data"]["split"] == "validation" and results["data"]["location"] == "sample detox.jsonl"
    assert results["data"]["rows"] == 128 and results["data"]["seed"] == 42  # the split the adapter was trained with
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"reports: {run.relative_to(tmp_path)}/eval.md")


def test_output_dir_holding_someone_elses_files_is_refused_touching_nothing(tmp_path, monkeypatch):
    """Bullet 2: an output_dir= that holds files we did not write is one line, exit 2, and stays as it was."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(tmp_path)
    before = snapshot(out), sorted(p.name for p in tmp_path.iterdir())

    code, lines = run_entry(monkeypatch, "dpeft-eval", [f"adapter={DETOX}", f"output_dir={out}", *QUICK])

    assert code == 2 and len(lines) == 1, lines
    assert "holds files distributed-peft did not write (thesis.tex)" in lines[0] and "Traceback" not in lines[0]
    assert (snapshot(out), sorted(p.name for p in tmp_path.iterdir())) == before


@pytest.mark.parametrize(
    "argv,missing",
    [(["task.data.path={sql}"], "answer"), (["task.data.columns.question=q"], "q")],
    ids=["path", "column"],
)
def test_overrides_are_checked_against_the_adapters_task_not_the_default_one(argv, missing, tmp_path, monkeypatch):
    """Bullet 1: the sql adapter's task (not the composed default, detox) is what task.* overrides apply to."""
    sql = tmp_path / "sql.jsonl"
    write_jsonl(sql, [{"context": "CREATE TABLE t (a INTEGER)", "question": "how many?"}] * 3)  # no answer column
    argv = [a.format(sql=sql) for a in argv]

    code, lines = run_entry(monkeypatch, "dpeft-eval", [f"adapter={DETOX.parent / 'sql'}", *argv])

    assert code == 2 and len(lines) == 1, lines
    assert f"lacks column(s) {missing}; allowed: its columns" in lines[0], lines[0]


def test_without_output_dir_earlier_training_runs_in_runs_do_not_block_the_report(tmp_path, monkeypatch):
    """runs/ holds the user's training runs (`runs/<task>-<model>`); the report goes into a new runs/eval-..., and
    only that is checked: the one problem left is the missing data file."""
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "runs" / "detox-tiny-llama"
    earlier.mkdir(parents=True)
    (earlier / ".dpeft-owner.json").write_text("{}")
    (earlier / "metrics.jsonl").write_text("")
    code, lines = run_entry(monkeypatch, "dpeft-eval", [f"adapter={DETOX.parent / 'sql'}", "task.data.path=nope.jsonl"])
    assert code == 2 and len(lines) == 1 and "task.data.path='nope.jsonl' does not exist" in lines[0], lines
