"""Prompts: the one place that turns a task and a record of field values into what the model reads.

One function per fact, called by every path (training, evaluation, dpeft-generate, the explorer), so they build
byte-identical prompts: the record a user's input makes (`task_record`, `fields_record`), the template of a record
(the no-input one when a task's optional fields are empty), its prompt text (`format_prompt`), its prompt token ids
(`prompt_ids`), and the refusal of an empty prompt or one that does not fit the context (`generation_prompt_ids`).
A user's text is data: `literal_overrides` makes the command line's prompts, inputs and templates reach the config
as the user typed them, never as Hydra or OmegaConf syntax.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig

from distributed_peft.config import template_fields
from distributed_peft.errors import ConfigError, DataError

TEMPLATE_KEYS = ("task.prompt_template", "task.prompt_template_no_input", "task.completion_template")


class EmptyPrompt(DataError):
    """The field a user must fill is empty."""


class PromptTooLong(DataError):
    """The prompt and the tokens to generate do not fit the model's context."""


def optional_fields(task: DictConfig) -> set[str]:
    """Fields only the full prompt template uses: when all are empty, `prompt_template_no_input` is used."""
    if not task.prompt_template_no_input:
        return set()
    return set(template_fields(task.prompt_template)) - set(template_fields(task.prompt_template_no_input))


def prompt_template(task: DictConfig, record: dict[str, Any]) -> str:
    """The template of a record: the no-input one when the task has it and its optional fields are empty."""
    optional = optional_fields(task)
    if optional and not any(str(record.get(name) or "").strip() for name in optional):
        return task.prompt_template_no_input
    return task.prompt_template


def main_field(task: DictConfig) -> str:
    """The field a free-text prompt fills (detox: toxic, sql: question, instruct: instruction): the last placeholder
    of the template the task uses when its optional fields are empty."""
    template = task.prompt_template_no_input or task.prompt_template
    fields = template_fields(template)
    if not fields:
        raise ConfigError(f"task.prompt_template={template!r} has no {{field}}; allowed: a template with a field")
    return fields[-1]


def render(template: str, record: dict[str, Any], key: str) -> str:
    """`template` with its placeholders filled from `record`; values are inserted as they are (braces included)."""
    try:
        return template.format_map(record)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"{key}={template!r} cannot be filled ({type(exc).__name__}: {exc}); allowed: {{field}} placeholders "
            "of task.data.columns, and {{ or }} for a literal brace"
        ) from exc


def format_prompt(task: DictConfig, record: dict[str, Any]) -> str:
    """The prompt text of a record."""
    template = prompt_template(task, record)
    key = "task.prompt_template" if template == task.prompt_template else "task.prompt_template_no_input"
    return render(template, record, key)


def format_completion(task: DictConfig, record: dict[str, Any]) -> str:
    """The completion text of a record (without EOS)."""
    return render(task.completion_template, record, "task.completion_template")


def prompt_ids(task: DictConfig, record: dict[str, Any], tokenizer) -> list[int]:
    """The token ids of a record's prompt, with BOS where the tokenizer adds one: what training puts before the
    completion and what evaluation and generation generate from.

    Trailing spaces are left to the completion (completion_ids). A BPE tokenizer writes a word's leading space into
    the word's token, so `<Neutral>: ` alone would end in a lone-space token, and the completion's first word would
    be a token (`whatever`) other than the one the same word is in running text (` whatever`, as in the input): a model
    that copies the input then starts every rewrite wrong. task.prompt_space=prompt keeps the space in the prompt (how
    adapters recorded before that option were trained, which is what their recorded config says)."""
    text = format_prompt(task, record)
    return tokenizer(text.rstrip(" ") if task.prompt_space == "completion" else text)["input_ids"]


def completion_ids(task: DictConfig, record: dict[str, Any], tokenizer, prompt: list[int]) -> list[int]:
    """The token ids of a record's completion (without EOS) after its `prompt` ids: what the prompt text followed by
    the completion tokenizes to after the prompt's ids, so the prompt's trailing space joins the first word as in
    running text. A tokenizer whose joint ids do not start with the prompt's (one that appends EOS, say) gets the
    prompt's trailing spaces and the completion tokenized alone."""
    completion = format_completion(task, record)
    if task.prompt_space != "completion":
        return tokenizer(completion, add_special_tokens=False)["input_ids"]
    text = format_prompt(task, record)
    joint = tokenizer(text + completion)["input_ids"]
    if joint[: len(prompt)] == prompt and len(joint) > len(prompt):
        return joint[len(prompt) :]
    spaces = text[len(text.rstrip(" ")) :]  # not in `prompt`: without them here the model would never see them
    return tokenizer(spaces + completion, add_special_tokens=False)["input_ids"]


def prompt_fields(task: DictConfig) -> list[str]:
    """The fields a user fills, in template order (the full template's, then any only the no-input one has)."""
    fields = template_fields(task.prompt_template) + template_fields(task.prompt_template_no_input or "")
    return list(dict.fromkeys(fields))


def fields_record(task: DictConfig, fields: dict[str, Any]) -> dict[str, str]:
    """A record of the task's fields from a user's field values (as text, None as empty), the rest empty."""
    record = {name: "" for name in task.data.columns}
    record.update({name: "" if value is None else str(value) for name, value in fields.items()})
    return record


def task_record(task: DictConfig, prompt: str, inputs: dict[str, Any]) -> dict[str, str]:
    """A record of the task's fields: `inputs` for the named fields, `prompt` for the main field, the rest empty."""
    return fields_record(task, {**inputs, main_field(task): prompt})


def check_not_empty(task: DictConfig, record: dict[str, Any]) -> None:
    """Refuse a record whose main field is empty: there is nothing to answer."""
    main = main_field(task)
    if not str(record.get(main) or "").strip():
        raise EmptyPrompt(f"the prompt is empty; type the {main} for task {task.name}")


def generation_prompt_ids(
    task: DictConfig, record: dict[str, Any], tokenizer, max_new_tokens: int, context_length: int, model_name: str
) -> list[int]:
    """The prompt ids to generate from, or EmptyPrompt / PromptTooLong (the one refusal every command prints)."""
    check_not_empty(task, record)
    ids = prompt_ids(task, record, tokenizer)
    if len(ids) + max_new_tokens > context_length:
        raise PromptTooLong(
            f"the prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the context length "
            f"{context_length} of {model_name}; shorten it or ask for fewer new tokens"
        )
    return ids


# ----------------------------------------------------------------------------------------------------------------------
# The command line: a user's text is data. Bash strips the quotes of `task.prompt_template='Q: {prompt}\nA: '`, and
# Hydra would then read `{` as a dict and `${...}` as an interpolation; these keys get their value quoted instead.

_INTERPOLATION = re.compile(r"(\\*)\$\{")
_QUOTE_RUN = re.compile(r"(\\*)('|\Z)")


def hydra_literal(text: str) -> str:
    """`text` as a Hydra override value that Hydra and OmegaConf both read back exactly (no interpolation)."""
    escaped = _INTERPOLATION.sub(lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", text)  # OmegaConf: \${ is literal

    def quote(match: re.Match) -> str:  # Hydra: backslashes are escapes only before a quote or the closing quote
        backslashes, char = match.group(1), match.group(2)
        if char == "'":
            return "\\" * (2 * len(backslashes) + 1) + "'"
        return "\\" * (2 * len(backslashes)) + char

    return "'" + _QUOTE_RUN.sub(quote, escaped) + "'"


def _unquoted(value: str) -> str | None:
    """The text of a Hydra-quoted value ('...' or "..."), undoing the escapes `hydra_literal` writes; None if the
    value is not one quoted string."""
    if len(value) < 2 or value[0] not in "'\"" or value[-1] != value[0]:
        return None
    quote, inner, out, at = value[0], value[1:-1], [], 0
    for match in re.finditer(r"(\\*)(" + quote + r"|\Z)", inner):
        out.append(inner[at : match.start()])
        backslashes, char = len(match.group(1)), match.group(2)
        if char and backslashes % 2 == 0 or not char and backslashes % 2:
            return None  # an unescaped quote inside, or an escaped closing quote: not one quoted string
        out.append("\\" * (backslashes // 2) + char)
        at = match.end()
    return _INTERPOLATION.sub(lambda m: "\\" * (len(m.group(1)) // 2) + "${", "".join(out))


def _template_escapes(text: str) -> str:
    r"""`\n` and `\t` typed in a template become a newline and a tab (bash passes them as two characters)."""
    return re.sub(r"\\([nt])", lambda m: "\n" if m.group(1) == "n" else "\t", text)


def literal_overrides(argv: list[str], config_name: str = "config") -> list[str]:
    """The command line with templates (and dpeft-generate's prompt and inputs) made literal for Hydra (idempotent).

    `task.*_template=` values (also a task's own, `per_task.NAME.task.*_template=`), and under the `generate` config
    `prompt=` and `inputs.FIELD=`, are quoted for Hydra when the shell stripped the quotes, with `${` kept as text;
    templates also turn `\\n`/`\\t` into newlines/tabs. `inputs.FIELD=` and `per_task.NAME.KEY=` need no `+` (both
    start empty). Other arguments are left as they are.
    """
    literal = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        name = key.lstrip("+")
        if sep and key == name and config_name == "config" and name.startswith("per_task."):
            key = "++" + name  # per_task starts empty: a task's key is added (or replaced) without the user's `+`
            arg = f"{key}={value}"
        template = re.sub(r"^per_task\.[^.]+\.", "", name) in TEMPLATE_KEYS and value != "null"
        text_key = config_name == "generate" and (name == "prompt" or bool(re.fullmatch(r"inputs\.[^.]+", name)))
        if sep and not arg.startswith("-") and (template or text_key):
            text = _unquoted(value)
            text = value if text is None else text
            if template:
                text = _template_escapes(text)
            if name.startswith("inputs.") and key == name:
                key = "++" + name  # inputs starts empty: a field is added (or replaced) without the user's `+`
            arg = f"{key}={hydra_literal(text)}"
        literal.append(arg)
    return literal
