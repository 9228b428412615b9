"""dpeft-merge: fold an adapter into its base and write a plain transformers model folder."""

import json

from omegaconf import DictConfig

from distributed_peft.adapters.storage import MERGED_METADATA, merge_adapter
from distributed_peft.cli.app import hydra_app
from distributed_peft.config import validate_merge
from distributed_peft.runtime.distributed import resolve_device


@hydra_app("dpeft-merge", config_name="merge", validator=validate_merge)
def main(cfg: DictConfig) -> None:
    output = merge_adapter(cfg.adapter, cfg.output, cfg.allow_base_mismatch, resolve_device(cfg.device))
    precision = json.loads((output / MERGED_METADATA).read_text())["precision"]
    print(f"merged {cfg.adapter} into its base: {output}")
    print(f"precision: {precision}")


if __name__ == "__main__":
    main()
