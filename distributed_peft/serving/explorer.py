"""dpeft-explore: a web page (and a JSON API) that puts every task adapter beside the base they share.

    dpeft-explore                                      # adapters_prebuilt/ on the embedded tiny-llama, CPU
    dpeft-explore adapters=[runs/sql/adapter,runs/detox/adapter] model=llama-3.2-1b host=0.0.0.0 port=8080
    curl -s 127.0.0.1:7860/api/generate -d '{"task": "detox", "prompt": "shut up, idiot"}'

The base is loaded once and every adapter attached to it (peft multi-adapter). `set_adapter` switches the model
for every caller, so one worker thread owns the model and answers requests one after another while the server
keeps accepting them; each request waits for its own answer. An adapter that cannot be loaded is listed as
unavailable, with its reason, and the others keep working. The page and the API are in `explorer_app.py`.
"""

from __future__ import annotations

import socket
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distributed_peft.adapters.storage import (
    adapter_names,
    check_base_matches,
    load_adapter,
    read_adapter_metadata,
    recorded_base,
)
from distributed_peft.data.prompts import (
    EmptyPrompt,
    PromptTooLong,
    check_not_empty,
    fields_record,
    generation_prompt_ids,
    prompt_fields,
    task_record,
)
from distributed_peft.errors import AdapterError, ConfigError, DataError, DpeftError
from distributed_peft.evaluation.generation import default_adapters, generate_batch

MAX_PROMPT_CHARS = 100_000  # refused before tokenizing; the context length decides the rest


class RequestError(Exception):
    """A request the explorer refuses: an HTTP status (4xx) and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class TaskAdapter:
    """One adapter as the page shows it: its task, model card and validation examples, or why it is unavailable."""

    name: str  # the peft adapter name and the task selector's value
    directory: str
    title: str  # the model card's heading
    available: bool = False
    reason: str = ""  # why it is unavailable
    description: str = ""
    task: DictConfig | None = None
    context_length: int = 0
    fields: list[str] = field(default_factory=list)  # the prompt template's fields, in order
    examples: list[dict[str, str]] = field(default_factory=list)  # validation records (template fields only)
    card: str = ""  # model card markdown
    loss_curve: str | None = None  # loss.png

    def summary(self) -> dict[str, Any]:
        """What GET /api/tasks says about it."""
        keys = ("name", "title", "available", "reason", "description", "fields", "examples", "context_length")
        return {key: getattr(self, key) for key in keys}


class Explorer:
    """The loaded model and its adapters; answers base-vs-adapter requests on one worker thread."""

    def __init__(self, model, tokenizer, adapters: list[TaskAdapter], base_name: str, device: str):
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.base_name, self.device = base_name, device
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpeft-explore-model")

    def adapter(self, name: str) -> TaskAdapter:
        """The available adapter called `name`, or a RequestError (404 unknown, 409 unavailable)."""
        found = next((a for a in self.adapters if a.name == name), None)
        if found is None:
            known = ", ".join(a.name for a in self.adapters if a.available)
            raise RequestError(404, f"task={name!r} is unknown; allowed: {known}")
        if not found.available:
            raise RequestError(409, f"task={name!r} is unavailable: {found.reason}")
        return found

    def request_fields(self, payload: Any) -> tuple[str, dict[str, str]]:
        """The task and its fields from an API request: `prompt` fills the main field, as in dpeft-generate."""
        if not isinstance(payload, dict) or not isinstance(payload.get("task"), str):
            raise RequestError(400, 'the body must be a JSON object with "task" and "prompt"')
        prompt, inputs = payload.get("prompt", ""), payload.get("inputs") or {}
        if not isinstance(prompt, str) or not isinstance(inputs, dict):
            raise RequestError(400, '"prompt" must be a string and "inputs" an object of field: text')
        adapter = self.adapter(payload["task"])
        self._check_fields(adapter, inputs)
        record = task_record(adapter.task, prompt, inputs)
        return adapter.name, {name: record[name] for name in adapter.fields}

    @staticmethod
    def _check_fields(adapter: TaskAdapter, fields: dict[str, Any]) -> None:
        unknown = sorted(set(fields) - set(adapter.fields))
        if unknown:
            raise RequestError(
                400,
                f"inputs {', '.join(unknown)} are not fields of task {adapter.name}; allowed: "
                + ", ".join(adapter.fields),
            )

    def submit(
        self, task: str, fields: dict[str, str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0
    ) -> Future:
        """Check a request and queue it for the worker; the future holds its answer or a RequestError.

        The answer: {"task", "prompt" (as the model sees it), "prompt_tokens", "base", "adapter"}.
        """
        adapter = self.adapter(task)
        self._check_fields(adapter, fields)
        record = fields_record(adapter.task, fields)
        try:
            check_not_empty(adapter.task, record)
        except EmptyPrompt as error:
            raise RequestError(400, error.problems[0]) from error
        if sum(len(value) for value in record.values()) > MAX_PROMPT_CHARS:
            raise RequestError(413, f"the prompt is longer than {MAX_PROMPT_CHARS:,} characters")
        return self._worker.submit(self._answer, adapter, record, max_new_tokens, temperature, seed)

    def _answer(self, adapter: TaskAdapter, record: dict[str, str], max_new_tokens: int, temperature: float, seed):
        import torch

        try:
            ids = generation_prompt_ids(
                adapter.task, record, self.tokenizer, max_new_tokens, adapter.context_length, self.base_name
            )
        except PromptTooLong as error:
            raise RequestError(413, error.problems[0]) from error
        except DpeftError as error:  # an empty prompt, or a template that cannot be filled
            raise RequestError(400, error.problems[0]) from error

        def complete() -> str:
            if temperature > 0:
                torch.manual_seed(seed)  # the same draw for base and adapter, and for a repeated request
            return generate_batch(self.model, self.tokenizer, [ids], max_new_tokens, temperature=temperature)[0]

        self.model.set_adapter(adapter.name)
        adapter_answer = complete()
        with self.model.disable_adapter():
            base_answer = complete()
        prompt = self.tokenizer.decode(ids, skip_special_tokens=False)
        return {
            "task": adapter.name,
            "prompt": prompt,
            "prompt_tokens": len(ids),
            "base": base_answer,
            "adapter": adapter_answer,
        }

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _card(directory: Path, metadata: dict[str, Any]) -> tuple[str, str | None]:
    """The model card (README.md beside the adapter or its run, else one written from the metadata) and loss.png."""
    from distributed_peft.adapters.model_cards import card_body, model_card

    cards = [d / "README.md" for d in (directory, directory.parent) if (d / "README.md").is_file()]
    card = card_body(cards[0].read_text() if cards else model_card(metadata, metadata.get("eval")))
    curves = [d / "loss.png" for d in (directory, directory.parent) if (d / "loss.png").is_file()]
    return card, str(curves[0].resolve()) if curves else None


def _examples(run_cfg: DictConfig, fields: list[str], count: int) -> list[dict[str, str]]:
    """The first validation records of the adapter's own split (none when its data cannot be read here)."""
    from distributed_peft.data.task_data import split_records

    try:
        eval_records = split_records(run_cfg.task, run_cfg.training)[0]
    except (DataError, OSError, ValueError, ConnectionError):
        return []
    return [
        {name: record[name] for name in fields} for record in eval_records.select(range(min(count, len(eval_records))))
    ]


def describe_adapters(directories: list[str], cfg: DictConfig) -> tuple[list[TaskAdapter], DictConfig, str]:
    """Read every adapter's metadata, card and examples; refuse those whose base does not match.

    Returns (adapters, run config the base loads with, where the base loads from). Nothing heavy is loaded.
    """
    from distributed_peft.config import load_recorded_config
    from distributed_peft.modeling.loading import resolve_base

    readable: list[tuple[str, dict[str, Any]]] = []
    adapters: list[TaskAdapter] = []
    for directory in directories:
        try:
            readable.append((directory, read_adapter_metadata(directory)))
        except (AdapterError, OSError, ValueError) as exc:
            reason = exc.problems[0] if isinstance(exc, AdapterError) else _first_line(exc)
            adapters.append(TaskAdapter(Path(directory).name, directory, Path(directory).name, reason=reason))
    if not readable:
        raise AdapterError([f"no adapter can be loaded: {a.directory}: {a.reason}" for a in adapters])
    run_cfg, path, identity = recorded_base(readable[0][1])
    if cfg.model is not None:  # the user names the base; adapters are checked against it like any other
        run_cfg.model = cfg.model
        path, identity = resolve_base(cfg.model)
    for (directory, metadata), name in zip(readable, adapter_names([m for _, m in readable]), strict=True):
        recorded = load_recorded_config(metadata["config"])
        task = recorded.task
        fields = prompt_fields(task)
        card, curve = _card(Path(directory), metadata)
        title = next((line[2:].strip() for line in card.splitlines() if line.startswith("# ")), name)
        adapter = TaskAdapter(
            name,
            directory,
            title,
            description=metadata.get("task_description", ""),
            task=task,
            context_length=run_cfg.model.context_length,
            fields=fields,
            card=card,
            loss_curve=curve,
        )
        try:
            check_base_matches(metadata, identity, cfg.allow_base_mismatch)
            adapter.examples = _examples(recorded, fields, cfg.examples_per_task)
            adapter.available = True
        except AdapterError as exc:
            adapter.reason = exc.problems[0]
        adapters.append(adapter)
    return sorted(adapters, key=lambda a: not a.available), run_cfg, path


def load_explorer(cfg: DictConfig) -> Explorer:
    """Load the base once and attach every adapter that fits it; the others are kept as unavailable."""
    from distributed_peft.modeling.loading import load_base_model, load_tokenizer
    from distributed_peft.runtime.distributed import resolve_device
    from distributed_peft.runtime.tracking import quiet_library_progress

    quiet_library_progress()
    device = resolve_device(cfg.device)
    adapters, run_cfg, path = describe_adapters(list(cfg.adapters) or default_adapters(), cfg)
    base = load_base_model(run_cfg, path, device=device)
    tokenizer = load_tokenizer(path)
    model = None
    for adapter in (a for a in adapters if a.available):
        try:
            if model is None:
                model = load_adapter(base, adapter.directory, adapter_name=adapter.name)
            else:
                model.load_adapter(adapter.directory, adapter_name=adapter.name, is_trainable=False)
        except Exception as exc:  # a broken adapter must not take the page down: show it as unavailable
            adapter.available, adapter.reason = False, f"cannot be loaded: {_first_line(exc)}"
            if model is not None and adapter.name in model.peft_config:
                model.delete_adapter(adapter.name)
    if model is None:
        raise AdapterError([f"no adapter can be loaded: {a.directory}: {a.reason}" for a in adapters])
    if run_cfg.peft.method != "qlora":  # a 4-bit base is placed on the device as it loads
        model.to(device)
    return Explorer(model, tokenizer, adapters, run_cfg.model.name, device)


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process holds before the model is loaded (a bind error after a minute helps nobody)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise ConfigError(
                f"port={port} cannot be used on host {host}: {exc.strerror}; allowed: a free port"
            ) from exc
