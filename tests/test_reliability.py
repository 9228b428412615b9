"""A run that meets a NaN, a full disk, a failing write or a planted secret: it says what happened in one line,
keeps its last good checkpoint, leaves nothing partial that looks valid, and writes no secret anywhere."""

from __future__ import annotations

import errno
import json
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, compose_config, run_entry
from omegaconf import OmegaConf

from distributed_peft.config import group_options
from distributed_peft.errors import DIVERGED_EXIT_CODE, StorageError
from distributed_peft.modeling import objective
from distributed_peft.runtime.atomic_files import TMP_PREFIX
from distributed_peft.training.checkpoints import checkpoint_problem, list_checkpoints
from distributed_peft.training.recipe import FinetuneRecipe, run_training

QUICK = [
    "task=detox",
    "model=tiny-llama",
    "training=demo",
    "task.data.max_examples=80",
    "training.eval_steps=0",
    "training.max_eval_examples=8",
    "peft.dropout=0",
    "evaluation.generate=false",
    "logging.progress_bar=false",
]


def nan_loss_on_training_calls(monkeypatch, is_bad) -> None:
    """Make the training loss NaN on the training forward passes (counted from 1) that `is_bad` picks."""
    real = objective.token_stats
    calls = {"n": 0}

    def token_stats(logits, targets, **kwargs):
        stats = real(logits, targets, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if is_bad(calls["n"]):
                stats["loss_sum"] = stats["loss_sum"] * float("nan")
        return stats

    monkeypatch.setattr(objective, "token_stats", token_stats)


def lora_weights(recipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}


def test_a_nan_loss_skips_the_update_and_the_next_step_trains(monkeypatch, tmp_path, bases):
    recipe = FinetuneRecipe(compose_config([*QUICK, "training.max_steps=4", f"output_dir={tmp_path}"]))
    recipe.setup()
    try:
        windows = recipe._windows()
        before = lora_weights(recipe)
        nan_loss_on_training_calls(monkeypatch, lambda call: call == 1)
        metrics = recipe.train_step(next(windows))
        assert metrics["train/skipped_nonfinite"] == 1.0
        after_nan = lora_weights(recipe)
        assert all(torch.equal(before[n], after_nan[n]) for n in before), "a NaN step changed the adapter"
        assert not recipe.optimizer.state_dict()["state"], "the optimizer stepped (its moments exist) on a NaN loss"
        for _ in range(2):  # B starts at zero, so A first moves on the second update
            metrics = recipe.train_step(next(windows))
            assert metrics["train/skipped_nonfinite"] == 0.0 and metrics["train/loss"] > 0
        after = lora_weights(recipe)
        changed = [n for n in before if not torch.equal(after_nan[n], after[n])]
        assert len(changed) == len(before), "every LoRA tensor must train on the finite steps after the NaN"
    finally:
        recipe.cleanup()


def test_a_lasting_nan_stops_with_one_line_exit_3_and_keeps_the_last_good_checkpoint(monkeypatch, tmp_path, bases):
    nan_loss_on_training_calls(monkeypatch, lambda call: call > 4)
    argv = [*QUICK, "training.max_steps=20", "training.checkpoint_every=2", "training.max_nonfinite_steps=2"]
    code, lines = run_entry(monkeypatch, "dpeft-train", [*argv, f"output_dir={tmp_path}"])
    assert code == DIVERGED_EXIT_CODE, "\n".join(lines)
    good = tmp_path / "checkpoints" / "step-000004"
    assert lines == [
        "dpeft-train: error: training.max_nonfinite_steps=2: the loss was NaN/inf at 3 steps (the last at step 7); "
        f"stopped. Last good checkpoint: {good}; lower training.lr or check the data"
    ]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000002"]
    assert checkpoint_problem(good) is None
    assert not (tmp_path / "adapter").exists()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["train/skipped_nonfinite"]] == [5, 6, 7]


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_not_enough_disk_is_one_line_before_training_starts(monkeypatch, tmp_path, bases):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    code, lines = run_entry(monkeypatch, "dpeft-train", [*QUICK, "training.max_steps=4", f"output_dir={tmp_path}"])
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"dpeft-train: error: output_dir='{tmp_path}' has 1 MiB free; this run needs about")
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "adapter").exists()


def test_a_failing_checkpoint_write_is_one_line_and_the_previous_checkpoint_stays(monkeypatch, tmp_path, bases):
    from accelerate import Accelerator

    real_save_state, calls = Accelerator.save_state, {"n": 0}

    def save_state(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: the disk fills half way
            Path(output_dir).mkdir(parents=True)
            Path(output_dir, "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    cfg = compose_config([*QUICK, "training.max_steps=6", "training.checkpoint_every=2", f"output_dir={tmp_path}"])
    with pytest.raises(StorageError) as error:
        run_training(cfg)
    first = tmp_path / "checkpoints" / "step-000002"
    assert str(error.value) == (
        f"cannot write {tmp_path / 'checkpoints' / 'step-000004'}: the disk is full; nothing partial was left under "
        f"that name (the last complete checkpoint is {first})"
    )
    assert list_checkpoints(tmp_path) == [first] and checkpoint_problem(first) is None
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]
    assert not (tmp_path / "adapter").exists()


def test_a_crash_while_saving_the_adapter_leaves_no_adapter_directory(monkeypatch, tmp_path, bases):
    from transformers import PreTrainedTokenizerBase

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    with pytest.raises(StorageError, match=r"cannot write .*adapter: the disk is full"):
        run_training(compose_config([*QUICK, "training.max_steps=2", f"output_dir={tmp_path}"]))
    assert not (tmp_path / "adapter").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


PLANTED = {
    "HF_TOKEN": "hf_PlantedTokenForTheLeakTest0123456789abcd",
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
    "MY_SERVICE_PASSWORD": "planted-password-5f3a9c",
}


@pytest.mark.slow
def test_planted_secrets_appear_in_no_output_log_or_card(monkeypatch, capfd, tmp_path, bases):
    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    overrides = [
        *QUICK,
        "training.max_steps=2",
        "logging.tensorboard=true",
        "logging.wandb=true",
        # a user who pulls a secret into the config by mistake: it is masked wherever the config is written
        "task.description=${oc.env:MY_SERVICE_PASSWORD}",
        f"output_dir={tmp_path / 'run'}",
    ]
    monkeypatch.setattr(sys, "argv", ["dpeft-train", *overrides])
    run_training(compose_config(overrides))
    printed = capfd.readouterr()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10 and any("wandb" in str(p) for p in written) and any("tfevents" in p.name for p in written)
    for value in PLANTED.values():
        assert value not in printed.out + printed.err
        leaks = [str(p) for p in written if value.encode() in p.read_bytes()]
        assert not leaks, f"secret found in {leaks}"
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").task.description == "***"  # masked, and loads back


def test_a_config_value_that_is_a_secret_is_masked_and_the_yaml_still_loads(monkeypatch):
    from distributed_peft.config import to_yaml

    monkeypatch.setenv("MY_SERVICE_PASSWORD", PLANTED["MY_SERVICE_PASSWORD"])
    cfg = compose_config(
        ["task.description=${oc.env:MY_SERVICE_PASSWORD}", "task.name=x-${oc.env:MY_SERVICE_PASSWORD}"]
    )
    text = to_yaml(cfg)
    assert PLANTED["MY_SERVICE_PASSWORD"] not in text
    loaded = OmegaConf.create(text)  # a bare *** would be a YAML alias: the dump must quote it
    assert (loaded.task.description, loaded.task.name, loaded.model.name) == ("***", "x-***", cfg.model.name)


def test_remote_code_is_never_trusted_unless_the_user_says_so():
    assert all(not compose_config([f"model={name}"]).model.trust_remote_code for name in group_options("model"))
    sources = [p.read_text() for p in (PROJECT_ROOT / "distributed_peft").rglob("*.py")]
    assert sum(text.count("trust_remote_code=True") for text in sources) == 0
    assert sum(text.count('"trust_remote_code": cfg.model.trust_remote_code') for text in sources) == 1
