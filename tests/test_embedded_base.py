"""The embedded bases: built offline from their configs, deterministic for a seed, with a usable tokenizer."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config

from distributed_peft.data.task_data import IGNORE_INDEX
from distributed_peft.errors import ConfigError
from distributed_peft.modeling.embedded_base import (
    PretrainingMix,
    base_dir,
    build_base,
    copy_blocks,
    thread_invariant_layer_norms,
    weights_fingerprint,
)
from distributed_peft.modeling.loading import load_tokenizer

QUICK = ["model.base.pretrain_steps=3", "model.base.pretrain_batch_size=4"]


@pytest.mark.slow
def test_same_seed_gives_the_same_base_and_another_seed_does_not(tmp_path, monkeypatch):
    fingerprints = []
    for home, seed in [("a", 0), ("b", 0), ("c", 1)]:
        monkeypatch.setenv("DPEFT_HOME", str(tmp_path / home))
        directory = build_base(compose_config(["model=tiny-llama", *QUICK, f"model.base.seed={seed}"]).model)
        fingerprints.append(json.loads((directory / "dpeft_base.json").read_text())["fingerprint"])
        assert fingerprints[-1] == weights_fingerprint(directory)
    assert fingerprints[0] == fingerprints[1]
    assert fingerprints[0] != fingerprints[2]


def test_cache_key_follows_the_base_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("DPEFT_HOME", str(tmp_path))
    default = base_dir(compose_config(["model=tiny-llama"]).model)
    assert default.parent == tmp_path / "bases"
    assert base_dir(compose_config(["model=tiny-llama", "model.base.pretrain_steps=10"]).model) != default
    for override in ("model.base.pretrain_copy_share=0.5", "model.base.pretrain_copy_separator='<copy>'"):
        assert base_dir(compose_config(["model=tiny-llama", override]).model) != default, override
    assert base_dir(compose_config(["model=tiny-llama"]).model) == default


def test_copy_blocks_carry_loss_on_the_copy_only(bases):
    tokenizer = load_tokenizer(str(bases["tiny-llama"]))
    base = compose_config(["model=tiny-llama", "model.base.pretrain_seq_len=32"]).model.base
    fields = ["you are a fool", "SELECT name FROM t", "a" * 200]
    inputs, labels = copy_blocks(fields, tokenizer, base)
    assert inputs.shape[1] == 32 and inputs.shape == labels.shape
    sep = tokenizer.convert_tokens_to_ids("<sep>")
    for row, row_labels in zip(inputs.tolist(), labels.tolist(), strict=True):
        starts = [0] + [i + 1 for i, t in enumerate(row) if t == tokenizer.eos_token_id][:-1]
        for start in starts:
            if sep not in row[start:]:
                break
            middle = row.index(sep, start)
            source = row[start:middle]
            copy = row[middle + 1 : middle + 1 + len(source)]
            assert copy == source and row[middle + 1 + len(source)] == tokenizer.eos_token_id
            assert row_labels[start : middle + 1] == [IGNORE_INDEX] * (middle + 1 - start)
            assert row_labels[middle + 1 : middle + 2 + len(source)] == [*source, tokenizer.eos_token_id]
    assert sum(row.count(sep) for row in inputs.tolist()) == 3, "every field once, the long one cut to fit"


def test_pretraining_mix_takes_the_copy_share_of_each_batch():
    import torch

    lm = torch.zeros(10, 4, dtype=torch.long)
    copy = (torch.ones(7, 4, dtype=torch.long), torch.full((7, 4), IGNORE_INDEX))
    base = compose_config(["model=tiny-llama", "model.base.pretrain_batch_size=8"]).model.base
    mix = PretrainingMix(lm, copy, base)
    for _ in range(5):  # past the end of both sources: they are reshuffled, never short
        inputs, labels = mix.batch()
        assert inputs.shape == (8, 4) and int(inputs[:, 0].sum()) == 6, "round(8 * 0.8) copy rows"
        assert torch.equal(labels[:2], inputs[:2]) and (labels[2:] == IGNORE_INDEX).all()
    base.pretrain_copy_share = 0.0
    assert int(PretrainingMix(lm, copy, base).batch()[0].sum()) == 0, "share 0: plain causal LM only"


def test_bloom_gradients_do_not_depend_on_the_thread_count():
    """The fused CPU LayerNorm backward sums per thread: BLOOM's pretraining gave other weights with 2 threads."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    threads = torch.get_num_threads()
    grads = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            torch.manual_seed(0)
            model = BloomForCausalLM(BloomConfig(vocab_size=256, hidden_size=64, n_layer=1, n_head=2))
            batch = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
            with thread_invariant_layer_norms(model):
                model(input_ids=batch, labels=batch).loss.backward()
            grads.append({name: param.grad for name, param in model.named_parameters()})
            assert "forward" not in vars(model.transformer.ln_f), "the LayerNorms are restored afterwards"
    finally:
        torch.set_num_threads(threads)
    assert [name for name in grads[0] if not torch.equal(grads[0][name], grads[1][name])] == []


@pytest.mark.parametrize(
    "override,problem",
    [
        ("model.base.pretrain_copy_share=1.5", "model.base.pretrain_copy_share=1.5 is invalid; it must be a number"),
        ("model.base.pretrain_copy_separator='a b'", "model.base.pretrain_copy_separator='a b' is invalid; it must"),
        ("model.base.pretrain_copy_separator='</s>'", "model.base.pretrain_copy_separator='</s>' is invalid; it must"),
    ],
)
def test_bad_copy_settings_are_one_line_each(override, problem):
    with pytest.raises(ConfigError) as error:
        compose_config(["model=tiny-llama", override])
    assert len(error.value.problems) == 1 and error.value.problems[0].startswith(problem)


@pytest.mark.parametrize("model,family_class", [("tiny-llama", "LlamaForCausalLM"), ("tiny-bloom", "BloomForCausalLM")])
def test_built_base_is_a_pretrained_transformers_model(model, family_class, bases):
    from transformers import AutoModelForCausalLM

    metadata = json.loads((bases[model] / "dpeft_base.json").read_text())
    assert 500_000 < metadata["parameters"] < 5_000_000
    assert set(metadata["corpus"]["files"]) == {"detox.jsonl", "instruct.jsonl", "sql.jsonl"}, "never heldout/"
    assert metadata["corpus"]["records"] == 7900 and metadata["pretrain"]["copy_blocks"] > 0
    # real text is less predictable than the old template text (built: llama 3.95 -> 1.29, bloom 7.63 -> 2.77)
    assert metadata["pretrain"]["final_loss"] < metadata["pretrain"]["first_loss"] / 2, "pretraining did not learn"
    network = AutoModelForCausalLM.from_pretrained(bases[model])
    assert type(network).__name__ == family_class
    dims = [m.weight.shape for m in network.modules() if type(m).__name__ == "Linear"]
    assert all(d % 64 == 0 for shape in dims for d in shape), "bitsandbytes' CPU kernels need multiples of 64"


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bloom"])
def test_tokenizer_has_pad_bos_eos_and_roundtrips(model, bases):
    tokenizer = load_tokenizer(str(bases[model]))
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    text = "SELECT name FROM employees WHERE salary > 5000 -- ünïcode ok"
    ids = tokenizer(text)["input_ids"]
    assert (ids[0] == tokenizer.bos_token_id) == (model == "tiny-llama"), "Llama adds <s>, BLOOM adds nothing"
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
