"""dpeft-reproduce: retrain the shipped adapters from their recorded configs and compare (exit 1: out of tolerance)."""

from omegaconf import DictConfig

from distributed_peft.cli.app import hydra_app
from distributed_peft.training.reproduce import run_reproduce, validate_reproduce


@hydra_app("dpeft-reproduce", config_name="reproduce", validator=validate_reproduce)
def main(cfg: DictConfig) -> None:
    """Retrain, compare, report; exit 1 when a metric is out of tolerance."""
    if not run_reproduce(cfg):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
