"""Task data: load (hub, bundled sample or a checked local file), format prompts, tokenize, mask, split."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distributed_peft.config import TrainTarget, resolve_data_format, resolve_data_source, template_fields
from distributed_peft.constants import SAMPLE_DATA_DIR
from distributed_peft.data.files import read_text_columns
from distributed_peft.data.prompts import completion_ids, format_completion, optional_fields, prompt_ids
from distributed_peft.errors import DataError

IGNORE_INDEX = -100  # label of tokens that get no loss (prompt and padding)


def _load_dataset_args(data: DictConfig) -> tuple[tuple, dict[str, Any]]:
    """Arguments of `datasets.load_dataset` for a hub or bundled sample source."""
    if resolve_data_source(data) == "hub":
        return (data.hub_id, data.hub_config), {"split": data.hub_split}
    return ("json",), {"data_files": str(SAMPLE_DATA_DIR / data.sample_file), "split": "train"}


def _load_library_dataset(task: DictConfig, wanted: dict[str, str]):
    """A hub dataset or the bundled sample through `datasets`, its wanted columns as text."""
    import datasets

    args, kwargs = _load_dataset_args(task.data)
    if resolve_data_source(task.data) == "hub":  # unreachable or not cached: one line now, not a minute of retries
        from distributed_peft.runtime.hub import check_hub_dataset

        check_hub_dataset(task.data.hub_id)
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # a failure is reported once, as one line below
    try:
        dataset = datasets.load_dataset(*args, **kwargs)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetGenerationError) as exc:
        cause = exc.__cause__ or exc
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(f"task.data: cannot load {args[0]!r}: {reason}") from exc
    missing = sorted(set(wanted.values()) - set(dataset.column_names))
    if missing:
        raise DataError(
            f"task.data.columns: column(s) {', '.join(missing)} not in the data; "
            f"allowed: {', '.join(dataset.column_names)}"
        )
    dataset = dataset.select_columns(sorted(set(wanted.values())))
    return dataset.map(
        lambda row: {name: "" if row[column] is None else str(row[column]) for name, column in wanted.items()},
        remove_columns=[c for c in dataset.column_names if c not in wanted],
    )


def _load_local_dataset(task: DictConfig, wanted: dict[str, str]):
    """A local file's wanted columns, every value checked and made text (see data_files.py)."""
    import datasets

    path, fmt = Path(task.data.path), resolve_data_format(task.data.path, task.data.format)
    required = {task.data.columns[name] for name in task.data.columns if name not in optional_fields(task)}
    optional = set(wanted.values()) - required  # the input of an instruct task, extra references
    texts = read_text_columns(path, fmt, sorted(set(wanted.values())), optional)
    features = datasets.Features({name: datasets.Value("string") for name in wanted})
    return datasets.Dataset.from_dict({name: texts[column] for name, column in wanted.items()}, features=features)


def load_records(task: DictConfig):
    """The task's examples as a `datasets.Dataset` with one text column per template field and an `example_id`."""
    columns = dict(task.data.columns)
    extra = {f"reference_{i}": column for i, column in enumerate(task.data.extra_references, start=1)}
    wanted = {**columns, **extra}  # field name -> column of the data
    if resolve_data_source(task.data) == "local":
        dataset = _load_local_dataset(task, wanted)
    else:
        dataset = _load_library_dataset(task, wanted)
    return dataset.add_column("example_id", list(range(len(dataset))))


def references(record: dict[str, Any], task: DictConfig) -> list[str]:
    """Every accepted completion of a record: the completion itself, then any extra reference columns."""
    extra = [record[k] for k in sorted(record) if k.startswith("reference_") and str(record[k]).strip()]
    return [format_completion(task, record), *extra]


@cache
def _sentence_chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def learned_record(record: dict[str, Any], task: DictConfig) -> dict[str, Any]:
    """The record as training learns it: under task.data.train_target=closest_to_input its completion field holds
    whichever accepted completion (its own or an extra reference) is nearest its prompt fields by chrF, the first
    on a tie; otherwise the record itself."""
    if task.data.train_target != TrainTarget.CLOSEST_TO_INPUT:
        return record
    chrf = _sentence_chrf()
    (target_field,) = template_fields(task.completion_template)  # one field, as check_task_data requires
    prompt_fields = template_fields(task.prompt_template)
    source = " ".join(str(record.get(name) or "") for name in prompt_fields).strip()
    candidates = references(record, task)
    best = max(candidates, key=lambda text: chrf.sentence_score(text, [source]).score)
    return {**record, target_field: best}


def tokenize_example(task: DictConfig, record: dict[str, Any], tokenizer, max_seq_len: int) -> dict[str, Any]:
    """Token ids and labels of a record: its prompt's ids (as generation gets them) labelled IGNORE_INDEX, then its
    completion's tokens and EOS labelled.

    Sequences longer than max_seq_len are cut at the end; `truncated` tells whether that happened.
    """
    prompt = prompt_ids(task, record, tokenizer)
    completion = completion_ids(task, record, tokenizer, prompt)
    completion.append(tokenizer.eos_token_id)
    input_ids = (prompt + completion)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_seq_len]
    return {"input_ids": input_ids, "labels": labels, "truncated": len(prompt) + len(completion) > max_seq_len}


@dataclass
class DataStats:
    """What happened to the examples on their way to the model (reported and saved with the run)."""

    source: str
    loaded: int = 0
    empty_completion: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    train: int = 0
    eval: int = 0
    split_seed: int = 0
    eval_example_ids: list[int] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"data: {self.loaded} loaded from {self.source}, {self.train} train / {self.eval} eval "
            f"(seed {self.split_seed}); {self.truncated} truncated, {self.dropped_too_long} dropped as too "
            f"long, {self.empty_completion} without completion"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass
class TaskData:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    stats: DataStats


def tokenize_records(records, task, tokenizer, training, stats: DataStats, keep_text: bool) -> list[dict[str, Any]]:
    """Tokenized examples of records (prompt masked), counting truncated and too-long ones in `stats`."""
    examples = []
    for record in records:
        example = tokenize_example(task, learned_record(record, task), tokenizer, training.max_seq_len)
        if example["truncated"]:
            if training.truncation == "drop":
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
        if all(label == IGNORE_INDEX for label in example["labels"]):
            stats.dropped_too_long += 1  # the prompt alone fills max_seq_len: nothing left to learn
            continue
        kept = {"input_ids": example["input_ids"], "labels": example["labels"], "id": record["example_id"]}
        if keep_text:  # the validation split also feeds generation metrics
            kept.update(record=record, references=references(record, task))
        examples.append(kept)
    return examples


def split_records(task: DictConfig, training: DictConfig):
    """The task's usable records shuffled by the seed and split as training splits them: (eval, train, stats)."""
    source = resolve_data_source(task.data)
    where = {"hub": task.data.hub_id, "sample": f"sample {task.data.sample_file}", "local": task.data.path}[source]
    records = load_records(task)
    stats = DataStats(source=str(where), loaded=len(records), split_seed=training.seed)
    completion_fields = [f for f in task.data.columns if "{" + f + "}" in task.completion_template]
    records = records.filter(lambda row: all(row[f].strip() for f in completion_fields))
    stats.empty_completion = stats.loaded - len(records)
    records = records.shuffle(seed=training.seed)
    keep = int(len(records) * task.data.fraction)
    if task.data.max_examples:
        keep = min(keep, task.data.max_examples)
    records = records.select(range(keep))
    if len(records) < 2:
        raise DataError(
            f"task.data: {len(records)} usable example(s) from {where} after filtering "
            f"(fraction={task.data.fraction}, max_examples={task.data.max_examples}); at least 2 are needed"
        )
    n_eval = max(1, round(len(records) * training.eval_fraction))
    if training.max_eval_examples:
        n_eval = min(n_eval, training.max_eval_examples)
    return records.select(range(n_eval)), records.select(range(n_eval, len(records))), stats


def prepare_task_data(cfg: DictConfig, tokenizer, keep_train_text: bool = False) -> TaskData:
    """Load, filter, split by seed and tokenize the task's data; raise DataError when nothing is left.

    Validation examples keep their text fields (for generation metrics); training examples only on request.
    """
    task, training = cfg.task, cfg.training
    eval_records, train_records, stats = split_records(task, training)
    train = tokenize_records(train_records, task, tokenizer, training, stats, keep_text=keep_train_text)
    evaluation = tokenize_records(eval_records, task, tokenizer, training, stats, keep_text=True)
    if not train or not evaluation:
        raise DataError(
            f"training.max_seq_len={training.max_seq_len}: no {'train' if not train else 'eval'} example left "
            f"(truncation={training.truncation!r}, {stats.dropped_too_long} dropped as too long); "
            "allowed: a max_seq_len that fits the prompts"
        )
    stats.train, stats.eval = len(train), len(evaluation)
    stats.eval_example_ids = sorted(example["id"] for example in evaluation)
    return TaskData(train=train, eval=evaluation, stats=stats)


def collate_padded(examples: list[dict[str, Any]], tokenizer) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example (whatever side the tokenizer pads by default): the tokenizer's pad
    id with attention 0 for the inputs, IGNORE_INDEX for the labels (no loss on padding)."""
    from torch.nn.utils.rnn import pad_sequence

    inputs = tokenizer.pad(
        {"input_ids": [example["input_ids"] for example in examples]},
        padding_side="right",  # positions count from the first token, as in packed rows and single examples
        return_attention_mask=True,
        return_tensors="pt",
    )
    labels = [torch.tensor(example["labels"]) for example in examples]
    return {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
    }
