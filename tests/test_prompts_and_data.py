"""Every path that builds a prompt agrees (train, eval, dpeft-generate, the explorer), a user's text is data and never
config syntax, and local data is read the way users have it: numbers as text, a byte-order mark skipped, lists,
objects, nulls and non-object lines refused in one line naming the file, the line (or record/row) and the column."""

from __future__ import annotations

import json
import re
import shlex
import sys

import pytest
from conftest import PROJECT_ROOT, TINY_ADAPTERS, compose_config, run_entry

from distributed_peft.data.prompts import format_completion, format_prompt, hydra_literal, literal_overrides
from distributed_peft.data.task_data import IGNORE_INDEX, load_records, prepare_task_data
from distributed_peft.errors import DataError

TOKENS = 2  # generated tokens: the prompts are under test, not the answers
LONG = "idiot " * 600  # more tokens than tiny-llama's context of 512


@pytest.fixture(scope="module")
def tokenizer(bases):
    from distributed_peft.modeling.loading import load_tokenizer

    return load_tokenizer(str(bases["tiny-llama"]))


def write_jsonl(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def train_args(path) -> list[str]:
    return ["task=custom", f"task.data.path={path}", "logging.progress_bar=false"]


def custom_task(path, *overrides: str):
    return compose_config(["task=custom", f"task.data.path={path}", *overrides]).task


# ----------------------------------------------------------------------------------------------------------------------
# Data the way users have it


def test_numbers_and_booleans_in_used_columns_become_text_as_written(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [
        '{"prompt": "seven", "completion": 7}',
        '{"prompt": 1.50, "completion": true}',
        '{"prompt": "x", "completion": "y"}',
    ]
    jsonl = write_jsonl(tmp_path / "mixed.jsonl", lines)  # one column holding text and numbers: pyarrow refuses it
    as_text = [(r["prompt"], r["completion"]) for r in load_records(custom_task(jsonl))]
    assert as_text == [("seven", "7"), ("1.50", "true"), ("x", "y")]
    (tmp_path / "mixed.json").write_text("[" + ",".join(lines) + "]")
    assert [r["completion"] for r in load_records(custom_task(tmp_path / "mixed.json"))] == ["7", "true", "y"]
    (tmp_path / "cells.csv").write_text("prompt,completion\n007,1.50\nTrue,NA\n")
    assert [(r["prompt"], r["completion"]) for r in load_records(custom_task(tmp_path / "cells.csv"))] == [
        ("007", "1.50"),
        ("True", "NA"),
    ], "csv cells stay the text of the file (no int, float, bool or NaN guessing)"
    table = pa.table({"prompt": pa.array([3, 4]), "completion": pa.array([2.5, 1.0]), "flag": pa.array([True, False])})
    pq.write_table(table, tmp_path / "numbers.parquet")
    task = custom_task(tmp_path / "numbers.parquet", "task.data.columns.completion=flag")
    assert [(r["prompt"], r["completion"]) for r in load_records(task)] == [("3", "true"), ("4", "false")]


def _bad_files(tmp_path) -> dict[str, tuple[str, str]]:
    """format -> (file, where and why it is refused)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = '{"prompt": "a", "completion": "b"}'
    text_or_number = "allowed: text or a number"
    files = {
        "jsonl-list": (
            write_jsonl(tmp_path / "l.jsonl", [good, "", '{"prompt": "c", "completion": ["x"]}']),
            f"line 3, column 'completion' holds a list; {text_or_number}",
        ),
        "jsonl-object": (
            write_jsonl(tmp_path / "o.jsonl", [good, '{"prompt": {"k": 1}, "completion": "b"}']),
            f"line 2, column 'prompt' holds an object; {text_or_number}",
        ),
        "jsonl-null": (
            write_jsonl(tmp_path / "n.jsonl", [good, good, '{"prompt": null, "completion": "b"}']),
            f"line 3, column 'prompt' is null; {text_or_number} (an empty string for no text)",
        ),
        "json-list": (str(tmp_path / "l.json"), f"record index 1, column 'completion' holds a list; {text_or_number}"),
        "csv-short-row": (
            str(tmp_path / "s.csv"),
            "line 4 has 1 field(s) where the header has 2; allowed: one field per column (quote a cell that holds the "
            "delimiter or a line break)",
        ),
        "parquet-null": (
            str(tmp_path / "n.parquet"),
            f"row index 2, column 'completion' is null; {text_or_number} (an empty string for no text)",
        ),
        "parquet-list": (
            str(tmp_path / "l.parquet"),
            f"row index 0, column 'completion' holds a list; {text_or_number}",
        ),
        "parquet-object": (
            str(tmp_path / "o.parquet"),
            f"row index 0, column 'prompt' holds an object; {text_or_number}",
        ),
    }
    (tmp_path / "l.json").write_text(
        json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": [1]}])
    )
    (tmp_path / "s.csv").write_text('prompt,completion\n"two\nlines",b\nshort\n')  # the short row is on line 4
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "completion": ["x", "y", None]}), tmp_path / "n.parquet")
    pq.write_table(pa.table({"prompt": ["a"], "completion": [["x", "y"]]}), tmp_path / "l.parquet")
    pq.write_table(pa.table({"prompt": [{"k": 1}], "completion": ["x"]}), tmp_path / "o.parquet")
    return files


def test_lists_objects_and_nulls_are_refused_naming_file_line_and_column(tmp_path, monkeypatch, bases):
    files = _bad_files(tmp_path)
    for name, (path, where) in files.items():
        with pytest.raises(DataError) as error:
            load_records(custom_task(path))
        assert error.value.problems == [f"task.data.path={path!r}: {where}"], name
    path, where = files["jsonl-list"]
    argv = ["task=custom", f"task.data.path={path}", f"output_dir={tmp_path}/run"]
    code, lines = run_entry(monkeypatch, "dpeft-train", argv)
    assert (code, lines) == (2, [f"dpeft-train: error: task.data.path={path!r}: {where}"])


def test_a_null_in_the_optional_input_reads_as_empty_and_selects_the_no_input_template(tmp_path):
    path = write_jsonl(
        tmp_path / "instruct.jsonl",
        ['{"instruction": "Add", "input": null, "response": "3"}', '{"instruction": "Add", "response": "3"}'],
    )
    task = compose_config(["task=instruct", f"task.data.path={path}"]).task
    records = list(load_records(task))
    assert [r["input"] for r in records] == ["", ""]
    assert format_prompt(task, records[0]) == "<Instruction>: Add\n<Response>: "
    write_jsonl(tmp_path / "instruct.jsonl", ['{"instruction": null, "input": "1, 2", "response": "3"}'])
    with pytest.raises(DataError, match=r"line 1, column 'instruction' is null"):
        load_records(task)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv"])
def test_utf8_files_with_a_byte_order_mark_validate_and_load(fmt, tmp_path, tokenizer):
    rows = [{"prompt": f"Q{i} = ", "completion": f"answer {i}"} for i in range(6)]
    if fmt == "jsonl":
        text = "".join(json.dumps(row) + "\n" for row in rows)
    elif fmt == "json":
        text = json.dumps(rows)
    else:
        sep = "\t" if fmt == "tsv" else ","
        text = f"prompt{sep}completion\n" + "".join(f"{r['prompt']}{sep}{r['completion']}\n" for r in rows)
    path = tmp_path / f"bom.{fmt}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    cfg = compose_config(["task=custom", f"task.data.path={path}"])  # validation reads the first column's name
    data = prepare_task_data(cfg, tokenizer, keep_train_text=True)
    assert data.stats.loaded == 6
    assert sorted(e["record"]["prompt"] for e in data.train + data.eval) == [f"Q{i} = " for i in range(6)]


def test_a_jsonl_line_that_is_not_an_object_is_one_line(tmp_path, monkeypatch, bases):
    first = write_jsonl(tmp_path / "first.jsonl", ["[1, 2]", '{"prompt": "a", "completion": "b"}'])
    code, lines = run_entry(monkeypatch, "dpeft-train", [*train_args(first), f"output_dir={tmp_path}/a"])
    assert (code, lines) == (
        2,
        [
            f"dpeft-train: error: task.data.path={first!r} cannot be read as jsonl: line 1 is not a JSON object "
            "(a list); allowed: one JSON object per line"
        ],
    )
    later = write_jsonl(tmp_path / "later.jsonl", ['{"prompt": "a", "completion": "b"}'] * 3 + ['"just text"'])
    code, lines = run_entry(monkeypatch, "dpeft-train", [*train_args(later), f"output_dir={tmp_path}/b"])
    assert (code, lines) == (
        2,
        [
            f"dpeft-train: error: task.data.path={later!r}: line 4 is not a JSON object (a string); "
            "allowed: one JSON object per line"
        ],
    )


# ----------------------------------------------------------------------------------------------------------------------
# Every path that builds a prompt agrees


def generate_cli(monkeypatch, capsys, argv: list[str]) -> str:
    """What `dpeft-generate ARGV` prints, run in this process through its real entry point."""
    from hydra.core.global_hydra import GlobalHydra

    from distributed_peft.cli.generate import main

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["dpeft-generate", *argv, f"max_new_tokens={TOKENS}"])
    capsys.readouterr()
    try:
        main()
    finally:
        GlobalHydra.instance().clear()
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def explorer(bases):
    """The explorer's model worker over the tiny example adapters, without a web server."""
    from distributed_peft.cli.preflight import check_overrides
    from distributed_peft.config import validate_explore
    from distributed_peft.serving.explorer import load_explorer

    adapters = f"adapters=[{TINY_ADAPTERS / 'instruct'},{TINY_ADAPTERS / 'detox'},{TINY_ADAPTERS / 'sql'}]"
    explorer = load_explorer(check_overrides([adapters], "explore", validate_explore))
    yield explorer
    explorer.close()


def ask(explorer, payload: dict, max_new_tokens: int = TOKENS) -> dict:
    """The explorer's answer to an API request body (as POST /api/generate handles it)."""
    task, fields = explorer.request_fields(payload)
    return explorer.submit(task, fields, max_new_tokens).result(timeout=120)


def test_generate_and_the_explorer_honour_the_instruct_input(monkeypatch, capsys, explorer):
    out = generate_cli(
        monkeypatch,
        capsys,
        [f"adapters=[{TINY_ADAPTERS / 'instruct'}]", "prompt=Sum the numbers", "+inputs.input=1, 2"],
    )
    assert "<Instruction>: Sum the numbers\n<Input>: 1, 2\n<Response>:" in out
    without_plus = generate_cli(
        monkeypatch, capsys, [f"adapters=[{TINY_ADAPTERS / 'instruct'}]", "prompt=Sum the numbers", "inputs.input=1, 2"]
    )
    assert without_plus == out
    answer = ask(explorer, {"task": "instruct", "prompt": "Sum the numbers", "inputs": {"input": "1, 2"}})
    assert answer["prompt"].endswith("<Instruction>: Sum the numbers\n<Input>: 1, 2\n<Response>:")
    page = explorer.submit("instruct", {"instruction": "Sum the numbers", "input": ""}, TOKENS).result(timeout=120)
    assert page["prompt"].endswith("<Instruction>: Sum the numbers\n<Response>:"), "no input: the no-input template"


# The task configs' templates written out: every path must build exactly these bytes.
EXPECTED_PROMPT = {
    "detox": lambda r: f"<Toxic>: {r['toxic']}\n<Neutral>: ",
    "sql": lambda r: f"<Schema>: {r['context']}\n<Question>: {r['question']}\n<SQL>: ",
    "instruct": lambda r: (
        f"<Instruction>: {r['instruction']}\n<Input>: {r['input']}\n<Response>: "
        if r["input"].strip()
        else f"<Instruction>: {r['instruction']}\n<Response>: "
    ),
}
MAIN_FIELD = {"detox": "toxic", "sql": "question", "instruct": "instruction"}  # what `prompt` fills


def sample_examples(task: str, tokenizer) -> tuple[object, list[dict]]:
    """The task's config and tokenized examples with their records (for instruct: one with an input, one without)."""
    cfg = compose_config([f"task={task}", "model=tiny-llama", "task.data.max_examples=60"])
    data = prepare_task_data(cfg, tokenizer, keep_train_text=True)
    examples = data.train + data.eval
    if task == "instruct":
        with_input = next(e for e in examples if e["record"]["input"].strip())
        return cfg, [with_input, next(e for e in examples if not e["record"]["input"].strip())]
    return cfg, examples[:2]


@pytest.mark.parametrize("task", ["detox", "sql", "instruct"])
def test_train_eval_generate_and_the_explorer_build_byte_identical_prompts(task, explorer, tokenizer, monkeypatch):
    """For the same record: the prompt tokens dpeft-train learns after, dpeft-eval generates from, dpeft-generate
    (prompt= and inputs.FIELD=) and the explorer (API request and page fields) generate from are one sequence, the
    task template's text tokenized with BOS."""
    from distributed_peft.evaluation import evaluator, generation

    cfg, examples = sample_examples(task, tokenizer)
    evaluated: list[list[int]] = []

    def no_generation(model, tok, prompts, *_):
        evaluated.extend(prompts)
        return [""] * len(prompts)

    monkeypatch.setattr(evaluator, "generate_completions", no_generation)
    monkeypatch.setattr(evaluator, "score_all", lambda *args: {})
    generated: list[list[int]] = []
    real_generate_batch = generation.generate_batch

    def capture(model, tok, prompts, max_new_tokens, *args, **kwargs):
        generated.extend(prompts)
        return real_generate_batch(model, tok, prompts, max_new_tokens, *args, **kwargs)

    monkeypatch.setattr(generation, "generate_batch", capture)
    adapter = explorer.adapter(task)
    for example in examples:
        record, main = example["record"], MAIN_FIELD[task]
        expected = tokenizer(EXPECTED_PROMPT[task](record).rstrip(" "))["input_ids"]  # the space: the first word's
        assert expected[0] == tokenizer.bos_token_id
        n_prompt = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
        assert example["input_ids"][:n_prompt] == expected, "dpeft-train"
        evaluated.clear()
        evaluator.evaluate_generations(None, tokenizer, [example], cfg, None)
        assert evaluated == [expected], "dpeft-eval"
        inputs = {name: record[name] for name in adapter.fields if name != main and record[name]}
        argv = [f"adapters=[{TINY_ADAPTERS / task}]", f"prompt={record[main]}", f"max_new_tokens={TOKENS}"]
        generated.clear()
        generation.generate_with_adapters(
            compose_config_generate(argv + [f"inputs.{k}={v}" for k, v in inputs.items()])
        )
        assert generated == [expected, expected], "dpeft-generate (adapter, then base)"
        api = ask(explorer, {"task": task, "prompt": record[main], "inputs": inputs})
        page = explorer.submit(task, {name: record[name] for name in adapter.fields}, TOKENS).result(timeout=120)
        for name, answer in (("explorer API", api), ("explorer page", page)):
            assert answer["prompt_tokens"] == len(expected), name
            assert answer["prompt"] == tokenizer.decode(expected, skip_special_tokens=False), name


def test_empty_and_over_context_prompts_get_the_same_refusal_from_generate_and_the_explorer(monkeypatch, explorer):
    from distributed_peft.serving.explorer import RequestError

    cases = [("instruct", "   ", 400), ("detox", LONG, 413)]
    for task, prompt, status in cases:
        code, lines = run_entry(
            monkeypatch,
            "dpeft-generate",
            [f"adapters=[{TINY_ADAPTERS / task}]", f"prompt={prompt}", "max_new_tokens=8"],
        )
        lines = [line for line in lines if "built on another machine" not in line]  # tiny-llama built on another CPU
        assert code == 2 and len(lines) == 1 and lines[0].startswith("dpeft-generate: error: the prompt is "), lines
        with pytest.raises(RequestError) as refused:
            ask(explorer, {"task": task, "prompt": prompt}, max_new_tokens=8)
        assert (refused.value.status, f"dpeft-generate: error: {refused.value.message}") == (status, lines[0])
    assert lines[0].endswith(
        "with max_new_tokens=8 it exceeds the context length 512 of tiny-llama; shorten it or ask for fewer new tokens"
    )


def test_config_syntax_in_a_prompt_or_a_data_value_is_text(monkeypatch, capsys, explorer, tmp_path):
    home = "${oc.env:HOME}"
    out = generate_cli(
        monkeypatch,
        capsys,
        [f"adapters=[{TINY_ADAPTERS / 'instruct'}]", f"prompt=be {home} {{x", "+inputs.input=a}b ${x"],
    )
    assert f"<Instruction>: be {home} {{x\n<Input>: a}}b ${{x\n<Response>:" in out
    answer = ask(explorer, {"task": "instruct", "prompt": f"be {home} {{x", "inputs": {"input": "{input}"}})
    assert answer["prompt"].endswith(f"<Instruction>: be {home} {{x\n<Input>: {{input}}\n<Response>:")
    record = {"prompt": f"{{completion}} {home} }}", "completion": "{0}"}
    path = write_jsonl(tmp_path / "braces.jsonl", [json.dumps(record)])
    task = custom_task(path, "task.prompt_template=Q: {prompt}\\nA: ")
    loaded = next(iter(load_records(task)))
    assert (format_prompt(task, loaded), format_completion(task, loaded)) == (
        f"Q: {{completion}} {home} }}\nA: ",
        "{0}",
    )


@pytest.mark.parametrize(
    "text",
    ["${oc.env:HOME}", "a {b", "}", 'it\'s "quoted"', "back\\slash\\", "\\${x}", "$${y}", "[1,2]", "a,b", "null"],
)
def test_user_text_on_the_command_line_reaches_the_config_exactly(text):
    for key in ("prompt", "+inputs.context"):
        typed = [f"{key}={text}"]  # as bash passes it once the quotes are stripped
        once = literal_overrides(typed, "generate")
        assert literal_overrides(once, "generate") == once, "applied twice: unchanged"
        cfg = compose_config_generate([f"adapters=[{TINY_ADAPTERS / 'sql'}]", *typed])
        assert (cfg.prompt if key == "prompt" else cfg.inputs.context) == text
        assert literal_overrides([f"{key}={hydra_literal(text)}"], "generate") == once, "Hydra-quoted: the same"


def compose_config_generate(overrides: list[str]):
    from distributed_peft.cli.preflight import check_overrides
    from distributed_peft.config import validate_generate

    return check_overrides(overrides, "generate", validate_generate)


def test_the_readme_prompt_template_works_as_typed(tmp_path, tokenizer):
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own data") :]
    typed = re.search(r"`(task\.prompt_template=[^`]*)`", section).group(1)
    argv = shlex.split(typed)  # what bash hands the program
    assert argv == ["task.prompt_template=Q: {prompt}\\nA: "]
    pairs = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(4)]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = compose_config(["task=custom", f"task.data.path={path}", *argv])
    assert cfg.task.prompt_template == "Q: {prompt}\nA: "
    data = prepare_task_data(cfg, tokenizer, keep_train_text=True)
    example = data.train[0]
    prompt, completion = format_prompt(cfg.task, example["record"]), format_completion(cfg.task, example["record"])
    assert prompt == f"Q: {example['record']['prompt']}\nA: " and completion == example["record"]["completion"]
    labelled = [token for token in example["labels"] if token != IGNORE_INDEX]
    # only the completion (and EOS) carries loss; the template's trailing space is tokenized with its first word
    assert tokenizer.decode(labelled[:-1]) == " " + completion
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=True) == prompt + completion


def test_a_hydra_quoted_template_and_interpolation_in_it_are_text(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "q", "completion": "a"}'])
    quoted = "task.prompt_template='${{oc.env:HOME}}\\tQ: {prompt}\\nA: '"  # bash: "task.prompt_template='...'"
    task = custom_task(path, quoted)
    assert task.prompt_template == "${{oc.env:HOME}}\tQ: {prompt}\nA: "
    assert format_prompt(task, {"prompt": "q", "completion": "a"}) == "${oc.env:HOME}\tQ: q\nA: "
    assert custom_task(path, "task.prompt_template_no_input=null").prompt_template_no_input is None


def test_arguments_that_are_not_user_text_are_left_as_they_are():
    argv = ["task=sql", "training.lr=1e-4", "-m", "output_dir=runs/x", "task.name=${oc.env:USER}", "~task.metrics"]
    assert literal_overrides(argv) == argv
    assert literal_overrides(["prompt=${x}", "inputs.a=b"]) == ["prompt=${x}", "inputs.a=b"], "only dpeft-generate's"
