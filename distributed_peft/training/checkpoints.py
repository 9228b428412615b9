"""Periodic checkpoints through accelerate's `save_state`, written atomically and verified; resume from the newest.

    <output_dir>/checkpoints/step-000040/
        model.safetensors | pytorch_model/ | pytorch_model_fsdp.bin    the trainable (LoRA) weights only, never the
                                             frozen base (DDP/CPU: a save hook; ZeRO: exclude_frozen_parameters;
                                             FSDP: accelerate's adapter_only, as transformers' Trainer saves it)
        optimizer.bin, scheduler, random_states_<rank>.pkl, scaler.pt        (accelerate, every mode)
        trainer_state.json   step, epoch and position in it, the sampler's generator, counters, run fingerprint
        COMPLETE.json        written last, with the size and sha256 of every file: no marker, no resume

Every rank writes into `.tmp-step-N` (a shared filesystem, as on SLURM clusters), then rank 0 writes the marker
and renames the directory: a kill at any moment leaves either a complete checkpoint or an ignored leftover.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distributed_peft.config import RESUME_OFF
from distributed_peft.errors import ConfigError, StorageError
from distributed_peft.runtime.atomic_files import TMP_PREFIX, atomic_write_text, remove_leftovers, storage_error

CHECKPOINTS_DIR = "checkpoints"
MARKER = "COMPLETE.json"
TRAINER_STATE = "trainer_state.json"
BYTES_PER_TRAINABLE_PARAM = 16  # fp32 weight + Adam's two moments + DeepSpeed's fp32 master copy
DISK_MARGIN_BYTES = 32 * 2**20


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, newest first (leftovers of interrupted saves excluded)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)
    return {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def checkpoint_problem(directory: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (missing marker, missing or altered file), or None if it is whole."""
    marker = directory / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the save never finished)"
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"{MARKER} is unreadable ({exc})"
    for name, expected in recorded.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['size']} were written"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def newest_complete_checkpoint(run_dir: Path, say=print) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is named with the reason."""
    for directory in list_checkpoints(run_dir):
        problem = checkpoint_problem(directory)
        if problem is None:
            return directory
        say(f"resume: skipping checkpoint {directory}: {problem}")
    return None


def resolve_resume(cfg: DictConfig, say=print) -> Path | None:
    """The checkpoint `training.resume` points at: auto (newest complete one in output_dir), false, or a path."""
    choice = str(cfg.training.resume)
    if choice.lower() in RESUME_OFF:
        return None
    if choice in ("auto", "force"):
        return newest_complete_checkpoint(Path(cfg.output_dir), say)
    path = Path(choice)
    if (path / CHECKPOINTS_DIR).is_dir():  # a run directory: its newest complete checkpoint
        found = newest_complete_checkpoint(path, say)
        if found is None:
            raise ConfigError(f"training.resume={choice!r} holds no complete checkpoint; allowed: auto, false, a path")
        return found
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"training.resume={choice!r} is not a complete checkpoint: {problem}")
    return path


def read_trainer_state(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / TRAINER_STATE).read_text())


# Options that cannot change the trained weights: they may differ between a checkpoint and the run resuming it.
FREE_KEYS = (
    "logging.",
    "evaluation.",
    "output_dir",
    "adapter",
    "allow_base_mismatch",
    "num_gpu_workers",  # the world size is recorded instead
    "num_machines",
    "machine_rank",
    "main_process_ip",
    "main_process_port",
    "distributed.timeout_s",
    "task.description",
    "task.metrics",
    "training.eval_steps",
    "training.eval_batch_size",
    "training.checkpoint_every",
    "training.keep_checkpoints",
    "training.resume",
    "training.max_nonfinite_steps",
    "task.data.path",  # as typed (relative to where the command ran): data.file, its size and sha256 are compared
)
MAX_LISTED_CHANGES = 6


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def data_identity(cfg: DictConfig) -> dict[str, Any]:
    """Where the training examples come from and, for a file, its size and content hash."""
    from distributed_peft.config import resolve_data_source
    from distributed_peft.constants import SAMPLE_DATA_DIR

    data = cfg.task.data
    source = resolve_data_source(data)
    if source == "hub":
        return {"data.hub": f"{data.hub_id} {data.hub_config or ''} {data.hub_split}".strip()}
    path = SAMPLE_DATA_DIR / data.sample_file if source == "sample" else Path(data.path)
    return {"data.file": str(path.resolve()), "data.bytes": path.stat().st_size, "data.sha256": _sha256(path)}


def run_fingerprint(cfg: DictConfig, world_size: int, strategy: str) -> dict[str, Any]:
    """Everything that changes the result: the resolved config less FREE_KEYS, the data file, world size, strategy.

    The base's weights fingerprint is added once the base is resolved (`base.fingerprint`).
    """
    from omegaconf import OmegaConf

    settings = _flatten(OmegaConf.to_container(cfg, resolve=True))
    kept = {k: v for k, v in settings.items() if not any(k == f or k.startswith(f) for f in FREE_KEYS)}
    return {**kept, **data_identity(cfg), "world_size": world_size, "strategy": strategy}


def changed_settings(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key old -> new` for every setting of `current` that the checkpoint recorded differently."""
    changed = []
    for key, value in current.items():
        before = recorded.get(key)
        if before != value:
            shown = [str(v)[:12] + "..." if key.endswith("sha256") and v else repr(v) for v in (before, value)]
            changed.append(f"{key} {shown[0]} -> {shown[1]}")
    return changed


def check_same_run(recorded: dict[str, Any], current: dict[str, Any], checkpoint: Path, force: bool) -> list[str]:
    """Refuse to resume a checkpoint made with other settings (one line naming them), unless forced.

    Returns the changed settings (empty when it is the same run); with force they are the caller's to record.
    """
    changed = changed_settings(recorded, current)
    if changed and not force:
        listed = "; ".join(changed[:MAX_LISTED_CHANGES])
        more = f" and {len(changed) - MAX_LISTED_CHANGES} more" if len(changed) > MAX_LISTED_CHANGES else ""
        raise ConfigError(
            f"training.resume: checkpoint {checkpoint} was made with other settings ({listed}{more}); "
            "rerun with training.resume=false to start over, or training.resume=force to continue anyway"
        )
    return changed


def encode_generator_state(generator: torch.Generator | None) -> str | None:
    return None if generator is None else base64.b64encode(generator.get_state().numpy().tobytes()).decode()


def decode_generator_state(encoded: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8)


def check_disk_space(run_dir: Path, trainable_params: int, keep: int) -> None:
    """Refuse to start when the disk cannot hold the checkpoints kept plus the final adapter."""
    needed = BYTES_PER_TRAINABLE_PARAM * trainable_params * (keep + 2) + DISK_MARGIN_BYTES
    existing = Path(run_dir)
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise StorageError(
            f"output_dir={str(run_dir)!r} has {free / 2**20:,.0f} MiB free; this run needs about "
            f"{needed / 2**20:,.0f} MiB ({keep} checkpoints of {trainable_params:,} trainable parameters and the "
            "adapter); allowed: free space, fewer training.keep_checkpoints, or another output_dir"
        )


@contextlib.contextmanager
def fsdp_adapter_only():
    """Within it, accelerate's save_state/load_state write and read an FSDP model's adapter weights only.

    accelerate saves an FSDP model with `save_fsdp_model(plugin, accelerator, model, dir, i)` and no way to pass its
    `adapter_only` (which gathers only the trainable parameters: peft's state dict, or DCP's `ignore_frozen_params`
    under FSDP2's full state dict); transformers' Trainer passes it. This supplies it for the calls made inside.
    """
    import accelerate.accelerator as library
    from accelerate.utils import load_fsdp_model, save_fsdp_model

    original = library.save_fsdp_model, library.load_fsdp_model
    library.save_fsdp_model = functools.partial(save_fsdp_model, adapter_only=True)
    library.load_fsdp_model = functools.partial(load_fsdp_model, adapter_only=True)
    try:
        yield
    finally:
        library.save_fsdp_model, library.load_fsdp_model = original


class Checkpointer:
    """Saves and restores the whole training state under every distributed mode; keeps the newest `keep`."""

    def __init__(self, accelerator, run_dir: Path, keep: int):
        self.accelerator, self.run_dir, self.keep = accelerator, Path(run_dir), keep
        self.deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
        self.fsdp = accelerator.distributed_type.name == "FSDP"
        if accelerator.is_main_process:
            remove_leftovers(self.run_dir / CHECKPOINTS_DIR)  # `.tmp-step-N` of a save that a kill interrupted
        accelerator.register_save_state_pre_hook(self._keep_trainable_weights)
        accelerator.register_load_state_pre_hook(self._load_trainable_weights)

    # accelerate would save the frozen (4-bit) base in every checkpoint: keep the trainable weights only
    @staticmethod
    def _keep_trainable_weights(models, weights, output_dir) -> None:
        for i, (model, state) in enumerate(zip(models, weights, strict=False)):
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            weights[i] = {name: tensor for name, tensor in state.items() if name in trainable}

    @staticmethod
    def _load_trainable_weights(models, input_dir) -> None:
        from safetensors.torch import load_file

        for i, model in enumerate(models):
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            state = load_file(str(path), device=str(next(model.parameters()).device))
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            missing = sorted(trainable - set(state))
            if missing:
                raise ConfigError(
                    f"training.resume: {path} lacks {len(missing)} trainable tensor(s), e.g. {missing[0]}"
                )
            model.load_state_dict(state, strict=False)
        models.clear()  # loaded here: accelerate must not load them again

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Every rank calls this. Returns the checkpoint directory; raises StorageError on a failed write."""
        from distributed_peft.runtime.distributed import global_sum

        accelerator = self.accelerator
        final = step_dir(self.run_dir, step)
        tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        failure: OSError | None = None
        try:
            kwargs = {"exclude_frozen_parameters": True} if self.deepspeed else {}
            with self._trainable_only():
                accelerator.save_state(str(tmp), **kwargs)
        except OSError as exc:
            failure = exc
        if global_sum(accelerator, failure is not None) == 0 and accelerator.is_main_process:
            try:
                state = {"step": step, **trainer_state}
                (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
                atomic_write_text(tmp / MARKER, json.dumps({"step": step, "files": _manifest(tmp)}, indent=2))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self._prune()
            except OSError as exc:
                failure = exc
            except StorageError as exc:  # the marker's own atomic write: it already names the path
                failure = OSError(exc.problems[0])
        if global_sum(accelerator, failure is not None) > 0:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            newest = next(iter(list_checkpoints(self.run_dir)), None)
            error = storage_error(final, failure or OSError("another rank failed to write its shard"))
            raise StorageError(f"{error.problems[0]} (the last complete checkpoint is {newest})")
        accelerator.wait_for_everyone()
        return final

    def _trainable_only(self):
        """Under FSDP, accelerate's model save and load limited to the adapter; the other modes need nothing here
        (the save hook above, DeepSpeed's exclude_frozen_parameters)."""
        return fsdp_adapter_only() if self.fsdp else contextlib.nullcontext()

    def _prune(self) -> None:
        for old in list_checkpoints(self.run_dir)[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore weights, optimizer, scheduler, RNG and scaler; return the trainer state saved with them."""
        kwargs = {"load_module_strict": False} if self.deepspeed else {}
        with self._trainable_only():
            self.accelerator.load_state(str(directory), **kwargs)
        return read_trainer_state(directory)

    def remove_all(self) -> int:
        """Delete an earlier run's checkpoints (training.resume=false in a used output_dir)."""
        found = list_checkpoints(self.run_dir)
        if self.accelerator.is_main_process:
            for directory in found:
                shutil.rmtree(directory, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return len(found)
