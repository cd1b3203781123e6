"""The package's error types: each names the bad value or file, what was expected, and the fix.

They subclass the built-in error a caller would catch for the same problem (``ValueError`` for a bad value,
``pickle.UnpicklingError`` for a refused pickle...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import pickle


class MMExpertsError(Exception):
    """Base of every error raised on purpose by mmexperts."""


class ConfigError(MMExpertsError, ValueError):
    """A configuration field holds a value outside what it accepts; the message names the field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


class CorruptFileError(MMExpertsError, ValueError):
    """A file or folder mmexperts wrote (or reads) is damaged, truncated or inconsistent with its metadata."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


class UnsafePickleError(MMExpertsError, pickle.UnpicklingError):
    """A pickle asks for a class or function outside the allow-list of plain data types."""


class CheckpointError(MMExpertsError, RuntimeError):
    """A checkpoint cannot be resumed from exactly (missing, incomplete or mismatched files)."""


class DataError(MMExpertsError, ValueError):
    """A dataset row or file is malformed; the message names the file and line."""


class NonFiniteLossError(MMExpertsError, RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row."""


__all__ = ["CheckpointError", "ConfigError", "CorruptFileError", "DataError", "MMExpertsError", "NonFiniteLossError",
           "UnsafePickleError"]


class FetchError(MMExpertsError, OSError):
    """A download that mmexperts needs failed (e.g. no access to PyPI); the message names the package and says how
    to pass an existing local copy instead."""


__all__ += ["FetchError"]
