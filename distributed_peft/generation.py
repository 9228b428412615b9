"""Greedy generation of completions for task prompts, batched with left padding, spread over every rank."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from distributed_peft.cli import hydra_app
from distributed_peft.config import PROJECT_ROOT, load_recorded_config, validate_generate
from distributed_peft.data import format_example


def prompt_ids(record: dict[str, Any], task: DictConfig, tokenizer) -> list[int]:
    """The prompt exactly as training tokenized it (with BOS where the tokenizer adds one)."""
    prompt, _ = format_example(record, task)
    return tokenizer(prompt)["input_ids"]


def _left_padded(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    synced_gpus: bool = False,
    temperature: float = 0.0,
) -> list[str]:
    """Completions (decoded, stripped, stopped at EOS) of already tokenized prompts: greedy, or sampled at
    `temperature` > 0 from torch's global generator (seed it first for a reproducible answer)."""
    from distributed_peft.evaluate import evaluation_mode

    device = next(model.parameters()).device
    input_ids, attention_mask = _left_padded(prompts, tokenizer.pad_token_id)
    with evaluation_mode(model):
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            **({"temperature": temperature} if temperature > 0 else {}),
            num_beams=1,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced_gpus,  # ZeRO-3: every rank keeps stepping until all finish (params are gathered)
        )
    new_tokens = output[:, input_ids.shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_completions(model, tokenizer, prompts: list[list[int]], cfg: DictConfig, accelerator) -> list[str]:
    """Completions for every prompt, each rank decoding its share; returned whole on every rank."""
    from accelerate.utils import gather_object

    network = accelerator.unwrap_model(model)
    synced = accelerator.distributed_type.name in ("DEEPSPEED", "FSDP") and accelerator.num_processes > 1
    batch_size, max_new_tokens = cfg.evaluation.generation_batch_size, cfg.evaluation.max_new_tokens
    indexed = list(enumerate(prompts))
    with accelerator.split_between_processes(indexed, apply_padding=True) as shard:
        results = []
        for start in range(0, len(shard), batch_size):
            chunk = shard[start : start + batch_size]
            texts = generate_batch(network, tokenizer, [ids for _, ids in chunk], max_new_tokens, synced)
            results.extend(zip([i for i, _ in chunk], texts, strict=True))
    gathered = dict(gather_object(results)) if accelerator.num_processes > 1 else dict(results)
    return [gathered[i] for i in range(len(prompts))]


def main_field(task: DictConfig, record: dict[str, str]) -> str:
    """The field a free-text prompt fills: the last placeholder of the template the record will use."""
    from distributed_peft.config import template_fields

    template = task.prompt_template
    if task.prompt_template_no_input and not record.get("input", "").strip():
        template = task.prompt_template_no_input
    return template_fields(template)[-1]


def task_record(task: DictConfig, prompt: str, inputs: dict[str, str]) -> dict[str, str]:
    """A record for the task's template: `inputs` for named fields, `prompt` for its main field."""
    record = {name: "" for name in task.data.columns}
    record.update(inputs)
    record[main_field(task, record)] = prompt
    return record


def generate_with_adapters(cfg: DictConfig) -> dict[str, dict[str, str]]:
    """For each adapter: its task's prompt, the base's answer and the adapter's answer (one base load)."""
    from distributed_peft.adapters import load_base_with_adapters
    from distributed_peft.tracking import quiet_library_progress

    quiet_library_progress()
    model, tokenizer, names, metadatas = load_base_with_adapters(list(cfg.adapters), cfg.allow_base_mismatch)
    answers = {}
    for name, metadata in zip(names, metadatas, strict=True):
        task = load_recorded_config(metadata["config"]).task
        ids = prompt_ids(task_record(task, cfg.prompt, dict(cfg.inputs)), task, tokenizer)
        model.set_adapter(name)
        adapter = generate_batch(model, tokenizer, [ids], cfg.max_new_tokens)[0]
        with model.disable_adapter():
            base = generate_batch(model, tokenizer, [ids], cfg.max_new_tokens)[0]
        answers[name] = {"prompt": tokenizer.decode(ids, skip_special_tokens=True), "base": base, "adapter": adapter}
    return answers


def default_adapters() -> list[str]:
    """Every adapter shipped in adapters_prebuilt/."""
    return sorted(str(p.parent) for p in (PROJECT_ROOT / "adapters_prebuilt").glob("*/adapter_model.safetensors"))


@hydra_app("dpeft-generate", config_name="generate", validator=validate_generate)
def main(cfg: DictConfig) -> None:
    """Print each adapter's answer and the base's for the same input."""
    if not cfg.adapters:
        cfg.adapters = default_adapters()
    for name, answer in generate_with_adapters(cfg).items():
        print(f"=== {name}\n{answer['prompt']}\n  base:    {answer['base']}\n  adapter: {answer['adapter']}")


if __name__ == "__main__":
    main()
