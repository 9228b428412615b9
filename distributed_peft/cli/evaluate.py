"""dpeft-eval: base vs adapter on the recorded validation split or any file, reports in a directory of its own."""

import json
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from distributed_peft.cli.app import hydra_app
from distributed_peft.cli.preflight import split_config_flags
from distributed_peft.config import group_options
from distributed_peft.constants import ADAPTER_METADATA
from distributed_peft.errors import ConfigError
from distributed_peft.evaluation.evaluator import parse_user_overrides, plan_evaluation, run_evaluation
from distributed_peft.evaluation.heldout import plan_heldout, run_heldout


def command_line_overrides() -> list[str]:
    """The user's overrides: the command line itself, or Hydra's record of one multirun job's (sweeps, flags)."""
    args = split_config_flags(sys.argv[1:])[0]  # --config-dir/--config-name choose configs: not overrides
    if not any(a.startswith("-") for a in args) and not any(o.is_sweep_override() for o in parse_user_overrides(args)):
        return args
    return list(HydraConfig.get().overrides.task)  # sweeps and flags reach the validator only inside Hydra's job


def validate_evaluation(cfg: DictConfig) -> None:
    """dpeft-eval's config check: the task it will evaluate is the adapter's, with the command line's overrides (with
    heldout=true: the adapter's task has bundled held-out rows)."""
    if cfg.heldout:
        plan_heldout(cfg, command_line_overrides())
    else:
        plan_evaluation(cfg, command_line_overrides())


def with_adapter_task(argv: list[str]) -> list[str]:
    """The command line composed over the adapter's own task (`task=<its name>` added when it is a task of conf/ and
    no task= is given), so that its fields can be overridden: task.data.columns.question=q on an sql adapter."""

    try:
        parsed = parse_user_overrides(argv)
    except ConfigError:
        return argv  # Hydra's flags with values, or a typo that the check reports in one line
    if any(o.key_or_group == "task" for o in parsed):
        return argv
    given = {o.key_or_group: o.value() for o in parsed if not o.is_sweep_override()}
    adapter = given.get("adapter") or (f"{given['output_dir']}/adapter" if given.get("output_dir") else None)
    if not isinstance(adapter, str):
        return argv
    try:
        name = json.loads((Path(adapter) / ADAPTER_METADATA).read_text())["config"]["task"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return argv  # no readable adapter here: the check names the problem
    if name not in group_options("task"):
        return argv
    first = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    return [*argv[:first], f"task={name}", *argv[first:]]


@hydra_app("dpeft-eval", validator=validate_evaluation)
def _evaluate_app(cfg: DictConfig) -> None:
    if cfg.heldout:
        run_heldout(cfg, list(HydraConfig.get().overrides.task))
    else:
        run_evaluation(cfg, list(HydraConfig.get().overrides.task))


def main() -> None:
    """dpeft-eval: base vs adapter on the recorded validation split or any file, reports in a directory of its own."""
    sys.argv[1:] = with_adapter_task(sys.argv[1:])
    _evaluate_app()


if __name__ == "__main__":
    main()
