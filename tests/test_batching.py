"""Padding-free packing computes exactly what one-by-one examples compute; batch samplers group and budget."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from conftest import compose_config, packed_lora_llama

from distributed_peft.data.batching import LengthAwareBatchSampler, collate_packed, model_inputs, train_loader
from distributed_peft.data.task_data import IGNORE_INDEX, collate_padded, prepare_task_data
from distributed_peft.errors import ConfigError
from distributed_peft.modeling.loading import load_tokenizer
from distributed_peft.modeling.objective import completion_token_stats


@pytest.fixture(scope="module")
def llama(bases):
    """A float32 LoRA model on tiny-llama with the packed attention, B nudged off zero so LoRA matters."""
    _, model, examples, tokenizer = packed_lora_llama(bases)
    return model, examples, tokenizer


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = completion_token_stats(model(**model_inputs(batch)).logits, batch["labels"])["loss_sum"].sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_packed_batch_equals_the_sum_of_examples_run_one_by_one(llama):
    model, examples, tokenizer = llama
    model.train()
    assert len({len(e["input_ids"]) for e in examples}) > 1, "examples of different lengths"
    packed_loss, packed_grads = loss_and_grads(model, collate_packed(examples))
    single = [loss_and_grads(model, collate_padded([e], tokenizer)) for e in examples]
    total_loss = sum(loss for loss, _ in single)
    assert packed_loss.item() == pytest.approx(total_loss.item(), abs=1e-5 * max(1.0, abs(total_loss.item())))
    for name, grad in packed_grads.items():
        expected = sum(grads[name] for _, grads in single)
        assert torch.allclose(grad, expected, atol=1e-5, rtol=1e-5), f"{name}: {(grad - expected).abs().max()}"


def test_packing_without_boundaries_would_leak_across_examples(llama):
    """Guard of the guard: the same row with one continuous position range (no restarts) gives another loss."""
    model, examples, _ = llama
    packed = collate_packed(examples)
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
    leaky = {k: v for k, v in leaky.items() if not k.startswith(("cu_seq", "max_length"))}
    with torch.no_grad():
        exact = completion_token_stats(model(**model_inputs(packed)).logits, packed["labels"])["loss_sum"].sum()
        leaked = completion_token_stats(model(**model_inputs(leaky)).logits, leaky["labels"])["loss_sum"].sum()
    assert abs(exact - leaked) > 1e-3


def test_padding_free_is_refused_on_bloom():
    with pytest.raises(ConfigError, match="training.packing='padding_free' is not possible on model 'tiny-bloom': "
                                          "BLOOM's ALiBi"):  # fmt: skip
        compose_config(["model=tiny-bloom", "training.packing=padding_free"])
    assert compose_config(["model=tiny-bloom", "training.packing=group_by_length"]).training.packing


def test_group_by_length_batches_similar_lengths_and_changes_each_epoch():
    lengths = [int(x) for x in torch.randint(5, 200, (800,), generator=torch.Generator().manual_seed(1))]
    grouped = LengthAwareBatchSampler(lengths, seed=3, batch_size=8, group_by_length=True)
    plain = LengthAwareBatchSampler(lengths, seed=3, batch_size=8)

    def waste(sampler):
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(800)), "every example once per epoch"
        padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        return 1 - sum(lengths) / padded

    assert waste(grouped) < 0.05 < 0.3 < waste(plain)
    first, again = list(grouped), list(grouped)
    assert first == again, "the same epoch iterated twice (accelerate's even_batches wrap) gives the same plan"
    grouped.set_epoch(1)
    assert list(grouped) != first, "a new order every epoch"
    assert list(LengthAwareBatchSampler(lengths, seed=3, batch_size=8, group_by_length=True)) == first, "seeded"
    assert list(LengthAwareBatchSampler(lengths, seed=4, batch_size=8, group_by_length=True)) != first, "by the seed"


@pytest.mark.parametrize("packed", [True, False])
def test_token_budget_is_respected(packed):
    lengths = [int(x) for x in torch.randint(5, 100, (300,), generator=torch.Generator().manual_seed(2))]
    batches = list(LengthAwareBatchSampler(lengths, seed=0, tokens_per_batch=400, packed=packed))
    assert sorted(i for batch in batches for i in batch) == list(range(300)), "every example once"

    def cost(batch):
        return sum(lengths[i] for i in batch) if packed else max(lengths[i] for i in batch) * len(batch)

    assert all(cost(batch) <= 400 for batch in batches), "no example is over the budget alone"
    for batch, following in pairwise(batches):
        assert cost([*batch, following[0]]) > 400, "a batch closes only when the next example would not fit"
    assert len(batches) < 300 // 2, "batches hold several examples"


def rows_of(batch: dict) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each example in a batch: cut at the packed boundaries, or at the padding."""
    if "cu_seq_lens_q" in batch:
        bounds = batch["cu_seq_lens_q"].tolist()
        ids, labels, positions = (batch[key][0].tolist() for key in ("input_ids", "labels", "position_ids"))
        assert positions == [p for a, b in pairwise(bounds) for p in range(b - a)], "restart per example"
        return [(ids[a:b], labels[a:b]) for a, b in pairwise(bounds)]
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert batch["attention_mask"].tolist() == [[1] * n + [0] * (batch["input_ids"].shape[1] - n) for n in lengths]
    padded = zip(batch["input_ids"].tolist(), batch["labels"].tolist(), lengths, strict=True)
    return [(ids[:n], labels[:n]) for ids, labels, n in padded]


@pytest.mark.parametrize("packing", ["none", "group_by_length", "padding_free"])
@pytest.mark.parametrize("tokens_per_batch", [None, 512])
def test_train_loader_modes(packing, tokens_per_batch, bases):
    tokenizer = load_tokenizer(str(bases["tiny-llama"]))
    overrides = ["task=detox", f"training.packing={packing}", "training.micro_batch_size=4"]
    cfg = compose_config([*overrides, f"training.tokens_per_batch={tokens_per_batch or 'null'}"])
    data = prepare_task_data(cfg, tokenizer)
    batches = list(train_loader(data.train, cfg, tokenizer))
    rows = [row for batch in batches for row in rows_of(batch)]
    expected = [(e["input_ids"], e["labels"]) for e in data.train]
    if packing == "padding_free":  # the first label of each example is already a prompt token's IGNORE_INDEX
        assert all(b["input_ids"].shape[0] == 1 and "attention_mask" not in b for b in batches)
    assert sorted(rows) == sorted(expected), "every example once, whole, with its labels"
    if tokens_per_batch:
        cost = [b["input_ids"].numel() for b in batches]
        assert max(cost) <= tokens_per_batch and sum(cost) / len(cost) > tokens_per_batch / 2
    else:
        assert [len(rows_of(b)) for b in batches[:-1]] == [4] * (len(batches) - 1)
    if packing == "group_by_length":  # against the same batch sizes drawn at random (real lengths vary widely)
        sizes = [len(rows_of(b)) for b in batches]
        spread = [max(len(i) for i, _ in rows_of(b)) - min(len(i) for i, _ in rows_of(b)) for b in batches]
        lengths = [len(e["input_ids"]) for e in data.train]
        shuffled = [lengths[i] for i in torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0))]
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        random_spread = [
            max(shuffled[a : a + n]) - min(shuffled[a : a + n]) for a, n in zip(starts, sizes, strict=True)
        ]
        assert sum(spread) / sum(random_spread) < 0.1, "similar lengths together"


def test_the_flattening_collator_packs_exactly_what_the_packed_attention_reads(llama):
    """transformers' DataCollatorWithFlattening: our examples back to back, positions from 0 at each start, the
    boundaries as int32 and the longest as an int, and labels unchanged (its first-label mask falls on the prompt)."""
    _, examples, _ = llama
    batch = collate_packed(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert all(e["labels"][0] == IGNORE_INDEX for e in examples), "completion-only labels start masked"
    assert batch["input_ids"].tolist() == [[t for e in examples for t in e["input_ids"]]]
    assert batch["labels"].tolist() == [[t for e in examples for t in e["labels"]]]
    assert batch["position_ids"].tolist() == [[p for n in lengths for p in range(n)]]
    bounds = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32 and batch[key].tolist() == bounds
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths) and isinstance(batch["max_length_q"], int)
    assert all(batch[key].dtype == torch.long for key in ("input_ids", "labels", "position_ids"))
    unmasked = {**examples[1], "labels": examples[1]["input_ids"]}  # a first label that is not masked: dropped
    assert collate_packed([examples[0], unmasked])["labels"][0, lengths[0]].item() == IGNORE_INDEX


def test_projecting_only_loss_positions_gives_the_same_loss_and_gradients(llama):
    from distributed_peft.modeling.objective import loss_positions, token_stats

    model, examples, tokenizer = llama
    batch = collate_padded(examples, tokenizer)
    full_loss, full_grads = loss_and_grads(model, batch)
    model.zero_grad(set_to_none=True)
    keep = loss_positions(batch["labels"])
    assert len(keep) < batch["labels"].shape[1] - 1, "prompt positions are skipped"
    logits = model(**model_inputs(batch), logits_to_keep=keep).logits
    loss = token_stats(logits, batch["labels"][:, keep + 1])["loss_sum"].sum()
    loss.backward()
    assert loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, full_grads[name], rtol=1e-5, atol=1e-5), name


def test_token_stats_sums_the_cross_entropy_of_labelled_tokens_per_row():
    from distributed_peft.modeling.objective import token_stats

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.tensor([[1, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 2, 2, 10, 0]])
    stats = token_stats(logits, targets)
    labelled = targets != IGNORE_INDEX
    nll = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(stats["loss_sum"], (nll * labelled).sum(dim=1))
    assert stats["tokens"].tolist() == [3, 4]
    assert stats["correct"].tolist() == ((logits.argmax(-1) == targets) & labelled).sum(dim=1).tolist()
    loss_only = token_stats(logits, targets, accuracy=False)  # training skips the argmax over the vocabulary
    assert "correct" not in loss_only and torch.equal(loss_only["loss_sum"], stats["loss_sum"])
