"""dpeft-build-base: build (or find cached) the base named by `model=`: an embedded tiny base, or a GGUF converted."""

import os

from omegaconf import DictConfig

from distributed_peft.cli.app import hydra_app
from distributed_peft.errors import ConfigError
from distributed_peft.modeling.embedded_base import base_metadata, build_base


@hydra_app("dpeft-build-base")
def main(cfg: DictConfig) -> None:
    """Build the base named by `model=` (tiny-llama, tiny-bloom, or a GGUF one such as smollm2-135m); print where."""
    force = bool(os.environ.get("DPEFT_REBUILD_BASE"))
    if cfg.model.get("gguf_file"):
        from distributed_peft.modeling.gguf_base import build_gguf_base

        directory, source = build_gguf_base(cfg.model, force=force)
        metadata = base_metadata(directory)
        print(f"{metadata['name']}: {metadata['parameters']:,} parameters, from {source}, dequantized to float32")
    elif cfg.model.embedded:
        directory = build_base(cfg.model, force=force)
        metadata = base_metadata(directory)
        print(
            f"{metadata['name']}: {metadata['parameters']:,} parameters, pretrain loss "
            f"{metadata['pretrain']['first_loss']:.3f} -> {metadata['pretrain']['final_loss']:.3f}"
        )
    else:
        raise ConfigError(
            f"model={cfg.model.name!r} has nothing to build (its weights load from {cfg.model.name_or_path}); allowed: "
            "an embedded base (tiny-llama, tiny-bloom) or one with model.gguf_file (smollm2-135m)"
        )
    print(f"fingerprint {metadata['fingerprint']}")
    print(f"saved in {directory}")


if __name__ == "__main__":
    main()
