"""Facts the whole package shares: where its parts lie on disk and the names of the files its commands exchange.

Importable by every layer; imports nothing of distributed_peft. A constant only one module uses stays in that module.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent  # a checkout's root (site-packages in an installed wheel): only dev tools use it
# The config tree ships inside the package: Hydra reads it as pkg://distributed_peft.conf from any directory, and a
# user's own config directory (--config-dir, hydra.searchpath) adds groups and options beside ours.
CONF_MODULE = "distributed_peft.conf"
CONF_SEARCH_PATH = f"pkg://{CONF_MODULE}"
CONF_DIR = PACKAGE_DIR / "conf"
SAMPLE_DATA_DIR = PACKAGE_DIR / "sample_corpora" / "data"  # the bundled sample files (task.data.sample_file)
HUB_CONFIGS_DIR = PACKAGE_DIR / "resources" / "hub_configs"  # Hub config.json copies: model.weights=random builds them
PREBUILT_DIR = PACKAGE_DIR / "adapters_prebuilt"  # shipped adapters (adapters_prebuilt/ in a checkout)

METRICS_FILE = "metrics.jsonl"  # a run's metrics log, one JSON object per line (written in runtime, read by tools)
# An adapter directory: peft's weights and config, and our metadata (base fingerprint, run config, task)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_METADATA = "dpeft_adapter.json"
