"""The shared shell of every `dpeft-*` entry point: a Hydra app over the packaged config tree that checks it first.

A user's mistake (unknown option, bad value, missing file) is printed as one line per problem and exits
with code 2 before any model is loaded; bugs keep their tracebacks. Every command answers `--help` (its own text in
conf/hydra/help/<command>.yaml: what it does, the groups it composes, its main keys) and `--cfg job|hydra|all`
(Hydra's print of the composed config), with the overrides checked the same way and nothing run.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from distributed_peft.cli.help import print_only, report_user_error
from distributed_peft.cli.preflight import check_overrides
from distributed_peft.config import register_configs
from distributed_peft.constants import CONF_SEARCH_PATH
from distributed_peft.data.files import validate_run
from distributed_peft.data.prompts import literal_overrides
from distributed_peft.errors import USER_ERROR_EXIT_CODE, DpeftError


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
    prog: str, config_name: str = "config", validator: Callable[[DictConfig], None] = validate_run
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
