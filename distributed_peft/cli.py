"""The shared shell of every `dpeft-*` entry point: a Hydra app over `conf/` that checks the config first.

A user's mistake (unknown option, bad value, missing file) is printed as one line per problem and exits
with code 2 before any model is loaded; bugs keep their tracebacks.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distributed_peft.config import CONF_DIR, CONFIG_GROUPS, group_options, register_configs, validate
from distributed_peft.errors import USER_ERROR_EXIT_CODE, ConfigError, DpeftError
from distributed_peft.prompts import literal_overrides


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


def check_overrides(
    overrides: list[str], config_name: str = "config", validator: Callable[[DictConfig], None] = validate
) -> DictConfig | None:
    """Compose and validate the config the way the app will; raise ConfigError on any user mistake.

    Returns None when the command line holds sweeps or Hydra flags, which Hydra itself must expand.
    """
    overrides = literal_overrides(overrides, config_name)  # prompts, inputs and templates are text, not syntax
    if any(arg.startswith("-") for arg in overrides):
        return None
    plain = [o for o in overrides if not re.match(r"^[+~]*hydra[./=]", o)]
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except HydraException as exc:
        raise ConfigError(_one_line(exc)) from exc
    if any(o.is_sweep_override() for o in parsed):
        return None
    problems = []
    for override in parsed:
        group = override.key_or_group
        if group in CONFIG_GROUPS and override.value_type is not None and "." not in group:
            choice = override.value()
            if isinstance(choice, str) and choice not in group_options(group):
                problems.append(
                    f"{group}={choice!r} is not a known {group}; allowed: {', '.join(group_options(group))}"
                )
    if problems:
        raise ConfigError(problems)
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=plain)
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
    """Turn `fn(cfg)` into a console-script entry point: preflight check, then `@hydra.main` over `conf/`."""

    def decorator(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        def run_checked(cfg: DictConfig) -> Any:
            from distributed_peft.termination import handle_sigterm
            from distributed_peft.tracking import quiet_third_party_notices

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
            try:
                check_overrides(sys.argv[1:], config_name, validator)
            except DpeftError as error:
                report_user_error(error, prog)
                sys.exit(USER_ERROR_EXIT_CODE)
            sys.argv[1:] = per_job_output_dir(sys.argv[1:])
            return hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(run_checked)()

        return entry

    return decorator
