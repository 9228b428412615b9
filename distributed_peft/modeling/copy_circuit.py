"""A copying circuit wired into an embedded Llama's initial weights (model.base.copy_circuit_init).

Rewriting (detox), repeating names (SQL) and code identifiers (instruct) need a base that can copy what it read. A
2-layer transformer learns that with an induction head: layer 0 has a head that attends to the previous token and
writes it into the residual stream; a head of layer 1 attends to the position whose previous token is the current
token and copies the token found there. Learned from a random init this forms slowly: after 400 steps of copy-heavy
pretraining a 4-layer 1.1M Llama copied 8 % of held-out tokens, a 2-layer one 13 % (21 % after 1,000; README "Why
the embedded base can copy"). Wired in at init it copies 88 % before the first step, and pretraining keeps and
sharpens it (97 % after 800 steps) while it learns the language model around it.

The residual stream (hidden_size d, head_dim h) is laid out at init as
  dim 0: a constant 1 (positions for the previous-token head), dims 1..h-1: the token's own vector (unit norm, random),
  dims h..2h-1: the previous token's vector (written by layer 0), the rest: the usual random init.
Layer 0 head 0 attends to the previous token through RoPE alone (its query and key read the constant); layer 1 head 0
matches the current token with the previous-token vectors on RoPE's slow frequencies (position-independent) and writes
the matched token's vector back with a gain that outweighs the current one; lm_head reads the token vectors. Every
other head's output, every MLP's output and every later layer start at zero, so they start as the identity and learn
from there. All of it is ordinary Llama weights: the base loads, quantizes and takes LoRA like any other.
"""

from __future__ import annotations

import math

import torch

from distributed_peft.config.model import COPY_CIRCUIT_PREVIOUS_TOKEN_PAIRS as PREVIOUS_TOKEN_PAIRS

ATTENTION_MARGIN = 10.0  # logits between the wanted key and the others, at init
COPY_GAIN = 3.0  # the copied token's vector against the current token's, in the residual stream
OUTPUT_LOGIT = 10.0  # the copied token's logit at init


@torch.no_grad()
def wire_copy_circuit(model, seed: int) -> None:
    """Set a freshly initialized LlamaForCausalLM's weights to the copying circuit described above (in place).

    config.model.copy_circuit_problem has checked that the shape takes it."""
    config = model.config
    d, heads = config.hidden_size, config.num_attention_heads
    h = d // heads
    half = h // 2
    n_token = h - 1  # dims 1..h-1; dim 0 is the constant
    inv_freq = model.model.rotary_emb.inv_freq.double()
    token_vectors = torch.randn(config.vocab_size, n_token, generator=torch.Generator().manual_seed(seed))
    token_vectors /= token_vectors.norm(dim=1, keepdim=True)

    embed = model.model.embed_tokens.weight
    embed[:, : 2 * h] = 0.0
    embed[:, 0] = 1.0
    embed[:, 1 : 1 + n_token] = token_vectors
    layers = model.model.layers
    for layer in layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    first, second = layers[0].self_attn, layers[1].self_attn
    for projection in (first.q_proj, first.k_proj, first.v_proj, second.q_proj, second.k_proj, second.v_proj):
        projection.weight[:h] = 0.0  # head 0 (and kv head 0) only

    # Layer 0, head 0: the residual is [1, token, 0], RMS-normalized to sqrt(d/2) per unit.
    scale0 = math.sqrt(d / 2)
    theta = inv_freq[:PREVIOUS_TOKEN_PAIRS]
    amplitude = math.sqrt(ATTENTION_MARGIN * math.sqrt(h) / float((1 - torch.cos(theta)).sum())) / scale0
    for i, angle in enumerate(theta.tolist()):  # score(query t, key s) ~ sum_i cos(angle_i * (t - s - 1))
        first.k_proj.weight[i, 0] = amplitude
        first.q_proj.weight[i, 0] = amplitude * math.cos(angle)
        first.q_proj.weight[i + half, 0] = -amplitude * math.sin(angle)
    identity = torch.eye(n_token)
    first.v_proj.weight[:n_token, 1 : 1 + n_token] = identity  # the token's vector
    first.o_proj.weight[h : h + n_token, :n_token] = identity * (1.0 / scale0)  # ... unit norm, into dims h..2h-1

    # Layer 1, head 0: the residual is [1, token, previous token], RMS-normalized to sqrt(d/3) per unit.
    scale1 = math.sqrt(d / 3)
    slow_pairs = range(half // 2, half)  # RoPE turns these by under 0.1 rad per 10 positions: content, not place
    matched = 2 * len(slow_pairs)
    beta = math.sqrt(ATTENTION_MARGIN * math.sqrt(h) * n_token / (scale1**2 * matched))
    rows = [row for i in slow_pairs for row in (i, i + half)]  # the k-th reads token dim k, the key its previous
    for k, row in enumerate(rows):
        second.q_proj.weight[row, 1 + k] = beta
        second.k_proj.weight[row, h + k] = beta
    second.v_proj.weight[:n_token, 1 : 1 + n_token] = identity
    second.o_proj.weight[1 : 1 + n_token, :n_token] = identity * (COPY_GAIN / scale1)

    # lm_head reads the token vectors; the final residual's token part is ~ token + COPY_GAIN * copied token.
    scale_final = math.sqrt(d / (2 + COPY_GAIN**2 + 1))
    lm_head = model.lm_head.weight
    lm_head[:, : 2 * h] = 0.0
    lm_head[:, 1 : 1 + n_token] = token_vectors * OUTPUT_LOGIT / (COPY_GAIN * scale_final)
