"""Errors a user (or the machine) can cause: caught at the entry point and printed as one line each.

Exit codes, documented in the README:
    2   a config, data, adapter or storage problem (nothing was trained, or the failing write is named)
    3   training stopped: the loss stayed non-finite past `training.max_nonfinite_steps`
    75  preempted: SIGTERM stopped the run at a step boundary after saving a checkpoint; rerun to resume
"""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2
DIVERGED_EXIT_CODE = 3
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again later (SLURM --requeue, a spot instance coming back)


class DpeftError(Exception):
    """A problem caused by the user's config, data or environment (not a bug)."""

    exit_code = USER_ERROR_EXIT_CODE
    label = "error"  # printed as `<prog>: <label>: <problem>`

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(DpeftError):
    """One or more config values are invalid; each problem names the key, the value and what is allowed."""


class DataError(DpeftError):
    """The data cannot be loaded or is unusable (missing columns, empty after filtering...)."""


class AdapterError(DpeftError):
    """An adapter does not fit the base it is loaded onto, or its directory is incomplete."""


class StorageError(DpeftError):
    """The output directory cannot be written, or the disk is (about to be) full."""


class TrainingDiverged(DpeftError):
    """The loss was non-finite for more steps than allowed; the last good checkpoint is kept."""

    exit_code = DIVERGED_EXIT_CODE


class Preempted(DpeftError):
    """SIGTERM arrived: the run saved a checkpoint at a step boundary and stops; the same command resumes it."""

    exit_code = PREEMPTED_EXIT_CODE
    label = "preempted"
