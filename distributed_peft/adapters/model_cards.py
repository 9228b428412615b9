"""Model cards in Hub conventions: the adapter's README.md and the merged model's, written with huggingface_hub.

An adapter card keeps the metadata peft recorded in its own README.md (save_pretrained writes one) and adds ours:
the base's portable name, tags, datasets, license and the evaluation as `model-index` results. Its text says what
was trained, on what, how it scored, how to load it with transformers + peft (loading_snippets), the command line
and the composed config. Everything a user typed passes through `redact` before it is written.
"""

from __future__ import annotations

import json
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from distributed_peft.adapters.loading_snippets import base_caveat, base_description, loading_section
from distributed_peft.adapters.metric_table import COUNT_METRICS, better, metrics_table
from distributed_peft.constants import ADAPTER_CONFIG, ADAPTER_METADATA
from distributed_peft.modeling.loading import portable_base_name
from distributed_peft.runtime.atomic_files import atomic_write_text
from distributed_peft.runtime.redaction import redact, redact_values

PIPELINE_TAG = "text-generation"
PROJECT_TAG = "distributed-peft"
CARD = "README.md"
HELDOUT_REPORT = "heldout.json"  # evaluation/heldout.py's report: the card shows its table when it sits beside
PEFT_BASE_TAG = "base_model:adapter:"  # peft tags an adapter with the path its base loaded from


def card_body(text: str) -> str:
    """A card's markdown without its YAML metadata block (what a page shows)."""
    match = REGEX_YAML_BLOCK.search(text)
    return text[match.end() :].lstrip("\n") if match else text


def _config_section(metadata: dict[str, Any], key: str) -> dict[str, Any]:
    return (metadata.get("config") or {}).get(key) or {}


def _data_source(metadata: dict[str, Any]) -> str:
    """Where the adapter's data came from (`sample`, `local` or `hub`), as its run resolved `source: auto`."""
    from omegaconf import OmegaConf

    from distributed_peft.config import resolve_data_source

    data = _config_section(metadata, "task").get("data")
    return resolve_data_source(OmegaConf.create(data)) if data else "local"


def trained_on_hub_dataset(metadata: dict[str, Any]) -> str | None:
    """The Hub dataset id the adapter was trained on; None for the bundled sample or a local file."""
    data = _config_section(metadata, "task").get("data") or {}
    return data.get("hub_id") if _data_source(metadata) == "hub" else None


def _project_license() -> str:
    try:
        return (package_metadata.metadata("distributed-peft")["License-Expression"] or "other").lower()
    except package_metadata.PackageNotFoundError:
        return "other"


def base_license(metadata: dict[str, Any]) -> dict[str, str]:
    """The card's license fields: the project's for an embedded base (built here from bundled corpora), else the
    base's own as its README.md records it locally (no network), else `other` pointing at the base."""
    model = _config_section(metadata, "model")
    if model.get("embedded"):
        return {"license": _project_license()}
    name_or_path = metadata["base"]["name_or_path"]
    readme = Path(name_or_path) / CARD
    hub_base = not Path(name_or_path).exists()
    if hub_base:
        from huggingface_hub import try_to_load_from_cache

        from distributed_peft.runtime.hub import hub_cache_dir

        cached = try_to_load_from_cache(name_or_path, CARD, cache_dir=hub_cache_dir())
        readme = Path(cached) if isinstance(cached, str) else readme
    if readme.is_file():
        data = ModelCard.load(readme, ignore_metadata_errors=True).data
        if data.get("license"):
            return {key: data.get(key) for key in ("license", "license_name", "license_link") if data.get(key)}
    fields = {"license": "other", "license_name": "base-model-license"}  # the Hub asks a name of an `other` license
    if hub_base:
        fields["license_link"] = f"https://huggingface.co/{name_or_path}"
    return fields


def _dataset_names(metadata: dict[str, Any]) -> tuple[str, str]:
    """(dataset_type, dataset_name) for the model-index: the Hub id when the data came from the Hub, else the task.

    The evaluation split is the run's own: held out of the training data (training.eval_fraction), not a Hub split.
    """
    data = _config_section(metadata, "task").get("data") or {}
    hub_id = trained_on_hub_dataset(metadata)
    if hub_id:
        return hub_id, f"{hub_id} ({data.get('hub_split')} split, validation part held out)"
    if _data_source(metadata) == "sample":
        return metadata["task"], f"{metadata['task']} (bundled sample {data.get('sample_file')}, validation part)"
    return metadata["task"], f"{metadata['task']} (local file {Path(data.get('path') or '?').name}, validation part)"


def eval_results(metadata: dict[str, Any], results: dict[str, Any]) -> list[EvalResult]:
    """One EvalResult per metric of the adapter (counts of tokens and examples are not metrics)."""
    dataset_type, dataset_name = _dataset_names(metadata)
    data = _config_section(metadata, "task").get("data") or {}
    config = data.get("hub_config") if trained_on_hub_dataset(metadata) else None
    return [
        EvalResult(
            task_type=PIPELINE_TAG,
            task_name=f"{metadata['task']}: {metadata.get('task_description', '')}".rstrip(": "),
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_config=config,
            metric_type=metric,
            metric_name=metric,
            metric_value=float(value),
        )
        for metric, value in results["adapter"].items()
        if metric not in COUNT_METRICS
    ]


def _peft_version(directory: Path) -> str | None:
    config = directory / ADAPTER_CONFIG
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("peft_version")


def _composed_config(metadata: dict[str, Any]) -> list[str]:
    from omegaconf import OmegaConf

    from distributed_peft.config import to_yaml

    if not metadata.get("config"):
        return []
    config_yaml = to_yaml(OmegaConf.create(metadata["config"])).rstrip()
    return [
        "## Composed config",
        "",
        "<details><summary>The resolved Hydra config this adapter was trained with (config.yaml)</summary>",
        "",
        "```yaml",
        config_yaml,
        "```",
        "",
        "</details>",
        "",
    ]


def heldout_section(report: dict[str, Any], heading: str | None = "## On real text it was not trained on") -> list[str]:
    """The held-out report as markdown lines: which rows, the table (one row per system), how to read it."""
    systems, data = report["systems"], report["data"]
    metrics = list(systems["adapter"])
    lines = [heading, ""] if heading else []
    lines += [
        f"{data['rows']} rows of `{data['file']}` (real text, in no training file), greedy decoding, at most "
        f"{report['generation']['max_new_tokens']} new tokens; scored against every reference of a row "
        f"({data['references_per_row']:g} per row on average).",
        "",
        "| system | " + " | ".join(f"{m} ({better(m)} is better)" for m in metrics) + " |",
        "| --- |" + " --- |" * len(metrics),
    ]
    for name, scores in systems.items():
        lines.append(f"| {report['labels'][name]} | " + " | ".join(f"{scores[m]:.2f}" for m in metrics) + " |")
    return [*lines, "", report["reading"], ""]


def adapter_card_text(
    metadata: dict[str, Any],
    results: dict[str, Any] | None,
    peft_version: str | None,
    heldout: dict[str, Any] | None = None,
) -> str:
    """The adapter card's markdown: base, fingerprint, task, method, data, training, evaluation (the validation split
    and, when there is a held-out report, real text it was not trained on), command, config."""
    base, run, peft = metadata["base"], metadata["run"], metadata["peft"]
    lines = [
        f"# {metadata['task']} adapter on {base['name']}",
        "",
        f"- task: `{metadata['task']}` ({metadata.get('task_description', '')})",
        f"- base: {base_description(metadata)}; weights fingerprint `{base['fingerprint']}`",
        f"- method: {peft['method']} r={peft['r']} alpha={peft['alpha']}, targets {', '.join(peft['target_modules'])}",
        f"- data: {run['data']}",
        f"- training: {run['optimizer_steps']} optimizer steps, effective batch {run['effective_batch']}, "
        f"{run['train_tokens']:,} completion tokens, {run['seconds']:.0f} s",
        "",
    ]
    if results:
        lines += ["## Evaluation (validation split)", "", metrics_table(results), ""]
    if heldout:
        lines += heldout_section(heldout)
    lines += loading_section(metadata)
    lines += ["## Reproduce", "", "The command line that trained this adapter:", "", "```", run["command"], "```", ""]
    lines += _composed_config(metadata)
    if peft_version:
        lines += ["## Framework versions", "", f"- PEFT {peft_version}", ""]
    return "\n".join(lines)


def adapter_card(
    metadata: dict[str, Any],
    results: dict[str, Any] | None,
    existing: ModelCard | None = None,
    peft_version: str | None = None,
    heldout: dict[str, Any] | None = None,
) -> ModelCard:
    """The adapter's card: `existing` metadata (peft's) kept, ours set over it; model-index from `results`."""
    data = existing.data if existing is not None else ModelCardData()
    base = portable_base_name(metadata["base"])
    method = metadata["peft"]["method"]
    peft_tags = [t for t in (data.tags or []) if not t.startswith(PEFT_BASE_TAG)]  # peft's names a local path
    tags = {*peft_tags, "peft", "lora", "transformers", method, metadata["task"], PROJECT_TAG, f"{PEFT_BASE_TAG}{base}"}
    data.base_model = base
    data.library_name = "peft"
    data.pipeline_tag = data.pipeline_tag or PIPELINE_TAG
    data.tags = sorted(tags)
    hub_dataset = trained_on_hub_dataset(metadata)
    if hub_dataset:
        data.datasets = [hub_dataset]
    for key, value in base_license(metadata).items():
        data[key] = value
    if results:
        data.model_name = f"{metadata['task']}-{method}-adapter-{base.rsplit('/', 1)[-1]}"
        data.eval_results = eval_results(metadata, results)
    return _card(data, adapter_card_text(metadata, results, peft_version, heldout))


def _card(data: ModelCardData, text: str) -> ModelCard:
    # metadata values are masked before they are dumped, so a masked value is still valid (quoted) YAML
    return ModelCard(f"---\n{ModelCardData(**redact_values(data.to_dict())).to_yaml()}\n---\n\n{redact(text)}")


def model_card(metadata: dict[str, Any], results: dict[str, Any] | None) -> str:
    """An adapter card from the metadata alone (what the explorer shows for a directory without README.md)."""
    return str(adapter_card(metadata, results, peft_version=None))


def write_model_card(path: Path, metadata: dict[str, Any], results: dict[str, Any] | None) -> ModelCard:
    """Write the adapter card to `path`, keeping the metadata of the card already there (peft's, or an earlier one).

    The PEFT version comes from the adapter_config.json beside it, and the held-out table from heldout.json, when
    they are there.
    """
    path = Path(path)
    existing = None
    if path.is_file() and REGEX_YAML_BLOCK.search(path.read_text()):  # a card with metadata (peft's, or ours)
        existing = ModelCard.load(path, ignore_metadata_errors=True)
    heldout = path.parent / HELDOUT_REPORT
    report = json.loads(heldout.read_text(encoding="utf-8")) if heldout.is_file() else None
    card = adapter_card(metadata, results, existing, _peft_version(path.parent), report)
    atomic_write_text(path, str(card))
    return card


def render_adapter_card(directory: str | Path) -> Path:
    """Rewrite README.md of an adapter directory (a run's adapter or a shipped one) from its recorded files:
    dpeft_adapter.json, and metrics.json when there is one (else the evaluation the metadata records)."""
    directory = Path(directory)
    recorded = json.loads((directory / ADAPTER_METADATA).read_text())
    metrics = directory / "metrics.json"
    results = json.loads(metrics.read_text()) if metrics.is_file() else recorded.get("eval")
    write_model_card(directory / CARD, recorded, results)
    return directory / CARD


def merged_card(metadata: dict[str, Any], precision: str) -> ModelCard:
    """The card of a dpeft-merge output: a plain transformers model, fine-tuned from the adapter's base."""
    base = portable_base_name(metadata["base"])
    method, task = metadata["peft"]["method"], metadata["task"]
    data = ModelCardData(
        base_model=base,
        base_model_relation="finetune",  # the Hub's `merge` is a merge of several models; this is one base, tuned
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=sorted({PROJECT_TAG, task, method, "merged-adapter"}),
        **base_license(metadata),
    )
    hub_dataset = trained_on_hub_dataset(metadata)
    if hub_dataset:
        data.datasets = [hub_dataset]
    run, peft = metadata["run"], metadata["peft"]
    caveat = base_caveat(metadata)  # a GGUF's weights, not its original's; random weights
    lines = [
        f"# {task} model: {metadata['base']['name']} with its {task} adapter merged in",
        "",
        f"A standard transformers model: the {method} adapter (r={peft['r']}, alpha={peft['alpha']}) for `{task}` "
        f"({metadata.get('task_description', '')}) merged into its base, {base_description(metadata)}; weights "
        f"fingerprint `{metadata['base']['fingerprint']}`. It loads with `AutoModelForCausalLM.from_pretrained` and "
        "`AutoTokenizer.from_pretrained`; no peft or distributed-peft is needed.",
        "",
        *([caveat, ""] if caveat else []),
        f"- precision: {precision}",
        f"- adapter training: {run['data']}; {run['optimizer_steps']} optimizer steps",
        "",
    ]
    if metadata.get("eval"):
        lines += [
            "## Evaluation of base + adapter before the merge (validation split)",
            "",
            metrics_table(metadata["eval"]),
            "",
        ]
    lines += ["## Adapter's training command", "", "```", run["command"], "```", ""]
    lines += _composed_config(metadata)
    return _card(data, "\n".join(lines))
