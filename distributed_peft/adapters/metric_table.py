"""An adapter's evaluation as people read it: base and adapter side by side (the `results` that eval.json,
metrics.json and dpeft_adapter.json record), which entries are counts, and which direction of each metric is better.

eval.md (evaluation/reports.py) and the model cards (model_cards.py) show the same table.
"""

from __future__ import annotations

from typing import Any

COUNT_METRICS = {"tokens", "generated_examples"}  # how much was evaluated, not how well
LOWER_IS_BETTER = {"toxic_share", "repeat_share", "loss"}


def better(metric: str) -> str:
    """Which direction of `metric` is better: "lower" or "higher"."""
    return "lower" if metric in LOWER_IS_BETTER else "higher"


def metrics_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per metric, base and adapter side by side, with which direction is better."""
    rows = ["| metric | base | adapter | better |", "| --- | --- | --- | --- |"]
    for metric, adapter in results["adapter"].items():
        base = results["base"][metric]
        if metric in COUNT_METRICS:
            rows.append(f"| {metric} | {int(base):,} | {int(adapter):,} | |")
            continue
        rows.append(f"| {metric} | {base:.4f} | {adapter:.4f} | {better(metric)} |")
    return "\n".join(rows)


def tasks_table(results: dict[str, dict[str, Any]], steps: dict[str, int]) -> str:
    """Markdown table of a multi-task job: per task its steps, eval loss of base and adapter, and the adapter's
    task metrics (each task's eval.md has the whole comparison)."""
    rows = ["| task | steps | eval loss base -> adapter | adapter metrics |", "| --- | --- | --- | --- |"]
    for task, result in results.items():
        adapter, base = result["adapter"], result["base"]
        metrics = ", ".join(
            f"{m} {v:.2f} (base {base[m]:.2f})" for m, v in adapter.items() if m not in {*COUNT_METRICS, "loss",
                                                                                        "token_accuracy"}
        )  # fmt: skip
        rows.append(f"| {task} | {steps[task]} | {base['loss']:.4f} -> {adapter['loss']:.4f} | {metrics or '-'} |")
    return "\n".join(rows)
