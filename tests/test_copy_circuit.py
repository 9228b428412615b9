"""The copying circuit wired into the embedded Llama's init (model.base.copy_circuit_init): the base copies what it
read before any pretraining and still after it, which a from-scratch init does not in CPU minutes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config, run_entry

from distributed_peft.modeling.copy_circuit import wire_copy_circuit
from distributed_peft.modeling.embedded_base import (
    base_dir,
    copy_accuracy,
    copy_probe_sentences,
    model_config,
)
from distributed_peft.modeling.loading import load_tokenizer


def fresh_model(overrides: list[str], tokenizer, wired: bool):
    from transformers import AutoModelForCausalLM

    cfg = compose_config(["model=tiny-llama", *overrides]).model
    torch.manual_seed(cfg.base.seed)
    model = AutoModelForCausalLM.from_config(model_config(cfg, tokenizer), dtype=torch.float32)
    if wired:
        wire_copy_circuit(model, cfg.base.seed)
    return model


@pytest.mark.parametrize("shape", [[], ["model.base.num_layers=3", "model.base.hidden_size=256"]])
def test_the_wired_init_copies_held_out_text_before_any_training_and_a_random_one_does_not(bases, shape):
    tokenizer = load_tokenizer(str(bases["tiny-llama"]))
    sentences = copy_probe_sentences(40)
    wired = copy_accuracy(fresh_model(shape, tokenizer, True), tokenizer, "<sep>", sentences)
    random = copy_accuracy(fresh_model(shape, tokenizer, False), tokenizer, "<sep>", sentences)
    # measured: 0.88 (every token but the copy's first); random init: 0.00
    assert wired > 0.8 and random < 0.05, (wired, random)


def test_the_built_base_still_copies_after_pretraining(bases):
    pretrain = json.loads((bases["tiny-llama"] / "dpeft_base.json").read_text())["pretrain"]
    assert pretrain["copy_circuit_init"] is True
    # measured 0.974; 400 steps from a random init: 0.08
    assert pretrain["copy_accuracy"] > 0.9, pretrain["copy_accuracy"]
    assert pretrain["final_loss"] < pretrain["first_loss"] - 1.5


def test_the_circuit_is_part_of_the_base_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("DPEFT_HOME", str(tmp_path))
    default = base_dir(compose_config(["model=tiny-llama"]).model)
    assert base_dir(compose_config(["model=tiny-llama", "model.base.copy_circuit_init=false"]).model) != default


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model=tiny-bloom", "model.base.copy_circuit_init=true"],
            "model.base.copy_circuit_init=True is invalid for family 'bloom'; allowed: false, or true for llama",
        ),
        (
            ["model=tiny-llama", "model.base.num_layers=1"],
            "model.base.copy_circuit_init=True is invalid for this base's shape; it needs num_layers >= 2",
        ),
        (
            ["model=tiny-llama", "model.base.num_heads=1", "model.base.num_kv_heads=1"],
            "model.base.copy_circuit_init=True is invalid for this base's shape; it needs num_heads >= 2",
        ),
    ],
)
def test_a_shape_the_circuit_does_not_fit_is_one_line_before_building(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setenv("DPEFT_HOME", str(tmp_path))
    code, lines = run_entry(monkeypatch, "dpeft-build-base", overrides)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "bases").exists() or not any((tmp_path / "bases").iterdir())
