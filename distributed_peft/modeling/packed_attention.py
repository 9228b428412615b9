"""Attention for padding-free packed rows: each example attends only to itself.

Which attention a packed row gets is chosen once, when the base loads (`packed_attention_implementation`):
- flash attention (configured, or on CUDA when flash-attn is installed): its varlen kernels read the example
  boundaries `cu_seq_lens_q/k` and `max_length_q/k` that the packed collator (transformers'
  DataCollatorWithFlattening, data/batching.py) passes through the model;
- sdpa on CUDA without flash-attn: transformers' own packed-sequence mask, found from the restarting `position_ids`
  (masking_utils.find_packed_sequence_indices), computed once per forward;
- on CPU, this module's kernel: causal sdpa on each example's slice (sum(Li^2)) instead of a block-diagonal mask
  over the whole row (sum(L)^2, most of it discarded: slower than padding on a CPU). Batches without boundaries
  (evaluation, generation) go through plain sdpa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_SDPA = "dpeft_packed_sdpa"
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")

# the one batch whose lengths are known: every layer (and a checkpointed layer's recomputation) is handed the same
# boundaries tensor, so the host reads them once per batch, not once per layer
_lengths_of: tuple[torch.Tensor | None, list[int]] = (None, [])


def packed_attention_implementation(configured: str, cuda: bool | None = None, flash_attn: bool | None = None) -> str:
    """The attn_implementation for padding-free packed rows (cuda, flash_attn: detected when None)."""
    if configured in FLASH_ATTENTION:
        return configured
    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        return register_packed_attention()
    if flash_attn is None:
        from transformers.utils import is_flash_attn_2_available

        flash_attn = is_flash_attn_2_available()
    return "flash_attention_2" if flash_attn else configured


def example_lengths(boundaries: torch.Tensor) -> list[int]:
    """Each packed example's length, from the collator's cumulative boundaries; read from the device once per batch."""
    global _lengths_of
    if _lengths_of[0] is not boundaries:
        _lengths_of = (boundaries, split_lengths(boundaries))
    return _lengths_of[1]


def split_lengths(boundaries: torch.Tensor) -> list[int]:
    """The lengths as Python ints (a host sync on CUDA)."""
    return boundaries.diff().tolist()


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention interface: [B, H, T, D] in, [B, T, H, D] out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    gqa = key.shape[1] != query.shape[1]
    dropout = dropout if module.training else 0.0
    lengths = example_lengths(boundaries)
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
