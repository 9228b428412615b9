"""The `task` group: prompt and completion templates, metrics, and where the examples come from (`task.data`)."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from distributed_peft.config.checks import Choice, check, check_choice
from distributed_peft.constants import SAMPLE_DATA_DIR


class DataSource(Choice):
    AUTO = "auto"  # path if set, else the bundled sample file, else the hub id
    SAMPLE = "sample"
    LOCAL = "local"
    HUB = "hub"


class DataFormat(Choice):
    JSONL = "jsonl"
    JSON = "json"
    CSV = "csv"
    TSV = "tsv"
    PARQUET = "parquet"


class TrainTarget(Choice):
    """Which accepted completion a training example learns when a record has several (data.task_data)."""

    COMPLETION = "completion"  # the completion template's own column
    # of the completion and the extra_references, the one nearest the prompt's fields by chrF: the most conservative
    # human rewrite (ParaDetox's annotators mostly delete words; their first rewrite often also rephrases)
    CLOSEST_TO_INPUT = "closest_to_input"


class PromptSpace(Choice):
    """Where a prompt's trailing spaces are tokenized (data/prompts.prompt_ids)."""

    COMPLETION = "completion"  # with the completion's first word, as in running text
    PROMPT = "prompt"  # as the prompt's own last token: how adapters trained before this option read their prompts


class TaskMetric(Choice):
    EXACT_MATCH = "exact_match"
    EXECUTION_ACCURACY = "execution_accuracy"
    BLEU = "bleu"
    CHRF = "chrf"
    ROUGE_L = "rouge_l"
    TOXIC_SHARE = "toxic_share"
    REPEAT_SHARE = "repeat_share"  # outputs that repeat a word or a piece of one more than three times in a row


@dataclass
class DataConfig:
    """Where a task's examples come from and how their columns map to the prompt template's fields."""

    source: str = "auto"  # auto: path if set, else the bundled sample file, else the hub id
    sample_file: Optional[str] = None  # a file in distributed_peft/sample_corpora/data
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    hub_split: str = "train"
    path: Optional[str] = None  # a local jsonl/json/csv/tsv/parquet file
    format: Optional[str] = None  # inferred from the path's suffix when null
    columns: dict[str, str] = field(default_factory=dict)  # template field -> column in the data
    extra_references: list[str] = field(default_factory=list)  # columns with more accepted completions (metrics)
    train_target: str = "completion"  # completion | closest_to_input (among the completion and extra_references)
    fraction: float = 1.0  # share of the examples to keep (after shuffling with the seed)
    max_examples: Optional[int] = None


@dataclass
class TaskConfig:
    name: str = "???"
    description: str = ""
    prompt_template: str = "???"  # what the model reads; its tokens get no loss
    prompt_template_no_input: Optional[str] = None  # used when the `input` field is empty (Alpaca style)
    completion_template: str = "???"  # what the model learns to write; EOS is appended
    prompt_space: str = "completion"  # a prompt's trailing spaces: with the completion's first word, or prompt
    metrics: list[str] = field(default_factory=lambda: ["chrf"])  # scored on greedy generations, base vs adapter
    data: DataConfig = field(default_factory=DataConfig)


def template_fields(template: str) -> list[str]:
    """Names of the `{field}` placeholders of a prompt template."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _is_one_field(template: str) -> bool:
    try:
        fields = template_fields(template)
    except ValueError:  # reported by check_task_data
        return False
    return len(fields) == 1 and template == "{" + fields[0] + "}"


def resolve_data_source(data: DataConfig | DictConfig) -> str:
    """The concrete source (`sample`, `local` or `hub`) that `auto` stands for."""
    if data.source != DataSource.AUTO:
        return data.source
    if data.path:
        return DataSource.LOCAL.value
    if data.sample_file:
        return DataSource.SAMPLE.value
    return DataSource.HUB.value


def resolve_data_format(path: str, fmt: Optional[str]) -> str:
    if fmt:
        return fmt
    suffix = Path(path).suffix.lstrip(".").lower()
    return {"jl": "jsonl", "ndjson": "jsonl"}.get(suffix, suffix)


def _locate_data_file(data: DictConfig) -> tuple[Optional[tuple[Path, str]], Optional[str]]:
    """(the file a task reads and its format, None) or (None, why it cannot be read); (None, None) for the hub."""
    source = resolve_data_source(data)
    if source == DataSource.HUB:
        if not data.hub_id:
            return None, "task.data.hub_id=None is invalid; it must be a hub dataset id when task.data.source=hub"
        return None, None
    if source == DataSource.SAMPLE:
        if not data.sample_file or not (SAMPLE_DATA_DIR / data.sample_file).is_file():
            allowed = ", ".join(sorted(p.name for p in SAMPLE_DATA_DIR.glob("*.jsonl")))
            return None, f"task.data.sample_file={data.sample_file!r} is not a bundled sample; allowed: {allowed}"
        return (SAMPLE_DATA_DIR / data.sample_file, DataFormat.JSONL.value), None
    if not data.path:
        return None, "task.data.path=None is invalid; it must be a local data file when task.data.source=local"
    fmt = resolve_data_format(data.path, data.format)
    if fmt not in DataFormat.values():
        allowed = ", ".join(DataFormat.values())
        return None, f"task.data.format={fmt!r} (from {data.path!r}) is not supported; allowed: {allowed}"
    if not Path(data.path).is_file():
        return None, f"task.data.path={data.path!r} does not exist; it must be a readable {fmt} file"
    return (Path(data.path), fmt), None


def data_file(data: DictConfig) -> Optional[tuple[Path, str]]:
    """The local file (a bundled sample or task.data.path) and format a task reads; None for the hub or a location
    that check_task_data reports as invalid."""
    return _locate_data_file(data)[0]


def check_task_metrics(cfg: DictConfig, problems: list[str]) -> None:
    task = cfg.task
    for metric in task.metrics:
        check_choice(problems, "task.metrics", metric, TaskMetric)
    if TaskMetric.EXECUTION_ACCURACY.value in task.metrics and "context" not in task.data.columns:
        problems.append("task.metrics=execution_accuracy needs a `context` field with the CREATE TABLE schema")


def check_task_data(cfg: DictConfig, problems: list[str]) -> None:
    """task.data and the templates' fields; the file's own columns are data/'s check (data.files.check_data_file)."""
    task = cfg.task
    data = task.data
    check_choice(problems, "task.data.source", data.source, DataSource)
    check_choice(problems, "task.prompt_space", task.prompt_space, PromptSpace)
    check(problems, 0 < data.fraction <= 1, "task.data.fraction", data.fraction, "in (0, 1]")
    check_choice(problems, "task.data.train_target", data.train_target, TrainTarget)
    if data.train_target == TrainTarget.CLOSEST_TO_INPUT and not (
        data.extra_references and _is_one_field(task.completion_template)
    ):
        problems.append(
            f"task.data.train_target=closest_to_input needs other rewrites to choose from (task.data.extra_references="
            f"{list(data.extra_references)!r}) and a completion template that is one field (task.completion_template="
            f"{task.completion_template!r}); allowed: completion, or extra_references and a '{{field}}' template"
        )
    if data.max_examples is not None:
        check(problems, data.max_examples > 0, "task.data.max_examples", data.max_examples, "> 0 or null")
    fields: set[str] = set()
    for key in ("prompt_template", "completion_template", "prompt_template_no_input"):
        template = task[key]
        if template is None:
            continue
        try:
            fields |= set(template_fields(template))
        except ValueError as exc:  # an unbalanced brace: str.format could never fill it
            problems.append(
                f"task.{key}={template!r} is not a template ({exc}); allowed: text with {{field}} placeholders, "
                "a literal brace doubled ({{ or }})"
            )
    unmapped = sorted(fields - set(data.columns.keys()))
    if unmapped:
        problems.append(
            f"task.data.columns={dict(data.columns)!r} has no column for template field(s) {', '.join(unmapped)}; "
            f"allowed: a mapping with a key for every field of the prompt and completion templates"
        )
    problem = _locate_data_file(data)[1]
    if problem:
        problems.append(problem)
