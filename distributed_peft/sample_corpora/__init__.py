"""The bundled sample data: real detox (ParaDetox) and instruct (GPTeacher) rows with held-out test files, and
seeded template-generated text-to-SQL.

`python -m distributed_peft.sample_corpora [DATASETS_DIR]` rebuilds every file from ../shared/datasets; SOURCE.md
in data/ says where each file comes from and under which license.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from distributed_peft.sample_corpora import real_data, sql

DATA_DIR = Path(__file__).parent / "data"
HELDOUT_DIR = DATA_DIR / "heldout"  # evaluation only: never trained on, never in a base's pretraining corpus
SHARED_DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"  # ../shared beside a checkout


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records as UTF-8 JSON lines with '\\n' line endings."""
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(lines)


def write_all(out_dir: Path = DATA_DIR, shared_datasets: Path = SHARED_DATASETS, seed: int = 0) -> dict[str, int]:
    """Write every corpus into out_dir/<name>.jsonl and the held-out files into out_dir/heldout/; return the record
    count of each (held-out ones as heldout/<name>)."""
    out_dir = Path(out_dir)
    (out_dir / "heldout").mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for name, (train, heldout) in real_data.build_real_corpora(Path(shared_datasets)).items():
        write_jsonl(out_dir / f"{name}.jsonl", train)
        write_jsonl(out_dir / "heldout" / f"{name}.jsonl", heldout)
        counts[name], counts[f"heldout/{name}"] = len(train), len(heldout)
    records = sql.generate(seed)
    write_jsonl(out_dir / "sql.jsonl", records)
    counts["sql"] = len(records)
    return counts


def main() -> None:
    """Rebuild the committed sample corpora and print their record counts."""
    shared = Path(sys.argv[1]) if len(sys.argv) > 1 else SHARED_DATASETS
    for name, count in write_all(shared_datasets=shared).items():
        print(f"{name}: {count} records -> {DATA_DIR / (name + '.jsonl')}")
