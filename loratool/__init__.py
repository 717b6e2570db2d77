"""loratool: audit, merge, unmerge, verify, reshape and convert LoRA adapters, streaming.

The Python API mirrors the CLI::

    import loratool
    adapter = loratool.read_adapter("path/to/adapter")
    report = loratool.inspect_adapter(adapter)
"""

__version__ = "0.1.0"

from loratool.errors import (  # noqa: E402
    CheckFailedError,
    FormatError,
    InputError,
    LoratoolError,
    ModuleMismatchError,
    OutputExistsError,
    UnsupportedError,
)

# everything else is imported on first use, so that `import loratool` (and `loratool --help`)
# stays light: no torch until something computes
_LAZY = {
    "Adapter": "loratool.adapter",
    "LoraModule": "loratool.adapter",
    "ModuleKind": "loratool.adapter",
    "BaseModel": "loratool.base",
    "detect_format": "loratool.formats",
    "read_adapter": "loratool.formats",
    "write_adapter": "loratool.formats",
    "inspect_adapter": "loratool.inspect",
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
    "CheckFailedError",
    "FormatError",
    "InputError",
    "LoratoolError",
    "ModuleMismatchError",
    "OutputExistsError",
    "UnsupportedError",
]
