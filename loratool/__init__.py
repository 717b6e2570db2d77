"""loratool: audit, merge, unmerge, verify, reshape and convert LoRA adapters, streaming.

The Python API mirrors the CLI::

    import loratool
    adapter = loratool.read_adapter("path/to/adapter")
    report = loratool.inspect_adapter(adapter)
"""

__version__ = "0.1.0"

from loratool.adapter import Adapter, LoraModule, ModuleKind  # noqa: E402
from loratool.base import BaseModel  # noqa: E402
from loratool.errors import (  # noqa: E402
    CheckFailedError,
    FormatError,
    InputError,
    LoratoolError,
    ModuleMismatchError,
    OutputExistsError,
    UnsupportedError,
)
from loratool.formats import detect_format, read_adapter, write_adapter  # noqa: E402
from loratool.inspect import inspect_adapter  # noqa: E402

__all__ = [
    "Adapter",
    "BaseModel",
    "CheckFailedError",
    "FormatError",
    "InputError",
    "LoraModule",
    "LoratoolError",
    "ModuleKind",
    "ModuleMismatchError",
    "OutputExistsError",
    "UnsupportedError",
    "detect_format",
    "inspect_adapter",
    "read_adapter",
    "write_adapter",
]
