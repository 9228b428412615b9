"""dpeft-bench (make bench): our packing against TRL's SFTTrainer on the same QLoRA job; with CUDA, also on
llama-3.2-1b and bloom-1b1 with random weights, flash attention and Liger on and off (`gpu_models`).

The harness is a tool for developing distributed-peft, not part of what users import: it lives in `benchmarks/`
beside the package, in a checkout (pip install -e .), and is not in the wheel.
"""

import importlib
import sys
from types import ModuleType

from omegaconf import DictConfig

from distributed_peft.cli.app import hydra_app
from distributed_peft.config import validate_bench
from distributed_peft.constants import PROJECT_ROOT
from distributed_peft.errors import ConfigError


def load_harness() -> ModuleType:
    """benchmarks/harness.py of the checkout this package runs from; a ConfigError when installed from a wheel."""
    if not (PROJECT_ROOT / "benchmarks" / "harness.py").is_file():
        raise ConfigError(
            "dpeft-bench runs from a checkout of distributed-peft (pip install -e .): its harness, benchmarks/, "
            "is not in the wheel"
        )
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    return importlib.import_module("benchmarks.harness")


@hydra_app("dpeft-bench", config_name="bench", validator=validate_bench)
def main(cfg: DictConfig) -> None:
    """Every variant on every task, into output_dir (claimed before the first run); the tables on stdout."""
    load_harness().bench(cfg)


if __name__ == "__main__":
    main()
