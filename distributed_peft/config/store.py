"""The schemas in Hydra's ConfigStore (what `conf/*.yaml` start their defaults lists with), and a run's config as
saved with it and read back."""

from __future__ import annotations

import re
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from distributed_peft.config.commands import BenchConfig, ExploreConfig, GenerateConfig, MergeConfig
from distributed_peft.config.root import Config
from distributed_peft.runtime.output_dirs import default_output_dir
from distributed_peft.runtime.redaction import redact_values


def register_configs() -> None:
    """Register the schema that `conf/config.yaml` starts its defaults list with, and its resolvers."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    store.store(name="generate_config", node=GenerateConfig)
    store.store(name="merge_config", node=MergeConfig)
    store.store(name="explore_config", node=ExploreConfig)
    store.store(name="bench_config", node=BenchConfig)
    if not OmegaConf.has_resolver("dpeft_output_dir"):
        OmegaConf.register_new_resolver("dpeft_output_dir", default_output_dir)
    if not OmegaConf.has_resolver("dpeft_job_name"):
        OmegaConf.register_new_resolver("dpeft_job_name", job_name)


def job_name(tasks: Any, task_name: str) -> str:
    """A run's name in its default output_dir: the task's, or a multi-task job's tasks joined (detox+instruct+sql)."""
    return "+".join(map(str, tasks)) if tasks else task_name


def load_recorded_config(recorded: dict[str, Any] | DictConfig) -> DictConfig:
    """A config saved by an earlier run (config.yaml, dpeft_adapter.json), completed with today's schema defaults
    so that options added since then read as their defaults."""
    register_configs()
    if isinstance(recorded, DictConfig):  # config.yaml as OmegaConf.load read it: saved resolved, so text only
        recorded = OmegaConf.to_container(recorded, resolve=False)
    if isinstance(recorded.get("task"), dict) and "prompt_space" not in recorded["task"]:
        # recorded before task.prompt_space: that adapter learned its prompts with the trailing space as a token
        recorded = {**recorded, "task": {**recorded["task"], "prompt_space": "prompt"}}
    return OmegaConf.merge(OmegaConf.structured(Config), _literal(recorded))


def _literal(value: Any) -> Any:
    """A recorded (resolved) value read back as text: a `${` a user typed into a template stays literal."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)  # OmegaConf's escapes
    if isinstance(value, dict):
        return {key: _literal(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_literal(item) for item in value]
    return value


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as saved with a run, secrets from the environment masked (it loads back as YAML)."""
    return OmegaConf.to_yaml(OmegaConf.create(redact_values(OmegaConf.to_container(cfg, resolve=True))))
