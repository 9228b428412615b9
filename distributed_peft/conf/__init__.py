"""The Hydra config tree, shipped inside the package: every `dpeft-*` command reads it as pkg://distributed_peft.conf.

One directory per config group (task/, model/, peft/, distributed/, training/, logging/, experiment/) and one primary
config per command (config.yaml for train/eval/launch/bench, generate.yaml, merge.yaml, reproduce.yaml, explore.yaml).
A user's own directory composes with it: `dpeft-train --config-dir my_conf task=my_task`.
"""

from distributed_peft.config import register_configs

# Importing the tree registers its schema (base_config...) and resolvers, so any Hydra user composes it as our commands
# do: `initialize_config_module("distributed_peft.conf")`, DVC's `[hydra] config_module` (examples/dvc).
register_configs()
