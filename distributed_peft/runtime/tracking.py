"""Metrics of a run: metrics.jsonl always, TensorBoard and wandb when asked, loss.png at the end. Rank 0 only."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distributed_peft.constants import METRICS_FILE
from distributed_peft.runtime.atomic_files import atomic_write_text
from distributed_peft.runtime.redaction import redact


class RunLog:
    """Writes each logged step to metrics.jsonl and to the optional trackers, on the main process only."""

    def __init__(self, cfg: DictConfig, run_dir: Path, is_main_process: bool, resume_step: int | None = None):
        self.is_main = is_main_process
        self.path = run_dir / METRICS_FILE
        self.trackers: list[Any] = []
        if not self.is_main:
            return
        kept = ""  # a resumed run keeps the rows up to its checkpoint and drops those of the lost steps after it
        if resume_step and self.path.is_file():
            rows = [r for r in read_metrics(run_dir) if r["step"] <= resume_step and "train/loss" in r]
            kept = "".join(f"{json.dumps(row)}\n" for row in rows)  # the final evaluation is written anew
        atomic_write_text(self.path, kept)
        run_name = Path(cfg.output_dir).name
        config = {key: redact(value) if isinstance(value, str) else value
                  for key, value in _flat(OmegaConf.to_container(cfg, resolve=True)).items()}  # fmt: skip
        if cfg.logging.tensorboard:
            from accelerate.tracking import TensorBoardTracker

            self._start(lambda: TensorBoardTracker(run_name, str(run_dir / "tensorboard")), config, "tensorboard")
        if cfg.logging.wandb:
            from accelerate.tracking import WandBTracker

            os.environ.setdefault("WANDB_SILENT", "true")
            kwargs = {"name": run_name, "mode": cfg.logging.wandb_mode, "dir": str(run_dir)}
            self._start(lambda: WandBTracker(cfg.logging.wandb_project, **kwargs), config, "wandb")

    def _start(self, make_tracker, config: dict[str, Any], name: str) -> None:
        try:
            tracker = make_tracker()
            tracker.start()
            tracker.store_init_configuration(config)
            self.trackers.append(tracker)
        except Exception as exc:  # a tracker must never fail a run (wandb not logged in, no network...)
            warnings.warn(f"logging.{name}: disabled for this run: {str(exc).splitlines()[0]}", stacklevel=2)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for tracker in list(self.trackers):
            try:
                tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
            except Exception as exc:
                warnings.warn(f"tracker {tracker.name} failed and is disabled: {exc}", stacklevel=2)
                self.trackers.remove(tracker)

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception as exc:
                warnings.warn(f"tracker {tracker.name} did not close cleanly: {exc}", stacklevel=2)


# Notices that say nothing about the run: bitsandbytes' optional `kernels` package, DeepSpeed's accelerator guess.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "DeepSpeed")


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def showing_third_party_notices(debug: bool = False) -> bool:
    """`logging.debug=true` or DPEFT_DEBUG=1: every third-party notice is shown as the library prints it."""
    return debug or os.environ.get("DPEFT_DEBUG") == "1"


def quiet_third_party_notices(debug: bool = False) -> None:
    """A normal run prints our progress and results: third-party warnings and FutureWarnings are silenced where they
    arise (their loggers filtered before the libraries import), unless `logging.debug=true` or DPEFT_DEBUG=1."""
    if showing_third_party_notices(debug):
        return
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)  # the same object the library gets when it imports later
        if not any(isinstance(f, _ErrorsOnly) for f in logger.filters):
            logger.addFilter(_ErrorsOnly())
    warnings.filterwarnings("ignore", category=FutureWarning)


# DeepSpeed's comm backend loads its shared-memory op on CPU and says so with a print(), on every rank.
DEEPSPEED_OP_LOADED = re.compile(r"DeepSpeed \S+ built successfully")


@contextlib.contextmanager
def quiet_deepspeed_setup(debug: bool = False) -> Iterator[None]:
    """Around the Accelerator's DeepSpeed setup (a DeepSpeed launch only): its op builder's probe of which ops this
    machine can build, run first with its output captured at fd level (compiler lines `gcc ... -o /tmp/...` through
    the root logger, "[WARNING] async_io requires ..." prints; shown again if the probe fails), then the setup itself
    with the comm op's "... built successfully" print left out. Everything shows with logging.debug or DPEFT_DEBUG=1.
    """
    if showing_third_party_notices(debug) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        yield
        return
    with _output_captured_unless_failing():
        try:
            import deepspeed.ops
        except ImportError:  # accelerate says what is missing when it sets DeepSpeed up
            pass
        else:
            deepspeed.ops.__compatible_ops__  # noqa: B018 (probed on first access, once per process, then cached)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        lines = printed.getvalue().splitlines(keepends=True)
        sys.stdout.write("".join(line for line in lines if not DEEPSPEED_OP_LOADED.fullmatch(line.strip())))


@contextlib.contextmanager
def _output_captured_unless_failing() -> Iterator[None]:
    """This process's stdout and stderr (its children's too) into a temporary file, written to stderr on an error."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as captured:
        try:
            for fd in saved:
                os.dup2(captured.fileno(), fd)
            yield
        except BaseException:
            captured.seek(0)
            output = captured.read()
            raise
        else:
            output = b""
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            if output:
                sys.stderr.write(output.decode(errors="replace"))


def quiet_library_progress() -> None:
    """Only our progress bar is shown: datasets' and transformers' per-call bars are noise in a training log."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # no line per file of every checkpoint


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
