"""Adapter formats: one registry of symmetric reader/writer pairs with detection.

Each format module provides ``NAME``, ``detect(path) -> bool``, ``read(path, **options) ->
Adapter`` and ``write(adapter, target, **options)``; ``OUTPUT_IS_FILE`` marks formats that
write one file instead of a folder. ``read_adapter`` / ``write_adapter`` are the entry points.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from loratool.adapter import Adapter
from loratool.errors import FormatError, InputError, UnsupportedError
from loratool.io.atomic import atomic_output_dir, atomic_output_file
from loratool.io.store import refuse_special_file

# detection order matters: the most specific layouts first
_FORMAT_MODULES = {
    "peft": "loratool.formats.peft",
    "mlx": "loratool.formats.mlx",
    "gguf": "loratool.formats.gguf",
    "litgpt": "loratool.formats.litgpt",
    "lit-llama": "loratool.formats.lit_llama",
    "scratch": "loratool.formats.scratch",
}


def format_names() -> list[str]:
    return list(_FORMAT_MODULES)


def get_format(name: str) -> ModuleType:
    """The module implementing a format.

    Raises:
        InputError: unknown or not (yet) available format.
    """
    if name not in _FORMAT_MODULES:
        raise InputError(f"unknown format {name!r} (known: {', '.join(_FORMAT_MODULES)})")
    try:
        return importlib.import_module(_FORMAT_MODULES[name])
    except ModuleNotFoundError as exc:
        if exc.name == _FORMAT_MODULES[name]:
            raise InputError(f"format {name!r} is not available in this build of loratool") from None
        raise


def available_formats() -> list[ModuleType]:
    mods = []
    for name in _FORMAT_MODULES:
        try:
            mods.append(get_format(name))
        except InputError:
            continue
    return mods


def detect_format(path: Path | str) -> str:
    """Name of the format of the adapter at ``path``.

    Raises:
        FormatError: nothing recognizes it.
    """
    path = Path(path)
    if not path.exists():
        raise FormatError(path, "adapter not found")
    refuse_special_file(path)
    for mod in available_formats():
        if mod.detect(path):
            return mod.NAME
    raise FormatError(path, "unknown adapter format (expected PEFT, MLX, GGUF, LitGPT, Lit-LLaMA or a scratch state dict)")


def read_adapter(path: Path | str, *, format: str | None = None, **options) -> Adapter:
    """Read any supported adapter into the canonical model.

    Args:
        path: adapter folder or file.
        format: a format name; detected when None.
        **options: format options (``adapter_name``, ``alpha``, ``scale``, ``base``...).
    Raises:
        FormatError, InputError, UnsupportedError.
    """
    path = Path(path)
    name = format or detect_format(path)
    return get_format(name).read(path, **options)


def refuse_lora_bias(adapter: Adapter, holder: str) -> None:
    """Refuse an adapter with a LoRA bias when the target format (``holder``) cannot store one.

    Raises:
        UnsupportedError: naming the first module whose bias would be lost.
    """
    bias = [m.name for m in adapter if m.bias is not None]
    if bias:
        raise UnsupportedError(f"{holder} cannot hold a LoRA bias (lora_bias, e.g. {bias[0]}); it would be lost")


def refuse_modules_to_save(adapter: Adapter, holder: str) -> None:
    """Refuse an adapter with modules_to_save when the target format (``holder``) cannot store them.

    Raises:
        UnsupportedError: naming the tensors that would be lost.
    """
    if adapter.modules_to_save:
        names = sorted(adapter.modules_to_save)
        raise UnsupportedError(f"{holder} adapters cannot hold modules_to_save ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); they would be lost")


def write_adapter(adapter: Adapter, out: Path | str, *, format: str = "peft", force: bool = False, inputs=(), **options) -> Path:
    """Write an adapter atomically in the given format; returns OUT.

    Raises:
        OutputExistsError, InputError, UnsupportedError.
    """
    mod = get_format(format)
    out = Path(out)
    guard = atomic_output_file if getattr(mod, "OUTPUT_IS_FILE", False) else atomic_output_dir
    with guard(out, force=force, inputs=inputs) as tmp:
        mod.write(adapter, tmp, **options)
    return out
