"""Task metrics on known inputs: each can fail in the direction it guards."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distributed_peft.evaluation.metrics import (
    contains_toxic_word,
    execution_match,
    normalize_sql,
    rouge_l,
    score,
    score_all,
)

SCHEMA = "CREATE TABLE employees (id INTEGER, name TEXT, department TEXT, salary REAL)"


def test_sql_normalisation_ignores_case_spacing_and_semicolon():
    assert normalize_sql("select  NAME from Employees where salary > 10;") == normalize_sql(
        "SELECT name FROM employees WHERE salary > 10"
    )
    assert normalize_sql("SELECT name FROM employees") != normalize_sql("SELECT id FROM employees")


def test_an_unparsable_generation_is_scored_as_text_without_a_warning_line(caplog):
    """A base model's output that writes a CREATE TABLE and goes on: sqlglot falls back to a 'Command' and used to
    log a warning per row into the user's terminal (dpeft-eval, dpeft-reproduce)."""
    rambling = "CREATE TABLE orders (id INTEGER, status TEXT)\n<"
    with caplog.at_level("WARNING"):
        assert normalize_sql(rambling).startswith("CREATE TABLE orders")
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("sqlglot")]


def test_execution_accuracy_compares_result_rows_not_text():
    gold = "SELECT COUNT(*) FROM employees WHERE salary > 0"
    assert execution_match("SELECT count(id) FROM employees WHERE salary > 0", gold, SCHEMA)
    assert not execution_match("SELECT COUNT(*) FROM employees WHERE salary < 0", gold, SCHEMA)
    assert not execution_match("SELEC nonsense", gold, SCHEMA), "a query that fails to run counts wrong"
    assert not execution_match("SELECT * FROM no_such_table", gold, SCHEMA)


# (prediction, reference, ROUGE-L F1 worked out by hand over rouge-score's tokens: lowercased, split at anything not
# a letter or digit). The old whitespace-split, case-sensitive variant gave 0.5, 0.0, 0.667, 0.0 for the first four.
ROUGE_PAIRS = [
    ("The Cat sat on the mat.", "the cat sat on the mat", 1.0),
    ("Hello, world!", "hello world", 1.0),
    ("return max(numbers) - min(numbers)", "return min(numbers)", 0.75),  # LCS 3 of 5 and 3 tokens
    ("A B C D", "a c d e", 0.75),  # LCS a c d: precision 3/4, recall 3/4
    ("x y", "a b", 0.0),
]


@pytest.mark.parametrize(("prediction", "reference", "expected"), ROUGE_PAIRS)
def test_rouge_l_is_rouge_scores_lcs_f1_ignoring_case_and_punctuation(prediction, reference, expected):
    ours = rouge_l(prediction, reference)  # first: it imports rouge-score so that the test's stderr is not kept
    from rouge_score import rouge_scorer

    library = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    assert ours == pytest.approx(expected)
    assert ours == pytest.approx(library)


def test_rouge_l_score_is_the_mean_of_the_best_reference_in_0_to_100():
    predictions = ["The Cat sat on the mat.", "A B C D"]
    references = [["a dog", "the cat sat on the mat"], ["a c d e"]]
    assert score("rouge_l", predictions, references, [{}, {}]) == pytest.approx(100 * (1.0 + 0.75) / 2)


def test_rouge_l_never_closes_a_stderr_that_was_only_borrowed():
    """rouge-score brings absl.logging, whose handler closes the stream it was created with when logging is configured
    again (as Hydra does at every command): a test's captured stderr closed that way broke every later test."""
    probe = """
import io, logging.config, sys
borrowed = sys.stderr = io.StringIO()
from distributed_peft.evaluation.metrics import rouge_l
assert rouge_l("The cat", "the cat") == 1.0
sys.stderr = sys.__stderr__
logging.config.dictConfig({"version": 1})
print("closed" if borrowed.closed else "open")
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "open", done.stderr


def test_toxic_words_are_matched_as_whole_words_and_phrases():
    assert contains_toxic_word("You are an IDIOT.")
    assert contains_toxic_word("just shut up already")
    assert not contains_toxic_word("Hello, I disagree with the assessment.")


def test_corpus_scores():
    predictions, references = (
        ["he is wrong about this", "thanks"],
        [["he is wrong about this"], ["thank you", "thanks"]],
    )
    assert score("chrf", predictions, references, [{}, {}]) == pytest.approx(100.0)
    assert score("bleu", ["completely different words here"], [["he is wrong about this"]], [{}]) < 10
    assert score("toxic_share", ["fine", "stupid"], [["a"], ["b"]], [{}, {}]) == 50.0
    sql = score_all(
        ["exact_match", "execution_accuracy"],
        ["SELECT name FROM employees", "SELECT 1"],
        [["select name from employees;"], ["SELECT name FROM employees"]],
        [{"context": SCHEMA}, {"context": SCHEMA}],
    )
    assert sql == {"exact_match": 50.0, "execution_accuracy": 50.0}


def test_repeat_share_counts_outputs_that_loop_on_a_word_or_a_piece_of_one():
    from distributed_peft.evaluation.metrics import repeats_a_piece, score

    looping = ["good good good good", "miamiamiamia", "you are you are you are you are", "no no no no way"]
    fine = ["good good good", "hahaha", "wait....", "I am fine", "that was a bad bad idea", ""]
    assert [repeats_a_piece(t) for t in looping] == [True] * 4
    assert [repeats_a_piece(t) for t in fine] == [False] * 6
    assert score("repeat_share", looping[:1] + fine[:3], [["x"]] * 4, [{}] * 4) == 25.0
