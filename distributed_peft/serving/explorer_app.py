"""The explorer's web layer: the Gradio page and a small JSON API beside it, served by uvicorn.

GET  /api/tasks      every adapter: name, title, available (or why not), fields, validation examples
POST /api/generate   {"task": "sql", "prompt": "...", "inputs": {"context": "..."}, "max_new_tokens": 64,
                      "temperature": 0, "seed": 0} -> {"prompt", "prompt_tokens", "base", "adapter"}
                     a refused request is a 4xx {"error": "one line"}: 400 empty prompt or bad JSON,
                     404 unknown task, 409 unavailable adapter, 413 prompt too long, 422 bad setting
/                    the page; its Generate button is also Gradio's named endpoint `/generate`
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline machines: no telemetry calls

import gradio as gr  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from distributed_peft.data.prompts import main_field  # noqa: E402
from distributed_peft.serving.explorer import Explorer, RequestError, TaskAdapter  # noqa: E402

MAX_FIELDS = 4  # input boxes on the page; a task uses as many as its prompt template has fields
MAX_TEMPERATURE = 2.0
CSS = """
#prompt textarea, #base-output textarea, #adapter-output textarea { font-family: ui-monospace, monospace; }
#message { color: #b42318; font-weight: 600; }
"""
log = logging.getLogger(__name__)


def _settings(payload: dict[str, Any], default_tokens: int, limit: int) -> tuple[int, float, int]:
    """max_new_tokens, temperature and seed of a request, or a 422 naming the bad one."""
    tokens, temperature, seed = (
        payload.get("max_new_tokens", default_tokens),
        payload.get("temperature", 0.0),
        payload.get("seed", 0),
    )
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= limit:
        raise RequestError(422, f"max_new_tokens={tokens!r} is invalid; it must be an integer in [1, {limit}]")
    if not isinstance(temperature, int | float) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise RequestError(422, f"temperature={temperature!r} is invalid; it must be in [0, {MAX_TEMPERATURE}]")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise RequestError(422, f"seed={seed!r} is invalid; it must be an integer >= 0")
    return tokens, float(temperature), seed


def add_api(app: FastAPI, explorer: Explorer, cfg: DictConfig) -> None:
    """GET /api/tasks and POST /api/generate; a refused request answers 4xx JSON and the server carries on."""

    @app.get("/api/tasks")
    async def tasks() -> list[dict[str, Any]]:
        return [adapter.summary() for adapter in explorer.adapters]

    @app.post("/api/generate")
    async def generate(request: Request) -> JSONResponse:
        try:
            try:
                payload = json.loads(await request.body() or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(400, f"the body is not JSON: {exc}") from exc
            task, fields = explorer.request_fields(payload)
            settings = _settings(payload, cfg.max_new_tokens, cfg.max_new_tokens_limit)
            answer = await asyncio.wrap_future(explorer.submit(task, fields, *settings))
        except RequestError as error:
            return JSONResponse({"error": error.message}, status_code=error.status)
        return JSONResponse(answer)


def _label(adapter: TaskAdapter) -> str:
    return adapter.title if adapter.available else f"{adapter.name} (unavailable)"


def _status(adapter: TaskAdapter) -> str:
    if not adapter.available:
        return f"**{adapter.name} is unavailable:** {adapter.reason}"
    return f"**{adapter.title}** — {adapter.description}"


def _example_choices(adapter: TaskAdapter) -> list[tuple[str, int]]:
    def short(text: str) -> str:
        return text if len(text) <= 90 else text[:87] + "..."

    if not adapter.examples:  # an unavailable adapter may have no task at all
        return []
    main = main_field(adapter.task)
    return [(f"{n + 1}. {short(ex[main])}", n) for n, ex in enumerate(adapter.examples)]


def _field_updates(adapter: TaskAdapter, example: dict[str, str] | None) -> list[Any]:
    updates = []
    for i in range(MAX_FIELDS):
        if i < len(adapter.fields) and adapter.available:
            name = adapter.fields[i]
            updates.append(gr.update(visible=True, label=name, value=(example or {}).get(name, "")))
        else:
            updates.append(gr.update(visible=False, value=""))
    return updates


def build_page(explorer: Explorer, cfg: DictConfig) -> gr.Blocks:
    """Task selector, inputs prefilled from the validation data, settings, base and adapter side by side; cards."""
    adapters = {adapter.name: adapter for adapter in explorer.adapters}
    first = next(a for a in explorer.adapters if a.available)
    unavailable = [a for a in explorer.adapters if not a.available]

    with gr.Blocks(title="dpeft-explore", analytics_enabled=False) as page:
        gr.Markdown(
            f"# Task explorer\nOne base, `{explorer.base_name}` on {explorer.device}, and "
            f"{len(adapters) - len(unavailable)} task adapters on it: the same input through the base and "
            "through the task's adapter."
            + "".join(f"\n\n⚠ **{a.name} is unavailable:** {a.reason}" for a in unavailable)
        )
        with gr.Tab("Try a task"):
            task = gr.Radio(
                [(_label(a), a.name) for a in explorer.adapters], value=first.name, label="Task", elem_id="task"
            )
            status = gr.Markdown(_status(first), elem_id="task-status")
            example = gr.Dropdown(
                _example_choices(first),
                value=0 if first.examples else None,
                label="Example from the task's validation data",
                elem_id="example",
            )
            fields = []
            for i, update in enumerate(_field_updates(first, first.examples[0] if first.examples else None)):
                fields.append(
                    gr.Textbox(
                        lines=3 if i < len(first.fields) - 1 else 2,
                        elem_id=f"field-{i}",
                        **{k: v for k, v in update.items() if k != "__type__"},
                    )
                )
            with gr.Row():
                max_new_tokens = gr.Slider(
                    1,
                    cfg.max_new_tokens_limit,
                    value=cfg.max_new_tokens,
                    step=1,
                    label="Max new tokens",
                    elem_id="max-new-tokens",
                )
                temperature = gr.Slider(
                    0, MAX_TEMPERATURE, value=0, step=0.05, label="Temperature (0: greedy)", elem_id="temperature"
                )
                seed = gr.Number(0, precision=0, minimum=0, label="Seed (when sampling)", elem_id="seed")
            run = gr.Button("Generate", variant="primary", elem_id="generate")
            message = gr.Markdown(elem_id="message")
            prompt = gr.Textbox(label="Prompt as the model sees it", lines=4, interactive=False, elem_id="prompt")
            with gr.Row():
                base_out = gr.Textbox(
                    label=f"Base: {explorer.base_name}", lines=4, interactive=False, elem_id="base-output"
                )
                adapter_out = gr.Textbox(
                    label=f"Adapter: {first.name}", lines=4, interactive=False, elem_id="adapter-output"
                )
        with gr.Tab("Adapter cards"):
            for adapter in explorer.adapters:
                with gr.Accordion(_label(adapter), open=adapter is first):
                    if adapter.card:
                        gr.Markdown(adapter.card)
                    if not adapter.available:
                        gr.Markdown(f"**Unavailable:** {adapter.reason}")
                    if adapter.loss_curve:
                        gr.Image(adapter.loss_curve, label="loss curve", interactive=False, height=320)

        def on_task(name: str):
            adapter = adapters[name]
            first_example = adapter.examples[0] if adapter.examples else None
            choices = _example_choices(adapter)
            return (
                _status(adapter),
                gr.update(choices=choices, value=0 if choices else None),
                "",
                "",
                gr.update(label=f"Adapter: {name}", value=""),
                "",
                *_field_updates(adapter, first_example),
            )

        def on_example(name: str, index: int | None):
            adapter = adapters[name]
            if index is None or not 0 <= index < len(adapter.examples):
                return [gr.update() for _ in fields]
            return _field_updates(adapter, adapter.examples[index])

        async def on_generate(name: str, tokens: float, temp: float, seed_value: float | None, *values: str):
            """Base and adapter answers; a refused request is a message on the page, never an error."""
            try:
                adapter = explorer.adapter(name)
                request = dict(zip(adapter.fields, values, strict=False))
                future = explorer.submit(name, request, int(tokens), float(temp), int(seed_value or 0))
                answer = await asyncio.wrap_future(future)
            except RequestError as error:
                return "", "", "", error.message
            except Exception as exc:  # a bug in one request must not take the page down
                log.exception("generation failed")
                return "", "", "", f"generation failed: {type(exc).__name__}: {exc}"
            return answer["prompt"], answer["base"], answer["adapter"], ""

        task.change(on_task, task, [status, example, prompt, base_out, adapter_out, message, *fields], api_name=False)
        example.input(on_example, [task, example], fields, api_name=False)
        run.click(
            on_generate,
            [task, max_new_tokens, temperature, seed, *fields],
            [prompt, base_out, adapter_out, message],
            api_name="generate",
            concurrency_limit=8,
        )
    return page


def build_app(explorer: Explorer, cfg: DictConfig) -> FastAPI:
    """The JSON API and the page under one FastAPI app."""
    app = FastAPI(title="dpeft-explore")
    add_api(app, explorer, cfg)
    return gr.mount_gradio_app(app, build_page(explorer, cfg), path="/", css=CSS, ssr_mode=False, footer_links=["api"])


def serve(explorer: Explorer, cfg: DictConfig) -> None:
    """Serve until interrupted."""
    import uvicorn

    uvicorn.run(build_app(explorer, cfg), host=cfg.host.strip("[]"), port=cfg.port, log_level="warning")
