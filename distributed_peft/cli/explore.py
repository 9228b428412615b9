"""dpeft-explore: a local web page to try the base and its adapters side by side."""

import sys

from omegaconf import DictConfig

from distributed_peft.cli.app import hydra_app
from distributed_peft.config import missing_extra, validate_explore
from distributed_peft.errors import ConfigError
from distributed_peft.serving.explorer import check_port_free, load_explorer


@hydra_app("dpeft-explore", config_name="explore", validator=validate_explore)
def main(cfg: DictConfig) -> None:
    """Serve the page until interrupted."""
    problem = missing_extra("gradio", "explore", "dpeft-explore (its web page)")
    if problem:
        raise ConfigError(problem)
    check_port_free(cfg.host, cfg.port)
    explorer = load_explorer(cfg)
    from distributed_peft.serving.explorer_app import serve

    for adapter in explorer.adapters:
        print(f"  {adapter.name}: {adapter.title if adapter.available else 'unavailable: ' + adapter.reason}")
    print(f"dpeft-explore: {explorer.base_name} on {explorer.device}, http://{cfg.host}:{cfg.port} (Ctrl-C stops)")
    sys.stdout.flush()
    try:
        serve(explorer, cfg)
    finally:
        explorer.close()


if __name__ == "__main__":
    main()
