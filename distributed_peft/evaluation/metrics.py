"""Task metrics over generated completions: SQL exact match and execution accuracy, BLEU, chrF, ROUGE-L and the
share of outputs that still contain a toxic word or that loop on a word. Every metric is a number in [0, 100] (higher
is better) except `toxic_share` and `repeat_share` (lower is better)."""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import sys
from collections import Counter
from collections.abc import Sequence
from functools import cache
from pathlib import Path

TOXIC_WORDS_FILE = Path(__file__).resolve().parents[1] / "resources" / "toxic_words.txt"


def normalize_sql(query: str) -> str:
    """Canonical text of a query (keywords, identifier case, spacing, trailing `;`); unparsable text as is, lowered."""
    import sqlglot
    from sqlglot.errors import SqlglotError

    # a generation that is not one statement is scored as its text: no "Falling back to parsing as a 'Command'" line
    # per row in the user's terminal
    logging.getLogger("sqlglot").setLevel(logging.ERROR)
    try:
        statements = sqlglot.transpile(query, read="sqlite", write="sqlite", normalize=True)
        return statements[0] if len(statements) == 1 else " ".join(query.lower().split())
    except SqlglotError:
        return " ".join(query.lower().split())


def _rows(connection: sqlite3.Connection, query: str) -> Counter | None:
    try:
        return Counter(map(tuple, connection.execute(query).fetchall()))
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return None


def execution_match(predicted: str, gold: str, context: str, seed: int = 0) -> bool:
    """Both queries return the same rows (as a multiset) on a seeded in-memory database built from the schema."""
    from distributed_peft.sample_corpora.sql import create_database

    connection = create_database(context, seed=seed)
    try:
        expected = _rows(connection, gold)
        return expected is not None and _rows(connection, predicted) == expected
    finally:
        connection.close()


@cache
def _rouge_l_scorer():
    # rouge-score imports absl.logging, whose handler keeps the sys.stderr of the moment it is imported and closes it
    # when logging is configured again (Hydra does at every command): bound to the process's own stderr, it never is.
    with contextlib.redirect_stderr(sys.__stderr__ or sys.stderr):
        from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] as the rouge-score library computes it (lowercased, punctuation dropped, no
    stemming), so our numbers compare with everyone's."""
    return _rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure


@cache
def toxic_words() -> frozenset[str]:
    lines = TOXIC_WORDS_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(w.strip().lower() for w in lines if w.strip() and not w.startswith("#"))


def contains_toxic_word(text: str) -> bool:
    words = re.findall(r"[a-z']+", text.lower())
    vocabulary = toxic_words()
    return any(w in vocabulary for w in words) or any(" " in p and p in " ".join(words) for p in vocabulary)


# a piece of text (a word, several, or part of one) that comes 4 or more times in a row: "good good good good",
# "miamiamiamia"; a piece must hold a letter or digit, so "...." and runs of spaces are not counted
REPEATED_PIECE = re.compile(r"(.{1,24}?)\1{3,}", re.DOTALL)


def repeats_a_piece(text: str) -> bool:
    """Whether `text` repeats a word or a piece of one more than three times in a row (a looping generation)."""
    spaced = f"{text} "  # so that a word's last repeat, at the end of the text, ends in a space like the others
    return any(re.search(r"\w", match.group(1)) for match in REPEATED_PIECE.finditer(spaced))


def score(
    metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]], records: Sequence[dict]
) -> float:
    """One metric over a split; references[i] lists every accepted reference of example i."""
    import sacrebleu

    n = max(len(predictions), 1)
    if metric == "bleu":
        return sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score
    if metric == "chrf":
        return sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score
    if metric == "rouge_l":
        return 100 * sum(max(rouge_l(p, r) for r in refs) for p, refs in zip(predictions, references, strict=True)) / n
    if metric == "exact_match":
        hits = sum(normalize_sql(p) == normalize_sql(refs[0]) for p, refs in zip(predictions, references, strict=True))
        return 100 * hits / n
    if metric == "execution_accuracy":
        hits = sum(
            execution_match(p, refs[0], record["context"])
            for p, refs, record in zip(predictions, references, records, strict=True)
        )
        return 100 * hits / n
    if metric == "toxic_share":
        return 100 * sum(contains_toxic_word(p) for p in predictions) / n
    if metric == "repeat_share":
        return 100 * sum(repeats_a_piece(p) for p in predictions) / n
    raise ValueError(f"unknown metric {metric!r}")


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """sacrebleu's layout: one stream per reference slot; an example with fewer references repeats its first."""
    width = max((len(refs) for refs in references), default=1)
    return [[refs[k] if k < len(refs) else refs[0] for refs in references] for k in range(width)]


def score_all(
    metrics: Sequence[str], predictions: Sequence[str], references: Sequence[Sequence[str]], records: Sequence[dict]
) -> dict[str, float]:
    """The task's metrics (`task.metrics`) over one model's predictions."""
    return {metric: score(metric, predictions, references, records) for metric in metrics}
