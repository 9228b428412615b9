"""How hard a run works its devices: model FLOPs per trained token from the architecture, the device's peak dense
TFLOPS, MFU, and the peak memory of the process.

The convention is PaLM's model FLOPs utilisation (Chowdhery et al. 2022, appendix B): the FLOPs the model needs,
not the FLOPs the hardware ran. A matmul of m x k by k x n counts 2mkn; gradient checkpointing's recompute, QLoRA's
dequantisation, padding and elementwise work (norms, activations, softmax, dropout) count nothing. Attention counts
QK^T and the weighted sum of V over the whole sequence (not halved for the causal mask, as PaLM), with each
sequence's own length: a packed row's examples and a padded row's real tokens, not the padded width. For LoRA and
QLoRA the base is frozen, so a token costs the base's forward, its backward for activations only (no weight
gradients: one more forward's worth of matmuls; attention's backward is twice its forward, both operands being
activations), and each adapted linear's A and B forward, backward and weight gradients (three times their forward).
transformers' `floating_point_ops` (6 x parameters per token) is the full fine-tuning count without attention, and
torch's datasheet table (torch._inductor.analysis.device_info) is private, matches exact names only and lacks most of
the devices below: hence this module.
"""

from __future__ import annotations

import re
import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch

MIB = 2**20


@dataclass(frozen=True)
class Architecture:
    """The sizes of a decoder that decide its FLOPs, read from its transformers config."""

    family: str  # llama (Llama, Mistral and other Llama-shaped decoders) or bloom
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> Architecture:
        """Llama-shaped (q/k/v/o and a gated MLP) or BLOOM (fused query_key_value, 4h MLP); ValueError otherwise."""
        if config.model_type == "bloom":
            hidden, heads = config.hidden_size, config.n_head
            return cls("bloom", config.n_layer, hidden, 4 * hidden, heads, heads, hidden // heads, config.vocab_size)
        if not all(hasattr(config, key) for key in ("intermediate_size", "num_key_value_heads")):
            raise ValueError(f"architecture {config.model_type} not in the FLOPs table")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            "llama",
            config.num_hidden_layers,
            config.hidden_size,
            config.intermediate_size,
            heads,
            config.num_key_value_heads or heads,
            head_dim,
            config.vocab_size,
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Each layer's linear modules by name, as (in features, out features)."""
        h, attention = self.hidden, self.heads * self.head_dim
        if self.family == "bloom":
            return {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, 4 * h),
                    "dense_4h_to_h": (4 * h, h)}  # fmt: skip
        kv = self.kv_heads * self.head_dim
        return {"q_proj": (h, attention), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (attention, h),
                "gate_proj": (h, self.intermediate), "up_proj": (h, self.intermediate),
                "down_proj": (self.intermediate, h)}  # fmt: skip

    def matmul_weights(self) -> int:
        """Weights a token is multiplied by: every layer's linears and the output head (the embedding is a lookup)."""
        return self.layers * sum(a * b for a, b in self.linear_shapes().values()) + self.hidden * self.vocab


@dataclass(frozen=True)
class TrainingFlops:
    """A sequence of length s costs `per_token * s + per_context_token * s * s` model FLOPs to train on."""

    per_token: float
    per_context_token: float

    def of(self, tokens: float, squared_lengths: float) -> float:
        """Model FLOPs of sequences holding `tokens` tokens in all, their squared lengths summing to squared_lengths."""
        return self.per_token * tokens + self.per_context_token * squared_lengths

    def of_batches(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """Model FLOPs of micro batches (one host sync for all of them)."""
        lengths = torch.cat([sequence_lengths(batch) for batch in batches]).double()
        tokens, squared_lengths = torch.stack([lengths.sum(), (lengths * lengths).sum()]).tolist()
        return self.of(tokens, squared_lengths)


def training_flops(arch: Architecture, lora_targets: list[str], r: int) -> TrainingFlops:
    """Model FLOPs of LoRA/QLoRA training: frozen base forward + activation backward, adapters forward + backward +
    weight gradients, attention forward + backward; ValueError for a LoRA target the architecture does not have."""
    shapes = arch.linear_shapes()
    unknown = [name for name in lora_targets if name not in shapes]
    if unknown:
        raise ValueError(f"LoRA target {unknown[0]} not in {arch.family}'s FLOPs table")
    base_forward = 2 * arch.matmul_weights()
    lora_forward = arch.layers * sum(2 * r * (shapes[name][0] + shapes[name][1]) for name in lora_targets)
    attention_forward = arch.layers * 2 * 2 * arch.heads * arch.head_dim  # QK^T and scores x V, per context token
    return TrainingFlops(2 * base_forward + 3 * lora_forward, 3 * attention_forward)


def sequence_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The length of every sequence in a micro batch: a packed row's examples, a padded row's real tokens."""
    if "cu_seq_lens_q" in batch:
        return batch["cu_seq_lens_q"].diff()
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(dim=-1)
    rows, width = batch["input_ids"].shape
    return torch.full((rows,), width, device=batch["input_ids"].device)


# Peak dense (no 2:4 sparsity) tensor-core TFLOPS per GPU, from NVIDIA's datasheets (A10, L4, A100, H100, H200; their
# Hopper and Ada figures are printed "with sparsity": halved here), the V100 datasheet (fp16 tensor cores, no bf16, no
# TF32), and the Ada Lovelace whitepaper for the RTX 4090 (fp16/bf16 with fp32 accumulate, as PyTorch's matmuls run).
# fp32 is the CUDA-core figure, used when TF32 is off (PyTorch's default for matmuls). Matched against
# torch.cuda.get_device_name() in this order; a name that matches none (A10G, L40S, H800, ...) has no MFU.
@dataclass(frozen=True)
class DevicePeak:
    bf16: float | None
    fp16: float
    tf32: float | None
    fp32: float

    def tflops(self, precision: str) -> float | None:
        """The peak for bf16, fp16, tf32 or fp32 matmuls; None where the device has no such units (V100's bf16)."""
        if precision == "tf32":
            return self.tf32 or self.fp32  # without TF32 units an fp32 matmul runs on the CUDA cores
        return getattr(self, precision)


PEAK_TFLOPS: list[tuple[str, DevicePeak]] = [
    (r"V100S", DevicePeak(bf16=None, fp16=130.0, tf32=None, fp32=16.4)),
    (r"V100-PCIE", DevicePeak(bf16=None, fp16=112.0, tf32=None, fp32=14.0)),
    (r"V100-(SXM2|DGXS)", DevicePeak(bf16=None, fp16=125.0, tf32=None, fp32=15.7)),
    (r"\bA10\b", DevicePeak(bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2)),
    (r"\bL4\b", DevicePeak(bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3)),
    (r"\bA100\b", DevicePeak(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5)),  # SXM4 and PCIe alike
    (r"\bH100\b.*PCIe", DevicePeak(bf16=756.0, fp16=756.0, tf32=378.0, fp32=51.0)),
    (r"\bH[12]00\b.*NVL", DevicePeak(bf16=835.0, fp16=835.0, tf32=417.5, fp32=60.0)),
    (r"\bH[12]00\b", DevicePeak(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9)),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"RTX 4090(?! D)", DevicePeak(bf16=165.2, fp16=165.2, tf32=82.6, fp32=82.6)),
]


def device_peak(device_name: str) -> DevicePeak | None:
    for pattern, peak in PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return peak
    return None


def matmul_precision(compute_dtype: torch.dtype, mixed_precision: str) -> str:
    """bf16, fp16, tf32 or fp32: what the run's matmuls run in (autocast first, else the compute dtype)."""
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    if compute_dtype in (torch.bfloat16, torch.float16):
        return "bf16" if compute_dtype == torch.bfloat16 else "fp16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@dataclass(frozen=True)
class PeakCompute:
    """The device's peak for the run's precision, or why there is none (then MFU is absent, never 0)."""

    tflops: float | None
    device: str
    precision: str
    unknown: str | None = None  # a few words: "CPU", "unknown GPU NVIDIA A10G", ...


def peak_compute(device: torch.device, precision: str) -> PeakCompute:
    if device.type != "cuda":
        return PeakCompute(None, device.type.upper(), precision, unknown=device.type.upper())
    name = torch.cuda.get_device_name(device)
    peak = device_peak(name)
    if peak is None:
        return PeakCompute(None, name, precision, unknown=f"unknown GPU {name}")
    tflops = peak.tflops(precision)
    if tflops is None:
        return PeakCompute(None, name, precision, unknown=f"{name} has no {precision} units")
    return PeakCompute(tflops, name, precision)


def mfu(flops_per_s_per_device: float, peak: PeakCompute) -> float | None:
    """Achieved model FLOPs per second of one device over its peak; None when the peak is unknown."""
    return None if peak.tflops is None else flops_per_s_per_device / (peak.tflops * 1e12)


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """The process's peak memory so far and its kind: allocated device memory on CUDA, else the resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB, "device"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / MIB, "RSS"


@dataclass
class ThroughputMeter:
    """What a run measures as it trains: its model FLOPs (None when the architecture has no count) and the device's
    peak; turns cumulative FLOPs and seconds into `train/mfu`, `train/model_tflops_per_s_per_worker` and
    `train/peak_memory_mib`."""

    flops: TrainingFlops | None
    peak: PeakCompute
    device: torch.device
    world_size: int
    unknown_flops: str | None = None  # why the FLOPs cannot be counted

    def step_metrics(self, flops_done: float, seconds: float) -> dict[str, float]:
        metrics = {"train/peak_memory_mib": peak_memory_mib(self.device)[0]}
        if self.flops is not None and seconds > 0:
            per_device = flops_done / seconds / self.world_size
            metrics["train/model_tflops_per_s_per_worker"] = per_device / 1e12
            utilisation = mfu(per_device, self.peak)
            if utilisation is not None:
                metrics["train/mfu"] = utilisation
        return metrics

    def why_no_mfu(self) -> str | None:
        return self.peak.unknown if self.flops is not None else self.unknown_flops


def throughput_meter(model_config: Any, lora_targets: list[str], r: int, device: torch.device, precision: str,
                     world_size: int) -> ThroughputMeter:  # fmt: skip
    """The meter for a run on this architecture and device; FLOPs it cannot count leave MFU absent, with the reason."""
    try:
        flops, unknown = training_flops(Architecture.from_config(model_config), lora_targets, r), None
    except ValueError as exc:
        flops, unknown = None, str(exc)
    return ThroughputMeter(flops, peak_compute(device, precision), device, world_size, unknown_flops=unknown)


def throughput_summary(meter: ThroughputMeter, last: dict[str, float], peak_memory: float) -> dict[str, Any]:
    """The run's record of its speed: the last step's cumulative rates, MFU or why not, the peak memory."""
    return {
        "tokens_per_s": last.get("train/tokens_per_s"),
        "tokens_per_s_per_worker": last.get("train/tokens_per_s_per_worker"),
        "model_tflops_per_s_per_worker": last.get("train/model_tflops_per_s_per_worker"),
        "mfu": last.get("train/mfu"),
        "mfu_unknown": meter.why_no_mfu(),
        "device": meter.peak.device,
        "precision": meter.peak.precision,
        "peak_tflops": meter.peak.tflops,
        "peak_memory_mib": peak_memory,
        "peak_memory_kind": peak_memory_mib(meter.device)[1],
        "model_flops_per_token": meter.flops.per_token if meter.flops else None,  # attention's term (x length) apart
    }


def throughput_line(summary: dict[str, Any]) -> str:
    """`throughput: 12,345 tokens/s (6,172 per worker), MFU 41.2% of 989 TFLOPS (NVIDIA H200, bf16), peak memory
    3,210 MiB`; MFU n/a (<why>) where it is unknown, (RSS) where the peak memory is the process's resident set."""
    if summary["mfu"] is not None:
        mfu_text = (f"MFU {summary['mfu']:.1%} of {summary['peak_tflops']:,.0f} TFLOPS "
                    f"({summary['device']}, {summary['precision']})")  # fmt: skip
    else:
        mfu_text = f"MFU n/a ({summary['mfu_unknown'] or 'no training step timed'})"
    memory = f"peak memory {summary['peak_memory_mib']:,.0f} MiB"
    if summary["peak_memory_kind"] == "RSS":
        memory += " (RSS)"
    tokens = summary["tokens_per_s"] or 0.0
    per_worker = summary["tokens_per_s_per_worker"] or 0.0
    return f"throughput: {tokens:,.0f} tokens/s ({per_worker:,.0f} per worker), {mfu_text}, {memory}"
