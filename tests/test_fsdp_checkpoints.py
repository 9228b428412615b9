"""FSDP checkpoints hold the trainable (LoRA) weights and optimizer state, never the frozen base, and resume exactly.

accelerate runs no FSDP on CPU: here the path choice is checked with a stand-in Accelerator, and accelerate's own
FSDP save/load functions run on a real peft model (FSDP2's full-state-dict path, which needs no wrapping); the GPU
test launches real FSDP on every visible GPU (one is a valid world size).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distributed_peft.training.checkpoints import Checkpointer, fsdp_adapter_only, list_checkpoints


class StandInAccelerator:
    """What Checkpointer uses of an Accelerator; records which FSDP save/load accelerate would call and with what."""

    is_main_process, num_processes = True, 1

    def __init__(self, kind: str):
        self.distributed_type = SimpleNamespace(name=kind)
        self.calls: list[tuple[str, dict, dict]] = []

    def register_save_state_pre_hook(self, hook):
        pass

    def register_load_state_pre_hook(self, hook):
        pass

    def wait_for_everyone(self):
        pass

    def save_state(self, directory: str, **kwargs):
        import accelerate.accelerator as library

        self.calls.append(("save", getattr(library.save_fsdp_model, "keywords", {}), kwargs))
        Path(directory).mkdir(parents=True)
        (Path(directory) / "optimizer.bin").write_bytes(b"state")

    def load_state(self, directory: str, **kwargs):
        import accelerate.accelerator as library

        self.calls.append(("load", getattr(library.load_fsdp_model, "keywords", {}), kwargs))


@pytest.mark.parametrize(
    "kind,save_keywords,save_kwargs,load_kwargs",
    [
        ("FSDP", {"adapter_only": True}, {}, {}),
        ("DEEPSPEED", {}, {"exclude_frozen_parameters": True}, {"load_module_strict": False}),
        ("MULTI_GPU", {}, {}, {}),
        ("NO", {}, {}, {}),
    ],
)
def test_each_mode_saves_and_loads_the_trainable_weights_only(kind, save_keywords, save_kwargs, load_kwargs, tmp_path):
    import accelerate.accelerator as library

    original = library.save_fsdp_model, library.load_fsdp_model
    accelerator = StandInAccelerator(kind)
    checkpointer = Checkpointer(accelerator, tmp_path, keep=2)
    saved = checkpointer.save(4, {"epoch": 0})
    checkpointer.load(saved)
    assert accelerator.calls == [("save", save_keywords, save_kwargs), ("load", save_keywords, load_kwargs)]
    assert (library.save_fsdp_model, library.load_fsdp_model) == original, "accelerate left patched"
    assert list_checkpoints(tmp_path) == [saved] and json.loads((saved / "trainer_state.json").read_text())["step"] == 4


def tiny_peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model


def test_accelerates_fsdp_save_under_the_patch_writes_the_adapter_alone_and_loads_it_back(tmp_path):
    """accelerate's save_fsdp_model/load_fsdp_model as accelerate.save_state calls them inside fsdp_adapter_only()
    (FSDP2, full state dict: torch.distributed.checkpoint's get_model_state_dict with ignore_frozen_params)."""
    import accelerate.accelerator as library
    from accelerate.state import PartialState
    from torch.distributed.fsdp.fully_sharded_data_parallel import FullStateDictConfig, StateDictType

    PartialState(cpu=True)  # accelerate's logging needs its state (reset after each test by conftest)
    model = tiny_peft_model()
    plugin = SimpleNamespace(fsdp_version=2, state_dict_type=StateDictType.FULL_STATE_DICT,
                             state_dict_config=FullStateDictConfig(), optim_state_dict_config=None)  # fmt: skip
    accelerator = SimpleNamespace(num_processes=1, process_index=0, is_fsdp2=True, is_main_process=True,
                                  wait_for_everyone=lambda: None)  # fmt: skip
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    with fsdp_adapter_only():
        library.save_fsdp_model(plugin, accelerator, model, str(tmp_path), 0)
    (written,) = tmp_path.iterdir()
    state = torch.load(written, weights_only=True)
    assert written.name == "pytorch_model_fsdp.bin"
    assert set(state) == set(trainable) and len(state) == 4, sorted(state)  # lora_A/B of q and v: no base weight
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert written.stat().st_size < frozen_bytes / 10

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    with fsdp_adapter_only():
        library.load_fsdp_model(plugin, accelerator, model, str(tmp_path), 0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trainable[name]), f"{name} was not restored"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs CUDA (accelerate runs no FSDP on CPU)")
def test_fsdp_qlora_checkpoint_holds_the_adapter_only_and_resumes_to_the_uninterrupted_adapter(tmp_path):
    from test_resume import BIN, kill_tree, max_adapter_difference, run, start, wait_for_checkpoint

    gpus = torch.cuda.device_count()
    job = ["task=sql", "model=llama-3.2-1b", "model.weights=random", "+model.config_overrides.num_hidden_layers=2",
           "peft=qlora", "training=demo", "task.data.max_examples=60", "training.max_steps=8",
           "training.max_eval_examples=16", "training.eval_steps=0", "peft.dropout=0.0", "evaluation.generate=false",
           "logging.progress_bar=false", "distributed=fsdp", f"num_gpu_workers={gpus}"]  # fmt: skip

    def launch(out: Path, port: int, *extra: str) -> list[str]:
        return [str(BIN / "dpeft-launch"), *job, f"output_dir={out}", f"main_process_port={port}", *extra]

    reference = tmp_path / "reference"
    run(launch(reference, 29731, "training.checkpoint_every=0"))
    out = tmp_path / "resumed"
    command = launch(out, 29733, "training.checkpoint_every=4", "training.keep_checkpoints=2")
    proc = start(command)
    wait_for_checkpoint(out, 4, proc, timeout=480)
    kill_tree(proc)
    (checkpoint,) = list_checkpoints(out)
    weights = torch.load(checkpoint / "pytorch_model_fsdp.bin", weights_only=True)
    assert weights and all("lora_" in name for name in weights), sorted(weights)[:5]
    base_files = [p.name for p in checkpoint.rglob("*") if p.is_file() and p.stat().st_size > 50 * 2**20]
    assert not base_files, f"the frozen base was saved: {base_files}"

    resumed = run(command)
    assert f"resume: continuing from {checkpoint}" in resumed.stdout
    assert max_adapter_difference(out, reference) <= 1e-5
