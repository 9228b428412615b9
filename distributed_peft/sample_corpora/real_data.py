"""The bundled real detox (ParaDetox, CC0) and instruct (GPTeacher Code-Instruct, MIT) data, reduced from ../shared.

Rows are ordered by the sha256 of their source text, so the selection is deterministic and unrelated to the source's
order: the first HELDOUT_ROWS go to `data/heldout/<task>.jsonl` (evaluation only: no adapter and no base trains on
them), the next TRAIN_ROWS to `data/<task>.jsonl` (the task's sample file and part of the bases' pretraining corpus),
skipping any row that shares a text with a held-out row. SOURCE.md states the sources and licenses.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

PARADETOX_FILE = "paradetox/paradetox.tsv"
GPTEACHER_FILE = "gpteacher-codegen/codegen-instruct.jsonl"
DETOX_TRAIN_ROWS, DETOX_HELDOUT_ROWS = 4000, 400
INSTRUCT_TRAIN_ROWS, INSTRUCT_HELDOUT_ROWS = 1400, 200
MAX_RESPONSE_CHARS = 400  # a response fits the demo's 128-token sequences about whole
DETOX_COLUMNS = ("en_toxic_comment", "en_neutral_comment", "neutral2", "neutral3")  # the last two: extra references
INSTRUCT_COLUMNS = ("instruction", "input", "response")


def text_key(text: str) -> str:
    """A text compared case- and space-insensitively (the same sentence twice is one text)."""
    return " ".join(text.lower().split())


def selection_order(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def paradetox_records(path: Path) -> list[dict[str, str]]:
    """ParaDetox rows as detox records; rows with a line break inside a cell (5, quoting accidents) are left out."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    records = []
    for row in rows:
        cells = [row["toxic"], row["neutral1"], row["neutral2"], row["neutral3"]]
        if any("\n" in cell for cell in cells) or not cells[0].strip() or not cells[1].strip():
            continue
        records.append(dict(zip(DETOX_COLUMNS, (cell.strip() for cell in cells), strict=True)))
    return records


def gpteacher_records(path: Path) -> list[dict[str, str]]:
    """GPTeacher Code-Instruct records whose response has at most MAX_RESPONSE_CHARS characters."""
    with path.open(encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [
        {column: record[column].strip() for column in INSTRUCT_COLUMNS}
        for record in records
        if record["response"].strip() and len(record["response"]) <= MAX_RESPONSE_CHARS
    ]


def split_heldout(
    records: list[dict[str, str]], key_columns: Iterable[str], heldout_rows: int, train_rows: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, heldout) in hash order of the key columns' text; a train row sharing any text with a held-out row or
    an earlier train row's key is skipped, so no held-out text is ever trained on."""
    key_columns = tuple(key_columns)
    ordered = sorted(records, key=lambda r: selection_order("\n".join(r[c] for c in key_columns)))
    heldout = ordered[:heldout_rows]
    heldout_texts = {text_key(value) for record in heldout for value in record.values() if value}
    train, seen = [], set()
    for record in ordered[heldout_rows:]:
        key = text_key("\n".join(record[c] for c in key_columns))
        if key in seen or any(text_key(value) in heldout_texts for value in record.values() if value):
            continue
        seen.add(key)
        train.append(record)
        if len(train) == train_rows:
            break
    return train, heldout


def build_real_corpora(shared_datasets: Path) -> dict[str, tuple[list[dict], list[dict]]]:
    """{task: (train records, held-out records)} for detox and instruct, from the datasets directory of ../shared."""
    detox = paradetox_records(shared_datasets / PARADETOX_FILE)
    instruct = gpteacher_records(shared_datasets / GPTEACHER_FILE)
    return {
        "detox": split_heldout(detox, ["en_toxic_comment"], DETOX_HELDOUT_ROWS, DETOX_TRAIN_ROWS),
        "instruct": split_heldout(instruct, ["instruction", "input"], INSTRUCT_HELDOUT_ROWS, INSTRUCT_TRAIN_ROWS),
    }
