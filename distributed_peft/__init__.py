"""distributed-peft: Hydra-composed QLoRA/LoRA fine-tuning of one adapter per task on a shared base, on one GPU or many.

The `dpeft-*` commands are the interface; the config tree they compose ships in `distributed_peft/conf`. Importing
the package loads nothing heavy: torch and transformers are imported by the modules that need them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("distributed-peft")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"
