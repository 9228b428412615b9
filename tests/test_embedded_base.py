"""The embedded bases: built offline from their configs, deterministic for a seed, with a usable tokenizer."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config

from distributed_peft.modeling.embedded_base import base_dir, build_base, weights_fingerprint
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
    assert base_dir(compose_config(["model=tiny-llama"]).model) == default


@pytest.mark.parametrize("model,family_class", [("tiny-llama", "LlamaForCausalLM"), ("tiny-bloom", "BloomForCausalLM")])
def test_built_base_is_a_pretrained_transformers_model(model, family_class, bases):
    from transformers import AutoModelForCausalLM

    metadata = json.loads((bases[model] / "dpeft_base.json").read_text())
    assert 1_000_000 < metadata["parameters"] < 5_000_000
    assert metadata["pretrain"]["final_loss"] < metadata["pretrain"]["first_loss"] / 3, "pretraining did not learn"
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
