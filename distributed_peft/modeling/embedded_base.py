"""Build the embedded tiny bases (`dpeft-build-base model=tiny-llama`): no hub, deterministic for a seed.

A base is a small Llama or BLOOM made from its transformers config with a seeded init, a byte-level BPE
tokenizer trained with `tokenizers` on the bundled sample data (real ParaDetox and GPTeacher text, template SQL; never
the held-out files), and a short pretraining on it that mixes plain causal-LM blocks with `X <sep> X` copy blocks
(model.base.pretrain_copy_share), so that adapters have a language model that can also repeat what it read.
The same recipe gives the same weights for any thread count. It is cached under
`$DPEFT_HOME/bases/<name>-<config hash>` with the sha256 fingerprint of its weights.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from distributed_peft.constants import SAMPLE_DATA_DIR
from distributed_peft.data.task_data import IGNORE_INDEX
from distributed_peft.errors import ConfigError, StorageError
from distributed_peft.modeling.copy_circuit import wire_copy_circuit

BASE_METADATA = "dpeft_base.json"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
CACHE_SLACK_BYTES = 16 * 2**20  # tokenizer files, metadata, filesystem blocks


def dpeft_home() -> Path:
    return Path(os.environ.get("DPEFT_HOME", Path.home() / ".cache" / "distributed_peft"))


def corpus_files() -> list[Path]:
    return sorted(SAMPLE_DATA_DIR.glob("*.jsonl"))


def corpus_records() -> list[list[str]]:
    """The bundled sample corpora's records (not the held-out files), each as its non-empty field values."""
    records = []
    for path in corpus_files():
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    records.append([str(v) for v in json.loads(line).values() if str(v).strip()])
    return records


def corpus_texts() -> list[str]:
    """The bundled sample corpora as plain text: one document per record, its fields one per line."""
    return ["\n".join(fields) for fields in corpus_records()]


def recipe_digest(model_cfg: DictConfig) -> str:
    """12 hex digits naming an embedded base's recipe: family, shape, seed, pretraining (copy mix included) and the
    bytes of every corpus file.

    The same recipe builds the same weights on one machine; another CPU may round the last bits differently, so this
    (not the weights fingerprint) is what identifies an embedded base across machines.
    """
    recipe = {"family": model_cfg.family, "base": OmegaConf.to_container(model_cfg.base, resolve=True)}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for path in corpus_files():
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def base_dir(model_cfg: DictConfig) -> Path:
    """Cache directory of an embedded base: changes whenever its shape, seed, pretraining or corpora change."""
    return dpeft_home() / "bases" / f"{model_cfg.name}-{recipe_digest(model_cfg)}"


def bytes_needed(model_cfg: DictConfig) -> int:
    """An upper bound of what building a base writes: float32 weights (untied embeddings), tokenizer, slack."""
    base = model_cfg.base
    vocab = 64 * math.ceil(base.vocab_size / 64) + 64
    params = 2 * vocab * base.hidden_size + base.num_layers * (
        4 * base.hidden_size**2 + 3 * base.hidden_size * max(base.intermediate_size, 4 * base.hidden_size)
    )
    return 2 * 4 * params + CACHE_SLACK_BYTES  # twice: the staging copy and a replaced older one coexist briefly


def _write_probe(directory: Path) -> None:
    """Create and remove a small file in `directory` (creating the directory): OSError when the cache takes none."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-") as probe:
        probe.write(b"ok")
        probe.flush()


def check_cache(model_cfg: DictConfig) -> None:
    """Raise StorageError (one line) unless $DPEFT_HOME takes the base: checked before a minute of pretraining."""
    bases = base_dir(model_cfg).parent
    needed_mib = math.ceil(bytes_needed(model_cfg) / 2**20)
    fix = f"set DPEFT_HOME to a writable directory with {needed_mib} MiB free"
    try:
        _write_probe(bases)
        free = shutil.disk_usage(bases).free
    except OSError as exc:
        reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror or str(exc)
        where = f"DPEFT_HOME={str(dpeft_home())!r}: the cache of embedded bases ({bases})"
        raise StorageError(f"{where} cannot be written ({reason}); {fix}") from exc
    if free < bytes_needed(model_cfg):
        raise StorageError(
            f"DPEFT_HOME={str(dpeft_home())!r}: {bases} has {free / 2**20:.0f} MiB free, building base "
            f"{model_cfg.name} needs {needed_mib} MiB; free space there or {fix}"
        )


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 over every tensor of a saved model, by name, independent of file metadata."""
    digest = hashlib.sha256()
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in sorted(f.keys()):
                tensor = f.get_tensor(name).contiguous()
                digest.update(name.encode())
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def train_tokenizer(texts: list[str], vocab_size: int, family: str, separator: str):
    """A byte-level BPE tokenizer with <pad>, <s>, </s> and the copy separator as special tokens; Llama-style adds
    <s> in front, BLOOM-style adds nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[*SPECIAL_TOKENS.values(), separator],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id(SPECIAL_TOKENS["bos_token"])
    if family == "bloom":
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=4096, additional_special_tokens=[separator], **SPECIAL_TOKENS
    )


def model_config(model_cfg: DictConfig, tokenizer):
    """The transformers config of an embedded base, vocabulary rounded up to a multiple of 64."""
    from transformers import BloomConfig, LlamaConfig

    base = model_cfg.base
    vocab = 64 * math.ceil(len(tokenizer) / 64)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    if model_cfg.family == "bloom":
        if base.intermediate_size != 4 * base.hidden_size:
            raise ConfigError(
                f"model.base.intermediate_size={base.intermediate_size} is invalid for BLOOM; "
                f"it must be 4 * hidden_size = {4 * base.hidden_size}"
            )
        return BloomConfig(
            vocab_size=vocab,
            hidden_size=base.hidden_size,
            n_layer=base.num_layers,
            n_head=base.num_heads,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            **ids,
        )
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        num_hidden_layers=base.num_layers,
        num_attention_heads=base.num_heads,
        num_key_value_heads=base.num_kv_heads,
        max_position_embeddings=model_cfg.context_length,
        tie_word_embeddings=False,
        **ids,
    )


def lm_blocks(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """All texts tokenized, joined by EOS and cut into blocks of seq_len tokens (plain causal LM: loss everywhere)."""
    ids: list[int] = []
    for encoding in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoding + [tokenizer.eos_token_id])
    n_blocks = len(ids) // seq_len
    return torch.tensor(ids[: n_blocks * seq_len]).view(n_blocks, seq_len)


def copy_blocks(fields: list[str], tokenizer, base: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of copy blocks: `X <sep> X </s>` units for every field X (cut to fit), in a seeded order,
    packed into blocks of pretrain_seq_len tokens; only the copy and its EOS carry a loss.

    An adapter that rewrites (detox) or repeats what it read (SQL names, code identifiers) needs a base that can copy;
    plain LM on a few hundred thousand tokens does not learn it in CPU minutes."""
    seq_len, eos = base.pretrain_seq_len, tokenizer.eos_token_id
    sep = tokenizer.convert_tokens_to_ids(base.pretrain_copy_separator)
    longest = (seq_len - 2) // 2
    order = torch.randperm(len(fields), generator=torch.Generator().manual_seed(base.seed)).tolist()
    encodings = tokenizer([fields[i] for i in order], add_special_tokens=False)["input_ids"]
    blocks, labels, block, block_labels = [], [], [], []
    for ids in encodings:
        ids = ids[:longest]
        unit, unit_labels = [*ids, sep, *ids, eos], [IGNORE_INDEX] * (len(ids) + 1) + [*ids, eos]
        if len(block) + len(unit) > seq_len:
            padding = seq_len - len(block)  # the rest of a block is EOS with no loss
            blocks.append(block + [eos] * padding)
            labels.append(block_labels + [IGNORE_INDEX] * padding)
            block, block_labels = [], []
        block, block_labels = block + unit, block_labels + unit_labels
    if block:
        blocks.append(block + [eos] * (seq_len - len(block)))
        labels.append(block_labels + [IGNORE_INDEX] * (seq_len - len(block)))
    return torch.tensor(blocks), torch.tensor(labels)


class PretrainingMix:
    """Batches of pretrain_batch_size rows: round(batch * pretrain_copy_share) copy blocks, the rest plain LM blocks,
    each kind drawn without replacement in a seeded order (reshuffled when used up)."""

    def __init__(self, lm: torch.Tensor, copy: tuple[torch.Tensor, torch.Tensor], base: DictConfig):
        self.generator = torch.Generator().manual_seed(base.seed)
        self.n_copy = round(base.pretrain_batch_size * base.pretrain_copy_share) if len(copy[0]) else 0
        self.n_lm = base.pretrain_batch_size - self.n_copy
        self.sources = {"lm": (lm, lm), "copy": copy}
        self.orders = {kind: self._order(kind) for kind in self.sources}

    def _order(self, kind: str) -> list[int]:
        return torch.randperm(len(self.sources[kind][0]), generator=self.generator).tolist()

    def _take(self, kind: str, count: int) -> list[int]:
        if count > len(self.orders[kind]):
            self.orders[kind] = self._order(kind)
        taken, self.orders[kind] = self.orders[kind][:count], self.orders[kind][count:]
        return taken

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [(kind, self._take(kind, count)) for kind, count in (("lm", self.n_lm), ("copy", self.n_copy)) if count]
        inputs = torch.cat([self.sources[kind][0][rows] for kind, rows in parts])
        labels = torch.cat([self.sources[kind][1][rows] for kind, rows in parts])
        return inputs, labels


def _layer_norm_affine_apart(self: torch.nn.LayerNorm, hidden: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(hidden, self.normalized_shape, None, None, self.eps) * self.weight + self.bias


@contextlib.contextmanager
def thread_invariant_layer_norms(model):
    """LayerNorms whose weight and bias gradients do not depend on the thread count, while pretraining.

    The fused CPU layer_norm backward sums those gradients over rows in per-thread chunks, so BLOOM (LayerNorm; Llama
    has RMSNorm) pretrained with 1 and with 2 threads came out with different weights. With the affine part applied as
    separate ops, autograd's reductions give the same bits for any thread count (tests/test_embedded_base.py)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm) and m.weight is not None]
    for norm in norms:
        norm.forward = _layer_norm_affine_apart.__get__(norm)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


def pretrain(model, mix: PretrainingMix, base: DictConfig) -> list[float]:
    """A short causal-LM pretraining (AdamW, cosine schedule) on the seeded mix of plain LM and copy blocks."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=base.pretrain_lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, base.pretrain_steps // 20), base.pretrain_steps)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(base.pretrain_steps):
        batch, labels = mix.batch()
        loss = model(input_ids=batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == base.pretrain_steps - 1:
            rate = (step + 1) * batch.numel() / (time.perf_counter() - start)
            print(f"  pretrain step {step + 1}/{base.pretrain_steps}  loss {loss.item():.3f}  {rate:,.0f} tok/s")
    model.eval()
    return losses


COPY_PROBE = SAMPLE_DATA_DIR / "heldout" / "detox.jsonl"  # real sentences in no training or pretraining file


def copy_accuracy(model, tokenizer, separator: str, sentences: list[str]) -> float:
    """Teacher-forced share of tokens a base predicts right when it reads `X <sep> X` (the copy's first token too):
    how well it can repeat what it read, which a rewriting adapter builds on."""
    sep = tokenizer.convert_tokens_to_ids(separator)
    right = total = 0
    model.eval()
    with torch.no_grad():
        for sentence in sentences:
            ids = tokenizer(sentence, add_special_tokens=False)["input_ids"][:60]
            inputs = torch.tensor([[tokenizer.bos_token_id, *ids, sep, *ids]])
            start = len(ids) + 1  # the logits at <sep> predict the copy's first token
            predicted = model(input_ids=inputs).logits[0, start : start + len(ids)].argmax(-1)
            right += int((predicted == torch.tensor(ids)).sum())
            total += len(ids)
    return right / total


def copy_probe_sentences(count: int = 100) -> list[str]:
    with COPY_PROBE.open(encoding="utf-8") as f:
        return [json.loads(line)["en_toxic_comment"] for line in f if line.strip()][:count]


def build_base(model_cfg: DictConfig, force: bool = False) -> Path:
    """Build (or find in the cache) the embedded base of a model config; return its directory."""
    if not model_cfg.embedded:
        raise ConfigError(f"model={model_cfg.name!r} is not embedded; allowed: tiny-llama, tiny-bloom")
    target = base_dir(model_cfg)
    if (target / BASE_METADATA).is_file() and not force:
        return target
    check_cache(model_cfg)  # a read-only or full cache is one line now, not a traceback after pretraining
    with build_lock(target):
        if (target / BASE_METADATA).is_file() and not force:
            return target  # another process built it while this one waited
        return _build(model_cfg, target)


@contextlib.contextmanager
def build_lock(target: Path):
    """One builder per base at a time: two jobs started on a fresh machine (an array job, two test workers) would
    otherwise both pretrain, and the second's replace would pull the directory from under the first's readers."""
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Waiting for another process that is building {target} ...", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def whole_on_this_process():
    """Build a model whole in this process, also inside a DeepSpeed ZeRO-3 run: there transformers' from_config
    partitions it with deepspeed.zero.Init, a collective that the other ranks, waiting at a barrier while rank 0
    builds the base, never join (and a meta-device build fails with "Cannot copy out of meta tensor")."""
    from transformers.integrations import deepspeed as hf_deepspeed

    active = hf_deepspeed._hf_deepspeed_config_weak_ref  # what is_deepspeed_zero3_enabled() reads
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = active


def _build(model_cfg: DictConfig, target: Path) -> Path:
    from transformers import AutoModelForCausalLM

    base = model_cfg.base
    print(f"Building embedded base {model_cfg.name} in {target}")
    records = corpus_records()
    texts = ["\n".join(fields) for fields in records]
    tokenizer = train_tokenizer(texts, base.vocab_size, model_cfg.family, base.pretrain_copy_separator)
    config = model_config(model_cfg, tokenizer)
    torch.manual_seed(base.seed)
    with whole_on_this_process():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if base.copy_circuit_init:
        wire_copy_circuit(model, base.seed)
    lm = lm_blocks(texts, tokenizer, base.pretrain_seq_len)
    copy = copy_blocks([field for fields in records for field in fields], tokenizer, base)
    start = time.perf_counter()
    with thread_invariant_layer_norms(model):
        losses = pretrain(model, PretrainingMix(lm, copy, base), base)
    seconds = time.perf_counter() - start
    copied = copy_accuracy(model, tokenizer, base.pretrain_copy_separator, copy_probe_sentences())
    print(f"  copies {copied:.1%} of held-out tokens (teacher-forced, 100 ParaDetox sentences it never saw)")

    metadata = {
        "name": model_cfg.name,
        "family": model_cfg.family,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.vocab_size,
        "pretrain": {
            **OmegaConf.to_container(base),
            "first_loss": losses[0],
            "final_loss": losses[-1],
            "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
            "lm_blocks": len(lm),
            "copy_blocks": len(copy[0]),
            "tokens_seen": base.pretrain_steps * base.pretrain_batch_size * base.pretrain_seq_len,
            "copy_accuracy": round(copied, 4),
        },
        "corpus": {
            "files": {path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:12] for path in corpus_files()},
            "records": len(records),
            "lm_tokens": lm.numel(),
        },
    }
    save_base(target, model, tokenizer, metadata)
    return target


def save_base(target: Path, model, tokenizer, metadata: dict) -> dict:
    """A built base into the cache: model, tokenizer and dpeft_base.json (`metadata`, with the weights' fingerprint
    unless it names one) written into a staging directory beside `target`, then renamed into place, so that a
    half-written base is never found in the cache (a failed save leaves no staging directory behind)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        metadata = {"fingerprint": weights_fingerprint(staging), **metadata}
        (staging / BASE_METADATA).write_text(json.dumps(metadata, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metadata


def base_metadata(directory: str | Path) -> dict:
    return json.loads((Path(directory) / BASE_METADATA).read_text())
