"""Typed config schemas registered in Hydra's ConfigStore, and validation of a composed config.

Nothing here imports torch: a bad value is reported in a fraction of a second, before any model loads.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from distributed_peft.errors import ConfigError, DpeftError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PROJECT_ROOT = PACKAGE_DIR.parent  # a checkout's root (site-packages in an installed wheel): only dev tools use it
# The config tree ships inside the package: Hydra reads it as pkg://distributed_peft.conf from any directory, and a
# user's own config directory (--config-dir, hydra.searchpath) adds groups and options beside ours.
CONF_MODULE = "distributed_peft.conf"
CONF_SEARCH_PATH = f"pkg://{CONF_MODULE}"
CONF_DIR = PACKAGE_DIR / "conf"
SAMPLE_DATA_DIR = PACKAGE_DIR / "sample_corpora" / "data"

CONFIG_GROUPS = ("task", "model", "peft", "distributed", "training", "logging", "experiment")
MODEL_FAMILIES = ("llama", "bloom", "mistral")
DATA_SOURCES = ("auto", "sample", "local", "hub")
DATA_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")
PEFT_METHODS = ("qlora", "lora")
QUANT_TYPES = ("nf4", "fp4")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
OPTIMIZERS = ("adamw_torch", "paged_adamw_8bit", "adamw_8bit")
TRUNCATION_POLICIES = ("truncate", "drop")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
DISTRIBUTED_STRATEGIES = ("auto", "ddp", "zero2", "zero3", "zero3_offload", "fsdp")
SHARDED_PARAMETER_STRATEGIES = ("zero3", "zero3_offload", "fsdp")  # the 4-bit storage dtype must match shards
WANDB_MODES = ("offline", "online", "disabled")
PACKING_MODES = ("none", "group_by_length", "padding_free")
PADDING_FREE_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")
RESUME_OFF = ("false", "no", "none", "off", "never")
RESUME_FORCE = "force"  # continue from the newest checkpoint even when the run's settings changed
MAX_SEED = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)
HOST_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[?[0-9A-Fa-f:.]+\]?")  # a host name or IP
TASK_METRICS = ("exact_match", "execution_accuracy", "bleu", "chrf", "rouge_l", "toxic_share")


@dataclass
class DataConfig:
    """Where a task's examples come from and how their columns map to the prompt template's fields."""

    source: str = "auto"  # auto: path if set, else the bundled sample file, else the hub id
    sample_file: Optional[str] = None  # a file in distributed_peft/sample_corpora/data
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    hub_split: str = "train"
    path: Optional[str] = None  # a local jsonl/json/csv/tsv/parquet file
    format: Optional[str] = None  # inferred from the path's suffix when null
    columns: dict[str, str] = field(default_factory=dict)  # template field -> column in the data
    extra_references: list[str] = field(default_factory=list)  # columns with more accepted completions (metrics)
    fraction: float = 1.0  # share of the examples to keep (after shuffling with the seed)
    max_examples: Optional[int] = None


@dataclass
class TaskConfig:
    name: str = "???"
    description: str = ""
    prompt_template: str = "???"  # what the model reads; its tokens get no loss
    prompt_template_no_input: Optional[str] = None  # used when the `input` field is empty (Alpaca style)
    completion_template: str = "???"  # what the model learns to write; EOS is appended
    metrics: list[str] = field(default_factory=lambda: ["chrf"])  # scored on greedy generations, base vs adapter
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class EmbeddedBaseConfig:
    """Shape and pretraining of a tiny base built locally by `dpeft-build-base` (no hub needed)."""

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    seed: int = 0
    pretrain_steps: int = 300
    pretrain_batch_size: int = 16
    pretrain_seq_len: int = 128
    pretrain_lr: float = 3e-3


@dataclass
class ModelConfig:
    name: str = "???"
    family: str = "???"
    name_or_path: str = "???"  # hub id, local dir, or the embedded base's name
    embedded: bool = False
    context_length: int = 2048
    torch_dtype: str = "auto"
    attn_implementation: str = "sdpa"
    lora_target_modules: list[str] = field(default_factory=list)
    trust_remote_code: bool = False
    base: Optional[EmbeddedBaseConfig] = None


@dataclass
class QuantizationConfig:
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto: bfloat16 on CUDA with bf16 support, float16 on older GPUs, float32 on CPU
    quant_storage: str = "auto"  # auto: the compute dtype when parameters are sharded (ZeRO-3/FSDP), else uint8


@dataclass
class PeftConfig:
    method: str = "qlora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None  # null: the model config's lora_target_modules
    bias: str = "none"
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)


@dataclass
class DistributedConfig:
    strategy: str = "auto"  # auto: whatever `accelerate launch` set up; else checked against the launch
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    timeout_s: int = 600


@dataclass
class TrainingConfig:
    lr: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = -1  # optimizer steps; > 0 overrides epochs
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    max_seq_len: int = 256
    truncation: str = "truncate"  # or drop
    eval_fraction: float = 0.1
    max_eval_examples: Optional[int] = 256
    eval_steps: int = 50  # 0: only at the end
    eval_batch_size: int = 8
    seed: int = 42
    optimizer: str = "adamw_torch"
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    packing: str = "none"  # none | group_by_length | padding_free (Llama family with sdpa/flash attention)
    tokens_per_batch: Optional[int] = None  # a token budget per micro batch instead of micro_batch_size examples
    liger_kernel: bool = False  # fused Liger kernels on CUDA when the package is installed; ignored elsewhere
    checkpoint_every: int = 100  # optimizer steps between checkpoints (0: none); SIGTERM always saves one
    keep_checkpoints: int = 2  # the newest K complete checkpoints are kept
    # auto: continue from output_dir's newest complete checkpoint of the same run; false: start over; force: continue
    # from the newest checkpoint even when settings changed (recorded in the run's metadata); or a checkpoint path
    resume: str = "auto"
    max_nonfinite_steps: int = 10  # steps with a NaN/inf loss skipped before the run stops (exit code 3)


@dataclass
class EvaluationConfig:
    """Generation-based task metrics at the end of training and in dpeft-eval (greedy decoding)."""

    generate: bool = True
    max_generate_examples: int = 64  # validation examples decoded by base and adapter
    max_new_tokens: int = 64
    generation_batch_size: int = 16
    show_examples: int = 3  # side-by-side generations in eval.md


@dataclass
class LoggingConfig:
    log_every_steps: int = 1
    progress_bar: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "distributed-peft"
    wandb_mode: str = "offline"  # online only when the user asks; a wandb failure never stops a run
    debug: bool = False  # also show third-party notices (bitsandbytes, DeepSpeed, FutureWarnings); or DPEFT_DEBUG=1


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output_dir: str = "runs/${task.name}-${model.name}"
    adapter: Optional[str] = None  # dpeft-eval: a trained run's adapter directory
    # dpeft-launch: workers per node and the node layout. null: the environment variable (NUM_GPU_WORKERS,
    # NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT), else 1 node x 1 worker on 127.0.0.1:29500.
    # Only dpeft-launch reads and checks them (distributed_peft/cli/launch.py: launch_layout).
    num_gpu_workers: Optional[int] = None
    num_machines: Optional[int] = None
    machine_rank: Optional[int] = None
    main_process_ip: Optional[str] = None
    main_process_port: Optional[int] = None
    allow_base_mismatch: bool = False  # load an adapter onto a base other than the one it was trained on


@dataclass
class GenerateConfig:
    """dpeft-generate: one base, several adapters, the same input through each."""

    adapters: list[str] = field(default_factory=list)  # empty: every adapter in adapters_prebuilt/
    prompt: str = "???"  # fills each task's main input field (detox: toxic, sql: question, instruct: instruction)
    inputs: dict[str, str] = field(default_factory=dict)  # other fields: +inputs.context='CREATE TABLE ...'
    max_new_tokens: int = 64
    allow_base_mismatch: bool = False


@dataclass
class MergeConfig:
    """dpeft-merge: an adapter merged into a full-precision copy of its base, saved as a plain transformers model."""

    adapter: str = "???"
    output: str = "???"
    allow_base_mismatch: bool = False


@dataclass
class ExploreConfig:
    """dpeft-explore: a web page that puts every adapter beside the base they share, loaded once."""

    adapters: list[str] = field(default_factory=list)  # empty: every adapter in adapters_prebuilt/
    model: Optional[ModelConfig] = None  # `model=NAME`: the base to load; null: the base the adapters record
    host: str = "127.0.0.1"  # 0.0.0.0 to serve other machines
    port: int = 7860
    device: str = "auto"  # auto: cuda when available, else cpu
    max_new_tokens: int = 64  # the page's default; requests may ask for up to max_new_tokens_limit
    max_new_tokens_limit: int = 256
    examples_per_task: int = 5  # validation examples offered per task
    allow_base_mismatch: bool = False


# dpeft-bench's variants, on the same job: TRL's SFTTrainer padded (the baseline) and padding-free, and ours
BENCH_VARIANTS = ("trl_padded", "ours_padded", "ours_group_by_length", "ours_padding_free", "trl_padding_free")


@dataclass
class BenchConfig:
    """dpeft-bench: our packing against TRL's SFTTrainer on the same tiny-llama QLoRA job (benchmark.py)."""

    tasks: list[str] = field(default_factory=lambda: ["detox", "instruct"])
    repeats: int = 3  # every variant, interleaved with the others
    examples: int = 400  # per task, train + validation
    variants: list[str] = field(default_factory=lambda: list(BENCH_VARIANTS))  # trl_padded always runs
    output_dir: str = "runs/bench"  # bench.json, bench.md


def validate_bench(cfg: DictConfig) -> None:
    problems = unknown_keys(cfg, BenchConfig)
    bundled = [
        t for t in group_options("task") if OmegaConf.load(CONF_DIR / "task" / f"{t}.yaml").data.get("sample_file")
    ]
    allowed = f"{', '.join(bundled)} (the tasks with bundled data)"
    _check(problems, len(cfg.tasks) > 0, "tasks", list(cfg.tasks), f"a non-empty list of: {allowed}")
    for task in cfg.tasks:
        if task not in bundled:
            problems.append(f"tasks: {task!r} is not a task dpeft-bench runs; allowed: {allowed}")
    _check(problems, len(cfg.variants) > 0, "variants", list(cfg.variants), "a non-empty list")
    for variant in cfg.variants:
        if variant not in BENCH_VARIANTS:
            problems.append(f"variants: {variant!r} is not a variant; allowed: {', '.join(BENCH_VARIANTS)}")
    _check(problems, cfg.repeats >= 1, "repeats", cfg.repeats, "an integer >= 1")
    _check(problems, cfg.examples >= 2, "examples", cfg.examples, "an integer >= 2 (one to train on, one to evaluate)")
    try:  # known before an hour of runs
        from distributed_peft.runtime.output_dirs import check_output_dir

        check_output_dir(cfg.output_dir)
    except DpeftError as error:
        problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)


def validate_generate(cfg: DictConfig) -> None:
    problems = unknown_keys(cfg, GenerateConfig)
    for adapter in cfg.adapters:
        if not Path(adapter).is_dir():
            problems.append(f"adapters: {adapter!r} is not a directory; allowed: adapter directories")
    _check(problems, cfg.max_new_tokens >= 1, "max_new_tokens", cfg.max_new_tokens, "an integer >= 1")
    if problems:
        raise ConfigError(problems)


def validate_explore(cfg: DictConfig) -> None:
    problems = unknown_keys(cfg, ExploreConfig)
    for adapter in cfg.adapters:
        if not Path(adapter).is_dir():
            problems.append(f"adapters: {adapter!r} is not a directory; allowed: adapter directories")
    _check(problems, 0 < cfg.port < 65536, "port", cfg.port, "a TCP port in [1, 65535]")
    host_ok = bool(HOST_PATTERN.fullmatch(cfg.host))
    _check(problems, host_ok, "host", cfg.host, "a host name or IP address such as 127.0.0.1 or 0.0.0.0")
    _allowed(problems, "device", cfg.device, ("auto", "cpu", "cuda"))
    _check(problems, cfg.max_new_tokens_limit >= 1, "max_new_tokens_limit", cfg.max_new_tokens_limit, "an integer >= 1")
    _check(
        problems,
        1 <= cfg.max_new_tokens <= cfg.max_new_tokens_limit,
        "max_new_tokens",
        cfg.max_new_tokens,
        f"in [1, {cfg.max_new_tokens_limit}] (max_new_tokens_limit)",
    )
    _check(problems, cfg.examples_per_task >= 1, "examples_per_task", cfg.examples_per_task, "an integer >= 1")
    if problems:
        raise ConfigError(problems)


def validate_merge(cfg: DictConfig) -> None:
    problems = unknown_keys(cfg, MergeConfig)
    if not Path(cfg.adapter).is_dir():
        problems.append(f"adapter={cfg.adapter!r} is not a directory; allowed: an adapter directory")
    if problems:
        raise ConfigError(problems)


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


def default_output_dir(name: str) -> str:
    """runs/<name>; in a Hydra multirun (-m) each job's own directory under the sweep's, so no two jobs share one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        sweep = HydraConfig.get().sweep
        return str(Path(sweep.dir) / str(sweep.subdir))
    return f"runs/{name}"


def group_options(group: str, config_dirs: Sequence[str | Path] = ()) -> list[str]:
    """Option names of a config group: `conf/<group>/*.yaml` in the package and in a user's config directories."""
    return sorted({p.stem for root in (CONF_DIR, *map(Path, config_dirs)) for p in (root / group).glob("*.yaml")})


# ----------------------------------------------------------------------------------------------------------------------
# Validation: every problem is collected and reported together, one line each.


def _allowed(problems: list[str], key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{key}={value!r} is not allowed; allowed: {', '.join(allowed)}")


def _check(problems: list[str], ok: bool, key: str, value: Any, requirement: str) -> None:
    if not ok:
        problems.append(f"{key}={value!r} is invalid; it must be {requirement}")


def _schema_of(annotation: Any) -> Optional[type]:
    """The dataclass a field holds (also through Optional[...]); None for free-form values (dicts, lists, scalars)."""
    if is_dataclass(annotation):
        return annotation
    if get_origin(annotation) is Union:
        return next((arg for arg in get_args(annotation) if is_dataclass(arg)), None)
    return None


def _schema_paths(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key a schema defines, nested dataclasses included."""
    paths = []
    for name, annotation in get_type_hints(schema).items():
        paths.append(prefix + name)
        nested = _schema_of(annotation)
        if nested is not None:
            paths += _schema_paths(nested, f"{prefix}{name}.")
    return paths


def _shown_value(node: DictConfig, key: str) -> str:
    try:
        value = node[key]
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
    except Exception:  # an interpolation that does not resolve: the key alone is enough to name the mistake
        return key
    return f"{key}={value!r}"


def unknown_keys(cfg: DictConfig, schema: type, prefix: str = "", root: Optional[type] = None) -> list[str]:
    """One line per key that `schema` does not define (added with `+`), with the closest known key as a hint.

    Fields typed as dicts (task.data.columns, dpeft-generate's inputs) are free-form and not looked into.
    """
    root = root or schema
    hints = get_type_hints(schema)
    problems = []
    for key in cfg.keys():
        key = str(key)
        if key not in hints:
            problems.append(_unknown_key_line(cfg, key, prefix, sorted(hints), root))
            continue
        nested = _schema_of(hints[key])
        child = cfg._get_node(key)
        if nested is not None and isinstance(child, DictConfig) and not child._is_none():
            problems += unknown_keys(child, nested, f"{prefix}{key}.", root)
    return problems


def _unknown_key_line(node: DictConfig, key: str, prefix: str, known: list[str], root: type) -> str:
    """`training.lrr=1 is not a known option; did you mean training.lr?` (or the section's keys when none is close)."""
    where = f"{prefix}{_shown_value(node, key)} is not a known option"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"{where}; did you mean {prefix}{close[0]}?"
    elsewhere = [p for p in _schema_paths(root) if p.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"{where} in {prefix.rstrip('.') or 'the top level'}; did you mean {' or '.join(elsewhere)}?"
    return f"{where}; allowed: {', '.join(prefix + k for k in known)}"


def missing_extra(module: str, extra: str, needed_by: str) -> str | None:
    """One line naming the extra to install when `module` is not importable (found without importing it)."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return None
    return f"{needed_by} needs {module}, which is not installed; allowed: pip install 'distributed-peft[{extra}]'"


def _check_extras(cfg: DictConfig, problems: list[str]) -> None:
    """Optional features whose package (an extra of distributed-peft) is missing, before any model loads."""
    needs = []
    if cfg.peft.method == "qlora":
        needs.append(("bitsandbytes", "qlora", "peft.method='qlora' (4-bit base)"))
    if cfg.training.optimizer in ("paged_adamw_8bit", "adamw_8bit"):
        needs.append(("bitsandbytes", "qlora", f"training.optimizer={cfg.training.optimizer!r}"))
    if cfg.distributed.strategy.startswith("zero"):
        needs.append(("deepspeed", "deepspeed", f"distributed.strategy={cfg.distributed.strategy!r}"))
    if cfg.logging.wandb:
        needs.append(("wandb", "wandb", "logging.wandb=true"))
    if cfg.logging.tensorboard:
        needs.append(("tensorboard", "tensorboard", "logging.tensorboard=true"))
    for module, extra, needed_by in needs:
        problem = missing_extra(module, extra, needed_by)
        if problem and problem not in problems:
            problems.append(problem)


def template_fields(template: str) -> list[str]:
    """Names of the `{field}` placeholders of a prompt template."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def resolve_data_source(data: DataConfig | DictConfig) -> str:
    """The concrete source (`sample`, `local` or `hub`) that `auto` stands for."""
    if data.source != "auto":
        return data.source
    if data.path:
        return "local"
    if data.sample_file:
        return "sample"
    return "hub"


def resolve_data_format(path: str, fmt: Optional[str]) -> str:
    if fmt:
        return fmt
    suffix = Path(path).suffix.lstrip(".").lower()
    return {"jl": "jsonl", "ndjson": "jsonl"}.get(suffix, suffix)


def read_columns(path: Path, fmt: str) -> list[str]:
    """Column names of a local data file, read from its header or first record only (a byte-order mark skipped)."""
    from distributed_peft.data.files import column_names

    return column_names(path, fmt)


def _validate_data(task: DictConfig, problems: list[str]) -> None:
    data = task.data
    _allowed(problems, "task.data.source", data.source, DATA_SOURCES)
    _check(problems, 0 < data.fraction <= 1, "task.data.fraction", data.fraction, "in (0, 1]")
    if data.max_examples is not None:
        _check(problems, data.max_examples > 0, "task.data.max_examples", data.max_examples, "> 0 or null")
    fields: set[str] = set()
    for key in ("prompt_template", "completion_template", "prompt_template_no_input"):
        template = task[key]
        if template is None:
            continue
        try:
            fields |= set(template_fields(template))
        except ValueError as exc:  # an unbalanced brace: str.format could never fill it
            problems.append(
                f"task.{key}={template!r} is not a template ({exc}); allowed: text with {{field}} placeholders, "
                "a literal brace doubled ({{ or }})"
            )
    unmapped = sorted(fields - set(data.columns.keys()))
    if unmapped:
        problems.append(
            f"task.data.columns={dict(data.columns)!r} has no column for template field(s) {', '.join(unmapped)}; "
            f"allowed: a mapping with a key for every field of the prompt and completion templates"
        )
    source = resolve_data_source(data)
    if source == "hub":
        if not data.hub_id:
            problems.append("task.data.hub_id=None is invalid; it must be a hub dataset id when task.data.source=hub")
        return
    if source == "sample":
        if not data.sample_file or not (SAMPLE_DATA_DIR / data.sample_file).is_file():
            allowed = ", ".join(sorted(p.name for p in SAMPLE_DATA_DIR.glob("*.jsonl")))
            problems.append(f"task.data.sample_file={data.sample_file!r} is not a bundled sample; allowed: {allowed}")
            return
        path, fmt = SAMPLE_DATA_DIR / data.sample_file, "jsonl"
    else:
        if not data.path:
            problems.append("task.data.path=None is invalid; it must be a local data file when task.data.source=local")
            return
        path, fmt = Path(data.path), resolve_data_format(data.path, data.format)
        if fmt not in DATA_FORMATS:
            problems.append(
                f"task.data.format={fmt!r} (from {data.path!r}) is not supported; allowed: {', '.join(DATA_FORMATS)}"
            )
            return
        if not path.is_file():
            problems.append(f"task.data.path={data.path!r} does not exist; it must be a readable {fmt} file")
            return
    try:
        columns = read_columns(path, fmt)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        problems.append(f"task.data.path={str(path)!r} cannot be read as {fmt}: {exc}")
        return
    if not columns:
        problems.append(f"task.data.path={str(path)!r} holds no record; allowed: a {fmt} file with at least one record")
        return
    missing = sorted({column for column in data.columns.values() if column not in columns})
    if missing:
        problems.append(
            f"task.data.path={str(path)!r} lacks column(s) {', '.join(missing)}; "
            f"allowed: its columns {', '.join(columns)} (map them with task.data.columns.FIELD=COLUMN)"
        )


def _validate_embedded_base(base: DictConfig, problems: list[str]) -> None:
    """The shape of an embedded base (model.base.*) must build: positive sizes, heads that divide the width."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "pretrain_batch_size", "pretrain_seq_len"):  # fmt: skip
        _check(problems, base[key] >= 1, f"model.base.{key}", base[key], "an integer >= 1")
    _check(problems, base.pretrain_steps >= 0, "model.base.pretrain_steps", base.pretrain_steps, "an integer >= 0")
    _check(problems, 0 < base.pretrain_lr <= 1, "model.base.pretrain_lr", base.pretrain_lr, "> 0 and <= 1")
    if base.num_heads >= 1 and base.hidden_size >= 1 and base.hidden_size % base.num_heads:
        problems.append(
            f"model.base.hidden_size={base.hidden_size!r} is invalid; it must be a multiple of model.base.num_heads "
            f"({base.num_heads})"
        )
    if base.num_kv_heads >= 1 and base.num_heads >= 1 and base.num_heads % base.num_kv_heads:
        problems.append(
            f"model.base.num_kv_heads={base.num_kv_heads!r} is invalid; it must divide model.base.num_heads "
            f"({base.num_heads})"
        )


def _lora_rank_problem(cfg: DictConfig, hidden_size: int) -> str:
    return (
        f"peft.r={cfg.peft.r!r} is invalid; it must be <= {hidden_size}, the width (hidden size) of model "
        f"{cfg.model.name}: a LoRA rank above the layers' width adds parameters and no capacity"
    )


def check_lora_rank(cfg: DictConfig, hidden_size: int) -> None:
    """Raise ConfigError when peft.r exceeds the model's width (read from its config.json for hub models)."""
    if cfg.peft.r > hidden_size:
        raise ConfigError(_lora_rank_problem(cfg, hidden_size))


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every invalid value of a composed config; load nothing heavy."""
    problems = unknown_keys(cfg, Config)
    task, model, peft, training = cfg.task, cfg.model, cfg.peft, cfg.training

    _allowed(problems, "model.family", model.family, MODEL_FAMILIES)
    _allowed(problems, "model.torch_dtype", model.torch_dtype, DTYPES)
    _check(problems, model.context_length > 0, "model.context_length", model.context_length, "> 0")
    if model.embedded and model.base is None:
        problems.append(f"model.base=None is invalid for embedded model {model.name!r}; it must describe its shape")
    if model.base is not None:
        _validate_embedded_base(model.base, problems)

    _allowed(problems, "peft.method", peft.method, PEFT_METHODS)
    _check(problems, peft.r > 0, "peft.r", peft.r, "a positive integer")
    if model.embedded and model.base is not None and 0 < model.base.hidden_size < peft.r:
        problems.append(_lora_rank_problem(cfg, model.base.hidden_size))
    _check(problems, peft.alpha > 0, "peft.alpha", peft.alpha, "a positive integer")
    _check(problems, 0 <= peft.dropout < 1, "peft.dropout", peft.dropout, "in [0, 1)")
    _allowed(problems, "peft.bias", peft.bias, ("none", "all", "lora_only"))
    _allowed(problems, "peft.quantization.quant_type", peft.quantization.quant_type, QUANT_TYPES)
    _allowed(problems, "peft.quantization.compute_dtype", peft.quantization.compute_dtype, DTYPES)
    _allowed(problems, "peft.quantization.quant_storage", peft.quantization.quant_storage, (*DTYPES, "uint8"))
    targets = peft.target_modules if peft.target_modules is not None else model.lora_target_modules
    if not targets:
        problems.append(
            f"peft.target_modules={peft.target_modules!r} is invalid: model family {model.family!r} "
            f"({model.name}) defines no LoRA targets; allowed: a non-empty list such as [q_proj,v_proj]"
        )

    _allowed(problems, "distributed.strategy", cfg.distributed.strategy, DISTRIBUTED_STRATEGIES)
    _allowed(problems, "distributed.backend", cfg.distributed.backend, ("auto", "gloo", "nccl"))
    _check(problems, cfg.distributed.timeout_s > 0, "distributed.timeout_s", cfg.distributed.timeout_s, "> 0")
    # num_gpu_workers, num_machines, machine_rank, main_process_*: only dpeft-launch reads them (launch_layout)

    _check(problems, 0 < training.lr <= 1, "training.lr", training.lr, "> 0 and <= 1 (e.g. 2e-4)")
    _allowed(problems, "training.lr_scheduler", training.lr_scheduler, LR_SCHEDULERS)
    _check(problems, 0 <= training.warmup_ratio < 1, "training.warmup_ratio", training.warmup_ratio, "in [0, 1)")
    _check(problems, training.weight_decay >= 0, "training.weight_decay", training.weight_decay, ">= 0")
    _check(problems, training.max_steps == -1 or training.max_steps > 0, "training.max_steps", training.max_steps,
           "a positive number of optimizer steps, or -1 to train for training.epochs")  # fmt: skip
    if training.max_steps <= 0:
        _check(problems, training.epochs > 0, "training.epochs", training.epochs, "> 0 when training.max_steps <= 0")
    for key in ("micro_batch_size", "gradient_accumulation_steps", "eval_batch_size"):
        _check(problems, training[key] >= 1, f"training.{key}", training[key], "an integer >= 1")
    _check(problems, training.max_grad_norm > 0, "training.max_grad_norm", training.max_grad_norm, "> 0")
    _check(
        problems,
        0 < training.max_seq_len <= model.context_length,
        "training.max_seq_len",
        training.max_seq_len,
        f"in [1, {model.context_length}] (the context length of model {model.name})",
    )
    _allowed(problems, "training.truncation", training.truncation, TRUNCATION_POLICIES)
    _check(problems, 0 < training.eval_fraction < 1, "training.eval_fraction", training.eval_fraction, "in (0, 1)")
    if training.max_eval_examples is not None:
        _check(
            problems, training.max_eval_examples > 0, "training.max_eval_examples", training.max_eval_examples, "> 0"
        )
    _check(problems, training.eval_steps >= 0, "training.eval_steps", training.eval_steps, ">= 0 (0: only at the end)")
    _allowed(problems, "training.optimizer", training.optimizer, OPTIMIZERS)
    _check(problems, 0 <= training.seed <= MAX_SEED, "training.seed", training.seed, f"in [0, {MAX_SEED}]")
    _allowed(problems, "training.packing", training.packing, PACKING_MODES)
    if training.packing == "padding_free" and model.family == "bloom":
        problems.append(
            f"training.packing='padding_free' is not possible on model {model.name!r}: BLOOM's ALiBi attention "
            "cannot keep packed examples apart; allowed: group_by_length, none"
        )
    elif training.packing == "padding_free" and model.attn_implementation not in PADDING_FREE_ATTENTION:
        problems.append(
            f"training.packing='padding_free' needs model.attn_implementation in {', '.join(PADDING_FREE_ATTENTION)}"
            f" (got {model.attn_implementation!r}); allowed: group_by_length, none"
        )
    if training.tokens_per_batch is not None:
        _check(
            problems,
            training.tokens_per_batch >= training.max_seq_len,
            "training.tokens_per_batch",
            training.tokens_per_batch,
            f">= training.max_seq_len ({training.max_seq_len}) or null",
        )
    _allowed(problems, "training.mixed_precision", training.mixed_precision, MIXED_PRECISION)
    for key, minimum in (("checkpoint_every", 0), ("keep_checkpoints", 1), ("max_nonfinite_steps", 0)):
        _check(problems, training[key] >= minimum, f"training.{key}", training[key], f"an integer >= {minimum}")
    resume = str(training.resume)
    if resume not in ("auto", RESUME_FORCE) and resume.lower() not in RESUME_OFF and not Path(resume).is_dir():
        problems.append(
            f"training.resume={resume!r} does not exist; allowed: auto, false, force (continue even when settings "
            "changed), or a checkpoint (or run) directory"
        )

    _allowed(problems, "logging.wandb_mode", cfg.logging.wandb_mode, WANDB_MODES)
    _check(problems, cfg.logging.log_every_steps >= 1, "logging.log_every_steps", cfg.logging.log_every_steps, ">= 1")

    for metric in task.metrics:
        _allowed(problems, "task.metrics", metric, TASK_METRICS)
    if "execution_accuracy" in task.metrics and "context" not in task.data.columns:
        problems.append("task.metrics=execution_accuracy needs a `context` field with the CREATE TABLE schema")
    evaluation = cfg.evaluation
    for key in ("max_generate_examples", "max_new_tokens", "generation_batch_size"):
        _check(problems, evaluation[key] >= 1, f"evaluation.{key}", evaluation[key], "an integer >= 1")
    if evaluation.max_new_tokens > model.context_length:
        problems.append(
            f"evaluation.max_new_tokens={evaluation.max_new_tokens!r} is invalid; it must be <= "
            f"{model.context_length} (the context length of model {model.name})"
        )
    _check(problems, evaluation.show_examples >= 0, "evaluation.show_examples", evaluation.show_examples, ">= 0")
    if evaluation.generate and evaluation.show_examples > evaluation.max_generate_examples >= 1:
        problems.append(
            f"evaluation.show_examples={evaluation.show_examples!r} is invalid with evaluation.max_generate_examples="
            f"{evaluation.max_generate_examples}: eval.md shows generated examples only; allowed: "
            f"evaluation.show_examples <= {evaluation.max_generate_examples}, or a larger max_generate_examples"
        )
    _validate_data(task, problems)
    _check_extras(cfg, problems)
    try:  # output_dir: absent, empty or ours, and writable, known before torch is imported
        from distributed_peft.runtime.atomic_files import check_writable
        from distributed_peft.runtime.output_dirs import check_output_dir

        check_output_dir(cfg.output_dir)
        check_writable(cfg.output_dir)
    except DpeftError as error:
        problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)


def load_recorded_config(recorded: dict[str, Any] | DictConfig) -> DictConfig:
    """A config saved by an earlier run (config.yaml, dpeft_adapter.json), completed with today's schema defaults
    so that options added since then read as their defaults."""
    register_configs()
    if isinstance(recorded, DictConfig):  # config.yaml as OmegaConf.load read it: saved resolved, so text only
        recorded = OmegaConf.to_container(recorded, resolve=False)
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


def lora_targets(cfg: DictConfig) -> list[str]:
    """The modules LoRA attaches to: the peft override, else the model family's targets."""
    targets = cfg.peft.target_modules if cfg.peft.target_modules is not None else cfg.model.lora_target_modules
    return list(targets)


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as saved with a run, secrets from the environment masked (it loads back as YAML)."""
    from distributed_peft.runtime.redaction import redact_values

    return OmegaConf.to_yaml(OmegaConf.create(redact_values(OmegaConf.to_container(cfg, resolve=True))))
