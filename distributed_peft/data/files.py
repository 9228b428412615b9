"""A user's local data file (jsonl, json, csv, tsv or parquet) read as text columns, every value checked.

Numbers and booleans become text (as the file writes them where it can: `1.50` stays `1.50`, a csv cell `007` stays
`007`); lists, objects and nulls are refused in one line naming the line (jsonl, csv, tsv), the record index (json)
or the row index (parquet) and the column; a null in an optional column reads as empty text. A UTF-8 byte-order
mark is skipped. No torch here: `check_data_file` adds the file's columns to config validation's one report in
milliseconds.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Collection, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distributed_peft.config import data_file, validate
from distributed_peft.errors import DataError

_MISSING = object()  # a record without the column
csv.field_size_limit(2**31 - 1)  # a long document in one cell is data, not an error


class BadData(ValueError):
    """Where and why a file cannot be read: `<where>: <what>; allowed: <what would be>` (no path)."""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, its byte-order mark skipped; BadData names a line that is not UTF-8."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise BadData(
                    f"line {number} is not UTF-8 ({error.reason} at byte {error.start}); allowed: UTF-8 text"
                ) from error
            yield number, text.removeprefix("\ufeff") if number == 1 else text


class _JsonNumber(str):
    """A JSON number, kept as the text the file writes."""


def _kind(value: Any) -> str:
    """What a JSON or parquet value is, in a user's words."""
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, _JsonNumber | int | float | Decimal):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "null" if value is None else f"a {type(value).__name__}"


def _json_value(text: str) -> Any:
    """A JSON value with its numbers kept as the text the file writes (`1.50`, `1e3`); NaN reads as null."""
    return json.loads(
        text,
        parse_int=_JsonNumber,
        parse_float=_JsonNumber,
        parse_constant=lambda c: None if c == "NaN" else _JsonNumber(c),
    )


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = _json_value(line)
        except ValueError as error:
            raise BadData(f"line {number} is not valid JSON ({error}); allowed: one JSON object per line") from error
        if not isinstance(record, dict):
            raise BadData(f"line {number} is not a JSON object ({_kind(record)}); allowed: one JSON object per line")
        yield f"line {number}", record


def _json_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    text = "".join(line for _, line in _lines(path))
    try:
        records = _json_value(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines in a .json file
            yield from _jsonl_records(path)
            return
        raise BadData(f"is not valid JSON ({error}); allowed: a JSON list of objects") from error
    if not isinstance(records, list):
        raise BadData(f"holds no record ({_kind(records)}, not a list); allowed: a JSON list of objects")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise BadData(
                f"record index {index} is not a JSON object ({_kind(record)}); allowed: a JSON list of objects"
            )
        yield f"record index {index}", record


def _csv_rows(path: Path, fmt: str) -> Iterator[tuple[int, list[str]]]:
    """(first line, cells) of every non-blank row; a row may span lines inside quotes."""
    reader = csv.reader((line for _, line in _lines(path)), delimiter="\t" if fmt == "tsv" else ",", strict=True)
    done = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise BadData(
                f"cannot be parsed as {fmt} from line {done + 1}: {error}; allowed: RFC 4180 quoting"
            ) from error
        first, done = done + 1, reader.line_num
        if row and (len(row) > 1 or row[0].strip()):
            yield first, row


def _csv_records(path: Path, fmt: str) -> Iterator[tuple[str, dict[str, Any]]]:
    rows = _csv_rows(path, fmt)
    header = next(rows, (0, []))[1]
    for number, row in rows:
        if len(row) != len(header):
            raise BadData(
                f"line {number} has {len(row)} field(s) where the header has {len(header)}; "
                "allowed: one field per column (quote a cell that holds the delimiter or a line break)"
            )
        yield f"line {number}", dict(reversed(list(zip(header, row, strict=True))))  # a repeated name: the first


def _parquet_records(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    present = [c for c in columns if c in column_names(path, "parquet")]
    try:
        table = pq.read_table(path, columns=present)
    except (OSError, ValueError) as error:
        raise BadData(f"cannot be read as parquet: {str(error).strip().splitlines()[0]}") from error
    values = {column: table.column(column).to_pylist() for column in present}
    for index in range(table.num_rows):
        yield f"row index {index}", {column: values[column][index] for column in present}


def _records(path: Path, fmt: str, columns: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) of every record of a local file, in file order."""
    if fmt == "jsonl":
        return _jsonl_records(path)
    if fmt == "json":
        return _json_records(path)
    if fmt in ("csv", "tsv"):
        return _csv_records(path, fmt)
    if fmt == "parquet":
        return _parquet_records(path, columns)
    raise BadData(f"format {fmt!r} is not supported; allowed: jsonl, json, csv, tsv, parquet")


def _as_text(value: Any, optional: bool, location: str, column: str) -> str:
    """A cell as text: text as it is, numbers and booleans written out; null only where the column is optional."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, float):
        if value == value:
            return str(value)
        value = None  # NaN: a missing value
    if value is None or value is _MISSING:
        if optional:
            return ""
        what = "is null" if value is None else "is missing"
        raise BadData(f"{location}, column {column!r} {what}; allowed: text or a number (an empty string for no text)")
    raise BadData(f"{location}, column {column!r} holds {_kind(value)}; allowed: text or a number")


def read_text_columns(path: Path, fmt: str, columns: Sequence[str], optional: Collection[str] = ()) -> dict[str, list]:
    """The `columns` of a local data file as lists of text, in file order; DataError (one line) on a bad value."""
    texts: dict[str, list[str]] = {column: [] for column in columns}
    try:
        if fmt in ("csv", "tsv", "parquet"):  # a header or schema names the columns: a missing one is named once
            missing = sorted(set(columns) - set(optional) - set(column_names(path, fmt)))
            if missing:
                raise BadData(
                    f"lacks column(s) {', '.join(missing)}; allowed: its columns {', '.join(column_names(path, fmt))} "
                    "(map them with task.data.columns.FIELD=COLUMN)"
                )
        for location, record in _records(path, fmt, columns):
            for column in columns:
                texts[column].append(_as_text(record.get(column, _MISSING), column in optional, location, column))
    except BadData as error:
        raise DataError(f"task.data.path={str(path)!r}: {error}") from error
    except OSError as error:
        raise DataError(f"task.data.path={str(path)!r} cannot be read: {error.strerror or error}") from error
    return texts


def column_names(path: Path, fmt: str) -> list[str]:
    """Column names of a local data file from its header or first record; BadData (a ValueError) if unreadable."""
    if fmt in ("jsonl", "json"):
        records = _records(path, fmt, ())
        try:
            return list(next(records)[1])
        except StopIteration:
            return []
        finally:
            records.close()
    if fmt in ("csv", "tsv"):
        rows = _csv_rows(path, fmt)
        try:
            return next(rows, (0, []))[1]
        finally:
            rows.close()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except (OSError, ValueError) as error:
            raise BadData(f"cannot be read as parquet: {str(error).strip().splitlines()[0]}") from error
    raise BadData(f"format {fmt!r} is not supported; allowed: jsonl, json, csv, tsv, parquet")


def check_data_file(cfg: DictConfig, problems: list[str]) -> None:
    """Append a line when the task's local data file (task.data.path or the bundled sample) cannot be read, holds no
    record, or lacks a column task.data.columns maps; a check for `config.validate(cfg, checks=...)`."""
    data = cfg.task.data
    located = data_file(data)
    if located is None:  # the hub, or a location config validation already reports
        return
    path, fmt = located
    try:
        columns = column_names(path, fmt)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        problems.append(f"task.data.path={str(path)!r} cannot be read as {fmt}: {exc}")
        return
    if not columns:
        problems.append(f"task.data.path={str(path)!r} holds no record; allowed: a {fmt} file with at least one record")
        return
    missing = sorted({column for column in data.columns.values() if column not in columns})
    if missing:
        problems.append(
            f"task.data.path={str(path)!r} lacks column(s) {', '.join(missing)}; "
            f"allowed: its columns {', '.join(columns)} (map them with task.data.columns.FIELD=COLUMN)"
        )


def validate_run(cfg: DictConfig) -> None:
    """A run's config and its data file's columns, every problem in one report, before any model loads."""
    validate(cfg, checks=[check_data_file])
