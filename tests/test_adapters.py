"""One base, many adapters: generation switches adapters exactly, wrong bases are refused, merges are exact,
a user's own data trains with no code, the shipped adapters are complete, and a prebuilt adapter reproduces."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, TINY_ADAPTERS, compose_config

from distributed_peft.adapters.storage import load_base_with_adapters, merge_adapter
from distributed_peft.constants import ADAPTER_METADATA, PREBUILT_DIR
from distributed_peft.errors import AdapterError
from distributed_peft.evaluation.generation import generate_with_adapters
from distributed_peft.evaluation.heldout import HELDOUT_SETS, REPORT_FILES
from distributed_peft.training.recipe import run_training

QUICK = [
    "training=demo",
    "training.max_steps=40",
    "training.eval_steps=0",
    "training.max_eval_examples=32",
    "evaluation.max_generate_examples=8",
    "logging.progress_bar=false",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bases) -> dict[str, Path]:
    """A sql and a detox QLoRA adapter on tiny-llama, and a LoRA one."""
    root = tmp_path_factory.mktemp("adapters")
    runs = {"sql": ["task=sql"], "detox": ["task=detox"], "detox-lora": ["task=detox", "peft=lora"]}
    for name, overrides in runs.items():
        run_training(compose_config([*overrides, *QUICK, f"output_dir={root / name}"]))
    return {name: root / name / "adapter" for name in runs}


def generate(adapters: list[Path], prompt: str, **inputs: str) -> dict[str, dict[str, str]]:
    overrides = [f"adapters=[{','.join(map(str, adapters))}]", f"prompt='{prompt}'"]
    overrides += [f"+inputs.{k}='{v}'" for k, v in inputs.items()]
    from distributed_peft.cli.preflight import check_overrides
    from distributed_peft.config import validate_generate

    return generate_with_adapters(check_overrides(overrides, "generate", validate_generate))


@pytest.mark.slow
def test_switching_adapters_gives_what_each_adapter_alone_gives(trained):
    schema = "CREATE TABLE employees (id INTEGER, name TEXT, salary REAL)"
    both = generate([trained["sql"], trained["detox"]], "How many employees are there?", context=schema)
    alone_sql = generate([trained["sql"]], "How many employees are there?", context=schema)
    alone_detox = generate([trained["detox"]], "How many employees are there?", context=schema)
    assert both["sql"] == alone_sql["sql"] and both["detox"] == alone_detox["detox"]
    assert both["sql"]["prompt"].startswith(f"<Schema>: {schema}\n<Question>: How many employees are there?")
    assert both["detox"]["prompt"] == "<Toxic>: How many employees are there?\n<Neutral>:"
    assert both["sql"]["adapter"] != both["detox"]["adapter"], "each adapter answers in its own task's way"
    assert both["sql"]["adapter"].upper().startswith("SELECT")


def copy_adapter(source: Path, target: Path, edit) -> Path:
    """A copy of an adapter whose dpeft_adapter.json is changed by edit(metadata)."""
    shutil.copytree(source, target)
    metadata = json.loads((target / "dpeft_adapter.json").read_text())
    edit(metadata)
    (target / "dpeft_adapter.json").write_text(json.dumps(metadata))
    return target


@pytest.mark.slow
def test_an_adapter_trained_on_another_base_is_refused(trained, tmp_path):
    def another_recipe(metadata):  # another seed: another embedded base, whatever machine builds it (an adapter
        metadata["config"]["model"]["base"]["seed"] += 1  # from before the recipe was recorded: read from its config)
        metadata["base"]["fingerprint"] = "0" * 64
        del metadata["base"]["recipe"]

    genuine = trained["sql"]
    foreign = copy_adapter(genuine, tmp_path / "foreign", another_recipe)
    # the base loads from the first adapter's config (the cached base): only the foreign one is checked against it
    with pytest.raises(AdapterError, match="does not match base tiny-llama: base fingerprint 0000000000000000 != "):
        load_base_with_adapters([genuine, foreign])
    model, _, names, _ = load_base_with_adapters([genuine, foreign], allow_mismatch=True)
    assert names == ["sql", "sql-1"] and model.active_adapter == "sql"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dpeft-generate"), f"adapters=[{genuine},{foreign}]", "prompt=hi"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=300,
    )
    assert proc.returncode == 2 and "pass allow_base_mismatch=true to load it anyway" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_an_embedded_base_rebuilt_on_another_machine_is_accepted_by_recipe(trained, tmp_path, capsys):
    def other_machine(metadata):  # same recipe, other last bits of the weights
        metadata["base"]["fingerprint"] = "0" * 64

    rebuilt = copy_adapter(trained["sql"], tmp_path / "rebuilt", other_machine)
    capsys.readouterr()
    model, *_ = load_base_with_adapters([rebuilt])
    assert model.active_adapter == "sql"
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1, notes
    assert notes[0].startswith(
        "note: adapter sql was trained on embedded base tiny-llama built on another machine "
        "(weights fingerprint 00000000... != "
    )
    assert notes[0].endswith("loading it") and "same recipe " in notes[0]

    def other_corpus(metadata):  # the same settings, but its base was pretrained on other text: another recipe
        metadata["base"]["fingerprint"], metadata["base"]["recipe"] = "0" * 64, "0" * 12

    with pytest.raises(AdapterError, match="does not match base tiny-llama: base fingerprint 0000000000000000"):
        load_base_with_adapters([copy_adapter(trained["sql"], tmp_path / "other-corpus", other_corpus)])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["detox", "detox-lora"])
def test_merged_model_computes_what_base_plus_adapter_computes(which, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    merged_dir = merge_adapter(trained[which], tmp_path / "merged")
    assert not list(merged_dir.glob("adapter_*")), "a standard transformers model, no adapter files"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    peft_model, tokenizer, *_ = load_base_with_adapters([trained[which]])
    ids = tokenizer(
        ["<Toxic>: you are a clueless idiot\n<Neutral>: ", "<Toxic>: shut up\n<Neutral>: he"],
        return_tensors="pt",
        padding=True,
    )
    from distributed_peft.evaluation.inference import evaluation_mode

    with evaluation_mode(peft_model):
        expected = peft_model(**ids).logits
    with torch.no_grad():
        actual = merged(**ids).logits
    assert torch.allclose(actual, expected, atol=1e-4), (actual - expected).abs().max()


@pytest.mark.slow
def test_users_own_jsonl_trains_and_evaluates_with_no_code(tmp_path, bases):
    rows = [
        {"prompt": f"Reverse the word {w}: ", "completion": w[::-1]}
        for w in (
            "apple banana cherry dragon eagle falcon garden harbor island jungle kettle lemon mango nectar "
            "orange pepper quartz river salmon tiger umbrella violet walnut yellow zebra"
        ).split()
        * 8
    ]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "dpeft-train"),
        "task=custom",
        f"task.data.path={data}",
        "task.name=reverse",
        *QUICK,
        f"output_dir={out}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "eval.json").read_text())
    assert results["adapter"]["loss"] < results["base"]["loss"]
    assert set(results["adapter"]) >= {"loss", "token_accuracy", "chrf"}
    assert "| chrf |" in (out / "eval.md").read_text()


ADAPTER_SETS = {  # (directory, the base its adapters record, the most MiB one task's directory may take)
    "shipped": (PREBUILT_DIR, "smollm2-135m", 10),
    "tiny-fixtures": (TINY_ADAPTERS, "tiny-llama", 5),
}


@pytest.mark.parametrize("which", list(ADAPTER_SETS))
def test_prebuilt_adapters_are_complete_and_small(which):
    root, base, limit_mib = ADAPTER_SETS[which]
    tasks = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert tasks == ["detox", "instruct", "sql"]
    for task in tasks:
        directory = root / task
        files = ["adapter_model.safetensors", "adapter_config.json", ADAPTER_METADATA, "config.yaml", "metrics.json"]
        files += ["README.md", *(REPORT_FILES if task in HELDOUT_SETS else ())]
        for name in files:
            assert (directory / name).is_file(), f"{task}: {name} missing"
        assert sum(f.stat().st_size for f in directory.iterdir()) < limit_mib * 2**20
        metadata = json.loads((directory / ADAPTER_METADATA).read_text())
        assert metadata["base"]["name"] == base and len(metadata["base"]["fingerprint"]) == 64
        assert metadata["base"]["fingerprint"] in (directory / "README.md").read_text()
        metrics = json.loads((directory / "metrics.json").read_text())
        assert metrics["adapter"]["loss"] < metrics["base"]["loss"]


@pytest.mark.slow
def test_reproduce_sql_passes(tmp_path, bases):
    """dpeft-reproduce retrains the tiny sql adapter from its recorded config (300 steps; detox's records 900) and its
    metrics (loss, exact match, execution accuracy) come out within tolerance."""
    prebuilt = TINY_ADAPTERS / "sql"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dpeft-reproduce"), f"prebuilt={prebuilt}", f"output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| metric | prebuilt | reproduced | tolerance | result |" in proc.stdout
    assert "FAIL" not in proc.stdout and "reproduce: all metrics within tolerance" in proc.stdout
    assert (tmp_path / "reproduce.md").is_file()
