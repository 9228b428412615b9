"""dpeft-generate: each adapter's answer next to the base's for the same input."""

from omegaconf import DictConfig

from distributed_peft.cli.app import hydra_app
from distributed_peft.config import validate_generate
from distributed_peft.evaluation.generation import default_adapters, generate_with_adapters


@hydra_app("dpeft-generate", config_name="generate", validator=validate_generate)
def main(cfg: DictConfig) -> None:
    """Print each adapter's answer and the base's for the same input."""
    if not cfg.adapters:
        cfg.adapters = default_adapters()
    for name, answer in generate_with_adapters(cfg).items():
        print(f"=== {name}\n{answer['prompt']}\n  base:    {answer['base']}\n  adapter: {answer['adapter']}")


if __name__ == "__main__":
    main()
