"""Completion-only masking, truncation/drop accounting, seeded split, one loading path for every source."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import compose_config, shared_dataset

from distributed_peft.data.prompts import completion_ids, format_completion, format_prompt, prompt_ids
from distributed_peft.data.task_data import (
    IGNORE_INDEX,
    collate_padded,
    learned_record,
    prepare_task_data,
    split_records,
    tokenize_example,
)
from distributed_peft.errors import DataError
from distributed_peft.modeling.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizers(bases):
    return {name: load_tokenizer(str(path)) for name, path in bases.items()}


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bloom"])
@pytest.mark.parametrize("task", ["detox", "sql", "instruct"])
def test_prompt_tokens_unlabelled_and_every_completion_token_labelled(task, model, tokenizers):
    tokenizer = tokenizers[model]
    cfg = compose_config([f"task={task}", f"model={model}", "task.data.max_examples=200"])
    data = prepare_task_data(cfg, tokenizer, keep_train_text=True)
    for example in data.train[:100]:
        labels, ids = example["labels"], example["input_ids"]
        prompt = prompt_ids(cfg.task, example["record"], tokenizer)  # what generation reads
        n_prompt = len(prompt)
        assert ids[:n_prompt] == prompt and labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert len(ids) > n_prompt and labels[n_prompt:] == ids[n_prompt:], "every completion token and EOS labelled"
        text = format_prompt(cfg.task, example["record"]) + format_completion(cfg.task, example["record"])
        assert ids == [*tokenizer(text)["input_ids"], tokenizer.eos_token_id], "tokenized as running text"
    if model == "tiny-llama":
        assert data.train[0]["input_ids"][0] == tokenizer.bos_token_id


def test_labels_decode_to_exactly_the_completion(tokenizers):
    tokenizer = tokenizers["tiny-llama"]
    cfg = compose_config(["task=detox"])
    record = {"toxic": "this idiot knows nothing", "neutral": "he does not know much"}
    prompt, completion = format_prompt(cfg.task, record), format_completion(cfg.task, record)
    assert prompt == "<Toxic>: this idiot knows nothing\n<Neutral>: "
    example = tokenize_example(cfg.task, record, tokenizer, max_seq_len=128)
    labelled = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(labelled[:-1]) == " " + completion, "the prompt's trailing space is the first word's"
    assert labelled[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=True) == prompt + completion


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bloom"])
def test_a_word_copied_from_the_input_is_the_same_token_in_the_completion(model, tokenizers):
    """`<Neutral>: ` ends in a space, which a BPE tokenizer writes into the next word's token: tokenized apart, the
    prompt ended in a lone space and the rewrite's first word was another token than the same word in the input, so
    a base that copies started every rewrite wrong (held-out detox BLEU 20.9 -> 25.2 with the fix)."""
    tokenizer = tokenizers[model]
    cfg = compose_config(["task=detox", f"model={model}"])
    record = {"toxic": "whatever the fuck they say", "neutral": "whatever they say"}
    example = tokenize_example(cfg.task, record, tokenizer, max_seq_len=128)
    prompt = prompt_ids(cfg.task, record, tokenizer)
    first_copied = tokenizer(" whatever", add_special_tokens=False)["input_ids"]
    assert example["input_ids"][len(prompt) : len(prompt) + len(first_copied)] == first_copied
    assert tokenizer.convert_ids_to_tokens(prompt[-1]) == ":", "no lone-space token at the end of the prompt"


def test_instruct_uses_the_no_input_template_when_input_is_empty():
    task = compose_config(["task=instruct"]).task
    with_input = format_prompt(task, {"instruction": "Add", "input": "1, 2", "response": "3"})
    without = format_prompt(task, {"instruction": "Add", "input": " ", "response": "3"})
    assert with_input == "<Instruction>: Add\n<Input>: 1, 2\n<Response>: "
    assert without == "<Instruction>: Add\n<Response>: "


@pytest.mark.parametrize("max_seq_len", [96, 80])
def test_truncation_is_counted_and_drop_removes_long_examples(tokenizers, max_seq_len):
    tokenizer = tokenizers["tiny-llama"]
    cfg = compose_config(["task=sql", f"training.max_seq_len={max_seq_len}"])
    eval_records, train_records, _ = split_records(cfg.task, cfg.training)
    records = [*eval_records, *train_records]
    untruncated = [tokenize_example(cfg.task, r, tokenizer, 10**6) for r in records]
    full = [(e["labels"].count(IGNORE_INDEX), len(e["input_ids"])) for e in untruncated]  # (prompt, whole) tokens
    too_long = sum(whole > max_seq_len for _, whole in full)
    prompt_fills = sum(prompt >= max_seq_len for prompt, _ in full)  # nothing left to learn once cut
    assert too_long > 0 and (prompt_fills > 0) == (max_seq_len == 80), (too_long, prompt_fills)
    truncated = prepare_task_data(cfg, tokenizer)
    assert (truncated.stats.truncated, truncated.stats.dropped_too_long) == (too_long, prompt_fills)
    assert max(len(e["input_ids"]) for e in truncated.train) == max_seq_len
    dropped = prepare_task_data(
        compose_config(["task=sql", f"training.max_seq_len={max_seq_len}", "training.truncation=drop"]), tokenizer
    )
    assert dropped.stats.truncated == 0
    assert dropped.stats.dropped_too_long == too_long
    assert len(dropped.train) + len(dropped.eval) + dropped.stats.dropped_too_long == dropped.stats.loaded
    assert max(len(e["input_ids"]) for e in dropped.train) <= max_seq_len


def test_empty_after_filtering_is_a_data_error(tokenizers):
    with pytest.raises(DataError, match="training.max_seq_len=8: no train example left"):
        prepare_task_data(
            compose_config(["task=sql", "training.max_seq_len=8", "training.truncation=drop"]), tokenizers["tiny-llama"]
        )


def test_split_is_seeded_recorded_and_disjoint(tokenizers):
    tokenizer = tokenizers["tiny-bloom"]
    first = prepare_task_data(compose_config(["task=detox", "model=tiny-bloom"]), tokenizer)
    again = prepare_task_data(compose_config(["task=detox", "model=tiny-bloom"]), tokenizer)
    other = prepare_task_data(compose_config(["task=detox", "model=tiny-bloom", "training.seed=7"]), tokenizer)
    assert first.stats.eval_example_ids == again.stats.eval_example_ids
    assert first.stats.eval_example_ids != other.stats.eval_example_ids
    assert not set(first.stats.eval_example_ids) & {e["id"] for e in first.train}
    assert first.stats.eval == len(first.eval) == 256 and first.stats.loaded == 4000
    assert json.loads(first.stats.to_json())["eval_example_ids"] == first.stats.eval_example_ids


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "tsv", "parquet"])
def test_custom_local_files_of_every_format_load_the_same(suffix, tmp_path, tokenizers):
    import pandas as pd

    records = [{"prompt": f"Q{i} = ", "completion": f"answer, {i}"} for i in range(20)]
    path = tmp_path / f"data.{suffix}"
    frame = pd.DataFrame(records)
    if suffix == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False, sep="\t" if suffix == "tsv" else ",", quoting=csv.QUOTE_MINIMAL)
    cfg = compose_config(["task=custom", f"task.data.path={path}"])
    data = prepare_task_data(cfg, tokenizers["tiny-llama"], keep_train_text=True)
    assert data.stats.loaded == 20 and data.stats.train + data.stats.eval == 20
    loaded = sorted((e["record"]["prompt"], e["record"]["completion"]) for e in data.train + data.eval)
    assert loaded == sorted((r["prompt"], r["completion"]) for r in records), "every record read back as written"


def test_real_paradetox_tsv_loads_with_a_column_map(tokenizers):
    path = shared_dataset("paradetox/paradetox.tsv")
    cfg = compose_config(
        ["task=detox", f"task.data.path={path}", "task.data.columns.toxic=toxic", "task.data.columns.neutral=neutral1"]
    )
    data = prepare_task_data(cfg, tokenizers["tiny-llama"])
    assert data.stats.loaded == 10427
    assert data.stats.train + data.stats.eval + data.stats.empty_completion + data.stats.dropped_too_long == 10427


def test_closest_to_input_trains_on_the_most_conservative_accepted_rewrite(tokenizers):
    tokenizer = tokenizers["tiny-llama"]
    overrides = ["task=detox", "task.data.max_examples=400", "task.data.extra_references=[neutral2,neutral3]"]
    plain = prepare_task_data(compose_config(overrides), tokenizer, keep_train_text=True)
    chosen = prepare_task_data(
        compose_config([*overrides, "task.data.train_target=closest_to_input"]), tokenizer, keep_train_text=True
    )
    assert [e["id"] for e in plain.train] == [e["id"] for e in chosen.train], "the same records, split alike"
    cfg = compose_config([*overrides, "task.data.train_target=closest_to_input"])
    changed = 0
    for before, after in zip(plain.train, chosen.train, strict=True):
        record = after["record"]
        target = learned_record(record, cfg.task)["neutral"]
        assert target in after["references"], "one of this record's own human rewrites"
        prompt = prompt_ids(cfg.task, record, tokenizer)
        labelled = [t for t in after["labels"] if t != IGNORE_INDEX]
        learned = completion_ids(cfg.task, {**record, "neutral": target}, tokenizer, prompt)
        assert labelled == [*learned, tokenizer.eos_token_id]
        if after["input_ids"] != before["input_ids"]:
            changed += 1
            assert target != record["neutral"]
    assert 50 <= changed <= 200, f"about a quarter of the records have a rewrite closer than the first: {changed}"
    assert plain.eval[0]["references"] == chosen.eval[0]["references"], "every rewrite still scores generations"

    record = {"toxic": "you are a fucking idiot lol", "neutral": "You are wrong.", "reference_1": "you are a lol"}
    record.update(reference_2="", example_id=0)
    assert learned_record(record, cfg.task)["neutral"] == "you are a lol"
    tie = {**record, "reference_1": "You are wrong."}
    assert learned_record(tie, cfg.task) == tie, "a tie keeps the completion column's own rewrite"
    assert learned_record(record, compose_config(overrides).task) is record, "the default learns the completion"


def test_collate_pads_right_with_the_tokenizers_pad_id_and_no_loss_on_padding(tokenizers):
    import copy

    tokenizer = copy.deepcopy(tokenizers["tiny-llama"])
    tokenizer.pad_token = tokenizer.eos_token  # a pad id that is not 0: it must come from the tokenizer
    tokenizer.padding_side = "left"  # generation's side: training batches are right-padded all the same
    pad = tokenizer.pad_token_id
    assert pad not in (0, 5, 6, 7, 8)
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "id": 0}, {"input_ids": [8], "labels": [8], "id": 1}]
    batch = collate_padded(examples, tokenizer)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_a_tokenizer_that_appends_eos_still_gets_the_prompts_trailing_space_before_the_completion(tokenizers):
    """Its joint ids end in EOS, so they do not start with the prompt's: the completion is then tokenized alone, with
    the space the prompt's ids left out in front of it (not dropped)."""
    tokenizer = tokenizers["tiny-llama"]

    def appending_eos(text, add_special_tokens=True):
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": ids + [tokenizer.eos_token_id] if add_special_tokens else ids}

    task = compose_config(["task=detox"]).task
    record = {"toxic": "whatever the fuck they say", "neutral": "whatever they say"}
    prompt = prompt_ids(task, record, appending_eos)
    assert prompt[-1] == tokenizer.eos_token_id
    assert completion_ids(task, record, appending_eos, prompt) == tokenizer(" whatever they say")["input_ids"][1:]


def test_an_adapter_recorded_before_prompt_space_reads_its_prompts_as_it_was_trained(tokenizers):
    """Its config.yaml has no task.prompt_space: it learned `<Neutral>: ` with the space as the prompt's last token,
    and generation must give it that (fed the new ids, the old SQL adapter answered `)SELECT ...`)."""
    from omegaconf import OmegaConf

    from distributed_peft.config.store import load_recorded_config

    tokenizer = tokenizers["tiny-llama"]
    recorded = OmegaConf.to_container(compose_config(["task=detox"]), resolve=True)
    del recorded["task"]["prompt_space"]
    old = load_recorded_config(recorded).task
    record = {"toxic": "whatever the fuck they say", "neutral": "whatever they say"}
    assert old.prompt_space == "prompt"
    as_trained = tokenizer("<Toxic>: whatever the fuck they say\n<Neutral>: ")["input_ids"]
    assert prompt_ids(old, record, tokenizer) == as_trained
    example = tokenize_example(old, record, tokenizer, max_seq_len=128)
    alone = tokenizer("whatever they say", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == [*prompt_ids(old, record, tokenizer), *alone, tokenizer.eos_token_id]
    new = load_recorded_config(OmegaConf.to_container(compose_config(["task=detox"])))
    assert new.task.prompt_space == "completion"
