"""Running a model without training it: no grad and dropout off (evaluation_mode), and a progress bar over its batches
on the main process (progress). Shared by the loss evaluation and generation."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def evaluation_mode(model) -> Iterator[None]:
    """No grad, dropout off, but 4-bit layers kept in train mode.

    bitsandbytes' CPU path repacks a 4-bit weight for good the first time it runs in eval mode without grad,
    and backward through a repacked layer silently loses the input gradient; so training after an
    evaluation would stop updating the LoRA layers below it. Keeping those layers in train mode avoids it.
    """
    was_training = {module: module.training for module in model.modules()}
    model.eval()
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes"):
            module.training = True
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in was_training.items():
            module.training = training


def progress(iterable, accelerator, desc: str | None, total: int | None = None):
    """`iterable` with a progress bar on the main process when `desc` is given (rate and ETA), else as it is."""
    if desc is None or not accelerator.is_main_process:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="batch", mininterval=0.5 if sys.stderr.isatty() else 10.0)
