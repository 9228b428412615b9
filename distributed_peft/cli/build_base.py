"""dpeft-build-base: build (or find cached) the embedded tiny base named by `model=`."""

import os

from omegaconf import DictConfig

from distributed_peft.cli.app import hydra_app
from distributed_peft.modeling.embedded_base import base_metadata, build_base


@hydra_app("dpeft-build-base")
def main(cfg: DictConfig) -> None:
    """Build the embedded base named by `model=` (tiny-llama or tiny-bloom) and print where it is."""
    directory = build_base(cfg.model, force=bool(os.environ.get("DPEFT_REBUILD_BASE")))
    metadata = base_metadata(directory)
    print(
        f"{metadata['name']}: {metadata['parameters']:,} parameters, pretrain loss "
        f"{metadata['pretrain']['first_loss']:.3f} -> {metadata['pretrain']['final_loss']:.3f}"
    )
    print(f"fingerprint {metadata['fingerprint']}")
    print(f"saved in {directory}")


if __name__ == "__main__":
    main()
