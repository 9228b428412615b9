"""Run logging: metrics.jsonl always, TensorBoard and offline wandb when asked, and a tracker never fails a run."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config

from distributed_peft.evaluation.reports import plot_loss_curves
from distributed_peft.runtime.tracking import RunLog, read_metrics


@pytest.mark.slow
def test_jsonl_and_tensorboard_and_offline_wandb_receive_every_logged_step(tmp_path):
    cfg = compose_config(["logging=wandb", "logging.tensorboard=true", f"output_dir={tmp_path}"])
    log = RunLog(cfg, tmp_path, is_main_process=True)
    assert sorted(t.name for t in log.trackers) == ["tensorboard", "wandb"]
    for step in range(1, 4):
        log.log({"train/loss": 3.0 / step, "train/tokens_per_s": 100.0}, step)
    log.log({"eval/loss": 1.5, "eval/token_accuracy": 0.5}, 3)
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 3]
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb runs offline unless the user asks otherwise"
    png = plot_loss_curves(tmp_path, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_tracker_is_a_warning_not_a_failed_run(tmp_path, monkeypatch):
    import accelerate.tracking

    class NotLoggedIn(accelerate.tracking.WandBTracker):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=...)")

    monkeypatch.setattr(accelerate.tracking, "WandBTracker", NotLoggedIn)
    cfg = compose_config(["logging=wandb", "logging.wandb_mode=online", f"output_dir={tmp_path}"])
    with pytest.warns(UserWarning, match="logging.wandb: disabled for this run: api_key not configured"):
        log = RunLog(cfg, tmp_path, is_main_process=True)
    log.log({"train/loss": 1.0}, 1)
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 1.0}


def test_only_the_main_process_writes(tmp_path):
    log = RunLog(compose_config([f"output_dir={tmp_path}"]), tmp_path, is_main_process=False)
    log.log({"train/loss": 1.0}, 1)
    assert not (tmp_path / "metrics.jsonl").exists()
