"""SparseDropout draws nn.Dropout's mask distribution (i.i.d. Bernoulli, kept values scaled) and backprops that mask."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from distributed_peft.modeling import lora_dropout
from distributed_peft.modeling.loading import attach_lora, load_base_model
from distributed_peft.modeling.lora_dropout import SparseDropout, drop_positions


def test_dropped_positions_are_iid_bernoulli():
    torch.manual_seed(0)
    n, p, rows = 200, 0.05, 20000
    positions = drop_positions(n * rows, p)  # one long draw, cut into rows
    assert torch.all(positions[1:] > positions[:-1]) and positions[-1] < n * rows
    masks = torch.zeros(n * rows).index_fill_(0, positions, 1).view(rows, n)
    counts = masks.sum(dim=1)
    assert counts.mean().item() == pytest.approx(n * p, rel=0.02)  # Binomial(n, p): mean n p, variance n p (1 - p)
    assert counts.var().item() == pytest.approx(n * p * (1 - p), rel=0.05)
    assert (masks.mean(dim=0) - p).abs().max() < 0.01
    neighbours = (masks[:, :-1] * masks[:, 1:]).mean().item()  # independent: P(both dropped) = p^2
    assert neighbours == pytest.approx(p * p, rel=0.1)
    starts = torch.zeros(4000, 4)
    for row in starts:  # each call's gaps start at its first element
        row[drop_positions(4, p)] = 1
    assert starts[:, 0].mean().item() == pytest.approx(p, abs=0.011)
    assert starts.mean().item() == pytest.approx(p, abs=0.006)


def test_drops_beyond_one_chunk_of_gaps(monkeypatch):
    monkeypatch.setattr(lora_dropout, "gap_count", lambda expected: 3)  # force many chunks
    torch.manual_seed(0)
    positions = drop_positions(100 * 4000, 0.05)
    assert torch.all(positions[1:] > positions[:-1]) and positions[-1] < 100 * 4000
    counts = torch.zeros(100 * 4000).index_fill_(0, positions, 1).view(4000, 100).sum(dim=1)
    assert counts.mean().item() == pytest.approx(5, rel=0.03)
    assert counts.var().item() == pytest.approx(5 * 0.95, rel=0.1)


def test_forward_scales_kept_values_and_backward_uses_the_same_mask():
    torch.manual_seed(0)
    dropout = SparseDropout(0.1).train()
    x = torch.randn(64, 48, requires_grad=True)
    out = dropout(x.t())  # a non-contiguous input
    kept = out != 0
    assert 0.05 < 1 - kept.float().mean().item() < 0.15
    assert torch.allclose(out[kept], x.t()[kept] / 0.9)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.allclose(x.grad.t(), torch.where(kept, weights / 0.9, 0.0))


def test_seeded_and_identity_when_not_training():
    x = torch.randn(32, 16)
    torch.manual_seed(3)
    first = SparseDropout(0.2).train()(x)
    assert (first == 0).any() and not torch.equal(first, x)  # equality below would hold for an identity too
    torch.manual_seed(3)
    assert torch.equal(first, SparseDropout(0.2).train()(x))
    torch.manual_seed(4)
    assert not torch.equal((first == 0), SparseDropout(0.2).train()(x) == 0), "the mask ignores the seed"
    assert SparseDropout(0.2).eval()(x) is x
    assert SparseDropout(0.0).train()(x) is x


def test_attach_lora_uses_sparse_dropout_with_the_configured_p(bases):
    cfg = compose_config(["model=tiny-llama", "peft=lora", "peft.dropout=0.07"])
    model = attach_lora(load_base_model(cfg, str(bases["tiny-llama"])), cfg)
    dropouts = [m for name, m in model.named_modules() if name.rsplit(".", 2)[-2:-1] == ["lora_dropout"]]
    assert len(dropouts) == model.config.num_hidden_layers * 7
    assert all(type(d) is SparseDropout and d.p == 0.07 for d in dropouts)
