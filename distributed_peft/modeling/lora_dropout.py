"""LoRA dropout that draws only the positions it drops: nn.Dropout's distribution at a fraction of its CPU cost.

nn.Dropout draws one random number per element (`bernoulli_`); on a CPU that is ~15% of a QLoRA step of a small
model, as LoRA drops the input of every adapted projection. The dropped positions of an i.i.d. Bernoulli(p) mask are
exactly those separated by i.i.d. Geometric(p) gaps, so drawing about p * numel gaps (by inverse CDF, in float64)
gives the same distribution with ~20x fewer random numbers. The draws come from torch's generator, so seeding and
checkpointed RNG state govern them as before. GPUs (where dropout is one fused kernel) and large p keep nn.Dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_SPARSE_P = 0.5  # above this the gaps are no cheaper than one draw per element


def gap_count(expected: float) -> int:
    """Gaps to draw at once for `expected` drops: six standard deviations over, so one chunk all but always."""
    return int(expected + 6 * math.sqrt(expected) + 16)


def drop_positions(numel: int, p: float) -> torch.Tensor:
    """Flat indices dropped by an i.i.d. Bernoulli(p) mask over `numel` elements, ascending (CPU)."""
    log_keep = math.log1p(-p)
    chunks, start = [], 0
    while start < numel:
        uniform = torch.rand(gap_count((numel - start) * p), dtype=torch.float64)
        kept_before = torch.log1p(-uniform).div_(log_keep).floor_()  # P(>= k) = (1 - p)^k: Geometric(p) failures
        positions = kept_before.add_(1).cumsum_(0).add_(start - 1).long()
        chunks.append(positions)
        start = int(positions[-1]) + 1
    positions = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return positions[: int(torch.searchsorted(positions, numel))]  # ascending: a prefix, no boolean mask


class _DropPositions(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return _scale_and_zero(x, positions, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        return _scale_and_zero(grad, positions, ctx.scale), None, None


def _scale_and_zero(x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    out = x.mul(scale)
    if not out.is_contiguous():  # positions index the row-major flat layout
        out = out.contiguous()
    out.view(-1).index_fill_(0, positions, 0)
    return out


class SparseDropout(nn.Dropout):
    """nn.Dropout that, training on a CPU, zeroes Geometric-gap positions instead of drawing a full mask.

    `idle`: the adapter it belongs to runs at scale 0 this step (a multi-task job's other adapters under DeepSpeed or
    FSDP): no mask is drawn, so the active adapter's masks are those it would draw alone."""

    idle = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.idle:
            return x
        if x.device.type != "cpu" or self.p > MAX_SPARSE_P or self.inplace:
            return F.dropout(x, self.p, self.training, self.inplace)
        return _DropPositions.apply(x, drop_positions(x.numel(), self.p), 1.0 / (1.0 - self.p))


def use_sparse_dropout(model: nn.Module) -> int:
    """Swap every LoRA layer's nn.Dropout for SparseDropout (same p); returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout:
                dropouts[name] = SparseDropout(dropout.p)
                swapped += 1
    return swapped
