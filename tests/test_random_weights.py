"""model.weights=random: a real architecture from its bundled Hub config.json with seeded random weights, no network."""

from __future__ import annotations

import json
import resource
import socket
from pathlib import Path

import pytest
from conftest import compose_config

from distributed_peft.errors import ConfigError

# A shrunk copy of each architecture (its config.json with these keys replaced): every width a multiple of 64, as
# bitsandbytes' CPU 4-bit kernels need, and the vocabulary of the embedded tokenizer it borrows.
SHRUNK = {
    "llama-3.2-1b": ["hidden_size=128", "intermediate_size=256", "num_hidden_layers=2", "num_attention_heads=4",
                     "num_key_value_heads=2", "head_dim=32", "vocab_size=4096"],
    "bloom-1b1": ["hidden_size=128", "n_layer=2", "n_head=4", "vocab_size=4096"],
}  # fmt: skip


def random_model(name: str, *extra: str):
    overrides = [f"+model.config_overrides.{kv}" for kv in SHRUNK[name]]
    return compose_config([f"model={name}", "model.weights=random", *overrides, *extra])


@pytest.mark.parametrize(
    "name,parameters",
    [("llama-3.2-1b", 1_235_814_400), ("bloom-1b1", 1_065_314_304), ("mistral-7b", 7_241_732_096)],
)
def test_a_bundled_config_builds_the_real_architecture_on_the_meta_device(name, parameters):
    """Llama-3.2-1B is the published 1.24e9 parameters (tied embeddings counted once), built without allocating."""
    from distributed_peft.modeling.random_base import parameter_count, random_model_config

    cfg = compose_config([f"model={name}", "model.weights=random"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert parameter_count(random_model_config(cfg.model)) == parameters
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 256, f"building {name} on the meta device grew the peak RSS by {grown_mib:.0f} MiB"


def test_a_base_is_built_whole_on_the_building_rank_inside_a_zero3_run():
    """Rank 0 builds a missing base while the other ranks wait at a barrier: transformers must not partition it with
    deepspeed.zero.Init (a collective they never join); the ZeRO-3 setting is back once the base is built."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from distributed_peft.modeling.random_base import parameter_count, random_model_config

    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        cfg = compose_config(["model=llama-3.2-1b", "model.weights=random"])
        assert parameter_count(random_model_config(cfg.model)) == 1_235_814_400
        assert is_deepspeed_zero3_enabled(), "the run's ZeRO-3 setting is restored"
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        del zero3


def test_random_weights_settings_are_checked_in_one_line_each():
    cases = {
        ("model=llama-3.2-1b", "model.weights=randm"): "model.weights='randm' is not allowed; allowed: pretrained, "
        "random",
        ("model=tiny-llama", "model.weights=random"): "model.weights='random' is invalid for model 'tiny-llama'; "
        "allowed: pretrained, or random for a model with a bundled Hub config: bloom-1b1, bloom-560m, llama-2-7b, "
        "llama-3.2-1b, mistral-7b",
        ("model=llama-3.2-1b", "+model.config_overrides.num_hidden_layers=2"): "model.config_overrides="
        "{'num_hidden_layers': 2} is invalid with model.weights='pretrained'; allowed: overrides only with "
        "model.weights=random",
        ("model=bloom-1b1", "model.weights=random", "+model.config_overrides.num_layers=2"): "model.config_overrides."
        "num_layers is not a key of bloom-1b1's config.json; allowed: architectures, model_type, "
        "apply_residual_connection_post_layernorm, attention_dropout, bos_token_id, eos_token_id, hidden_dropout, "
        "hidden_size, initializer_range, layer_norm_epsilon, n_head, n_layer, pad_token_id, pretraining_tp, "
        "slow_but_exact, vocab_size",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError) as error:
            compose_config(list(overrides))
        assert error.value.problems == [message]


def test_the_recipe_digest_follows_the_architecture_the_seed_and_the_dtype():
    from distributed_peft.modeling.embedded_base import base_dir
    from distributed_peft.modeling.random_base import random_base_dir, random_digest, tokenizer_base_config

    digest = random_digest(random_model("llama-3.2-1b").model)
    assert random_digest(random_model("llama-3.2-1b").model) == digest
    for extra in ("model.init_seed=1", "model.torch_dtype=float32", "+model.config_overrides.rms_norm_eps=1e-6"):
        assert random_digest(random_model("llama-3.2-1b", extra).model) != digest, extra
    assert random_base_dir(random_model("llama-3.2-1b").model).name == f"llama-3.2-1b-random-{digest}"
    for family, embedded in (("llama", "tiny-llama"), ("mistral", "tiny-llama"), ("bloom", "tiny-bloom")):
        # the tokenizer comes from the very base `model=tiny-llama` builds (the cached one, not a second build)
        assert base_dir(tokenizer_base_config(family)) == base_dir(compose_config([f"model={embedded}"]).model)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt (a Hub probe, a download) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-3.2-1b", "bloom-1b1"])
def test_qlora_on_a_random_real_architecture_trains_offline_and_records_its_random_base(
    name, tmp_path, bases, no_network
):
    import bitsandbytes as bnb
    import torch

    from distributed_peft.adapters.storage import check_base_matches
    from distributed_peft.errors import AdapterError
    from distributed_peft.modeling.loading import BaseIdentity, resolve_base
    from distributed_peft.training.recipe import FinetuneRecipe

    cfg = random_model(name, "task=sql", "peft=qlora", "training=demo", "training.max_steps=3",
                       "task.data.max_examples=40", "training.max_eval_examples=8", "training.eval_steps=0",
                       "evaluation.generate=false", "logging.progress_bar=false", f"output_dir={tmp_path}")  # fmt: skip
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    try:
        config = json.loads((Path(recipe.base_path) / "config.json").read_text())
        assert (config["hidden_size"], config["vocab_size"]) == (128, 4096)
        assert config["pad_token_id"] == recipe.tokenizer.pad_token_id  # the borrowed tokenizer's ids
        quantized = [m for m in recipe.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(quantized) == (14 if name == "llama-3.2-1b" else 8)  # every projection of 2 layers, 4-bit
        lora_b = {n: p.detach().clone() for n, p in recipe.model.named_parameters() if "lora_B" in n}
        recipe.train()
        moved = [n for n, p in recipe.model.named_parameters() if "lora_B" in n and not torch.equal(p, lora_b[n])]
        assert len(moved) == len(lora_b) > 0, "training did not update every LoRA B matrix"
        recipe.save()
    finally:
        recipe.cleanup()

    metadata = json.loads((tmp_path / "adapter" / "dpeft_adapter.json").read_text())
    base = metadata["base"]
    _, identity = resolve_base(cfg.model)  # the cached base: the same recipe, the same identity
    assert base["weights"] == "random" and base["fingerprint"] == identity.fingerprint
    assert base["fingerprint"].startswith("random:") and base["name"] == name
    check_base_matches(metadata, identity)
    pretrained = BaseIdentity(name, cfg.model.family, cfg.model.name_or_path, f"hub:{cfg.model.name_or_path}")
    with pytest.raises(AdapterError, match="base fingerprint random:"):
        check_base_matches(metadata, pretrained)  # never taken for an adapter of the real checkpoint
