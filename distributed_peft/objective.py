"""The completion-only causal-LM objective, summed per example so batches and ranks can be weighted by tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distributed_peft.data import IGNORE_INDEX


def completion_token_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example sums over labelled tokens: cross-entropy, token count and argmax hits (next-token shift)."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    token_loss = F.cross_entropy(logits.transpose(1, 2), safe_targets, reduction="none") * mask
    hits = (logits.argmax(dim=-1) == safe_targets) & mask
    return {"loss_sum": token_loss.sum(dim=1), "tokens": mask.sum(dim=1), "correct": hits.sum(dim=1)}


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a batch (the shift drops the first position)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
