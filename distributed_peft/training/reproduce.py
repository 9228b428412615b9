"""dpeft-reproduce: retrain a shipped adapter from its recorded config and check its metrics against the shipped ones.

    dpeft-reproduce task=detox
    dpeft-reproduce output_dir=runs/reproduce           # every shipped adapter
    dpeft-reproduce prebuilt=path/to/an/exported/adapter

Prints one table per task (metric, prebuilt, reproduced, tolerance, pass/fail) and exits 1 if any metric is out of
tolerance. The embedded base is built first if it is not cached; its fingerprint is compared too. A Hydra app like the
other commands: unknown keys, a task without a prebuilt adapter, a directory that is not one, or an output_dir holding
someone else's files are one line and exit 2; SIGTERM stops it with exit 75 (rerun to resume the training).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distributed_peft.config import TaskConfig, load_recorded_config, unknown_keys
from distributed_peft.constants import ADAPTER_CONFIG, ADAPTER_METADATA, ADAPTER_WEIGHTS, CONF_DIR, PREBUILT_DIR
from distributed_peft.errors import ConfigError, DpeftError, Preempted
from distributed_peft.runtime.output_dirs import run_dir

# Absolute tolerance per metric: retraining on another CPU reorders float sums, so the base and the adapter differ
# in the last bits and greedy decoding can flip a few tokens; the loss moves little, generation metrics more.
TOLERANCES = {
    "loss": 0.02,
    "token_accuracy": 0.01,
    "bleu": 5.0,
    "chrf": 5.0,
    "rouge_l": 5.0,
    "toxic_share": 5.0,
    "repeat_share": 5.0,
    "exact_match": 5.0,
    "execution_accuracy": 5.0,
}
# The tokenizer is the base's own (every loader reads it from the base), so the shipped copy leaves it out: 3.5 MB per
# adapter on SmolLM2. The weights ship in float16 (export_prebuilt), half the bytes in the repository's history.
PREBUILT_FILES = (ADAPTER_CONFIG, ADAPTER_METADATA)
RUN_FILES = {
    "config.yaml": "config.yaml",
    "eval.json": "metrics.json",
    "README.md": "README.md",
    "loss.png": "loss.png",
    "eval_metrics.png": "eval_metrics.png",
    "eval.md": "eval.md",
}


def export_prebuilt(run_dir: Path, destination: Path, heldout_rows: int | None = None) -> Path:
    """Copy a finished run into adapters_prebuilt/<task>: the adapter, its config, metrics, card and plots, and its
    held-out report (heldout.json/.md/.png: the bundled real text it was not trained on, beside the baselines)."""
    from distributed_peft.evaluation.heldout import write_heldout_report

    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    for name in PREBUILT_FILES:
        shutil.copy2(run_dir / "adapter" / name, destination / name)
    save_half_precision(run_dir / "adapter" / ADAPTER_WEIGHTS, destination / ADAPTER_WEIGHTS)
    for source, target in RUN_FILES.items():
        shutil.copy2(run_dir / source, destination / target)
    # real text it was not trained on, in its card (the first `heldout_rows` rows; None: all)
    write_heldout_report(destination, rows=heldout_rows, skip_without_heldout=True)
    return destination


def save_half_precision(source: Path, destination: Path) -> None:
    """The adapter's float32 tensors as float16 (peft casts them back to the LoRA layers' dtype when it loads them)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    half = {name: t.half() if t.is_floating_point() else t for name, t in tensors.items()}
    save_file(half, str(destination), metadata={"format": "pt"})


def compare(prebuilt: dict[str, float], reproduced: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for metric, tolerance in TOLERANCES.items():
        if metric in prebuilt:
            delta = abs(reproduced[metric] - prebuilt[metric])
            rows.append(
                {
                    "metric": metric,
                    "prebuilt": prebuilt[metric],
                    "reproduced": reproduced[metric],
                    "tolerance": tolerance,
                    "passed": delta <= tolerance,
                }
            )
    return rows


def table(task: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"## {task}",
        "",
        "| metric | prebuilt | reproduced | tolerance | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['metric']} | {r['prebuilt']:.4f} | {r['reproduced']:.4f} | ±{r['tolerance']:g} | "
            f"{'pass' if r['passed'] else 'FAIL'} |"
        )
    return "\n".join(lines)


@dataclass
class ReproduceConfig:
    """dpeft-reproduce: which shipped adapters to retrain, and where the retrained runs go."""

    task: Optional[TaskConfig] = None  # task=NAME: the shipped adapter of that task; null: every shipped adapter
    prebuilt: Optional[str] = None  # another prebuilt adapter directory (config.yaml, metrics.json, adapter files)
    output_dir: str = run_dir("reproduce")  # one run directory per task in it, and reproduce.md


ConfigStore.instance().store(name="reproduce_config", node=ReproduceConfig)  # conf/reproduce.yaml starts from it


def available_tasks() -> list[str]:
    return sorted(p.parent.name for p in PREBUILT_DIR.glob("*/config.yaml"))


def check_prebuilt_dir(directory: str | Path, key: str = "prebuilt") -> None:
    """Raise a one-line DpeftError unless `directory` is a prebuilt adapter (config.yaml, metrics.json, adapter)."""
    from distributed_peft.adapters.storage import check_adapter_dir

    directory = Path(directory)
    allowed = "allowed: a directory exported by `make prebuilt` (config.yaml, metrics.json and the adapter files)"
    if not directory.is_dir():
        raise ConfigError(f"{key}={str(directory)!r} is not a directory; {allowed}")
    missing = [name for name in ("config.yaml", "metrics.json") if not (directory / name).is_file()]
    if missing:
        raise ConfigError(
            f"{key}={str(directory)!r} is not a prebuilt adapter: {', '.join(missing)} missing; {allowed}"
        )
    try:
        recorded = OmegaConf.load(directory / "config.yaml")
        load_recorded_config(recorded)
        metrics = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, OmegaConfBaseException) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{key}={str(directory)!r}: config.yaml or metrics.json cannot be read ({reason}); {allowed}"
        ) from exc
    if not isinstance(metrics, dict) or not isinstance(metrics.get("adapter"), dict):
        raise ConfigError(f"{key}={str(directory)!r}: metrics.json has no `adapter` metrics; {allowed}")
    check_adapter_dir(directory)


def legacy_root(directory: Path) -> bool:
    """An output_dir written by dpeft-reproduce before the owner marker: reproduce.md and our run directories."""
    from distributed_peft.runtime.output_dirs import foreign_entries

    if not (directory / "reproduce.md").is_file():
        return False
    others = [p for p in directory.iterdir() if p.name != "reproduce.md"]
    return all(p.is_dir() and (p / "config.yaml").exists() and not foreign_entries(p) for p in others)


def task_overridden(task: DictConfig) -> bool:
    """Whether `task=NAME` came with task.* overrides (which a retraining from config.yaml would ignore)."""
    shipped = CONF_DIR / "task" / f"{task.name}.yaml"
    return shipped.is_file() and task != OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(shipped))


def validate_reproduce(cfg: DictConfig) -> None:
    """Every problem of a dpeft-reproduce command line, one line each; loads and writes nothing."""
    from distributed_peft.runtime.output_dirs import check_output_dir

    problems = unknown_keys(cfg, ReproduceConfig)
    tasks = available_tasks()
    if cfg.task is not None:
        name = cfg.task.name
        if not any(problem.startswith("task.") for problem in problems) and task_overridden(cfg.task):
            problems.append(
                "task.* overrides are not used: dpeft-reproduce retrains from the recorded config.yaml; "
                "allowed: task=NAME alone"
            )
        if cfg.prebuilt is not None:
            problems.append(f"task={name} and prebuilt={cfg.prebuilt!r} both name what to reproduce; allowed: one")
        elif name not in tasks:
            problems.append(
                f"task={name} has no prebuilt adapter; allowed: {', '.join(tasks)}, or no task= for all of them"
            )
    if cfg.prebuilt is not None:
        try:
            check_prebuilt_dir(cfg.prebuilt)
        except DpeftError as error:
            problems += error.problems
    output = Path(cfg.output_dir)
    if not (output.is_dir() and legacy_root(output)):
        try:
            check_output_dir(output)
        except DpeftError as error:
            problems += error.problems
    if problems:
        raise ConfigError(problems)


def sources(cfg: DictConfig) -> list[Path]:
    """The prebuilt adapter directories this command retrains."""
    if cfg.prebuilt is not None:
        return [Path(cfg.prebuilt)]
    return [PREBUILT_DIR / task for task in (available_tasks() if cfg.task is None else [cfg.task.name])]


def finished_earlier(run_dir: Path) -> bool:
    """Whether run_dir holds a finished reproduction: an adapter newer than every checkpoint (a retraining that was
    interrupted has newer checkpoints, and resumes)."""
    adapter = run_dir / "adapter"
    if not adapter.is_dir():
        return False
    saved = adapter.stat().st_mtime
    return all(step.stat().st_mtime <= saved for step in (run_dir / "checkpoints").glob("step-*"))


def reproduce(source: Path, output_root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Retrain one prebuilt adapter from its config.yaml; return the comparison rows and fingerprint check."""
    from distributed_peft.training.recipe import run_training

    cfg = load_recorded_config(OmegaConf.load(source / "config.yaml"))
    cfg.output_dir = str(output_root / source.name)
    if finished_earlier(Path(cfg.output_dir)):  # retrain it, rather than evaluate the earlier adapter again
        cfg.training.resume = "false"
    reproduced = run_training(cfg)  # else an interrupted one (SIGTERM, exit 75) resumes from its checkpoint
    prebuilt = json.loads((source / "metrics.json").read_text())
    recorded = json.loads((source / ADAPTER_METADATA).read_text())["base"]["fingerprint"]
    rebuilt = json.loads((Path(cfg.output_dir) / "adapter" / ADAPTER_METADATA).read_text())["base"]["fingerprint"]
    return compare(prebuilt["adapter"], reproduced["adapter"]), {"recorded": recorded, "rebuilt": rebuilt}


def reproduce_all(directories: list[Path], output_root: Path) -> bool:
    """Retrain each directory's adapter, print and write reproduce.md; True when every metric is within tolerance."""
    from distributed_peft.runtime import termination
    from distributed_peft.runtime.atomic_files import atomic_write_text

    report, failed = ["# Reproduction of adapters_prebuilt", ""], False
    for source in directories:
        print(f"dpeft-reproduce: retraining {source} into {output_root / source.name}", flush=True)
        with termination.phase(f"reproducing {source.name}"):
            rows, fingerprints = reproduce(source, output_root)
        same_base = fingerprints["recorded"] == fingerprints["rebuilt"]
        report += [
            table(source.name, rows),
            "",
            f"base fingerprint {'matches' if same_base else 'DIFFERS (another CPU?)'}: "
            f"recorded {fingerprints['recorded'][:16]}, rebuilt {fingerprints['rebuilt'][:16]}",
            "",
        ]
        failed |= not all(r["passed"] for r in rows)
    text = "\n".join(report)
    atomic_write_text(output_root / "reproduce.md", text)
    print(text)
    print("reproduce: " + ("FAILED" if failed else "all metrics within tolerance"))
    return not failed


def run_reproduce(cfg: DictConfig) -> bool:
    """Retrain, compare, report (the output directory claimed and locked meanwhile); True when all is in tolerance."""
    from distributed_peft.runtime import termination
    from distributed_peft.runtime.output_dirs import OWNER_MARKER, claim_output_dir

    output_root = Path(cfg.output_dir)
    if output_root.is_dir() and not (output_root / OWNER_MARKER).exists() and legacy_root(output_root):
        (output_root / OWNER_MARKER).write_text(json.dumps({"created_by": "distributed-peft"}) + "\n")
    # SIGTERM in any phase (building the base, loading, training, comparing) is Preempted: one line, exit 75
    with termination.handle_sigterm():
        claim = claim_output_dir(output_root, command="dpeft-reproduce", lock=True)  # held: nothing touched
        try:
            passed = reproduce_all(sources(cfg), output_root)
        except Preempted:
            raise  # keep the checkpoints: the same command resumes
        except Exception:
            claim.release()  # only what this command created
            raise
        finally:
            claim.unlock()
    return passed
