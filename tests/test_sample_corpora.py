"""Tests for the bundled sample data: real ParaDetox / GPTeacher rows with held-out test files, template SQL."""

from __future__ import annotations

import fnmatch
import json
import random
from pathlib import Path

import pytest
import tomllib
from conftest import PROJECT_ROOT, shared_dataset

from distributed_peft.modeling.embedded_base import corpus_files
from distributed_peft.sample_corpora import DATA_DIR, HELDOUT_DIR, real_data, sql, write_all

COUNTS = {"detox": 4000, "instruct": 1400, "heldout/detox": 400, "heldout/instruct": 200}
MINIMUM_SQL = 2000
FIELDS = {
    "detox": real_data.DETOX_COLUMNS,
    "instruct": real_data.INSTRUCT_COLUMNS,
    "sql": ("question", "context", "answer"),
}
REQUIRED_FIELDS = {"detox": FIELDS["detox"][:2], "instruct": ("instruction", "response"), "sql": FIELDS["sql"]}


def load(name: str) -> list[dict]:
    """Records of one committed file (`detox`, `heldout/detox`, ...)."""
    with (DATA_DIR / f"{name}.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def texts_of(records: list[dict]) -> set[str]:
    """The texts of records, normalized; values under three words ("4", "true") say nothing about overlap."""
    return {real_data.text_key(v) for record in records for v in record.values() if len(v.split()) >= 3}


def test_regeneration_from_shared_is_byte_identical(tmp_path: Path) -> None:
    shared = shared_dataset("paradetox/paradetox.tsv").parents[1]
    counts = write_all(tmp_path, shared_datasets=shared, seed=0)
    assert counts == {**COUNTS, "sql": 2500}
    for name in counts:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (DATA_DIR / f"{name}.jsonl").read_bytes(), name


@pytest.mark.parametrize("name", [*COUNTS, "sql"])
def test_counts_sizes_and_fields(name: str) -> None:
    records = load(name)
    assert len(records) == COUNTS[name] if name in COUNTS else len(records) >= MINIMUM_SQL
    assert (DATA_DIR / f"{name}.jsonl").stat().st_size < 1024 * 1024
    task = name.removeprefix("heldout/")
    for record in records:
        assert tuple(record) == FIELDS[task], record
        for field in REQUIRED_FIELDS[task]:
            assert isinstance(record[field], str) and record[field].strip(), (field, record)


def test_real_training_files_stay_small() -> None:
    """What the wheel carries of real data (training and held-out files) is about 1.6 MB."""
    real = [DATA_DIR / f"{name}.jsonl" for name in COUNTS]
    assert sum(path.stat().st_size for path in real) < 1_650_000


@pytest.mark.parametrize("name", [*COUNTS, "sql"])
def test_no_duplicate_records(name: str) -> None:
    lines = (DATA_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(set(lines))


@pytest.mark.parametrize("task", ["detox", "instruct"])
def test_heldout_shares_no_text_with_training_or_pretraining(task: str) -> None:
    heldout = texts_of(load(f"heldout/{task}"))
    for name in ("detox", "instruct", "sql"):
        assert not heldout & texts_of(load(name)), name
    assert HELDOUT_DIR not in {path.parent for path in corpus_files()}
    pretraining = texts_of([json.loads(line) for path in corpus_files() for line in path.open(encoding="utf-8")])
    assert len(pretraining) > 15_000 and not heldout & pretraining


def test_detox_extra_references_are_partly_filled() -> None:
    """ParaDetox gives one to three rewrites: neutral2/neutral3 are filled where the source has them."""
    records = load("detox")
    assert sum(bool(r["neutral2"]) for r in records) == 2016
    assert sum(bool(r["neutral3"]) for r in records) == 634
    assert all(r["neutral2"] or not r["neutral3"] for r in records)


def test_instruct_inputs_are_partly_empty() -> None:
    records = load("instruct")
    empty_share = sum(1 for record in records if not record["input"]) / len(records)
    assert 0.2 <= empty_share <= 0.3  # GPTeacher Code-Instruct: 21 % of all records, 25 % of the short ones
    assert all(len(record["response"]) <= real_data.MAX_RESPONSE_CHARS for record in records)


def test_sources_and_licenses_are_documented_and_shipped() -> None:
    source = (DATA_DIR / "SOURCE.md").read_text()
    for name, count in COUNTS.items():
        assert f"`{name}.jsonl` | {count:,} |" in source, name
    assert "CC0" in source and "MIT" in source
    assert "Copyright (c) 2023 Teknium" in (DATA_DIR / "GPTEACHER-LICENSE.txt").read_text()
    globs = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package_dir = DATA_DIR.parents[1]
    shipped = [*DATA_DIR.glob("*.jsonl"), *HELDOUT_DIR.glob("*.jsonl"), DATA_DIR / "SOURCE.md"]
    for path in [*shipped, DATA_DIR / "GPTEACHER-LICENSE.txt"]:
        relative = str(path.relative_to(package_dir))
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in globs["distributed_peft"]), relative


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
