"""Every run measures itself: model FLOPs per token from the architecture (LoRA's backward included), MFU over the
device's peak where the device is known (absent, with the reason, where not), and the peak memory."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import compose_config
from transformers import BloomConfig, LlamaConfig

from distributed_peft.runtime.tracking import read_metrics
from distributed_peft.training import throughput
from distributed_peft.training.recipe import run_training
from distributed_peft.training.throughput import (
    MIB,
    Architecture,
    ThroughputMeter,
    matmul_precision,
    peak_compute,
    sequence_lengths,
    throughput_line,
    throughput_meter,
    training_flops,
)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# meta-llama/Llama-3.2-1B's config.json
LLAMA_32_1B = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)  # fmt: skip


def test_llama_3_2_1b_costs_its_matmul_weights_twice_forward_and_once_more_backward():
    # per layer: q and o 2048x2048, k and v 2048x512 (8 kv heads of 64), gate/up/down 2048x8192; the output head
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192
    weights = 16 * per_layer + 2048 * 128256
    assert weights == 1_235_746_816  # the 1.24B parameters less the norms (the tied embedding counted once)
    flops = training_flops(Architecture.from_config(LLAMA_32_1B), [], r=16)
    assert flops.per_token == 2 * (2 * weights)  # frozen: forward + backward for the activations, no weight grads
    assert flops.per_token / 2 == pytest.approx(2 * 1.24e9, rel=0.01)
    assert flops.per_context_token == 3 * 16 * (2 * 2 * 32 * 64)  # QK^T and scores x V, forward + 2x backward
    # a packed row of sequences 100 and 300 long: the attention term follows each sequence, not the row
    assert flops.of(400, 100**2 + 300**2) == 400 * flops.per_token + (100**2 + 300**2) * flops.per_context_token


def test_lora_adds_three_times_its_forward_in_proportion_to_r():
    arch = Architecture.from_config(LLAMA_32_1B)
    frozen = training_flops(arch, [], r=16).per_token
    # per layer, in + out features: q 2048+2048, k and v 2048+512, o 2048+2048, gate/up/down 2048+8192
    lora_widths = 16 * (4096 + 2560 + 2560 + 4096 + 3 * 10240)
    assert training_flops(arch, LLAMA_TARGETS, r=16).per_token - frozen == 3 * 2 * 16 * lora_widths
    assert training_flops(arch, LLAMA_TARGETS, r=64).per_token - frozen == 3 * 2 * 64 * lora_widths
    assert training_flops(arch, ["q_proj", "v_proj"], r=8).per_token - frozen == 3 * 2 * 8 * 16 * (4096 + 2560)
    with pytest.raises(ValueError, match="LoRA target c_attn not in llama's FLOPs table"):
        training_flops(arch, ["c_attn"], r=8)


def test_bloom_counts_its_fused_qkv_and_4h_mlp():
    arch = Architecture.from_config(BloomConfig(hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880))  # 560m
    weights = 24 * (1024 * 3072 + 1024 * 1024 + 2 * 1024 * 4096) + 1024 * 250880
    flops = training_flops(arch, ["query_key_value", "dense"], r=8)
    assert flops.per_token == 4 * weights + 3 * 2 * 8 * 24 * ((1024 + 3072) + (1024 + 1024))
    assert flops.per_context_token == 3 * 24 * 4 * 1024


def test_sequence_lengths_of_padded_packed_and_full_rows():
    padded = {"input_ids": torch.zeros(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    packed = {"input_ids": torch.zeros(1, 7), "cu_seq_lens_q": torch.tensor([0, 3, 7], dtype=torch.int32)}
    assert sequence_lengths(padded).tolist() == [3, 2]
    assert sequence_lengths(packed).tolist() == [3, 4]
    assert sequence_lengths({"input_ids": torch.zeros(3, 5)}).tolist() == [5, 5, 5]
    flops = training_flops(Architecture.from_config(LLAMA_32_1B), LLAMA_TARGETS, r=16)
    assert flops.of_batches([padded, packed]) == flops.of(12, 9 + 4 + 9 + 16)


@pytest.mark.parametrize(
    "name,precision,tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA H200 NVL", "fp16", 835.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
        ("NVIDIA A10", "bf16", 125.0),
        ("NVIDIA L4", "fp16", 121.0),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
        ("Tesla V100-SXM2-16GB", "fp16", 125.0),
        ("Tesla V100-PCIE-32GB", "tf32", 14.0),  # no TF32 units: fp32 on the CUDA cores
        ("NVIDIA H100 80GB HBM3", "fp32", 66.9),
    ],
)
def test_mfu_is_achieved_flops_per_device_over_the_named_gpus_peak(monkeypatch, name, precision, tflops):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3210 * MIB)
    device = torch.device("cuda")
    peak = peak_compute(device, precision)
    assert (peak.tflops, peak.device, peak.unknown) == (tflops, name, None)
    flops = training_flops(Architecture.from_config(LLAMA_32_1B), LLAMA_TARGETS, r=16)
    meter = ThroughputMeter(flops, peak, device, world_size=2)
    tokens_per_s, seconds = 5_000.0, 4.0  # both ranks together, sequences of 512
    done = flops.of(tokens_per_s * seconds, tokens_per_s * seconds * 512)
    metrics = meter.step_metrics(done, seconds)
    per_device = (flops.per_token + 512 * flops.per_context_token) * tokens_per_s / 2
    assert metrics["train/mfu"] == pytest.approx(per_device / (tflops * 1e12), rel=1e-12)
    assert metrics["train/peak_memory_mib"] == 3210


@pytest.mark.parametrize(
    "name,precision,why",
    [
        ("NVIDIA A10G", "bf16", "unknown GPU NVIDIA A10G"),
        ("NVIDIA L40S", "bf16", "unknown GPU NVIDIA L40S"),
        ("Tesla V100-SXM2-32GB", "bf16", "Tesla V100-SXM2-32GB has no bf16 units"),
    ],
)
def test_an_unknown_gpu_or_precision_has_no_mfu_and_says_why(monkeypatch, name, precision, why):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    peak = peak_compute(torch.device("cuda"), precision)
    assert (peak.tflops, peak.unknown) == (None, why)
    meter = throughput_meter(LLAMA_32_1B, LLAMA_TARGETS, 16, torch.device("cuda"), precision, world_size=1)
    assert "train/mfu" not in meter.step_metrics(1e15, 1.0) and meter.why_no_mfu() == why


def test_on_cpu_mfu_is_absent_and_the_peak_memory_is_the_resident_set():
    meter = throughput_meter(LLAMA_32_1B, LLAMA_TARGETS, 16, torch.device("cpu"), "fp32", world_size=1)
    metrics = meter.step_metrics(2e12, 1.0)
    assert "train/mfu" not in metrics and meter.why_no_mfu() == "CPU"
    assert metrics["train/model_tflops_per_s_per_worker"] == 2.0
    assert 10 < metrics["train/peak_memory_mib"] < 64 * 1024  # this process's RSS: torch alone is more than 10 MiB
    unknown = throughput_meter(LlamaConfig(), ["c_attn"], 16, torch.device("cpu"), "fp32", world_size=1)
    assert unknown.flops is None and unknown.why_no_mfu() == "LoRA target c_attn not in llama's FLOPs table"


def test_matmul_precision_follows_autocast_then_the_compute_dtype(monkeypatch):
    assert matmul_precision(torch.float32, "bf16") == "bf16"
    assert matmul_precision(torch.float16, "no") == "fp16"
    assert matmul_precision(torch.bfloat16, "no") == "bf16"
    monkeypatch.setattr(throughput.torch, "get_float32_matmul_precision", lambda: "highest")
    assert matmul_precision(torch.float32, "no") == "fp32"
    monkeypatch.setattr(throughput.torch, "get_float32_matmul_precision", lambda: "high")
    assert matmul_precision(torch.float32, "no") == "tf32"


def test_the_summary_line_on_a_gpu_and_on_cpu():
    gpu = {"tokens_per_s": 12345.4, "tokens_per_s_per_worker": 6172.7, "mfu": 0.41234, "mfu_unknown": None,
           "device": "NVIDIA H200", "precision": "bf16", "peak_tflops": 989.4, "peak_memory_mib": 3210.2,
           "peak_memory_kind": "device"}  # fmt: skip
    assert throughput_line(gpu) == (
        "throughput: 12,345 tokens/s (6,173 per worker), MFU 41.2% of 989 TFLOPS (NVIDIA H200, bf16), "
        "peak memory 3,210 MiB"
    )
    cpu = {**gpu, "mfu": None, "mfu_unknown": "CPU", "peak_memory_mib": 812.0, "peak_memory_kind": "RSS"}
    assert throughput_line(cpu) == (
        "throughput: 12,345 tokens/s (6,173 per worker), MFU n/a (CPU), peak memory 812 MiB (RSS)"
    )


@pytest.mark.slow
def test_a_run_logs_its_throughput_every_step_records_it_and_prints_it_last(tmp_path, bases, capsys):
    overrides = ["task=detox", "model=tiny-llama", "training=demo", "task.data.max_examples=40", "training.max_steps=2",
                 "training.eval_steps=0", "training.max_eval_examples=8", "evaluation.generate=false",
                 "logging.progress_bar=false", f"output_dir={tmp_path}"]  # fmt: skip
    cfg = compose_config(overrides)
    run_training(cfg)
    steps = [row for row in read_metrics(tmp_path) if "train/loss" in row]
    assert [row["step"] for row in steps] == [1, 2]
    for row in steps:
        assert row["train/peak_memory_mib"] > 0 and row["train/tokens_per_s"] > 0
        assert row["train/model_tflops_per_s_per_worker"] > 0 and "train/mfu" not in row
    run = json.loads((tmp_path / "adapter" / "dpeft_adapter.json").read_text())["run"]["throughput"]
    # tiny-llama: width 128, MLP 256, 2 layers, 2 heads of 64 (2 kv heads), its tokenizer's vocabulary; LoRA on all
    # seven linears
    vocab = json.loads((bases["tiny-llama"] / "config.json").read_text())["vocab_size"]
    weights = 2 * (4 * 128 * 128 + 3 * 128 * 256) + 128 * vocab
    lora_widths = 2 * (4 * (128 + 128) + 3 * (128 + 256))
    assert run["model_flops_per_token"] == 4 * weights + 6 * cfg.peft.r * lora_widths
    assert (run["mfu"], run["mfu_unknown"], run["peak_memory_kind"]) == (None, "CPU", "RSS")
    assert run["tokens_per_s"] == steps[-1]["train/tokens_per_s"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"throughput: [\d,]+ tokens/s \([\d,]+ per worker\), MFU n/a \(CPU\), "
                        r"peak memory [\d,]+ MiB \(RSS\)", last), last  # fmt: skip
