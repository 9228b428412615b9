"""dpeft-train: fine-tune one task adapter on a shared base (the recipe is distributed_peft.training.recipe).

dpeft-train task=detox training=demo
python -m distributed_peft.cli.train task=detox training=demo
accelerate launch -m distributed_peft.cli.train task=sql                      # every process runs the same loop
accelerate launch --multi_gpu --num_processes 4 -m distributed_peft.cli.train task=instruct model=llama-3.2-1b
dpeft-launch task=sql distributed=zero3                                     # NUM_GPU_WORKERS / multi-node
"""

from omegaconf import DictConfig

from distributed_peft.cli.app import hydra_app
from distributed_peft.training.recipe import run_training


@hydra_app("dpeft-train")
def main(cfg: DictConfig) -> None:
    run_training(cfg)


if __name__ == "__main__":
    main()
