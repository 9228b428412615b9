"""Real architectures with random weights (`dpeft-train model=llama-3.2-1b model.weights=random`): no download.

The model is built from the bundled copy of its Hub config.json (resources/hub_configs/<name>.json: architecture
numbers only, with their source), with the keys of `model.config_overrides` replaced (a shrunk copy for tests), a
seeded init (`model.init_seed`) and the tokenizer of its family's embedded base (tiny-llama, tiny-bloom: built if
missing). It is saved as a plain transformers folder, so every loader reads it as a local model: QLoRA quantizes the
random weights through `from_pretrained(..., quantization_config=...)`, the path transformers supports (it does not
quantize in `from_config`). Cached under `$DPEFT_HOME/bases/<name>-random-<digest>`; the digest names the recipe
(config, overrides, seed, dtype, tokenizer) and is the base's fingerprint, `random:<digest>`, so an adapter trained
on it is never taken for one trained on the real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from distributed_peft.config import ModelConfig
from distributed_peft.constants import CONF_DIR, HUB_CONFIGS_DIR
from distributed_peft.errors import ConfigError, StorageError
from distributed_peft.modeling.embedded_base import (
    BASE_METADATA,
    build_base,
    build_lock,
    dpeft_home,
    recipe_digest,
    save_base,
    whole_on_this_process,
)

TOKENIZER_BASES = {"llama": "tiny-llama", "mistral": "tiny-llama", "bloom": "tiny-bloom"}
SAVED_DTYPES = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CACHE_SLACK_BYTES = 16 * 2**20


def bundled_config(name: str) -> dict[str, Any]:
    """{"source": the Hub URL it was copied from, "config": its config.json's architecture keys}."""
    return json.loads((HUB_CONFIGS_DIR / f"{name}.json").read_text())


def tokenizer_base_config(family: str) -> DictConfig:
    """The model config of the embedded base whose tokenizer a random base of `family` uses, as `model=NAME` composes
    it (the schema's defaults under the YAML), so both find the same cached base."""
    name = TOKENIZER_BASES[family]
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))


def random_model_config(model_cfg: DictConfig, tokenizer=None):
    """The transformers config: the bundled config.json with the overrides; token ids from `tokenizer` when given."""
    from transformers import AutoConfig

    values = {**bundled_config(model_cfg.name)["config"], **OmegaConf.to_container(model_cfg.config_overrides)}
    values.pop("architectures", None)
    if tokenizer is not None:
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        values.update({key: getattr(tokenizer, key) for key in ids})
    return AutoConfig.for_model(values.pop("model_type"), **values)


def parameter_count(config) -> int:
    """Parameters of the model `config` describes, built on the meta device (nothing allocated); tied ones once."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), whole_on_this_process():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def random_digest(model_cfg: DictConfig) -> str:
    """12 hex digits naming a random base's recipe: its config, overrides, seed, saved dtype and tokenizer."""
    recipe = {
        "config": bundled_config(model_cfg.name)["config"],
        "overrides": OmegaConf.to_container(model_cfg.config_overrides),
        "init_seed": model_cfg.init_seed,
        "dtype": str(SAVED_DTYPES[model_cfg.torch_dtype]),
        "tokenizer": recipe_digest(tokenizer_base_config(model_cfg.family)),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def random_base_dir(model_cfg: DictConfig) -> Path:
    return dpeft_home() / "bases" / f"{model_cfg.name}-random-{random_digest(model_cfg)}"


def build_random_base(model_cfg: DictConfig) -> tuple[Path, str]:
    """Build (or find in the cache) the random-weight base of a model config: (its directory, its digest)."""
    digest = random_digest(model_cfg)
    target = random_base_dir(model_cfg)
    if (target / BASE_METADATA).is_file():
        return target, digest
    tokenizer_dir = build_base(tokenizer_base_config(model_cfg.family))
    target.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(target):
        if (target / BASE_METADATA).is_file():
            return target, digest  # another process built it while this one waited
        _build(model_cfg, target, tokenizer_dir, digest)
    return target, digest


def _check_space(model_cfg: DictConfig, directory: Path, parameters: int) -> None:
    needed = parameters * SAVED_DTYPES[model_cfg.torch_dtype].itemsize + CACHE_SLACK_BYTES
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise StorageError(
            f"DPEFT_HOME={str(dpeft_home())!r}: {directory} has {free / 2**20:,.0f} MiB free, the random-weight "
            f"{model_cfg.name} needs {math.ceil(needed / 2**20):,} MiB; free space there or set DPEFT_HOME elsewhere"
        )


def _build(model_cfg: DictConfig, target: Path, tokenizer_dir: Path, digest: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = random_model_config(model_cfg, tokenizer)
    if config.vocab_size < len(tokenizer):
        raise ConfigError(
            f"model.config_overrides.vocab_size={config.vocab_size} is invalid; it must be >= {len(tokenizer)}, "
            f"the size of {TOKENIZER_BASES[model_cfg.family]}'s tokenizer that model.weights=random uses"
        )
    parameters = parameter_count(config)
    _check_space(model_cfg, target.parent, parameters)
    print(f"Building {model_cfg.name} with random weights ({parameters:,} parameters) in {target}", flush=True)
    with torch.random.fork_rng(devices=[]):  # a cached base and a fresh one leave the run's RNG alike
        torch.manual_seed(model_cfg.init_seed)
        with whole_on_this_process():
            model = AutoModelForCausalLM.from_config(config, dtype=SAVED_DTYPES[model_cfg.torch_dtype])
    metadata = {
        "name": model_cfg.name,
        "family": model_cfg.family,
        "weights": "random",
        "fingerprint": f"random:{digest}",
        "source": bundled_config(model_cfg.name)["source"],
        "config_overrides": OmegaConf.to_container(model_cfg.config_overrides),
        "init_seed": model_cfg.init_seed,
        "parameters": parameters,
    }
    save_base(target, model, tokenizer, metadata)
