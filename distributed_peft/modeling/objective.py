"""The completion-only causal-LM objective, summed per example so batches and ranks can be weighted by tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distributed_peft.data.task_data import IGNORE_INDEX


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token carries a label, over all rows: the only logits the loss needs.

    Passed as `logits_to_keep`, the vocabulary projection and the cross-entropy skip every prompt position.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def completion_token_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example sums over labelled tokens: cross-entropy, token count and argmax hits (next-token shift)."""
    return token_stats(logits[:, :-1], labels[:, 1:])


def token_stats(logits: torch.Tensor, targets: torch.Tensor, accuracy: bool = True) -> dict[str, torch.Tensor]:
    """Per-row sums of cross-entropy, labelled tokens and argmax hits (not with accuracy=False), logits aligned."""
    logits = logits.float()
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    # rows of [N, V]: over a transposed [B, V, T] view the CPU log-softmax (and its backward) is ~4x slower
    token_loss = F.cross_entropy(logits.flatten(0, 1), safe_targets.flatten(), reduction="none")
    token_loss = token_loss.view_as(targets) * mask
    stats = {"loss_sum": token_loss.sum(dim=1), "tokens": mask.sum(dim=1)}
    if accuracy:
        stats["correct"] = ((logits.argmax(dim=-1) == safe_targets) & mask).sum(dim=1)
    return stats


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a batch (the shift drops the first position)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
