"""Hub ids that cannot be used here: one line within seconds that says why and how to work offline.

transformers and datasets retry an unreachable Hub for about a minute and end in a traceback. Before anything loads,
`resolve_hub_model` and `check_hub_dataset` ask the Hub once (a few seconds at most, DNS included) and look in the
local cache: a cached model loads from its snapshot when the Hub is down; anything else is a one-line refusal naming
the three ways on (`hf download` on a connected machine, HF_HUB_OFFLINE=1, or a local copy).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from distributed_peft.errors import ConfigError, DataError

PROBE_TIMEOUT_S = 5.0  # per connect / read; the whole probe, DNS included, is bounded by PROBE_DEADLINE_S
PROBE_DEADLINE_S = 10.0
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether the user asked for offline mode (HF_HUB_OFFLINE, or transformers' and datasets' own variables)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(name, "").strip().upper() in _TRUE for name in names)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    """The Hub cache as a process started now would use it (HF_HUB_CACHE, else HF_HOME/hub, else the default)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def cached_model_snapshot(repo_id: str) -> Path | None:
    """The local snapshot directory of a Hub model holding its config and weights, or None."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache_dir())
    if not isinstance(config, str):
        return None
    snapshot = Path(config).parent
    return snapshot if any((snapshot / name).is_file() for name in WEIGHT_FILES) else None


def dataset_cached(repo_id: str) -> bool:
    """Whether datasets or the Hub cache holds anything of this dataset (datasets decides whether it is enough)."""
    import datasets

    hub_copy = hub_cache_dir() / f"datasets--{repo_id.replace('/', '--')}"
    datasets_copy = Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
    return hub_copy.is_dir() or datasets_copy.is_dir()


def probe_hub(url: str) -> tuple[int | None, str]:
    """Ask the Hub once: (HTTP status, "") when it answered, (None, reason) when it cannot be reached in time."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers

    answer: list[tuple[int | None, str]] = []

    def ask() -> None:
        try:
            response = get_session().head(url, headers=build_hf_headers(), timeout=PROBE_TIMEOUT_S)
            answer.append((response.status_code, ""))
        except Exception as exc:  # any transport failure (DNS, refused, TLS, proxy, timeout) means unreachable
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            answer.append((None, reason))

    thread = threading.Thread(target=ask, name="dpeft-hub-probe", daemon=True)  # getaddrinfo ignores timeouts
    thread.start()
    thread.join(PROBE_DEADLINE_S)
    return answer[0] if answer else (None, f"no answer within {PROBE_DEADLINE_S:g} s")


def _check_repo_id(repo_id: str, key: str, local_kind: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(
            f"{key}={repo_id!r} is neither an existing local {local_kind} nor a Hub id; "
            "allowed: a local path or a Hub id such as owner/name"
        ) from exc


def _offline_advice(repo_id: str, repo_type: str, local_key: str) -> str:
    flag = " --repo-type dataset" if repo_type == "dataset" else ""
    download = f"run `hf download {repo_id}{flag}` on a connected machine, copy its cache ({hub_cache_dir()}) here"
    if hub_offline():
        return f"{download}; or point {local_key} at a local copy"
    return f"to work offline: {download} and set HF_HUB_OFFLINE=1; or point {local_key} at a local copy"


def resolve_hub_model(repo_id: str, key: str = "model.name_or_path") -> str:
    """What to load for a Hub model id: the id when the Hub answers, its cached snapshot when it cannot be reached.

    Raises ConfigError (one line, within PROBE_DEADLINE_S) when neither works; loads nothing.
    """
    _check_repo_id(repo_id, key, "model directory")
    advice = _offline_advice(repo_id, "model", key)
    if hub_offline():
        if cached_model_snapshot(repo_id) is None:
            raise ConfigError(f"{key}={repo_id!r} is not in the local Hub cache and HF_HUB_OFFLINE=1; {advice}")
        return repo_id
    status, reason = probe_hub(f"{hub_endpoint()}/{repo_id}/resolve/main/config.json")
    if status is not None and status < 400:
        return repo_id
    if status in (401, 403, 404):
        raise ConfigError(
            f"{key}={repo_id!r}: the Hub has no such model, or it is private or gated (HTTP {status}); check the id, "
            "accept its license on huggingface.co and set HF_TOKEN, or point it at a local copy"
        )
    snapshot = cached_model_snapshot(repo_id)
    why = reason or f"HTTP {status}"
    if snapshot is not None:
        print(
            f"note: the Hub ({hub_endpoint()}) cannot be reached ({why}); loading {repo_id} from {snapshot}",
            file=sys.stderr,
        )
        return str(snapshot)
    raise ConfigError(f"{key}={repo_id!r}: the Hugging Face Hub ({hub_endpoint()}) cannot be reached ({why}); {advice}")


def check_hub_dataset(repo_id: str, key: str = "task.data.hub_id") -> None:
    """Raise DataError (one line, within PROBE_DEADLINE_S) unless the Hub dataset can be loaded here.

    With HF_HUB_OFFLINE=1 a dataset with a cached copy passes (datasets reads it); when the Hub is down, a cached copy
    is named with the variable that uses it.
    """
    _check_repo_id(repo_id, key, "data file")
    advice = _offline_advice(repo_id, "dataset", "task.data.path")
    if hub_offline():
        if not dataset_cached(repo_id):
            raise DataError(f"{key}={repo_id!r} is not in the local cache and HF_HUB_OFFLINE=1; {advice}")
        return
    status, reason = probe_hub(f"{hub_endpoint()}/api/datasets/{repo_id}")
    if status is not None and status < 400:
        return
    if status in (401, 403, 404):
        raise DataError(
            f"{key}={repo_id!r}: the Hub has no such dataset, or it is private or gated (HTTP {status}); check the id, "
            "set HF_TOKEN, or point task.data.path at a local file"
        )
    why = reason or f"HTTP {status}"
    if dataset_cached(repo_id):
        raise DataError(
            f"{key}={repo_id!r}: the Hugging Face Hub ({hub_endpoint()}) cannot be reached ({why}); a cached copy "
            "exists: set HF_HUB_OFFLINE=1 to use it"
        )
    raise DataError(f"{key}={repo_id!r}: the Hugging Face Hub ({hub_endpoint()}) cannot be reached ({why}); {advice}")
