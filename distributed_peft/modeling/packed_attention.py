"""Attention for padding-free packed rows: each example attends only to itself, at the cost of its own length.

A packed row of examples with lengths L1..Ln could use sdpa with a block-diagonal mask, but that computes attention
over the whole row (sum(L)^2) and discards most of it: slower than padding on a CPU. This kernel runs causal
sdpa on each example's slice instead (sum(Li^2)), given the example boundaries `cu_seq_lens_q` that the packed
collator (transformers' DataCollatorWithFlattening, data/batching.py) passes through the model (the same keyword
flash-attention's varlen path reads). Batches without it (evaluation, generation) go through plain sdpa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_SDPA = "dpeft_packed_sdpa"


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention interface: [B, H, T, D] in, [B, T, H, D] out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    gqa = key.shape[1] != query.shape[1]
    dropout = dropout if module.training else 0.0
    lengths = boundaries.diff().tolist()
    # split (one gradient concat in backward) rather than slices (each slice's backward fills a whole-row zero tensor)
    pieces = [
        F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
    ]
    return torch.cat([piece.transpose(1, 2) for piece in pieces], dim=1), None  # written [B, T, H, D] directly


def packed_or_padded_mask(*args, **kwargs):
    """No mask without a padding mask (packed rows are split by boundaries instead); sdpa's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)


def register_packed_attention() -> str:
    """Make `attn_implementation="dpeft_packed_sdpa"` loadable; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_or_padded_mask)
    return PACKED_SDPA
