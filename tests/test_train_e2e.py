"""End to end on the embedded bases: QLoRA adapters learn each task, save complete, and reload exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config, shared_dataset
from safetensors.torch import load_file

from distributed_peft.evaluation.evaluator import run_evaluation
from distributed_peft.runtime.tracking import read_metrics
from distributed_peft.training.recipe import FinetuneRecipe, run_training

RUN_FILES = [
    "adapter/adapter_model.safetensors",
    "adapter/adapter_config.json",
    "adapter/tokenizer.json",
    "adapter/dpeft_adapter.json",
    "config.yaml",
    "split.json",
    "metrics.jsonl",
    "eval.json",
    "eval.md",
    "loss.png",
    "README.md",
]


# generation's path runs in training and in dpeft-eval (which chooses its own evaluation settings); its scores are not
# what these tests read
FEW_GENERATIONS = "evaluation.max_generate_examples=16"


def train_overrides(task: str, model: str, out, *extra: str) -> list[str]:
    return [
        f"task={task}",
        f"model={model}",
        "peft=qlora",
        "training=demo",
        "training.max_steps=40",
        "training.eval_steps=20",
        "training.max_eval_examples=64",
        FEW_GENERATIONS,
        f"output_dir={out}",
        *extra,
    ]


def assert_adapter_complete(adapter_dir, r: int) -> None:
    """Every LoRA tensor saved with its full shape, and no B matrix left at its zero init."""
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert tensors, "adapter saved empty"
    b_matrices = [t for name, t in tensors.items() if "lora_B" in name]
    assert b_matrices and len(b_matrices) * 2 == len(tensors)
    for name, tensor in tensors.items():
        assert tensor.numel() > 0 and r in tensor.shape, f"{name} saved with shape {tuple(tensor.shape)}"
    assert all(t.abs().sum() > 0 for t in b_matrices), "a LoRA B matrix was never updated"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bloom"])
@pytest.mark.parametrize("task", ["detox", "sql", "instruct"])
def test_qlora_adapter_beats_base_saves_complete_and_reloads(task, model, tmp_path, bases):
    results = run_training(compose_config(train_overrides(task, model, tmp_path)))

    assert results["adapter"]["loss"] < results["base"]["loss"] - 0.05, results
    assert results["adapter"]["token_accuracy"] > results["base"]["token_accuracy"]
    for name in RUN_FILES:
        assert (tmp_path / name).is_file(), f"{name} missing from the run directory"
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt")), "no pickles"
    assert_adapter_complete(tmp_path / "adapter", r=16)

    metrics = read_metrics(tmp_path)
    train_losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(train_losses) == 40
    # the loss on the same rows falls as it trains: base, then the adapter at step 20, then at the end (per-batch
    # training loss on real instruct rows of very different lengths moves 2.9-4.3 from batch to batch: no signal)
    evals = [m["eval/loss"] for m in metrics if "eval/loss" in m]
    assert results["base"]["loss"] > evals[0] > evals[-1] == results["adapter"]["loss"], (results["base"], evals)
    # one evaluation during training (eval_steps=20), none at step 40 but the final base-vs-adapter one
    assert [(m["step"], "eval/base_loss" in m) for m in metrics if "eval/loss" in m] == [(20, False), (40, True)]

    card = json.loads((tmp_path / "adapter" / "dpeft_adapter.json").read_text())
    fingerprint = json.loads((bases[model] / "dpeft_base.json").read_text())["fingerprint"]
    assert card["base"]["fingerprint"] == fingerprint
    assert fingerprint in (tmp_path / "README.md").read_text()

    again = [f"adapter={tmp_path / 'adapter'}", f"output_dir={tmp_path / 'reevaluated'}", FEW_GENERATIONS]
    reloaded = run_evaluation(compose_config(again), again)
    assert reloaded["adapter"]["loss"] == pytest.approx(results["adapter"]["loss"], abs=1e-4)
    assert reloaded["base"]["loss"] == pytest.approx(results["base"]["loss"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "task,relative,columns",
    [
        ("detox", "paradetox/paradetox.tsv", ["task.data.columns.toxic=toxic", "task.data.columns.neutral=neutral1"]),
        ("instruct", "gpteacher-codegen/codegen-instruct.jsonl", []),
    ],
)
def test_qlora_adapter_learns_real_data(task, relative, columns, tmp_path, bases):
    path = shared_dataset(relative)
    overrides = train_overrides(
        task,
        "tiny-llama",
        tmp_path,
        f"task.data.path={path}",
        "training.max_seq_len=256",
        "task.data.max_examples=2000",
        *columns,
    )
    results = run_training(compose_config(overrides))
    assert results["adapter"]["loss"] < results["base"]["loss"], results
    assert_adapter_complete(tmp_path / "adapter", r=16)


@pytest.mark.slow
def test_training_after_an_evaluation_still_updates_every_lora_layer(tmp_path, bases):
    """bitsandbytes' CPU 4-bit repack in eval mode would silently cut the input gradient through the base layers."""
    from distributed_peft.modeling.objective import completion_token_stats

    cfg = compose_config(train_overrides("detox", "tiny-llama", tmp_path, "peft.dropout=0", "training.warmup_ratio=0"))
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    model, windows = recipe.model, recipe._windows()
    model.train()
    for _ in range(3):  # B starts at zero, so A only gets a gradient once B has moved
        recipe.train_step(next(windows))
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    probe = next(windows)[0]

    def lora_gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        completion_token_stats(logits, probe["labels"])["loss_sum"].sum().backward()
        grads = {name: p.grad.detach().clone() for name, p in lora.items()}
        model.zero_grad(set_to_none=True)
        return grads

    before_eval = lora_gradients()
    recipe.evaluate()
    assert all(m.training for m in model.modules() if type(m).__module__.startswith("bitsandbytes"))
    after_eval = lora_gradients()
    changed = [n for n in lora if not torch.allclose(before_eval[n], after_eval[n], rtol=1e-5, atol=1e-8)]
    assert not changed, f"{len(changed)} LoRA gradients differ after an evaluation, e.g. {changed[:3]}"

    before_step = {name: p.detach().clone() for name, p in lora.items()}
    recipe.train_step(next(windows))
    frozen = [name for name, p in lora.items() if torch.equal(before_step[name], p.detach())]
    recipe.cleanup()
    assert len(lora) == cfg.model.base.num_layers * 7 * 2  # A and B of 7 linears per layer
    assert not frozen, f"{len(frozen)} LoRA tensors did not change after an evaluation: {frozen[:4]}"
