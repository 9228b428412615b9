"""Errors a user can cause: caught at the entry point and printed as one line each, exit code 2."""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2


class DpeftError(Exception):
    """A problem caused by the user's config, data or environment (not a bug)."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(DpeftError):
    """One or more config values are invalid; each problem names the key, the value and what is allowed."""


class DataError(DpeftError):
    """The data cannot be loaded or is unusable (missing columns, empty after filtering...)."""


class AdapterError(DpeftError):
    """An adapter does not fit the base it is loaded onto, or its directory is incomplete."""
