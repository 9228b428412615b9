"""The preflight: a command line composed and validated the way the app will run it, before any model loads.

A user's mistake (unknown option, bad value, missing config directory, a Hydra group whose plugin is absent) raises
ConfigError with one line per problem; sweeps and Hydra flags are left to Hydra, which expands them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distributed_peft.config import CONFIG_GROUPS, group_options, missing_extra, register_configs
from distributed_peft.constants import CONF_DIR, CONF_MODULE, CONF_SEARCH_PATH
from distributed_peft.data.files import validate_run
from distributed_peft.data.prompts import literal_overrides
from distributed_peft.errors import ConfigError


def _one_line(exc: Exception) -> str:
    """Hydra and OmegaConf errors span several lines; keep what names the key and the value."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    message = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0]
    key = getattr(cause, "full_key", None)
    if key and key not in message:
        message = f"{key}: {message}"
    return re.sub(r"\s+", " ", message)


CONFIG_DIR_FLAGS = ("--config-dir", "-cd")
CONFIG_NAME_FLAGS = ("--config-name", "-cn")


def take_flags(argv: Sequence[str], with_value: Sequence[str], alone: Sequence[str] = ()) -> tuple[list[str], list]:
    """(the rest of argv, the flags taken as (flag, value)): `--flag value`, `--flag=value` or a flag `alone`."""
    rest: list[str] = []
    taken: list[tuple[str, str | None]] = []
    args = iter(argv)
    for arg in args:
        flag, equals, value = arg.partition("=")
        if flag in with_value:
            taken.append((flag, value if equals else next(args, "")))
        elif arg in alone:
            taken.append((arg, None))
        else:
            rest.append(arg)
    return rest, taken


def split_config_flags(argv: list[str]) -> tuple[list[str], list[str], str | None]:
    """Hydra's --config-dir/-cd and --config-name/-cn taken out of a command line: (the rest, dirs, name)."""
    rest, taken = take_flags(argv, CONFIG_DIR_FLAGS + CONFIG_NAME_FLAGS)
    for flag, value in taken:
        if not value:
            raise ConfigError(f"{flag} needs a value; allowed: {flag} {'DIR' if flag in CONFIG_DIR_FLAGS else 'NAME'}")
    config_dirs = [value for flag, value in taken if flag in CONFIG_DIR_FLAGS]
    names = [value for flag, value in taken if flag in CONFIG_NAME_FLAGS]
    return rest, config_dirs, (names[-1] if names else None)


def _searchpath_entries(parsed: list) -> list[str]:
    """The entries of the command line's `hydra.searchpath=[...]` (the last one wins, as in Hydra)."""
    searchpath = [o for o in parsed if o.key_or_group == "hydra.searchpath"]
    return [str(e) for e in (searchpath[-1].value() if searchpath else [])]


def user_config_dirs(config_dirs: list[str], parsed: list) -> list[Path]:
    """A user's config directories, from --config-dir and `hydra.searchpath=[file://...]`, each checked to exist."""
    directories, problems = [], []
    for entry in [*config_dirs, *_searchpath_entries(parsed)]:
        if entry.startswith("pkg://"):
            continue  # a Python package's configs: Hydra resolves it; its options are not listed here
        path = Path(entry.removeprefix("file://")).expanduser().resolve()
        if path.is_dir():
            directories.append(path)
        else:
            problems.append(f"config directory {entry!r} does not exist; allowed: an existing directory")
    if problems:
        raise ConfigError(problems)
    return directories


def _searchpath_override(directories: list[Path], parsed: list) -> list[str]:
    """`hydra.searchpath=[...]` for compose(): the user's directories after ours, as `hydra.main` orders them."""
    entries = [f"file://{d}" for d in directories]
    entries += [e for e in _searchpath_entries(parsed) if e.startswith("pkg://")]
    entries += [CONF_SEARCH_PATH] if entries else []  # ours too: the primary config may be in a user's directory
    quoted = ",".join("'" + e.replace("\\", "\\\\").replace("'", "\\'") + "'" for e in entries)
    return [f"hydra.searchpath=[{quoted}]"] if entries else []


def _initialize(config_name: str, directories: list[Path]):
    """Hydra's compose API over our tree; over the user's directory when the primary config is there, as `hydra.main`
    finds `--config-dir DIR --config-name NAME` (DIR/NAME.yaml; compose cannot load a primary from hydra.searchpath)."""
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        home = next((d for d in directories if (d / f"{config_name}.yaml").is_file()), None)
        if home is not None:
            return initialize_config_dir(config_dir=str(home), version_base="1.3")
    return initialize_config_module(config_module=CONF_MODULE, version_base="1.3")


HYDRA_GROUP_CHOICE = re.compile(r"(hydra/[\w/]+)=([\w.-]+)")  # hydra/launcher=slurm (not a sweep over launchers)
SUBMITIT_LAUNCHERS = ("slurm", "local", "submitit_slurm", "submitit_local")


def check_hydra_choices(overrides: list[str], config_dirs: list[str]) -> None:
    """`hydra/launcher=NAME` and the other groups of Hydra's own config: a known option whose plugin is installed.

    Checked even under -m and sweeps (which Hydra expands), before anything is submitted.
    """
    chosen = [m.groups() for m in map(HYDRA_GROUP_CHOICE.fullmatch, overrides) if m]
    if not chosen:
        return
    from hydra.core.global_hydra import GlobalHydra

    problems = []
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()  # Hydra's options, plugins' included
        for group, choice in chosen:
            if group == "hydra/launcher" and choice in SUBMITIT_LAUNCHERS:
                problem = missing_extra("hydra_plugins.hydra_submitit_launcher", "slurm", f"{group}={choice}")
                if problem:
                    problems.append(problem)
                    continue
            options = sorted({*loader.get_group_options(group), *group_options(group, config_dirs)})
            if choice not in options:
                problems.append(f"{group}={choice!r} is not a known {group}; allowed: {', '.join(options)}")
    if problems:
        raise ConfigError(problems)


def check_overrides(
    overrides: list[str],
    config_name: str = "config",
    validator: Callable[[DictConfig], None] = validate_run,
    hydra_overrides: Sequence[str] = (),
) -> DictConfig | None:
    """Compose and validate the config the way the app will; raise ConfigError on any user mistake.

    Returns None when the command line holds sweeps or Hydra flags, which Hydra itself must expand. With
    `hydra_overrides` (choices of Hydra's own groups, `hydra/help=NAME`) the config keeps its `hydra` node.
    """
    overrides = literal_overrides(overrides, config_name)  # prompts, inputs and templates are text, not syntax
    overrides, config_dirs, user_config_name = split_config_flags(overrides)
    check_hydra_choices(overrides, config_dirs)
    if any(arg.startswith("-") for arg in overrides):
        return None
    config_name = user_config_name or config_name
    try:
        parsed_all = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(_one_line(exc)) from exc
    directories = user_config_dirs(config_dirs, parsed_all)
    if any(o.is_sweep_override() for o in parsed_all):
        return None
    plain = [o for o in overrides if not re.match(r"^[+~]*hydra[./=]", o)]
    parsed = [o for o in parsed_all if not re.match(r"^hydra[./]|^hydra$", o.key_or_group)]
    problems = []
    for override in parsed:
        group = override.key_or_group
        if group in CONFIG_GROUPS and override.value_type is not None and "." not in group:
            choice = override.value()
            options = group_options(group, directories)
            if isinstance(choice, str) and choice not in options:
                problems.append(f"{group}={choice!r} is not a known {group}; allowed: {', '.join(options)}")
    if problems:
        raise ConfigError(problems)
    register_configs()
    try:
        with _initialize(config_name, directories):
            cfg = compose(
                config_name=config_name,
                overrides=plain + _searchpath_override(directories, parsed_all) + list(hydra_overrides),
                return_hydra_config=bool(hydra_overrides),
            )
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from exc
    except AssertionError as exc:  # OmegaConf's update of a key under a group this command left empty (null)
        chosen = {o.key_or_group for o in parsed if "." not in o.key_or_group}
        inside = [o for o in parsed if "." in o.key_or_group and o.key_or_group.split(".")[0] not in chosen]
        if not inside:
            raise
        problems = []
        for override in inside:
            group = override.key_or_group.split(".")[0]
            problems.append(
                f"{override.input_line} sets a key of {group!r}, which {config_name}.yaml leaves empty; "
                f"allowed: choose it first ({group}=NAME) or drop the key"
            )
        raise ConfigError(problems) from exc
    _check_task_overrides(cfg, parsed)
    validator(cfg)
    return cfg


def _check_task_overrides(cfg: DictConfig, parsed: list) -> None:
    """With tasks=[...], a `task` choice or `task.KEY=` would silently apply to no task: each task's keys go under
    per_task.NAME.task."""
    if not OmegaConf.select(cfg, "tasks"):
        return
    problems = [
        f"{o.input_line} applies to a one-task run; with tasks={list(cfg.tasks)} "
        + (f"set it for one task: per_task.NAME.{o.key_or_group}" if "." in o.key_or_group else "list the tasks there")
        for o in parsed
        if o.key_or_group == "task" or o.key_or_group.startswith("task.")
    ]
    if problems:
        raise ConfigError(problems)
