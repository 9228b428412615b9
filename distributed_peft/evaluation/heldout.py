"""Held-out report: an adapter on bundled real text it was not trained on, beside the simplest baselines.

detox: the adapter, the base without it, the input copied unchanged and the input with the listed toxic words removed
(chrF, BLEU against every reference of a row, toxic share); instruct: the adapter and the base (the task's metrics).
SQL has no bundled real held-out text. Writes heldout.json, heldout.md and heldout.png; beside an adapter, its card
shows the table too.

    dpeft-eval adapter=distributed_peft/adapters_prebuilt/detox heldout=true        # -> runs/eval-detox-<time>/
    dpeft-eval adapter=runs/detox/adapter heldout=true heldout_rows=100 output_dir=runs/heldout-detox
    write_heldout_report(adapter_dir)        # make prebuilt: the files into the adapter directory, its card redrawn

Greedy decoding as the evaluator does it, with no `no_repeat_ngram_size`: a detox rewrite repeats most of its input.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distributed_peft.adapters.model_cards import CARD, HELDOUT_REPORT, heldout_section, render_adapter_card
from distributed_peft.config.commands import check_heldout_options
from distributed_peft.constants import ADAPTER_METADATA, PACKAGE_DIR, SAMPLE_DATA_DIR
from distributed_peft.errors import AdapterError, ConfigError, DataError
from distributed_peft.evaluation.metrics import contains_toxic_word, score_all, toxic_words
from distributed_peft.runtime.atomic_files import atomic_savefig, atomic_write_text

HELDOUT_DIR = SAMPLE_DATA_DIR / "heldout"  # the bundled held-out rows (sample_corpora/data/SOURCE.md)
REPORT_FILES = (HELDOUT_REPORT, "heldout.md", "heldout.png")
SHOWN_EXAMPLES = 4


@dataclass(frozen=True)
class HeldoutSet:
    """A task's held-out file: its columns for the task's template fields, extra references, and baselines."""

    file: str
    columns: dict[str, str]
    extra_references: tuple[str, ...] = ()
    baselines: tuple[str, ...] = ()
    reading: str = ""
    reference_system: str = "base"  # what the adapter is measured against in the reading's figures
    labels: dict[str, str] = field(default_factory=dict)


SYSTEM_LABELS = {
    "adapter": "adapter",
    "base": "base without adapter",
    "copy_input": "input copied unchanged",
    "remove_listed_words": "input with listed toxic words removed",
}
TICK_LABELS = {
    "adapter": "adapter",
    "base": "base",
    "copy_input": "input\ncopied",
    "remove_listed_words": "listed\nwords\nremoved",
}
HELDOUT_SETS = {
    "detox": HeldoutSet(
        file="detox.jsonl",
        columns={"toxic": "en_toxic_comment", "neutral": "en_neutral_comment"},
        extra_references=("neutral2", "neutral3"),
        baselines=("copy_input", "remove_listed_words"),
        reading=(
            "How to read it: a detox adapter is useful when it keeps the input's content (chrF close to copying's) "
            "while removing the toxicity (toxic share well below copying's)."
        ),
        reference_system="copy_input",
    ),
    "instruct": HeldoutSet(
        file="instruct.jsonl",
        columns={"instruction": "instruction", "input": "input", "response": "response"},
        reading=(
            "How to read it: the adapter helps where its chrF and ROUGE-L are above the base's, that is where its "
            "answers are closer to the human-written responses."
        ),
    ),
}


def heldout_set(task_name: str) -> HeldoutSet:
    """The held-out set of a task, or a one-line ConfigError naming the tasks that have one."""
    if task_name not in HELDOUT_SETS:
        raise ConfigError(
            f"heldout=true: task {task_name!r} has no bundled held-out real text (SQL stays on template data); "
            f"allowed: an adapter of {', '.join(HELDOUT_SETS)}"
        )
    return HELDOUT_SETS[task_name]


def heldout_file(task_name: str) -> Path:
    """The held-out rows of a task, or a one-line DataError when the file is missing."""
    path = HELDOUT_DIR / heldout_set(task_name).file
    if not path.is_file():
        raise DataError(
            f"the held-out rows of task {task_name} are missing: {path} does not exist; "
            "rebuild them with `python -m distributed_peft.sample_corpora` (see sample_corpora/data/SOURCE.md)"
        )
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Baselines

_WORD = re.compile(r"[a-z']+", re.IGNORECASE)  # the words `contains_toxic_word` reads


def remove_listed_words(text: str) -> str:
    """`text` without the words and phrases of the toxic list (as `toxic_share` matches them); the rest as it is."""
    phrases = [p for p in toxic_words() if " " in p]
    while contains_toxic_word(text):
        words = list(_WORD.finditer(text))
        drop = {i for i, w in enumerate(words) if w.group().lower() in toxic_words()}
        joined, starts = "", []
        for w in words:
            starts.append(len(joined))
            joined += w.group().lower() + " "
        for phrase in phrases:  # a phrase is matched in the joined words, as toxic_share matches it
            for match in re.finditer(re.escape(phrase), joined):
                drop |= {
                    i for i, s in enumerate(starts) if match.start() < s + len(words[i].group()) and s < match.end()
                }
        if not drop:  # a match the list check finds and this removal cannot: never loop on it
            break
        for i in sorted(drop, reverse=True):
            text = text[: words[i].start()] + text[words[i].end() :]
    return re.sub(r"[ \t]{2,}", " ", text).strip()  # the spaces around a removed word become one


def baseline_predictions(name: str, inputs: Sequence[str]) -> list[str]:
    """What a baseline outputs for each input: the input itself, or the input without the listed toxic words."""
    if name == "copy_input":
        return list(inputs)
    if name == "remove_listed_words":
        return [remove_listed_words(text) for text in inputs]
    raise ValueError(f"unknown baseline {name!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Rows and generation


def heldout_task(task: DictConfig, rows_file: Path) -> DictConfig:
    """The adapter's task (its templates and metrics) reading the held-out file's columns."""
    chosen = heldout_set(task.name)
    fields = set(task.data.columns)
    if fields != set(chosen.columns):
        raise ConfigError(
            f"heldout=true: the adapter's task {task.name} fills fields {', '.join(sorted(fields))}, the held-out "
            f"rows have {', '.join(sorted(chosen.columns))}; allowed: an adapter of the shipped {task.name} task"
        )
    held = OmegaConf.create(OmegaConf.to_container(task, resolve=True))
    held.data.update(
        source="local",
        path=str(rows_file),
        format="jsonl",
        columns=dict(chosen.columns),
        extra_references=list(chosen.extra_references),
        fraction=1.0,
        max_examples=None,
    )
    if "repeat_share" not in held.metrics:  # real text shows looping rewrites: every held-out table counts them
        held.metrics.append("repeat_share")
    return held


def load_heldout_rows(task: DictConfig, rows_file: Path, rows: int | None) -> list[dict[str, Any]]:
    """The first `rows` held-out records (all when None) as {record, references}."""
    from distributed_peft.data.task_data import load_records, references

    records = load_records(task)
    records = records.select(range(min(rows or len(records), len(records))))
    return [{"record": record, "references": references(record, task)} for record in records]


def generate_rows(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, desc: str | None):
    """Greedy completions of every prompt, longest first in batches (less padding), returned in prompt order."""
    from tqdm.auto import tqdm

    from distributed_peft.evaluation.generation import generate_batch

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: dict[int, str] = {}
    bar = tqdm(
        total=len(prompts),
        desc=desc,
        unit="row",
        disable=desc is None,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        texts = generate_batch(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens)
        answers.update(zip(chunk, texts, strict=True))
        bar.update(len(chunk))
    bar.close()
    return [answers[i] for i in range(len(prompts))]


# ---------------------------------------------------------------------------------------------------------------------
# The report


def score_systems(
    task: DictConfig, rows: list[dict[str, Any]], generated: dict[str, list[str]]
) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """Every system's predictions (generated ones, then the task's baselines) and their scores on the same rows."""
    from distributed_peft.data.prompts import main_field

    inputs = [row["record"][main_field(task)] for row in rows]
    predictions = dict(generated)
    for name in heldout_set(task.name).baselines:
        predictions[name] = baseline_predictions(name, inputs)
    references = [row["references"] for row in rows]
    records = [row["record"] for row in rows]
    scores = {name: score_all(list(task.metrics), texts, references, records) for name, texts in predictions.items()}
    return scores, predictions


def reading_sentence(task_name: str, systems: dict[str, dict[str, float]]) -> str:
    """How to read the table, then the adapter's figures against the system it should be compared with."""
    chosen = heldout_set(task_name)
    against = chosen.reference_system
    figures = ", ".join(
        f"{metric} {systems['adapter'][metric]:.1f} against {systems[against][metric]:.1f}"
        for metric in systems["adapter"]
    )
    return f"{chosen.reading} Here, adapter against {SYSTEM_LABELS[against]}: {figures}."


def plot_heldout(path: Path, report: dict[str, Any]) -> Path:
    """heldout.png: one panel per metric, one bar per system."""
    from distributed_peft.adapters.metric_table import better
    from distributed_peft.evaluation.reports import _pyplot

    plt = _pyplot()
    systems = report["systems"]
    names = list(systems)
    metrics = list(systems["adapter"])
    colors = {"adapter": "#1f77b4", "base": "#9e9e9e", "copy_input": "#2ca02c", "remove_listed_words": "#ff7f0e"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.9 * len(metrics) + 1, 3.8), dpi=110, squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        bars = ax.bar(range(len(names)), [systems[n][metric] for n in names], color=[colors[n] for n in names])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(names)), [TICK_LABELS[n] for n in names], fontsize=7)
        ax.set_title(f"{metric} ({better(metric)} is better)", fontsize=9)
        ax.margins(y=0.15)
    fig.suptitle(f"{report['task']} adapter on {report['data']['rows']} held-out rows of real text")
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def _examples_markdown(examples: list[dict[str, str]]) -> list[str]:
    lines = ["## Side by side", ""]
    for n, example in enumerate(examples, start=1):
        lines += [f"### Example {n}", ""]
        lines += [f"- {who}: `{text.replace(chr(10), ' ⏎ ')}`" for who, text in example.items()]
        lines.append("")
    return lines


def write_report_files(directory: Path, report: dict[str, Any]) -> None:
    """heldout.json, heldout.md (table, how to read it, side-by-side examples) and heldout.png in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / HELDOUT_REPORT, json.dumps(report, indent=2, ensure_ascii=False))
    md = [f"# {report['task']} adapter on real text it was not trained on", ""]
    md += [f"- adapter: `{report['adapter_dir']}`", ""]
    md += heldout_section(report, heading=None)
    md += ["![held-out metrics](heldout.png)", ""]
    md += _examples_markdown(report["examples"])
    atomic_write_text(directory / "heldout.md", "\n".join(md))
    plot_heldout(directory / "heldout.png", report)


def write_heldout_report(
    adapter_dir: str | Path,
    output_dir: str | Path | None = None,
    rows: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    allow_base_mismatch: bool = False,
    progress: bool = True,
    skip_without_heldout: bool = False,
) -> dict[str, Any] | None:
    """Score the adapter, its base and the task's baselines on the held-out rows; write the report files.

    `output_dir` None writes into the adapter directory and redraws its card with the held-out table. `rows`: the first
    N held-out rows (None: all); `max_new_tokens`: default the adapter's recorded evaluation.max_new_tokens.
    `skip_without_heldout`: an adapter of a task without held-out rows (sql) returns None instead of a ConfigError.
    """
    from distributed_peft.adapters.storage import load_base_with_adapters, read_adapter_metadata
    from distributed_peft.config import load_recorded_config
    from distributed_peft.data.prompts import PromptTooLong, generation_prompt_ids
    from distributed_peft.runtime.distributed import resolve_device
    from distributed_peft.runtime.tracking import quiet_library_progress

    started = time.perf_counter()
    adapter_dir = Path(adapter_dir)
    run_cfg = load_recorded_config(read_adapter_metadata(adapter_dir)["config"])
    if skip_without_heldout and run_cfg.task.name not in HELDOUT_SETS:
        return None
    rows_file = heldout_file(run_cfg.task.name)
    task = heldout_task(run_cfg.task, rows_file)
    max_new_tokens = max_new_tokens or run_cfg.evaluation.max_new_tokens
    quiet_library_progress()
    loaded = load_heldout_rows(task, rows_file, rows)
    model, tokenizer, _, _ = load_base_with_adapters([adapter_dir], allow_base_mismatch, resolve_device(device))
    kept, prompts = [], []
    for row in loaded:  # a prompt that leaves no room for max_new_tokens in the context is left out, and counted
        try:
            args = (tokenizer, max_new_tokens, run_cfg.model.context_length, run_cfg.model.name)
            prompts.append(generation_prompt_ids(task, row["record"], *args))
            kept.append(row)
        except PromptTooLong:
            continue
    if not kept:
        raise DataError(f"{rows_file}: no held-out row fits the context with max_new_tokens={max_new_tokens}")
    generated = {}
    for name in ("adapter", "base"):
        desc = f"held-out {run_cfg.task.name}, {name}" if progress else None
        if name == "adapter":
            generated[name] = generate_rows(model, tokenizer, prompts, max_new_tokens, batch_size, desc)
        else:
            with model.disable_adapter():
                generated[name] = generate_rows(model, tokenizer, prompts, max_new_tokens, batch_size, desc)
    systems, predictions = score_systems(task, kept, generated)
    report = {
        "task": run_cfg.task.name,
        "adapter_dir": _shown_path(adapter_dir.resolve()),
        "data": {
            "file": _shown_path(rows_file),
            "rows": len(kept),
            "loaded": len(loaded),
            "left_out_too_long": len(loaded) - len(kept),
            "references_per_row": round(sum(len(r["references"]) for r in kept) / len(kept), 2),
        },
        "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens},
        "systems": systems,
        "labels": {name: SYSTEM_LABELS[name] for name in systems},
        "reading": reading_sentence(run_cfg.task.name, systems),
        "examples": [
            {"input": _prompt_input(task, row["record"]), "reference": row["references"][0]}
            | {SYSTEM_LABELS[name]: predictions[name][i] for name in predictions if name != "copy_input"}
            for i, row in enumerate(kept[:SHOWN_EXAMPLES])
        ],
        "seconds": round(time.perf_counter() - started, 1),
    }
    target = Path(output_dir) if output_dir is not None else adapter_dir
    write_report_files(target, report)
    if target == adapter_dir and (adapter_dir / CARD).is_file() and (adapter_dir / ADAPTER_METADATA).is_file():
        render_adapter_card(adapter_dir)
    return report


def _shown_path(path: Path) -> str:
    """A path as the reports name it: relative to the package when it lies inside (no machine's checkout path)."""
    return str(path.relative_to(PACKAGE_DIR)) if path.is_relative_to(PACKAGE_DIR) else str(path)


def _prompt_input(task: DictConfig, record: dict[str, Any]) -> str:
    """The row's input fields as one line (detox: the toxic comment; instruct: instruction, then input)."""
    from distributed_peft.data.prompts import prompt_fields

    return " | ".join(str(record[f]) for f in prompt_fields(task) if str(record.get(f) or "").strip())


# ---------------------------------------------------------------------------------------------------------------------
# dpeft-eval heldout=true


def plan_heldout(cfg: DictConfig, overrides: Sequence[str]) -> tuple[Path, Path | None]:
    """The adapter and output directory of `dpeft-eval heldout=true`, checked (one line each); nothing loads."""
    from distributed_peft.adapters.storage import read_adapter_metadata
    from distributed_peft.evaluation.evaluator import parse_user_overrides
    from distributed_peft.runtime.output_dirs import check_output_dir

    problems: list[str] = []
    check_heldout_options(cfg, problems)
    parsed = parse_user_overrides(overrides)
    if cfg.adapter is None and "output_dir" not in {o.key_or_group for o in parsed}:
        problems.append("heldout=true needs adapter=DIR (the adapter to score on the held-out rows)")
    if problems:
        raise ConfigError(problems)
    adapter_dir = Path(cfg.adapter) if cfg.adapter else Path(cfg.output_dir) / "adapter"
    if not cfg.adapter and not adapter_dir.is_dir():
        raise AdapterError(f"output_dir={str(cfg.output_dir)!r} holds no adapter ({adapter_dir} does not exist)")
    metadata = read_adapter_metadata(adapter_dir)
    name = metadata["task"]
    ignored = [
        o.input_line
        for o in parsed
        if o.key_or_group.startswith("task.") or (o.key_or_group == "task" and o.value() != name)
    ]
    if ignored:
        raise ConfigError(
            f"{ignored[0]} is not used with heldout=true: the held-out rows are fixed; allowed: no task overrides"
        )
    heldout_file(name)
    output_dir = Path(cfg.output_dir) if "output_dir" in {o.key_or_group for o in parsed} else None  # a run: into it
    if output_dir is not None:
        check_output_dir(output_dir)
    return adapter_dir, output_dir


def run_heldout(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, Any]:
    """dpeft-eval heldout=true: the held-out report into output_dir (default a new runs/eval-<task>-<time>/)."""
    from distributed_peft.runtime.output_dirs import claim_output_dir, new_report_dir

    adapter_dir, output_dir = plan_heldout(cfg, overrides)
    task_name = read_task_name(adapter_dir)
    claim = claim_output_dir(output_dir or new_report_dir(task_name), command="dpeft-eval", lock=True)
    try:
        report = write_heldout_report(
            adapter_dir,
            claim.path,
            rows=cfg.heldout_rows,
            max_new_tokens=cfg.evaluation.max_new_tokens,
            batch_size=cfg.evaluation.generation_batch_size,
            allow_base_mismatch=bool(cfg.allow_base_mismatch),
            progress=bool(cfg.logging.progress_bar),
        )
    except BaseException:
        claim.release()
        raise
    finally:
        claim.unlock()
    print("\n".join(heldout_section(report, heading=None)))
    print(f"reports: {claim.path / 'heldout.md'} (heldout.json, heldout.png beside it)")
    return report


def read_task_name(adapter_dir: Path) -> str:
    return json.loads((adapter_dir / ADAPTER_METADATA).read_text())["task"]
