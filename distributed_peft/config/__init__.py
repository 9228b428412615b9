"""Typed config schemas registered in Hydra's ConfigStore, and validation of a composed config.

One module per config group (and `tasks`: several task adapters in one job), each holding its schema, the allowed
values of its keys (`Choice` enums) and its checks:
task, model, peft, distributed, training, logging, evaluation; the root `Config` and `validate` (root), the commands
that do not train (commands), the ConfigStore and saved configs (store), and the shared problem collection (checks).
Nothing here imports torch or reads a data file (gguf: a GGUF checkpoint's header, never its weights): a bad value is
reported in a fraction of a second, before any model loads; the layers above add their own checks to the same report
(`validate(cfg, checks=...)`).

Imports: errors, runtime.
"""

from distributed_peft.config.checks import Choice, missing_extra, unknown_keys
from distributed_peft.config.commands import (
    HOST_PATTERN,
    BenchConfig,
    BenchVariant,
    Device,
    ExploreConfig,
    GenerateConfig,
    MergeConfig,
    validate_bench,
    validate_explore,
    validate_generate,
    validate_merge,
)
from distributed_peft.config.distributed import (
    SHARDED_PARAMETER_STRATEGIES,
    Backend,
    DistributedConfig,
    DistributedStrategy,
)
from distributed_peft.config.evaluation import EvaluationConfig
from distributed_peft.config.logging import LoggingConfig, WandbMode
from distributed_peft.config.model import Dtype, EmbeddedBaseConfig, ModelConfig, ModelFamily
from distributed_peft.config.peft import (
    LoraBias,
    PeftConfig,
    PeftMethod,
    QuantizationConfig,
    QuantType,
    check_lora_rank,
    lora_targets,
)
from distributed_peft.config.root import CONFIG_GROUPS, Check, Config, group_options, task_configs, validate
from distributed_peft.config.store import load_recorded_config, register_configs, to_yaml
from distributed_peft.config.task import (
    DataConfig,
    DataFormat,
    DataSource,
    TaskConfig,
    TaskMetric,
    TrainTarget,
    data_file,
    resolve_data_format,
    resolve_data_source,
    template_fields,
)
from distributed_peft.config.tasks import PER_TASK_TRAINING_KEYS, Interleave
from distributed_peft.config.training import (
    EIGHT_BIT_OPTIMIZERS,
    MAX_SEED,
    RESUME_FORCE,
    RESUME_OFF,
    LrScheduler,
    MixedPrecision,
    Optimizer,
    PackingMode,
    PaddingFreeAttention,
    TrainingConfig,
    Truncation,
)

__all__ = [
    "CONFIG_GROUPS",
    "HOST_PATTERN",
    "PER_TASK_TRAINING_KEYS",
    "Interleave",
    "EIGHT_BIT_OPTIMIZERS",
    "MAX_SEED",
    "RESUME_FORCE",
    "RESUME_OFF",
    "SHARDED_PARAMETER_STRATEGIES",
    "Backend",
    "BenchConfig",
    "BenchVariant",
    "Check",
    "Choice",
    "Config",
    "DataConfig",
    "DataFormat",
    "DataSource",
    "Device",
    "DistributedConfig",
    "DistributedStrategy",
    "Dtype",
    "EmbeddedBaseConfig",
    "EvaluationConfig",
    "ExploreConfig",
    "GenerateConfig",
    "LoggingConfig",
    "LoraBias",
    "LrScheduler",
    "MergeConfig",
    "MixedPrecision",
    "ModelConfig",
    "ModelFamily",
    "Optimizer",
    "PackingMode",
    "PaddingFreeAttention",
    "PeftConfig",
    "PeftMethod",
    "QuantType",
    "QuantizationConfig",
    "TaskConfig",
    "TaskMetric",
    "TrainTarget",
    "TrainingConfig",
    "Truncation",
    "WandbMode",
    "check_lora_rank",
    "data_file",
    "group_options",
    "load_recorded_config",
    "lora_targets",
    "missing_extra",
    "register_configs",
    "resolve_data_format",
    "resolve_data_source",
    "task_configs",
    "template_fields",
    "to_yaml",
    "unknown_keys",
    "validate",
    "validate_bench",
    "validate_explore",
    "validate_generate",
    "validate_merge",
]
