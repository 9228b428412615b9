"""Tests for the seeded, template-generated sample corpora."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from distributed_peft.sample_corpora import DATA_DIR, detox, sql, write_all

MINIMUM_COUNTS = {"detox": 1500, "instruct": 1000, "sql": 2000}
REQUIRED_FIELDS = {
    "detox": ("en_toxic_comment", "en_neutral_comment"),
    "instruct": ("instruction", "response"),
    "sql": ("question", "context", "answer"),
}


def load(name: str) -> list[dict]:
    """Records of one committed corpus."""
    with (DATA_DIR / f"{name}.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """Corpora regenerated into a fresh directory with the default seed."""
    out_dir = tmp_path_factory.mktemp("sample_corpora")
    return out_dir, write_all(out_dir, seed=0)


def test_regeneration_is_byte_identical_to_committed_files(regenerated: tuple[Path, dict[str, int]]) -> None:
    out_dir, counts = regenerated
    assert set(counts) == set(MINIMUM_COUNTS)
    for name in counts:
        assert (out_dir / f"{name}.jsonl").read_bytes() == (DATA_DIR / f"{name}.jsonl").read_bytes(), name


@pytest.mark.parametrize("name", sorted(MINIMUM_COUNTS))
def test_counts_sizes_and_fields(name: str) -> None:
    records = load(name)
    assert len(records) >= MINIMUM_COUNTS[name]
    assert (DATA_DIR / f"{name}.jsonl").stat().st_size < 1024 * 1024
    for record in records:
        for field in REQUIRED_FIELDS[name]:
            assert isinstance(record[field], str) and record[field].strip(), (field, record)


@pytest.mark.parametrize("name", sorted(MINIMUM_COUNTS))
def test_no_duplicate_records(name: str) -> None:
    lines = (DATA_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(set(lines))


def test_instruct_inputs_are_partly_empty() -> None:
    records = load("instruct")
    empty_share = sum(1 for record in records if not record["input"]) / len(records)
    assert 0.25 <= empty_share <= 0.6
    assert all(len(record["response"]) <= 400 for record in records)


def test_toxic_words_only_on_the_toxic_side() -> None:
    for record in load("detox"):
        assert detox.TOXIC_WORD_PATTERN.search(record["en_toxic_comment"]), record
        assert not detox.TOXIC_WORD_PATTERN.search(record["en_neutral_comment"]), record
        assert detox.MIN_WORDS <= len(record["en_toxic_comment"].split()) <= detox.MAX_WORDS


def test_every_sql_answer_executes() -> None:
    for record in load("sql"):
        connection = sql.create_database(record["context"])
        try:
            connection.execute(record["answer"]).fetchall()
        finally:
            connection.close()


def test_most_sampled_sql_answers_return_rows() -> None:
    sample = random.Random(0).sample(load("sql"), 200)
    with_rows = 0
    for record in sample:
        connection = sql.create_database(record["context"])
        rows = connection.execute(record["answer"]).fetchall()
        connection.close()
        with_rows += bool(rows) and any(value is not None for value in rows[0])
    assert with_rows >= len(sample) // 2


def test_schemas_and_database_are_seeded() -> None:
    assert len(sql.SCHEMAS) >= 6
    context = sql.SCHEMAS[1].context
    first = sql.create_database(context, seed=3).execute("SELECT * FROM orders").fetchall()
    again = sql.create_database(context, seed=3).execute("SELECT * FROM orders").fetchall()
    assert first == again and len(first) == 20
    other = sql.create_database(context, seed=4).execute("SELECT * FROM orders").fetchall()
    assert other != first and len(other) == 20, "the rows follow the seed"
