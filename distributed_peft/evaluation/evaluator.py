"""Base-vs-adapter evaluation: eval loss and token accuracy, then the task's metrics on greedy generations.

dpeft-eval adapter=runs/detox-tiny-llama/adapter             # the recorded validation split -> runs/eval-detox-<time>/
dpeft-eval adapter=adapters_prebuilt/detox task.data.path=new.jsonl task.data.columns.toxic=comment output_dir=ev
dpeft-eval output_dir=runs/detox-tiny-llama                  # the adapter of that run, reports into that run
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from distributed_peft.config import resolve_data_source
from distributed_peft.data.prompts import prompt_ids
from distributed_peft.errors import AdapterError, ConfigError, DataError
from distributed_peft.evaluation.generation import generate_completions
from distributed_peft.evaluation.inference import evaluation_mode, progress
from distributed_peft.evaluation.metrics import score_all
from distributed_peft.modeling.objective import completion_token_stats
from distributed_peft.runtime.output_dirs import new_report_dir


def evaluate_loss(model, loader, accelerator, stop=None, desc: str | None = None) -> dict[str, float]:
    """Token-weighted eval loss and next-token accuracy over completion tokens, exact across ranks.

    `stop()`, asked before each batch (the same answer on every rank), ends it early: the result says `stopped`.
    With `desc`, the main process shows a progress bar.
    """
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    with evaluation_mode(model):
        for batch in progress(loader, accelerator, desc):
            if stop is not None and stop():
                return {"stopped": True}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            stats = completion_token_stats(logits, batch["labels"])
            per_example = torch.stack([stats["loss_sum"].double(), stats["tokens"].double(), stats["correct"].double()])
            per_example = accelerator.gather_for_metrics(per_example.T.contiguous())  # drops padding duplicates
            totals += per_example.sum(dim=0)
    loss_sum, tokens, correct = totals.tolist()
    return {"loss": loss_sum / tokens, "token_accuracy": correct / tokens, "tokens": tokens}


def evaluate_generations(model, tokenizer, examples: list[dict[str, Any]], cfg: DictConfig, accelerator) -> dict:
    """Greedy completions of the first validation examples, scored with the task's metrics."""
    examples = examples[: cfg.evaluation.max_generate_examples]
    prompts = [prompt_ids(cfg.task, e["record"], tokenizer) for e in examples]
    predictions = generate_completions(model, tokenizer, prompts, cfg, accelerator)
    references = [e["references"] for e in examples]
    scores = score_all(cfg.task.metrics, predictions, references, [e["record"] for e in examples])
    return {"scores": {**scores, "generated_examples": len(examples)}, "predictions": predictions}


def evaluate_base_and_adapter(model, loader, accelerator, cfg: DictConfig, tokenizer, examples) -> dict[str, Any]:
    """The same split scored by the base alone (adapter disabled) and by base + adapter: loss, token accuracy and,
    when `evaluation.generate`, the task's metrics on greedy generations with a few side-by-side samples."""
    shown = cfg.logging.progress_bar
    adapter_loss = evaluate_loss(model, loader, accelerator, desc="eval loss, adapter" if shown else None)
    results: dict[str, Any] = {"adapter": adapter_loss}
    with accelerator.unwrap_model(model).disable_adapter():
        results["base"] = evaluate_loss(model, loader, accelerator, desc="eval loss, base" if shown else None)
    if not cfg.evaluation.generate:
        return results
    adapter = evaluate_generations(model, tokenizer, examples, cfg, accelerator)
    with accelerator.unwrap_model(model).disable_adapter():
        base = evaluate_generations(model, tokenizer, examples, cfg, accelerator)
    results["adapter"].update(adapter["scores"])
    results["base"].update(base["scores"])
    shown = examples[: cfg.evaluation.show_examples]
    results["samples"] = [
        {
            "prompt": tokenizer.decode(prompt_ids(cfg.task, e["record"], tokenizer), skip_special_tokens=True),
            "reference": e["references"][0],
            "base": base["predictions"][i],
            "adapter": adapter["predictions"][i],
        }
        for i, e in enumerate(shown)
    ]
    return results


@dataclass
class EvaluationPlan:
    """What dpeft-eval evaluates and where its reports go, settled before anything heavy loads."""

    adapter_dir: Path
    metadata: dict[str, Any]
    run_cfg: DictConfig  # the adapter's recorded config, its task overridden from the command line
    whole_file: bool  # every row of task.data (a new file), not the recorded validation split
    output_dir: Path | None  # the user's output_dir=; None: a new directory under runs/


def parse_user_overrides(overrides: Sequence[str]) -> list[Override]:
    """The command line's overrides (Hydra's own hydra.* ones and flags left out), parsed by Hydra's parser."""
    plain = [o for o in overrides if not o.startswith("-") and not re.match(r"^[+~]*hydra[./=]", o)]
    try:
        return OverridesParser.create().parse_overrides(plain)
    except HydraException as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from exc


def _apply_task_overrides(run_cfg: DictConfig, cfg: DictConfig, parsed: list[Override]) -> None:
    """The adapter's recorded task with the user's task.* overrides on top (as Hydra applies them); `task=NAME` of
    another task instead takes that task as composed for this command."""
    if any(o.key_or_group == "task" and o.value() != run_cfg.task.name for o in parsed):
        run_cfg.task = cfg.task  # another task than the adapter's, as composed for this command
        return
    keys = set()
    for override in (o for o in parsed if o.key_or_group.startswith("task.")):
        key, value = override.key_or_group, override.value()
        keys.add(key)
        try:
            if override.is_delete():
                parent, _, leaf = key.rpartition(".")
                with open_dict(run_cfg):
                    del OmegaConf.select(run_cfg, parent)[leaf]
            else:
                force_add = override.is_add() or override.is_force_add()
                OmegaConf.update(run_cfg, key, value, merge=True, force_add=force_add)
        except (OmegaConfBaseException, KeyError, TypeError) as exc:
            raise ConfigError(f"{override.input_line} cannot apply to the adapter's recorded task: {exc}") from exc
    data = run_cfg.task.data
    if "task.data.path" in keys and data.path:  # a new file: read as a local file of its own format
        data.source = data.source if "task.data.source" in keys else "local"
        data.format = data.format if "task.data.format" in keys else None


def _data_location(data: DictConfig) -> tuple[str | None, ...]:
    """Which data a task reads (not how much of it): equal locations mean the same rows."""
    source = resolve_data_source(data)
    if source == "local":
        return (source, str(Path(data.path).resolve()) if data.path else None)
    if source == "sample":
        return (source, data.sample_file)
    return (source, data.hub_id, data.hub_config, data.hub_split)


def plan_evaluation(cfg: DictConfig, overrides: Sequence[str]) -> EvaluationPlan:
    """Resolve the adapter, the data and the output directory of dpeft-eval, and check them; load nothing heavy."""
    from distributed_peft.adapters.storage import read_adapter_metadata
    from distributed_peft.config import load_recorded_config
    from distributed_peft.data.files import validate_run
    from distributed_peft.runtime.output_dirs import check_output_dir

    parsed = parse_user_overrides(overrides)
    adapter_dir = Path(cfg.adapter) if cfg.adapter else Path(cfg.output_dir) / "adapter"
    if not cfg.adapter and not adapter_dir.is_dir():
        raise AdapterError(
            f"output_dir={str(cfg.output_dir)!r} holds no adapter ({adapter_dir} does not exist); "
            "pass adapter=PATH, or output_dir=RUN of a trained run"
        )
    metadata = read_adapter_metadata(adapter_dir)
    if not isinstance(metadata.get("config"), dict):
        raise AdapterError(f"adapter={str(adapter_dir)!r} records no run config in dpeft_adapter.json; retrain it")
    run_cfg = load_recorded_config(metadata["config"])  # the adapter's own task, model, peft and split
    recorded = _data_location(run_cfg.task.data)
    _apply_task_overrides(run_cfg, cfg, parsed)
    run_cfg.evaluation = cfg.evaluation  # how to evaluate is this command's choice
    data = run_cfg.task.data
    whole_file = _data_location(data) != recorded
    keys = {o.key_or_group for o in parsed}
    if whole_file:  # the training file's subsampling does not carry over to a new file
        data.fraction = data.fraction if "task.data.fraction" in keys else 1.0
        data.max_examples = data.max_examples if "task.data.max_examples" in keys else None
    elif resolve_data_source(data) == "local" and not Path(data.path).is_file():
        raise DataError(
            f"task.data.path={data.path!r}, the file adapter {str(adapter_dir)!r} was trained on, is gone (moved or "
            "deleted); pass task.data.path=NEW_FILE (and task.data.columns.FIELD=COLUMN if its columns differ)"
        )
    output_dir = Path(cfg.output_dir) if "output_dir" in keys else None
    if output_dir is not None:
        check_output_dir(output_dir)  # before validate's write probe: a directory of the user's files stays untouched
    checked = cfg.copy()  # this command's settings, checked with the task it will evaluate and where it will write
    # without output_dir a report goes into a new runs/eval-<task>-<time>: that is what is checked (runs/ itself
    # holds the user's training runs, which are not this report's directory)
    report_dir = output_dir or new_report_dir(run_cfg.task.name)
    checked.task, checked.adapter, checked.output_dir = run_cfg.task, None, str(report_dir)
    validate_run(checked)
    return EvaluationPlan(adapter_dir, metadata, run_cfg, whole_file, output_dir)


def _whole_file_examples(run_cfg: DictConfig, tokenizer) -> tuple[list[dict[str, Any]], Any]:
    """Every row of task.data in file order (the first task.data.max_examples or fraction of them when set)."""
    from distributed_peft.data.task_data import DataStats, load_records, tokenize_records

    task, training = run_cfg.task, run_cfg.training
    records = load_records(task)
    stats = DataStats(source=str(task.data.path or task.data.sample_file or task.data.hub_id), loaded=len(records))
    keep = int(len(records) * task.data.fraction)
    records = records.select(range(min(keep, task.data.max_examples or keep)))
    examples = tokenize_records(records, task, tokenizer, training, stats, keep_text=True)
    if not examples:
        raise DataError(
            f"task.data: no row of {stats.source} left to evaluate ({stats.loaded} loaded, {stats.dropped_too_long} "
            f"longer than the adapter's training.max_seq_len={training.max_seq_len}); allowed: a file with shorter rows"
        )
    stats.eval = len(examples)
    stats.eval_example_ids = [example["id"] for example in examples]
    return examples, stats


def _data_report(plan: EvaluationPlan, stats: Any) -> dict[str, Any]:
    """Which rows were evaluated: eval.json's `data` and the line eval.md and the console show."""
    data = plan.run_cfg.task.data
    source = resolve_data_source(data)
    where = {"local": data.path, "sample": f"sample {data.sample_file}", "hub": f"hub {data.hub_id}"}[source]
    report = {
        "source": source,
        "path": str(Path(data.path).resolve()) if source == "local" else None,
        "location": where,
        "columns": dict(data.columns),
        "split": "all rows" if plan.whole_file else "validation",
        "rows": stats.eval,
        "loaded": stats.loaded,
        "truncated": stats.truncated,
        "dropped_too_long": stats.dropped_too_long,
    }
    if plan.whole_file:
        line = f"every row of {where}: {stats.eval} of {stats.loaded} rows"
    else:
        line = f"the recorded validation split of {where} (seed {stats.split_seed}): {stats.eval} rows"
        report["seed"] = stats.split_seed
    extra = [f"{stats.truncated} truncated"] * bool(stats.truncated)
    extra += [f"{stats.dropped_too_long} longer than max_seq_len={plan.run_cfg.training.max_seq_len} left out"] * bool(
        stats.dropped_too_long
    )
    report["description"] = line + (f" ({', '.join(extra)})" if extra else "")
    return report


def run_evaluation(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load the base and an adapter, score both on the recorded validation split or on a new task.data file, and
    write the reports into output_dir (default: a new directory under runs/).

    `overrides`: the user's command-line overrides (which say whether output_dir and task.* were given).
    """
    from distributed_peft.adapters.storage import check_base_matches, load_adapter
    from distributed_peft.data.task_data import collate_padded, prepare_task_data
    from distributed_peft.evaluation.reports import write_eval_reports
    from distributed_peft.modeling.loading import load_base_model, load_tokenizer, resolve_base
    from distributed_peft.runtime.distributed import build_accelerator
    from distributed_peft.runtime.output_dirs import claim_on_main_process
    from distributed_peft.runtime.tracking import quiet_library_progress

    quiet_library_progress()
    plan = plan_evaluation(cfg, overrides)
    run_cfg, adapter_dir = plan.run_cfg, plan.adapter_dir
    accelerator = build_accelerator(run_cfg)
    # rank 0 alone writes: it claims and locks the directory before anything loads
    report_dir = plan.output_dir or new_report_dir(run_cfg.task.name)
    claim = claim_on_main_process(accelerator, report_dir, command="dpeft-eval")
    try:
        path, identity = resolve_base(run_cfg.model)
        check_base_matches(plan.metadata, identity, allow_mismatch=bool(cfg.get("allow_base_mismatch", False)))
        tokenizer = load_tokenizer(path)
        if plan.whole_file:
            examples, stats = _whole_file_examples(run_cfg, tokenizer)
        else:
            data = prepare_task_data(run_cfg, tokenizer)
            examples, stats = data.eval, data.stats
        model = load_adapter(load_base_model(run_cfg, path, device=accelerator.device), adapter_dir)
        loader = torch.utils.data.DataLoader(
            examples,
            batch_size=run_cfg.training.eval_batch_size,
            collate_fn=lambda batch: collate_padded(batch, tokenizer),
        )
        model, loader = accelerator.prepare(model, loader)
        results = evaluate_base_and_adapter(model, loader, accelerator, run_cfg, tokenizer, examples)
        data_report = _data_report(plan, stats)
        results.update(adapter_dir=str(adapter_dir), data=data_report)
        if claim is not None:
            header = [f"adapter: `{adapter_dir}`", f"data: {data_report['description']}"]
            title = f"{run_cfg.task.name} adapter on {run_cfg.model.name}"
            write_eval_reports(claim.path, results, title, header)
            print(f"eval loss: base {results['base']['loss']:.4f} -> adapter {results['adapter']['loss']:.4f}")
            print(f"data: {data_report['description']}")
            print(f"reports: {claim.path / 'eval.md'} (eval.json, eval_metrics.png beside it)")
    except BaseException:
        if claim is not None:
            claim.release()  # a failed evaluation removes only what it created
        raise
    finally:
        if claim is not None:
            claim.unlock()
    accelerator.end_training()
    return results
