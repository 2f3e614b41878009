"""User-facing errors.

Every problem a user can fix (a bad manifest row, missing weights, a cache of the wrong fingerprint) is raised as a
`PcacheError` carrying *what* went wrong and *what to do*; the CLI prints it without a traceback and exits with
`exit_code`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PcacheError(Exception):
    """An error the user can act on: `message` says what is wrong, `hint` what to do about it."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  → {self.hint}" if self.hint else self.message


class ManifestError(PcacheError):
    """The manifest is unusable (missing column, duplicate id, missing file, ...)."""


class DecodeError(PcacheError):
    """One image could not be decoded; embed records it in /failed and goes on."""


class WeightsError(PcacheError):
    """Backbone weights cannot be found or loaded."""


class CacheError(PcacheError):
    """A cache file is missing, malformed, or does not match what it is combined with."""


class StrategyRefused(PcacheError):
    """A fine-tuning strategy that the backbone's registry entry says cannot apply."""
