"""What people look at after a run: eval.json / eval.md (base vs adapter), loss.png, eval_metrics.png.

The table eval.md shows is adapters/metric_table.py, the model card adapters/model_cards.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distributed_peft.adapters.metric_table import COUNT_METRICS, better, metrics_table
from distributed_peft.runtime.atomic_files import atomic_savefig, atomic_write_text
from distributed_peft.runtime.tracking import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _samples_markdown(samples: list[dict[str, str]]) -> list[str]:
    lines = ["## Side by side", ""]
    for n, sample in enumerate(samples, start=1):
        lines += [f"### Example {n}", "", "Prompt:", "", "```", sample["prompt"].rstrip(), "```", ""]
        for who in ("reference", "base", "adapter"):
            lines.append(f"- {who}: `{sample[who].replace(chr(10), ' ⏎ ')}`")
        lines.append("")
    return lines


def write_eval_reports(run_dir: Path, results: dict[str, Any], title: str, header: Sequence[str] = ()) -> None:
    """eval.json, eval.md (metrics table and side-by-side generations) and eval_metrics.png in the run directory.

    `header`: lines shown under the title of eval.md (dpeft-eval: which adapter, on which data).
    """
    atomic_write_text(run_dir / "eval.json", json.dumps(results, indent=2))
    improvement = results["base"]["loss"] - results["adapter"]["loss"]
    md = [f"# {title}", "", *(f"- {line}" for line in header), *([""] if header else [])]
    md += [metrics_table(results), "", f"Eval loss lowered by {improvement:.4f} by the adapter.", ""]
    if results.get("samples"):
        md += _samples_markdown(results["samples"])
    atomic_write_text(run_dir / "eval.md", "\n".join(md))
    plot_metric_bars(run_dir, results, title)


def plot_metric_bars(run_dir: Path, results: dict[str, Any], title: str) -> Path:
    """eval_metrics.png: one pair of bars (base, adapter) per metric."""
    plt = _pyplot()
    metrics = [m for m in results["adapter"] if m not in COUNT_METRICS]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.4 * len(metrics) + 1, 3.6), dpi=110, squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        values = [results["base"][metric], results["adapter"][metric]]
        bars = ax.bar(["base", "adapter"], values, color=["#9e9e9e", "#1f77b4"])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(f"{metric} ({better(metric)} is better)", fontsize=9)
        ax.margins(y=0.15)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(run_dir) / "eval_metrics.png"
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def plot_loss_curves(run_dir: Path, title: str) -> Path:
    """loss.png: train loss per step, eval loss (adapter) at each evaluation, and the base's eval loss."""
    plt = _pyplot()
    rows = read_metrics(run_dir)
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    base = [r["eval/base_loss"] for r in rows if "eval/base_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss", linewidth=2)
    if base:
        ax.axhline(base[-1], color="gray", linestyle="--", label="eval loss, base without adapter")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(run_dir) / "loss.png"
    atomic_savefig(fig, path)
    plt.close(fig)
    return path
