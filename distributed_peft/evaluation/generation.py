"""Greedy generation of completions for task prompts, batched with left padding, spread over every rank."""

from __future__ import annotations

from omegaconf import DictConfig

from distributed_peft.config import load_recorded_config
from distributed_peft.constants import ADAPTER_WEIGHTS, PREBUILT_DIR
from distributed_peft.data.prompts import check_not_empty, generation_prompt_ids, task_record
from distributed_peft.evaluation.inference import evaluation_mode, progress


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
    device = next(model.parameters()).device
    padded = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")  # generation continues
    input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]  # from the right end of every row
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
    desc = "generating" if cfg.logging.progress_bar else None
    with accelerator.split_between_processes(indexed, apply_padding=True) as shard:
        results = []
        for start in progress(range(0, len(shard), batch_size), accelerator, desc):
            chunk = shard[start : start + batch_size]
            texts = generate_batch(network, tokenizer, [ids for _, ids in chunk], max_new_tokens, synced)
            results.extend(zip([i for i, _ in chunk], texts, strict=True))
    gathered = dict(gather_object(results)) if accelerator.num_processes > 1 else dict(results)
    return [gathered[i] for i in range(len(prompts))]


def generate_with_adapters(cfg: DictConfig) -> dict[str, dict[str, str]]:
    """For each adapter: its task's prompt, the base's answer and the adapter's answer (one base load).

    The prompt fills each task's main field and `inputs` the fields the task has; an empty prompt is refused before
    the base loads, one that does not fit the context before anything is generated.
    """
    from distributed_peft.adapters.storage import load_base_with_adapters, read_adapter_metadata
    from distributed_peft.runtime.distributed import resolve_device
    from distributed_peft.runtime.tracking import quiet_library_progress

    quiet_library_progress()
    run_cfgs = [load_recorded_config(read_adapter_metadata(d)["config"]) for d in cfg.adapters]
    inputs = {str(name): value for name, value in cfg.inputs.items()}
    records = [task_record(run.task, cfg.prompt, inputs) for run in run_cfgs]
    for run, record in zip(run_cfgs, records, strict=True):
        check_not_empty(run.task, record)
    device = resolve_device(cfg.device)
    model, tokenizer, names, _ = load_base_with_adapters(list(cfg.adapters), cfg.allow_base_mismatch, device)
    base_model = run_cfgs[0].model  # the base every adapter is loaded onto
    ids_per_adapter = [
        generation_prompt_ids(
            run.task, record, tokenizer, cfg.max_new_tokens, base_model.context_length, base_model.name
        )
        for run, record in zip(run_cfgs, records, strict=True)
    ]
    answers = {}
    for name, ids in zip(names, ids_per_adapter, strict=True):
        model.set_adapter(name)
        adapter = generate_batch(model, tokenizer, [ids], cfg.max_new_tokens)[0]
        with model.disable_adapter():
            base = generate_batch(model, tokenizer, [ids], cfg.max_new_tokens)[0]
        answers[name] = {"prompt": tokenizer.decode(ids, skip_special_tokens=True), "base": base, "adapter": adapter}
    return answers


def default_adapters() -> list[str]:
    """Every adapter shipped in adapters_prebuilt/."""
    return sorted(str(p.parent) for p in PREBUILT_DIR.glob(f"*/{ADAPTER_WEIGHTS}"))
