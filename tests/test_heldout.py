"""The held-out report (evaluation/heldout.py): baselines computed as the metrics read them, the report files and the
card's table for an adapter on a few rows, and dpeft-eval heldout=true's mistakes as one line."""

from __future__ import annotations

import json
import shutil

import pytest
import sacrebleu
from conftest import TINY_ADAPTERS, compose_config, run_entry

from distributed_peft.data.files import column_names
from distributed_peft.evaluation import heldout
from distributed_peft.evaluation.heldout import (
    HELDOUT_SETS,
    heldout_task,
    load_heldout_rows,
    remove_listed_words,
    score_systems,
    write_heldout_report,
)
from distributed_peft.evaluation.metrics import contains_toxic_word

DETOX = TINY_ADAPTERS / "detox"
# Two references each; three of five inputs hold a listed word (a capitalised one, the phrase "shut up", "stupid,")
ROWS = [
    (
        "you are a total IDIOT and everyone knows it",
        "you are wrong and everyone knows it",
        "everyone knows you are wrong",
    ),
    ("shut up about the weather already", "please stop talking about the weather", "enough about the weather"),
    ("this plan is stupid, it will never work", "this plan will never work", "this plan is bad, it will not work"),
    ("i do not agree with your point at all", "i do not agree with your point", "i disagree with your point"),
    ("the referee made a bad call tonight", "the referee made a bad call", "the referee was wrong tonight"),
]
HAS_LISTED_WORD = [True, True, True, False, False]


def write_rows(directory, rows=ROWS):
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"en_toxic_comment": t, "en_neutral_comment": a, "neutral2": b, "neutral3": ""}) for t, a, b in rows
    ]
    (directory / "detox.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "detox.jsonl"


def test_baselines_are_scored_as_the_metrics_read_them(tmp_path):
    """Copying scores the toxic share of the inputs and sacrebleu's chrF/BLEU of inputs vs every reference; removing
    the listed words takes the toxic share to 0."""
    path = write_rows(tmp_path)
    task = heldout_task(compose_config(["task=detox"]).task, path)
    rows = load_heldout_rows(task, path, None)
    assert [r["references"] for r in rows] == [[a, b] for _, a, b in ROWS]  # the empty neutral3 is no reference

    systems, predictions = score_systems(task, rows, generated={})

    inputs = [t for t, _, _ in ROWS]
    streams = [[a for _, a, _ in ROWS], [b for _, _, b in ROWS]]
    assert predictions["copy_input"] == inputs
    assert systems["copy_input"]["toxic_share"] == pytest.approx(100 * sum(HAS_LISTED_WORD) / len(ROWS))  # 60
    assert systems["copy_input"]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(inputs, streams).score)
    assert systems["copy_input"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(inputs, streams).score)
    assert systems["remove_listed_words"]["toxic_share"] == 0
    assert predictions["remove_listed_words"][3:] == inputs[3:]  # rows without a listed word are left as they are
    assert predictions["remove_listed_words"][0] == "you are a total and everyone knows it"
    assert predictions["remove_listed_words"][2] == "this plan is , it will never work"


def test_removing_listed_words_leaves_none_the_metric_would_find():
    assert remove_listed_words("Shut   up, you IDIOT!") == ", you !"
    assert remove_listed_words("shut damn up") == ""  # removing `damn` makes the phrase: removed in turn
    assert remove_listed_words("hellish weather, isn't it") == "hellish weather, isn't it"  # whole words only
    for text in ("Shut   up, you IDIOT!", "what the hell, stupid stupid idiots", "SHUT UP"):
        assert contains_toxic_word(text) and not contains_toxic_word(remove_listed_words(text))


def test_bundled_heldout_files_have_the_columns_the_report_reads():
    for task, chosen in HELDOUT_SETS.items():
        path = heldout.HELDOUT_DIR / chosen.file
        assert path.is_file(), f"{task}: {path} is not bundled"
        assert set(chosen.columns.values()) <= set(column_names(path, "jsonl"))


def test_report_files_and_card_for_an_adapter(tmp_path, monkeypatch, bases):
    """A copy of the shipped detox adapter on three rows: heldout.json/.md/.png beside it and its card's table."""
    monkeypatch.setattr(heldout, "HELDOUT_DIR", write_rows(tmp_path / "rows").parent)
    adapter = shutil.copytree(DETOX, tmp_path / "detox")

    report = write_heldout_report(adapter, rows=3, max_new_tokens=8, allow_base_mismatch=True, progress=False)

    assert list(report["systems"]) == ["adapter", "base", "copy_input", "remove_listed_words"]
    assert report["data"]["rows"] == 3 and report["data"]["references_per_row"] == 2
    assert len(report["examples"]) == 3 and report["examples"][0]["input"] == ROWS[0][0]
    assert json.loads((adapter / "heldout.json").read_text()) == report
    assert (adapter / "heldout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    copy = report["systems"]["copy_input"]
    row = f"| input copied unchanged | {copy['bleu']:.2f} | {copy['chrf']:.2f} | {copy['toxic_share']:.2f} |"
    assert copy["toxic_share"] == pytest.approx(100 * sum(HAS_LISTED_WORD[:3]) / 3)
    for name in ("heldout.md", "README.md"):
        text = (adapter / name).read_text()
        assert row in text and "chrF close to copying's" in text, name
    assert "## On real text it was not trained on" in (adapter / "README.md").read_text()
    assert "## Evaluation (validation split)" in (adapter / "README.md").read_text()  # the card keeps the rest


def test_sql_has_no_heldout_report_in_export():
    assert write_heldout_report(TINY_ADAPTERS / "sql", skip_without_heldout=True) is None


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["adapter={tmp}/nope", "heldout=true"], "is not a distributed-peft adapter directory (no such directory)"),
        (["adapter={sql}", "heldout=true"], "task 'sql' has no bundled held-out real text"),
        (["adapter={detox}", "heldout=true"], "the held-out rows of task detox are missing"),
        (["adapter={detox}", "heldout=true", "heldout_rows=0"], "heldout_rows=0 is invalid"),
    ],
    ids=["wrong-adapter", "sql", "missing-rows", "rows-zero"],
)
def test_dpeft_eval_heldout_mistakes_are_one_line(argv, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(heldout, "HELDOUT_DIR", tmp_path / "absent")
    monkeypatch.chdir(tmp_path)
    argv = [a.format(tmp=tmp_path, sql=TINY_ADAPTERS / "sql", detox=DETOX) for a in argv]

    code, lines = run_entry(monkeypatch, "dpeft-eval", argv)

    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("dpeft-eval: error: ") and expected in lines[0], lines
    assert not (tmp_path / "runs").exists()
