"""Mixed precision and the DeepSpeed config's numbers, decided on CPU: the GPU is faked (its capability and name).

A V100 (compute capability 7.0) emulates bf16 slowly, so `auto` trains it in fp16 with a loss scaler and the 4-bit base
computes in float16; an A100 (8.0) gets bf16; a CPU none. The DeepSpeed templates' "auto" values are filled from the
run's config in the training process, as they are in the files dpeft-launch writes.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROJECT_ROOT, compose_config, patch_everywhere, run_entry

from distributed_peft.errors import ConfigError
from distributed_peft.modeling.loading import compute_dtype, quantization_config
from distributed_peft.runtime.distributed import deepspeed_plugin_for, fill_deepspeed_config, resolve_mixed_precision

V100 = ((7, 0), "Tesla V100-SXM2-16GB")
A100 = ((8, 0), "NVIDIA A100-SXM4-80GB")
BF16_ON_V100 = (
    "training.mixed_precision='bf16' is not possible on Tesla V100-SXM2-16GB (compute capability 7.0; bf16 needs 8.0 "
    "or later); allowed here: fp16 (with a loss scaler, what auto picks), no"
)


@pytest.fixture
def gpu(monkeypatch):
    """Make this process see one GPU of the given (capability, name); None: no GPU."""

    def fake(device):
        if device is None:
            monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
            return
        capability, name = device
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.version, "hip", None)

    return fake


@pytest.mark.parametrize(
    "device,precision,dtype",
    [(V100, "fp16", torch.float16), (A100, "bf16", torch.bfloat16), (None, "no", torch.float32)],
    ids=["v100", "a100", "cpu"],
)
def test_auto_precision_follows_the_device_and_the_base_computes_in_it(device, precision, dtype, gpu):
    gpu(device)
    assert resolve_mixed_precision("auto") == precision
    # llama-3.2-1b's checkpoint is bfloat16 (model.torch_dtype): a V100 computes it in float16 all the same
    qlora = compose_config(["model=llama-3.2-1b", "peft=qlora"])
    assert compute_dtype(qlora) == dtype
    assert quantization_config(qlora).bnb_4bit_compute_dtype == dtype
    assert compute_dtype(compose_config(["model=llama-3.2-1b", "peft=lora"])) == dtype, "the LoRA base's dtype"


def test_an_explicit_precision_sets_the_base_dtype_where_the_device_runs_it(gpu):
    gpu(A100)
    assert compute_dtype(compose_config(["model=llama-3.2-1b", "training.mixed_precision=fp16"])) == torch.float16
    assert compute_dtype(compose_config(["model=tiny-llama"])) == torch.float32, "model.torch_dtype=float32 is kept"
    gpu(V100)  # a bf16 run's recorded config, evaluated on a V100: its base computes in float16, no error
    assert compute_dtype(compose_config(["model=llama-3.2-1b", "training.mixed_precision=bf16"])) == torch.float16
    with pytest.raises(ConfigError, match=r"^peft.quantization.compute_dtype='bfloat16' is not possible on Tesla V100"):
        compute_dtype(compose_config(["peft=qlora", "peft.quantization.compute_dtype=bfloat16"]))


def test_explicit_bf16_on_a_v100_is_one_line_before_any_model_loads(gpu, monkeypatch, tmp_path):
    gpu(V100)
    assert resolve_mixed_precision("fp16") == "fp16" and resolve_mixed_precision("no") == "no"

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    patch_everywhere(monkeypatch, "distributed_peft.modeling.loading", "load_base_model", no_model)
    out = tmp_path / "run"
    argv = ["task=sql", "model=tiny-llama", "training.mixed_precision=bf16", f"output_dir={out}"]
    code, lines = run_entry(monkeypatch, "dpeft-train", argv)
    assert (code, lines) == (2, [f"dpeft-train: error: {BF16_ON_V100}"])


def shipped_template_plugin(template: str, cfg, precision: str, monkeypatch):
    """The DeepSpeed plugin a training process builds under `accelerate launch --config_file
    launch/accelerate/<template>.yaml` (accelerate's own launcher code sets its environment) on 2 nodes x 4 workers."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    monkeypatch.chdir(PROJECT_ROOT)  # the templates name their DeepSpeed json relative to the checkout
    argv = ["--config_file", f"launch/accelerate/{template}.yaml", "-m", "distributed_peft.cli.train"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    for key, value in prepare_deepspeed_cmd_env(args)[1].items():
        if key.startswith("ACCELERATE"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("WORLD_SIZE", "8")
    return deepspeed_plugin_for(cfg, precision)


def auto_keys(config: dict, prefix: str = "") -> set[str]:
    found = set()
    for key, value in config.items():
        if isinstance(value, dict):
            found |= auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            found.add(prefix + key)
    return found


# accelerate fills these from model.config.hidden_size when the model is prepared (Accelerator._prepare_deepspeed)
WIDTH_KEYS = {"zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
              "zero_optimization.stage3_param_persistence_threshold"}  # fmt: skip


@pytest.mark.parametrize("template", ["zero2", "zero3", "zero3_offload"])
def test_shipped_deepspeed_templates_get_the_runs_numbers(template, monkeypatch):
    overrides = ["training.micro_batch_size=3", "training.gradient_accumulation_steps=5", "training.max_grad_norm=0.5"]
    cfg = compose_config(overrides)
    plugin = shipped_template_plugin(template, cfg, "fp16", monkeypatch)
    ds = plugin.deepspeed_config
    assert auto_keys(ds) <= WIDTH_KEYS, f"{template}: 'auto' left for accelerate to guess: {auto_keys(ds) - WIDTH_KEYS}"
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 8 and ds["gradient_clipping"] == 0.5
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert plugin.zero_stage == int(template[4])


def test_launched_without_deepspeed_there_is_no_plugin(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert deepspeed_plugin_for(compose_config([]), "no") is None


def test_a_users_deepspeed_number_that_contradicts_the_run_is_one_line_each(tmp_path, monkeypatch):
    cfg = compose_config(["training.micro_batch_size=4", "training.gradient_accumulation_steps=2"])
    own = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
           "gradient_clipping": 1.0, "bf16": {"enabled": True}, "fp16": {"enabled": "auto"}}  # fmt: skip
    (tmp_path / "ds.json").write_text(json.dumps(own))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as error:
        deepspeed_plugin_for(cfg, "fp16")
    assert error.value.problems == [
        "the DeepSpeed config's train_micro_batch_size_per_gpu=8 contradicts training.micro_batch_size=4; allowed: "
        "'auto' (filled from the run's config) or 4",
        "the DeepSpeed config's bf16.enabled=True contradicts training.mixed_precision='auto' (fp16 here); allowed: "
        "'auto' (filled from the run's config) or False",
    ]
    own.update(train_micro_batch_size_per_gpu=4, bf16={"enabled": False})  # agreeing numbers are kept as written
    filled = fill_deepspeed_config(own, cfg, "fp16", world_size=2)
    assert filled["train_batch_size"] == 16 and filled["fp16"] == {"enabled": True}
