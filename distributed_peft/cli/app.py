"""The shared shell of every `dpeft-*` entry point: a Hydra app over the packaged config tree that checks it first.

A user's mistake (unknown option, bad value, missing file) is printed as one line per problem and exits
with code 2 before any model is loaded; bugs keep their tracebacks. Every command answers `--help` (its own text in
conf/hydra/help/<command>.yaml: what it does, the groups it composes, its main keys) and `--cfg job|hydra|all`
(Hydra's print of the composed config), with the overrides checked the same way and nothing run.
"""

from __future__ import annotations

import functools
import re
import string
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distributed_peft.config import (
    CONF_DIR,
    CONF_MODULE,
    CONF_SEARCH_PATH,
    CONFIG_GROUPS,
    group_options,
    missing_extra,
    register_configs,
    validate,
)
from distributed_peft.data.prompts import literal_overrides
from distributed_peft.errors import USER_ERROR_EXIT_CODE, ConfigError, DpeftError


def report_user_error(error: DpeftError, prog: str) -> None:
    for problem in error.problems:
        print(f"{prog}: {error.label}: {problem}", file=sys.stderr)


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


def split_config_flags(argv: list[str]) -> tuple[list[str], list[str], str | None]:
    """Hydra's --config-dir/-cd and --config-name/-cn taken out of a command line: (the rest, dirs, name)."""
    rest: list[str] = []
    config_dirs: list[str] = []
    config_name = None
    args = iter(argv)
    for arg in args:
        flag, equals, value = arg.partition("=")
        if flag not in CONFIG_DIR_FLAGS + CONFIG_NAME_FLAGS:
            rest.append(arg)
            continue
        if not equals:
            value = next(args, "")
        if not value:
            raise ConfigError(f"{flag} needs a value; allowed: {flag} {'DIR' if flag in CONFIG_DIR_FLAGS else 'NAME'}")
        if flag in CONFIG_DIR_FLAGS:
            config_dirs.append(value)
        else:
            config_name = value
    return rest, config_dirs, config_name


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
    validator: Callable[[DictConfig], None] = validate,
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
    validator(cfg)
    return cfg


HELP_FLAGS = ("--help", "-h")
CFG_FLAGS = ("--cfg", "-c")  # job | hydra | all: Hydra prints the composed config and runs nothing
PRINT_FLAG_VALUES = (*CFG_FLAGS, "--package", "-p")  # flags that take a value


def split_print_flags(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(overrides, flags) of a command line that only asks to print (--help, --cfg job); None for any other."""
    overrides, flags = [], []
    args = iter(argv)
    for arg in args:
        flag, equals, _ = arg.partition("=")
        if flag in PRINT_FLAG_VALUES:
            flags += [arg] if equals else [arg, next(args, "")]
        elif arg in (*HELP_FLAGS, "--resolve"):
            flags.append(arg)
        else:
            overrides.append(arg)
    printing = any(f.partition("=")[0] in (*HELP_FLAGS, *CFG_FLAGS) for f in flags)
    return (overrides, flags) if printing else None


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
    sys.argv = [prog, *literal_overrides(argv, config_name), help_choice(prog)]  # --cfg all: its own hydra.help
    try:
        hydra.main(config_path=CONF_SEARCH_PATH, config_name=config_name, version_base="1.3")(_not_run)()
    finally:
        sys.argv = saved
    return 0


def _not_run(cfg: DictConfig) -> None:
    raise AssertionError("Hydra runs no task under --cfg")


def _remove_if_empty(directory: str) -> None:
    """Hydra creates the run directory before the app starts: a run that failed on a user error leaves nothing."""
    try:
        Path(directory).rmdir()  # only succeeds when empty
    except OSError:
        pass


def per_job_output_dir(argv: list[str]) -> list[str]:
    """Under -m, a fixed `output_dir=X` becomes X/<job number>: two jobs of a sweep never share a run directory."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    rewritten = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "output_dir" and re.fullmatch(r"[\w./~+-]+", value):  # a sweep (a,b or choice(...)) stays
            arg = f"output_dir={value.rstrip('/')}/${{hydra:job.num}}"
        rewritten.append(arg)
    return rewritten


def hydra_app(
    prog: str, config_name: str = "config", validator: Callable[[DictConfig], None] = validate
) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Turn `fn(cfg)` into a console-script entry point: preflight check, then `@hydra.main` over the shipped conf."""

    def decorator(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        def run_checked(cfg: DictConfig) -> Any:
            from distributed_peft.runtime.termination import handle_sigterm
            from distributed_peft.runtime.tracking import quiet_third_party_notices

            quiet_third_party_notices(debug=bool(OmegaConf.select(cfg, "logging.debug", default=False)))

            try:
                with handle_sigterm():  # SIGTERM in any phase: one line and exit 75 (see termination.py)
                    validator(cfg)
                    return fn(cfg)
            except DpeftError as error:
                report_user_error(error, prog)
                if HydraConfig.get().mode == RunMode.MULTIRUN:  # the job directory Hydra made for this job
                    _remove_if_empty(HydraConfig.get().runtime.output_dir)
                sys.exit(error.exit_code)

        @functools.wraps(fn)
        def entry() -> Any:
            sys.argv[1:] = literal_overrides(sys.argv[1:], config_name)  # what Hydra parses: user text as text
            register_configs()
            printed = print_only(prog, config_name, sys.argv[1:])
            if printed is not None:
                sys.exit(printed)
            try:
                check_overrides(sys.argv[1:], config_name, validator)
            except DpeftError as error:
                report_user_error(error, prog)
                sys.exit(USER_ERROR_EXIT_CODE)
            sys.argv[1:] = per_job_output_dir(sys.argv[1:])
            return hydra.main(config_path=CONF_SEARCH_PATH, config_name=config_name, version_base="1.3")(run_checked)()

        return entry

    return decorator
