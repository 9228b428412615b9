"""The completion-only causal-LM objective, summed per example so batches and ranks can be weighted by tokens.

`CompletionLoss` is the training loss of a micro batch, chosen once per run: logits at the loss positions then
cross-entropy, or (training.liger_kernel on CUDA) Liger's fused linear cross-entropy from the last hidden states and
the output layer's weight, which never materialises the [tokens, vocabulary] logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


class CompletionLoss:
    """The sum of token losses over a micro batch's labelled (completion) tokens; the caller divides by the window's
    labelled tokens on all ranks, whichever path computed the sum."""

    def __init__(self, model: torch.nn.Module, fused: bool = False):
        self.output_layer = output_layer(model)
        self.fused_cross_entropy = fused_linear_cross_entropy() if fused else None

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from distributed_peft.data.batching import model_inputs

        keep = loss_positions(batch["labels"])  # no vocabulary projection for prompt positions
        targets = batch["labels"][:, keep + 1]
        if self.fused_cross_entropy is None:
            logits = model(**model_inputs(batch), logits_to_keep=keep).logits
            return token_stats(logits, targets, accuracy=False)["loss_sum"].sum()
        with self._output_layer_returns_loss(targets):
            return model(**model_inputs(batch), logits_to_keep=keep).logits

    @contextmanager
    def _output_layer_returns_loss(self, targets: torch.Tensor) -> Iterator[None]:
        """For one forward, the output layer returns the summed fused cross-entropy of its input instead of logits.

        Computed inside the layer's own call, where ZeRO-3 and FSDP have gathered its (frozen) weight.
        """
        layer, fused = self.output_layer, self.fused_cross_entropy

        def loss_forward(hidden: torch.Tensor) -> torch.Tensor:
            hidden = hidden.reshape(-1, hidden.shape[-1])
            return fused(hidden, layer.weight, targets.reshape(-1).to(hidden.device), bias=layer.bias,
                         ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip

        own_forward = layer.__dict__.get("forward")  # an instance forward (accelerate's hooks) is put back too
        layer.forward = loss_forward
        try:
            yield
        finally:
            if own_forward is None:
                del layer.forward
            else:
                layer.forward = own_forward


def output_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The vocabulary projection (lm_head) of a model or of a peft model's base."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def fused_linear_cross_entropy() -> Callable[..., torch.Tensor]:
    """Liger's fused linear cross-entropy: (hidden [N, H], weight [V, H], targets [N], ...) -> loss, CUDA only."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a batch (the shift drops the first position)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
