"""`--help` and `--cfg job|hydra|all` for every command: printed over the checked config, nothing run.

Each command's help is the layout of conf/hydra/help/dpeft.yaml filled by conf/hydra/help/<command>.yaml.
"""

from __future__ import annotations

import string
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from distributed_peft.cli.preflight import check_overrides, split_config_flags, take_flags
from distributed_peft.config import group_options
from distributed_peft.constants import CONF_DIR, CONF_SEARCH_PATH
from distributed_peft.data.prompts import literal_overrides
from distributed_peft.errors import USER_ERROR_EXIT_CODE, ConfigError, DpeftError


def undecorated(error: DpeftError) -> DpeftError:
    """The error as raised: OmegaConf re-raises an exception that arises inside its code (SIGTERM's Preempted while a
    config is read) as a new one of the same type, its message followed by `full_key: ...` lines; Python keeps the
    original as the context."""
    inner = error.__context__
    while isinstance(inner, type(error)) and inner.problems and "\n".join(error.problems).startswith(inner.problems[0]):
        error, inner = inner, inner.__context__
    return error


def report_user_error(error: DpeftError, prog: str) -> None:
    """One line per problem on stderr, each naming the command."""
    error = undecorated(error)
    for problem in error.problems:
        print(f"{prog}: {error.label}: {problem}", file=sys.stderr)


HELP_FLAGS = ("--help", "-h")
CFG_FLAGS = ("--cfg", "-c")  # job | hydra | all: Hydra prints the composed config and runs nothing
PRINT_FLAG_VALUES = (*CFG_FLAGS, "--package", "-p")  # flags that take a value


def split_print_flags(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(overrides, flags) of a command line that only asks to print (--help, --cfg job); None for any other."""
    overrides, taken = take_flags(argv, PRINT_FLAG_VALUES, (*HELP_FLAGS, "--resolve"))
    if not any(flag in (*HELP_FLAGS, *CFG_FLAGS) for flag, _ in taken):
        return None
    return overrides, [flag for flag, _ in taken]


def _unchecked(cfg: DictConfig) -> None:
    """What --help and --cfg compose is printed, not run: an incomplete config (adapter=???) is shown as it is."""


def help_choice(prog: str) -> str:
    """The command's help config, by its name: config.yaml serves dpeft-train, -eval, -launch and -build-base."""
    return f"hydra/help={prog if (CONF_DIR / 'hydra' / 'help' / f'{prog}.yaml').is_file() else 'dpeft'}"


def command_help(prog: str, config_name: str, overrides: list[str]) -> str:
    """`prog --help`: the layout of conf/hydra/help/dpeft.yaml filled by hydra/help/<prog>.yaml, over the config
    the overrides compose; $APP_CONFIG_GROUPS lists the groups this command composes (not every group in conf/)."""
    choose_help = [help_choice(prog)]
    cfg = check_overrides(overrides, config_name, _unchecked, choose_help)
    if cfg is None:  # a sweep or a Hydra flag beside --help: the help of the command's defaults
        cfg = check_overrides([], config_name, _unchecked, choose_help)
    directories = [e.removeprefix("file://") for e in cfg.hydra.searchpath if e.startswith("file://")]
    choices = cfg.hydra.runtime.choices
    label = "chosen" if any(o.lstrip("+~").partition("=")[0] in choices for o in overrides) else "default"
    listing = "".join(
        f"{group}: {', '.join(group_options(group, directories))} ({label}: {choice or 'none'})\n"
        for group, choice in sorted(choices.items())
        if not group.startswith("hydra/")
    )
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return string.Template(cfg.hydra.help.template).safe_substitute(
        APP_CONFIG_GROUPS=listing or "(none: every setting is a key)\n", CONFIG=OmegaConf.to_yaml(job)
    )


def print_only(prog: str, config_name: str, argv: list[str]) -> int | None:
    """Answer `--help` or `--cfg job|hydra|all` (Hydra's own print) after checking the overrides; run nothing.

    Returns the exit code (2 on a user mistake, one line each), or None when the command line asks for more.
    """
    split = split_print_flags(argv)
    if split is None:
        return None
    overrides, flags = split
    try:
        if any(flag in HELP_FLAGS for flag in flags):
            print(command_help(prog, config_name, overrides))
            return 0
        if {"-m", "--multirun"} & set(overrides):  # Hydra's own refusal is a traceback
            raise ConfigError("--cfg prints one composed config, not a sweep; allowed: --cfg job without -m")
        check_overrides(overrides, config_name, _unchecked)
    except DpeftError as error:
        report_user_error(error, prog)
        return USER_ERROR_EXIT_CODE
    saved = sys.argv
    sys.argv = [prog, *flags_first(argv, config_name, help_choice(prog))]  # --cfg all: its own hydra.help
    try:
        hydra.main(config_path=CONF_SEARCH_PATH, config_name=config_name, version_base="1.3")(_not_run)()
    finally:
        sys.argv = saved
    return 0


def flags_first(argv: list[str], config_name: str, *extra_overrides: str) -> list[str]:
    """Hydra's command line with every flag before every override: argparse reads no override after a flag that
    follows one (`dpeft-train task=sql --cfg job`, as the README writes it)."""
    rest, printing = take_flags(argv, PRINT_FLAG_VALUES, (*HELP_FLAGS, "--resolve"))
    overrides, config_dirs, name = split_config_flags(rest)
    flags = [part for flag, value in printing for part in ((flag,) if value is None else (flag, value))]
    flags += [part for directory in config_dirs for part in ("--config-dir", directory)]
    flags += ["--config-name", name] if name else []
    return [*flags, *extra_overrides, *literal_overrides(overrides, config_name)]


def _not_run(cfg: DictConfig) -> None:
    raise AssertionError("Hydra runs no task under --cfg")
