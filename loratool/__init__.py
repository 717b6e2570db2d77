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

# operations, imported on first use so `import loratool` stays light
_LAZY = {
    "merge_model": "loratool.merge",
    "verify_weights": "loratool.verify",
    "verify_outputs": "loratool.verify",
    "rescale": "loratool.surgery",
    "rerank": "loratool.surgery",
    "combine": "loratool.surgery",
    "extract": "loratool.surgery",
    "convert": "loratool.conversion",
    "merge_qalora": "loratool.qalora",
    "push": "loratool.hub",
    "resolve_path": "loratool.hub",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loratool' has no attribute {name!r}")


__all__ = [*_LAZY,
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
