"""dpeft-reproduce: retrain a shipped adapter from its recorded config and check its metrics against the shipped ones.

    dpeft-reproduce task=detox
    dpeft-reproduce task=all output_dir=runs/reproduce

Prints one table per task (metric, prebuilt, reproduced, tolerance, pass/fail) and exits 1 if any metric is out of
tolerance. The embedded base is built first if it is not cached; its fingerprint is compared too.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from distributed_peft.config import PROJECT_ROOT, load_recorded_config
from distributed_peft.errors import USER_ERROR_EXIT_CODE, ConfigError, DpeftError

PREBUILT_DIR = PROJECT_ROOT / "adapters_prebuilt"
# Absolute tolerance per metric: retraining on another CPU reorders float sums, so the base and the adapter differ
# in the last bits and greedy decoding can flip a few tokens; the loss moves little, generation metrics more.
TOLERANCES = {
    "loss": 0.02,
    "token_accuracy": 0.01,
    "bleu": 5.0,
    "chrf": 5.0,
    "rouge_l": 5.0,
    "toxic_share": 5.0,
    "exact_match": 5.0,
    "execution_accuracy": 5.0,
}
PREBUILT_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "dpeft_adapter.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
RUN_FILES = {
    "config.yaml": "config.yaml",
    "eval.json": "metrics.json",
    "README.md": "README.md",
    "loss.png": "loss.png",
    "eval_metrics.png": "eval_metrics.png",
    "eval.md": "eval.md",
}


def export_prebuilt(run_dir: Path, destination: Path) -> Path:
    """Copy a finished run into adapters_prebuilt/<task>: the adapter, its config, metrics, card and plots."""
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    for name in PREBUILT_FILES:
        shutil.copy2(run_dir / "adapter" / name, destination / name)
    for source, target in RUN_FILES.items():
        shutil.copy2(run_dir / source, destination / target)
    return destination


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


def reproduce(task: str, output_root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Retrain one prebuilt adapter from its config.yaml; return the comparison rows and fingerprint check."""
    from distributed_peft.train import run_training

    source = PREBUILT_DIR / task
    cfg = load_recorded_config(OmegaConf.load(source / "config.yaml"))
    cfg.output_dir = str(output_root / task)
    reproduced = run_training(cfg)
    prebuilt = json.loads((source / "metrics.json").read_text())
    recorded = json.loads((source / "dpeft_adapter.json").read_text())["base"]["fingerprint"]
    rebuilt = json.loads((Path(cfg.output_dir) / "adapter" / "dpeft_adapter.json").read_text())["base"]["fingerprint"]
    return compare(prebuilt["adapter"], reproduced["adapter"]), {"recorded": recorded, "rebuilt": rebuilt}


def available_tasks() -> list[str]:
    return sorted(p.parent.name for p in PREBUILT_DIR.glob("*/config.yaml"))


def main(argv: list[str] | None = None) -> int:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    requested = args.get("task", "all")
    tasks = available_tasks() if requested == "all" else [requested]
    try:
        unknown = [t for t in tasks if t not in available_tasks()]
        if unknown or not tasks:
            raise ConfigError(
                f"task={requested!r} has no prebuilt adapter; allowed: all, {', '.join(available_tasks())}"
            )
    except DpeftError as error:
        print(f"dpeft-reproduce: error: {error.problems[0]}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    output_root = Path(args.get("output_dir", "runs/reproduce"))
    report, failed = ["# Reproduction of adapters_prebuilt", ""], False
    for task in tasks:
        rows, fingerprints = reproduce(task, output_root)
        same_base = fingerprints["recorded"] == fingerprints["rebuilt"]
        report += [
            table(task, rows),
            "",
            f"base fingerprint {'matches' if same_base else 'DIFFERS (another CPU?)'}: "
            f"recorded {fingerprints['recorded'][:16]}, rebuilt {fingerprints['rebuilt'][:16]}",
            "",
        ]
        failed |= not all(r["passed"] for r in rows)
    text = "\n".join(report)
    output_root.mkdir(parents=True, exist_ok=True)
    (output_root / "reproduce.md").write_text(text)
    print(text)
    print("reproduce: " + ("FAILED" if failed else "all metrics within tolerance"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
