"""Error types. Every error loratool raises on purpose derives from ``LoratoolError``.

The CLI maps ``exit_code`` to the process exit status and prints ``str(error)`` as one line.
Errors also inherit a built-in type so callers of the Python API can catch them naturally.
"""

from __future__ import annotations


class LoratoolError(Exception):
    """Root of loratool's errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class InputError(LoratoolError, ValueError):
    """The input is missing, malformed or inconsistent (exit 2)."""


class FormatError(InputError):
    """A file is not in the format it claims to be (truncated, garbage, unknown layout)."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnsupportedError(InputError):
    """The input is understood but the operation is refused (e.g. unmerging DoRA)."""


class ModuleMismatchError(InputError):
    """An adapter module does not fit the base (absent, or different shape)."""

    def __init__(self, module: str, reason: str):
        self.module = module
        self.reason = reason
        super().__init__(f"{module}: {reason}")


class OutputExistsError(InputError, FileExistsError):
    """OUT already exists and ``force`` was not given."""


class CheckFailedError(LoratoolError):
    """A verification ran and found a problem (exit 1)."""

    exit_code = 1
