"""Liger's fused linear cross-entropy as the training loss, and the attention packed rows get on CPU and CUDA.

CUDA and the Liger kernel are faked here: a plain-torch function with Liger's signature stands in for the fused loss,
and the attention choice is given its device and flash-attn availability. `make gpu-check` runs the real ones.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import packed_lora_llama

from distributed_peft.data.batching import collate_packed, model_inputs
from distributed_peft.data.task_data import IGNORE_INDEX, collate_padded
from distributed_peft.modeling import loading, objective, packed_attention
from distributed_peft.modeling.loading import load_base_model
from distributed_peft.modeling.objective import CompletionLoss, count_label_tokens
from distributed_peft.modeling.packed_attention import PACKED_SDPA, packed_attention_implementation
from distributed_peft.training.loop import backward_window


@pytest.fixture(scope="module")
def tiny(bases):
    """A float32 LoRA model on tiny-llama (4 layers) with the CPU packed kernel, B nudged off zero, and 6 examples."""
    return packed_lora_llama(bases)


class FakeLigerCrossEntropy:
    """liger_fused_linear_cross_entropy's signature and semantics in plain torch; records what it was given."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, input, weight, target, bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
                 label_smoothing=0.0, reduction="mean", **unused):  # fmt: skip
        self.calls.append({"input": input.shape, "weight": weight, "target": target, "ignore_index": ignore_index,
                           "reduction": reduction})  # fmt: skip
        logits = F.linear(input, weight, bias).float()
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def window_loss_and_grads(model, batch, loss: CompletionLoss) -> tuple[float, dict[str, torch.Tensor]]:
    """The training loop's backward over a one-batch window (single process), and the LoRA gradients it left."""
    from accelerate import Accelerator

    model.zero_grad(set_to_none=True)
    tokens = count_label_tokens(batch["labels"])
    loss_sum, skipped = backward_window(Accelerator(cpu=True), model, [batch], tokens, loss)
    assert not skipped
    return loss_sum, lora_grads(model)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_liger_fused_loss_equals_the_logits_loss_with_prompt_labels_ignored(tiny, monkeypatch, packed):
    _, model, examples, tokenizer = tiny
    model.train()
    batch = collate_packed(examples) if packed else collate_padded(examples, tokenizer)
    fake = FakeLigerCrossEntropy()
    monkeypatch.setattr(objective, "fused_linear_cross_entropy", lambda: fake)
    plain_loss, plain_grads = window_loss_and_grads(model, batch, CompletionLoss(model))
    assert fake.calls == [], "a run with liger off never calls the fused loss"
    fused_loss, fused_grads = window_loss_and_grads(model, batch, CompletionLoss(model, fused=True))

    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert call["reduction"] == "sum" and call["ignore_index"] == IGNORE_INDEX
    assert call["weight"] is model.get_base_model().lm_head.weight, "the output layer's own weight"
    target = call["target"]
    assert call["input"] == (target.numel(), model.config.hidden_size), "hidden states at the kept positions only"
    assert target.numel() < batch["labels"][:, 1:].numel(), "prompt-only positions are not projected"
    if not packed:  # one packed row keeps only labelled positions; padded rows share positions with others' prompts
        assert (target == IGNORE_INDEX).any(), "kept positions include other rows' prompt tokens, to be ignored"
    assert int((target != IGNORE_INDEX).sum()) == count_label_tokens(batch["labels"])
    assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
    for name, grad in fused_grads.items():
        assert torch.allclose(grad, plain_grads[name], rtol=1e-5, atol=1e-5), f"{name}: {(grad - plain_grads[name])}"
    with torch.no_grad():  # the output layer is itself again: evaluation still gets logits
        logits = model(**model_inputs(batch)).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)


def test_liger_off_never_looks_up_the_fused_loss(tiny, monkeypatch):
    _, model, examples, tokenizer = tiny

    def unavailable():
        raise AssertionError("liger off must not reach the fused loss")

    monkeypatch.setattr(objective, "fused_linear_cross_entropy", unavailable)
    loss = CompletionLoss(model, fused=False)
    with torch.no_grad():
        assert torch.isfinite(loss(model, collate_padded(examples[:2], tokenizer)))
    with pytest.raises(AssertionError, match="liger off"):
        CompletionLoss(model, fused=True)  # the path is chosen (and the function looked up) once, at setup


def test_liger_kernels_patch_the_model_but_leave_its_forward_to_our_loss(monkeypatch):
    """On CUDA with liger-kernel installed: Liger's norms/RoPE/SwiGLU go in, its own fused-loss forward does not."""
    seen = {}
    fake_module = types.ModuleType("liger_kernel.transformers")
    fake_module._apply_liger_kernel_to_instance = lambda **kwargs: seen.update(kwargs)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake_module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = torch.nn.Linear(2, 2)
    assert loading.apply_liger_kernel(model) is True
    assert seen == {"model": model, "fused_linear_cross_entropy": False, "cross_entropy": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="need CUDA"):
        assert loading.apply_liger_kernel(model) is False


@pytest.mark.parametrize(
    ("configured", "cuda", "flash_attn", "chosen"),
    [
        ("sdpa", False, False, PACKED_SDPA),  # CPU: sdpa per packed example
        ("sdpa", False, True, PACKED_SDPA),
        ("sdpa", True, True, "flash_attention_2"),  # CUDA: flash-attention's varlen kernels read the boundaries
        ("sdpa", True, False, "sdpa"),  # CUDA without flash-attn: transformers' packed-sequence mask
        ("flash_attention_2", False, False, "flash_attention_2"),  # what the user configured stays
        ("flash_attention_3", True, True, "flash_attention_3"),
    ],
)
def test_packed_attention_choice(configured, cuda, flash_attn, chosen):
    assert packed_attention_implementation(configured, cuda=cuda, flash_attn=flash_attn) == chosen


@pytest.mark.parametrize("flash_attn", [True, False])
def test_packed_attention_choice_detects_cuda_and_flash_attn(monkeypatch, flash_attn):
    import transformers.utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: flash_attn)
    assert packed_attention_implementation("sdpa") == ("flash_attention_2" if flash_attn else "sdpa")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert packed_attention_implementation("sdpa") == PACKED_SDPA


def test_cuda_sdpa_packed_logits_equal_the_cpu_kernel_and_unpacked_rows(tiny, bases, monkeypatch):
    """The CUDA fallback (transformers' packed mask from position_ids) and the CPU kernel give each example's own
    logits, as when it runs alone: checked here on CPU, where both can run."""
    cfg, lora_model, examples, tokenizer = tiny
    chosen = []

    def on_cuda_without_flash(configured, cuda=None, flash_attn=None):
        chosen.append(packed_attention_implementation(configured, cuda=True, flash_attn=False))
        return chosen[-1]

    monkeypatch.setattr(packed_attention, "packed_attention_implementation", on_cuda_without_flash)
    sdpa_model = load_base_model(cfg, str(bases["tiny-llama"])).eval()
    assert chosen == ["sdpa"] and sdpa_model.config._attn_implementation == "sdpa"
    kernel_model = lora_model.get_base_model()
    assert kernel_model.config._attn_implementation == PACKED_SDPA
    batch = collate_packed(examples)
    with torch.no_grad(), lora_model.disable_adapter():
        kernel_model.eval()
        by_kernel = kernel_model(**model_inputs(batch)).logits[0]
        by_mask = sdpa_model(**model_inputs(batch)).logits[0]
        alone = [sdpa_model(**model_inputs(collate_padded([e], tokenizer))).logits[0] for e in examples]
    assert torch.allclose(by_mask, by_kernel, atol=1e-5), (by_mask - by_kernel).abs().max()
    assert torch.allclose(by_mask, torch.cat(alone), atol=1e-5), (by_mask - torch.cat(alone)).abs().max()


def test_packed_kernel_reads_the_boundaries_once_per_batch_not_per_layer(tiny, monkeypatch):
    _, model, examples, _ = tiny
    reads = []
    split_lengths = packed_attention.split_lengths
    monkeypatch.setattr(packed_attention, "split_lengths", lambda bounds: reads.append(1) or split_lengths(bounds))
    assert model.config.num_hidden_layers > 1
    with torch.no_grad():
        for batches, batch in enumerate([collate_packed(examples[:3]), collate_packed(examples[3:])], start=1):
            model(**model_inputs(batch))
            assert len(reads) == batches, "one host read of the boundaries per forward, whatever the layers"
