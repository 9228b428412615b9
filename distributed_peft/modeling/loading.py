"""The base model: where it comes from, how it is quantized (QLoRA) and how LoRA attaches to it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distributed_peft.config import lora_targets
from distributed_peft.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseIdentity:
    """What an adapter records about the base it was trained on, and checks again when loaded."""

    name: str
    family: str
    name_or_path: str
    fingerprint: str
    recipe: str | None = None  # recipe digest of an embedded base (embedded_base.recipe_digest), else None
    weights: str | None = None  # "random" for a base built with model.weights=random (never a real checkpoint),
    # "gguf" for one converted from a GGUF file (the quantized checkpoint's values, not the original's)
    gguf: str | None = None  # that GGUF: file name, origin, weight types, content digest (gguf_base.gguf_source)

    def to_dict(self) -> dict[str, str]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def portable_base_name(base: dict[str, Any]) -> str:
    """The base as another machine names it: its Hub id, or for a local or embedded base the name that `model=NAME`
    loads or rebuilds, never a path of this machine."""
    name_or_path = base["name_or_path"]
    local = Path(name_or_path).is_absolute() or Path(name_or_path).exists()
    return base["name"] if local else name_or_path


def resolve_base(model_cfg: DictConfig) -> tuple[str, BaseIdentity]:
    """The directory or hub id to load, and the base's identity (weights sha256 for embedded bases).

    A hub id is checked first (distributed_peft/runtime/hub.py): unreachable and not cached is a one-line ConfigError.
    model.weights=random builds the architecture locally with random weights (modeling/random_base.py): no Hub at all.
    """
    if model_cfg.get("weights") == "random":
        from distributed_peft.modeling.random_base import build_random_base

        directory, digest = build_random_base(model_cfg)
        identity = BaseIdentity(model_cfg.name, model_cfg.family, model_cfg.name, f"random:{digest}", weights="random")
        return str(directory), identity
    if model_cfg.get("gguf_file"):
        from distributed_peft.modeling.embedded_base import base_metadata
        from distributed_peft.modeling.gguf_base import build_gguf_base

        directory, source = build_gguf_base(model_cfg)
        metadata = base_metadata(directory)
        path = model_cfg.name_or_path  # the original's Hub id: what a card names, never this machine's cache path
        # the GGUF's content digest is its recipe: the same file dequantized on another CPU is the same base
        recipe = "gguf-" + metadata["gguf"]["sha256"][:12]
        return str(directory), BaseIdentity(
            model_cfg.name, model_cfg.family, path, metadata["fingerprint"], recipe, weights="gguf", gguf=source
        )
    if model_cfg.embedded:
        from distributed_peft.modeling.embedded_base import base_metadata, build_base, recipe_digest

        directory = build_base(model_cfg)
        fingerprint = base_metadata(directory)["fingerprint"]
        identity = BaseIdentity(model_cfg.name, model_cfg.family, model_cfg.name, fingerprint, recipe_digest(model_cfg))
        return str(directory), identity
    path = model_cfg.name_or_path
    if Path(path).is_dir():
        from distributed_peft.modeling.embedded_base import weights_fingerprint

        return path, BaseIdentity(model_cfg.name, model_cfg.family, path, weights_fingerprint(path))
    from distributed_peft.runtime.hub import resolve_hub_model

    # an unreachable Hub is one line now, not a minute of retries when the weights load
    return resolve_hub_model(path), BaseIdentity(model_cfg.name, model_cfg.family, path, f"hub:{path}")


def compute_dtype(cfg: DictConfig) -> torch.dtype:
    """The dtype the frozen base computes in: the run's mixed precision (bfloat16 or float16), float32 on CPU.

    An explicit peft.quantization.compute_dtype is used as written; model.torch_dtype=float32 keeps the base in full
    precision; otherwise (auto, or a checkpoint's half dtype) the base computes in training.mixed_precision's half
    dtype, or this GPU's own (runtime/distributed.auto_precision) where that says auto or no or cannot run here (a bf16
    run's adapter evaluated on a V100): a V100 computes a bfloat16 checkpoint in float16, with fp16 mixed precision.
    """
    from distributed_peft.runtime.distributed import PRECISION_DTYPES, auto_precision, bf16_supported

    if not torch.cuda.is_available():
        return torch.float32
    quantized = cfg.peft.get("quantization", {}).get("compute_dtype", "auto") if cfg.peft.method == "qlora" else "auto"
    if quantized != "auto":
        if quantized == "bfloat16" and not bf16_supported():
            raise ConfigError(
                f"peft.quantization.compute_dtype='bfloat16' is not possible on {torch.cuda.get_device_name()} (no "
                "native bf16); allowed here: auto (float16 here), float16, float32"
            )
        return DTYPES[quantized]
    if cfg.model.torch_dtype == "float32":
        return torch.float32
    precision = cfg.training.mixed_precision
    if precision not in ("bf16", "fp16") or (precision == "bf16" and not bf16_supported()):
        precision = auto_precision()
    return PRECISION_DTYPES[precision]


def quantization_config(cfg: DictConfig, sharded_parameters: bool = False):
    """bitsandbytes 4-bit config; under ZeRO-3/FSDP the 4-bit storage dtype is the compute dtype so shards match."""
    from transformers import BitsAndBytesConfig

    quant = cfg.peft.quantization
    dtype = compute_dtype(cfg)
    storage = quant.quant_storage
    if storage == "auto":
        storage_dtype = dtype if sharded_parameters else torch.uint8
    else:
        storage_dtype = torch.uint8 if storage == "uint8" else DTYPES.get(storage, dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=storage_dtype,
    )


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # hub Llama tokenizers ship without a pad token
    return tokenizer


def load_base_model(cfg: DictConfig, path: str, device: torch.device | str = "cpu", sharded_parameters: bool = False):
    """The frozen base: 4-bit for QLoRA (on `device`), or in the model's dtype for LoRA.

    transformers never wraps a quantized model in DeepSpeed's zero.Init, so under ZeRO-3 the 4-bit base loads
    whole on each rank and DeepSpeed shards it when prepared (its storage dtype equal to the compute dtype).
    """
    from transformers import AutoModelForCausalLM

    attention = cfg.model.attn_implementation
    if cfg.training.packing == "padding_free":
        from distributed_peft.modeling.packed_attention import packed_attention_implementation

        attention = packed_attention_implementation(attention)  # flash varlen on CUDA, sdpa per example on CPU
    kwargs = {
        "dtype": compute_dtype(cfg),
        "attn_implementation": attention,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    if cfg.peft.method == "qlora":
        kwargs["quantization_config"] = quantization_config(cfg, sharded_parameters)
        if not sharded_parameters:  # ZeRO-3 and FSDP place (and shard) the weights themselves
            kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    return model


def attach_lora(model, cfg: DictConfig, gradient_checkpointing: bool = False, adapters: Sequence[tuple[str, int]] = ()):
    """Wrap the base in trainable LoRA adapters over the configured target modules.

    `adapters`: (name, seed) of each adapter, each initialised right after torch is seeded with its seed, so that an
    adapter of a multi-task job starts exactly as it would alone; empty: one adapter, "default", on torch's RNG as
    it stands. Every adapter stays trainable (the active one is chosen per step with `activate_adapter`).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from distributed_peft.modeling.lora_dropout import use_sparse_dropout

    targets = lora_targets(cfg)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ConfigError(
            f"peft.target_modules={targets} names module(s) {', '.join(missing)} that model {cfg.model.name} "
            f"does not have; allowed: module names of its {cfg.model.family} layers"
        )
    if cfg.peft.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.peft.r,
        lora_alpha=cfg.peft.alpha,
        lora_dropout=cfg.peft.dropout,
        target_modules=targets,
        bias=cfg.peft.bias,
        task_type="CAUSAL_LM",
    )
    for index, (name, seed) in enumerate(adapters or [("default", None)]):
        if seed is not None:
            torch.manual_seed(seed)
        model = get_peft_model(model, lora, adapter_name=name) if index == 0 else _added(model, name, lora)
    use_sparse_dropout(model)  # the same dropout distribution, without one random draw per element on CPU
    return model


def _added(model, name: str, lora):
    """A further adapter added to a peft model; every adapter stays trainable (peft freezes all but the active one,
    which under DDP or ZeRO would drop the others from the gradient reduction and the optimizer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model.add_adapter(name, lora)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                for layer in getattr(module, layer_name).values():
                    layer.requires_grad_(True)
    return model


def activate_adapter(model, name: str, others_at_zero: bool = False) -> None:
    """Route the forward through adapter `name`, without touching which parameters require grad (peft's set_adapter
    would freeze the others, changing the set of trainable parameters that DDP and ZeRO were set up with).

    `others_at_zero`: the other adapters stay in the forward, scaled by 0, so that each step gives them gradients of
    exactly zero (the active adapter's output is unchanged: adding 0.0 is exact). DeepSpeed's ZeRO needs it: it
    keeps the gradient partition of a parameter that got no gradient from its last step, which would enter the
    global norm that clipping scales every update by; FSDP's gradient hooks then fire for every parameter as when
    one adapter trains. `model` is the peft model (unwrapped).
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if others_at_zero and isinstance(module, LoraLayer):
            scales = module.__dict__.setdefault("_dpeft_scaling", dict(module.scaling))  # as peft set them
            module.scaling.update({a: (s if a == name else 0.0) for a, s in scales.items()})
            for adapter, dropout in module.lora_dropout.items():
                dropout.idle = adapter != name  # SparseDropout draws no mask for an adapter at scale 0
            module._active_adapter = [name, *(a for a in scales if a != name)]
        else:
            module._active_adapter = [name]
    model.base_model.active_adapter = name


def apply_liger_kernel(model) -> bool:
    """Swap in Liger's fused kernels (RMSNorm, RoPE, SwiGLU) on CUDA when installed; whether they are on.

    The model's forward stays transformers' own: the training loss calls Liger's fused linear cross-entropy itself
    (modeling/objective.CompletionLoss), since it is computed outside the forward, with completion-only labels.
    """
    import warnings

    if not torch.cuda.is_available():
        warnings.warn("training.liger_kernel=true ignored: Liger kernels need CUDA", stacklevel=2)
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        warnings.warn("training.liger_kernel=true ignored: pip install liger-kernel to use it", stacklevel=2)
        return False
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
    return True
