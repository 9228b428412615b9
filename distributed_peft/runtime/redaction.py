"""Secrets stay in the environment: tokens are read from it only, and never reach a file the run writes.

wandb and the Hub read WANDB_API_KEY / HF_TOKEN themselves; no config key holds a token. As a second line of
defence, whatever a run writes from user-supplied text (the resolved config, the command line in the model
card, tracker configs) passes through `redact`, which masks the value of every secret-looking environment
variable and anything shaped like a Hub or wandb token.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|CREDENTIAL", re.IGNORECASE)
TOKEN_SHAPES = [
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face user access tokens
    re.compile(r"\b(?:local-)?[0-9a-f]{40}\b"),  # wandb API keys (40 hex characters)
]
MIN_SECRET_LENGTH = 8  # shorter values ("1", "true") are settings, not secrets, and masking them would garble text


def secret_values() -> list[str]:
    """Values of environment variables whose names say they hold a secret, longest first."""
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every secret from the environment and every token-shaped string replaced by ***."""
    for value in secret_values():
        text = text.replace(value, MASK)
    for shape in TOKEN_SHAPES:
        text = shape.sub(MASK, text)
    return text


def redact_values(value: Any) -> Any:
    """`value` (str, dict, list, nested) with `redact` applied to every string in it, keys included.

    Mask values before a structure is dumped as YAML, never the dumped text: a masked plain scalar (`key: ***`)
    would read back as a YAML alias and fail to load; the dumper quotes a masked value.
    """
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_values(key): redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(item) for item in value]
    return value
