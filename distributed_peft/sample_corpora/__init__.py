"""Small seeded, template-generated sample corpora (detox, code instructions, text-to-SQL) for offline training."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from distributed_peft.sample_corpora import detox, instruct, sql

DATA_DIR = Path(__file__).parent / "data"
GENERATORS: dict[str, Callable[[int], list[dict]]] = {
    "detox": detox.generate,
    "instruct": instruct.generate,
    "sql": sql.generate,
}


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records as UTF-8 JSON lines with '\\n' line endings."""
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(lines)


def write_all(out_dir: Path = DATA_DIR, seed: int = 0) -> dict[str, int]:
    """Generate every corpus into out_dir/<name>.jsonl and return the record count of each."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for name, generate in GENERATORS.items():
        records = generate(seed)
        write_jsonl(out_dir / f"{name}.jsonl", records)
        counts[name] = len(records)
    return counts


def main() -> None:
    """Regenerate the committed sample corpora and print their record counts."""
    for name, count in write_all().items():
        print(f"{name}: {count} records -> {DATA_DIR / (name + '.jsonl')}")
