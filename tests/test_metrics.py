"""Task metrics on known inputs: each can fail in the direction it guards."""

from __future__ import annotations

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


def test_execution_accuracy_compares_result_rows_not_text():
    gold = "SELECT COUNT(*) FROM employees WHERE salary > 0"
    assert execution_match("SELECT count(id) FROM employees WHERE salary > 0", gold, SCHEMA)
    assert not execution_match("SELECT COUNT(*) FROM employees WHERE salary < 0", gold, SCHEMA)
    assert not execution_match("SELEC nonsense", gold, SCHEMA), "a query that fails to run counts wrong"
    assert not execution_match("SELECT * FROM no_such_table", gold, SCHEMA)


def test_rouge_l_is_the_lcs_f1():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS("a b c d", "a c d e") = 3 -> precision 3/4, recall 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("x y", "a b") == 0.0


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
