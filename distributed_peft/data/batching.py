"""How training examples become micro batches: padded, grouped by length, or packed padding-free.

- `none`: random batches padded to their longest example.
- `group_by_length`: batches of similar length (sorted inside random mega-batches), padded to their longest; works
  for every model (BLOOM's ALiBi included).
- `padding_free`: the batch's examples concatenated into one row, `position_ids` restarting at 0 for each, no
  attention mask: attention stays inside each example (transformers builds the block-diagonal mask from the
  positions) and no loss crosses an example boundary. Llama-family models with sdpa or flash attention only.

`training.tokens_per_batch` replaces the fixed number of examples with a token budget per micro batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig

from distributed_peft.data.task_data import IGNORE_INDEX, collate_padded

MEGABATCH_FACTOR = 50  # group_by_length sorts inside random windows of 50 batches, as transformers' sampler does


def collate_packed(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """One row: the examples back to back, positions restarting at 0, no label on any example's first token (the
    previous example must not predict it), and the example boundaries `cu_seq_lens_q/k` with `max_length_q/k` that
    flash-attention's varlen kernels and dpeft's packed sdpa read."""
    from transformers import DataCollatorWithFlattening

    # identical to what dpeft built by hand (int64 ids/labels/positions, int32 boundaries, int max lengths; first
    # label IGNORE_INDEX, which completion-only labels already are): tests/test_batching.py checks it
    return DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE_INDEX)(examples)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes from a batch (labels stay with the objective)."""
    return {key: value for key, value in batch.items() if key != "labels"}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens in a batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "position_ids" in batch:
        return int(batch["position_ids"].numel())
    return int(batch["input_ids"].numel())


class LengthAwareBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Seeded batches by example count or token budget, optionally grouped by length; a new order every epoch."""

    def __init__(
        self,
        lengths: list[int],
        seed: int,
        batch_size: int | None = None,
        tokens_per_batch: int | None = None,
        group_by_length: bool = False,
        packed: bool = False,
    ):
        self.lengths, self.seed, self.epoch = lengths, seed, 0
        self.batch_size, self.tokens_per_batch = batch_size, tokens_per_batch
        self.group_by_length, self.packed = group_by_length, packed
        self.drop_last = False  # accelerate's BatchSamplerShard reads these two
        self._batches = self._plan(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._batches = self._plan(epoch)

    def _cost(self, batch: list[int]) -> int:
        lengths = [self.lengths[i] for i in batch]
        return sum(lengths) if self.packed else max(lengths) * len(lengths)

    def _plan(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if self.group_by_length:
            window = (self.batch_size or 8) * MEGABATCH_FACTOR
            order = [i for start in range(0, len(order), window)
                     for i in sorted(order[start : start + window], key=lambda i: -self.lengths[i])]  # fmt: skip
        batches: list[list[int]] = []
        if self.tokens_per_batch:
            batch: list[int] = []
            for index in order:
                if batch and self._cost([*batch, index]) > self.tokens_per_batch:
                    batches.append(batch)
                    batch = []
                batch.append(index)
            if batch:
                batches.append(batch)
        else:
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.group_by_length:  # sorted windows would otherwise always start with their longest batch
            shuffle = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in shuffle]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        # No implicit epoch advance: accelerate's BatchSamplerShard iterates again to even out the last batches of
        # an epoch, and those must come from the same epoch's plan. The training loop calls set_epoch.
        yield from self._batches

    def __len__(self) -> int:
        return len(self._batches)


def train_loader(examples: list[dict[str, Any]], cfg: DictConfig, tokenizer) -> torch.utils.data.DataLoader:
    """The training DataLoader for `training.packing` and `training.tokens_per_batch`."""
    training = cfg.training
    packed = training.packing == "padding_free"
    if training.packing == "none" and not training.tokens_per_batch:
        generator = torch.Generator().manual_seed(training.seed)
        return torch.utils.data.DataLoader(
            examples,
            batch_size=training.micro_batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=lambda batch: collate_padded(batch, tokenizer),
        )
    sampler = LengthAwareBatchSampler(
        [len(e["input_ids"]) for e in examples],
        seed=training.seed,
        batch_size=training.micro_batch_size,
        tokens_per_batch=training.tokens_per_batch,
        group_by_length=training.packing == "group_by_length",
        packed=packed,
    )
    collate = collate_packed if packed else (lambda batch: collate_padded(batch, tokenizer))
    return torch.utils.data.DataLoader(examples, batch_sampler=sampler, collate_fn=collate)
