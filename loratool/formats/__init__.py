"""Adapter formats: one registry of symmetric reader/writer pairs with detection.

Each format module provides ``NAME``, ``detect(path) -> bool``, ``read(path, *, options...) ->
Adapter`` and ``write(adapter, target, *, options...)``; ``OUTPUT_IS_FILE`` marks formats that
write one file instead of a folder. ``read_adapter`` / ``write_adapter`` are the entry points:
they hand each function the keyword options its signature declares and refuse any other
(``format_options``), so an option never silently vanishes.
"""

from __future__ import annotations

import importlib
import inspect
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


# what callers offer every writer: the base model, OUT's final name, a dict to report into
WRITE_CONTEXT = ("base", "out_name", "report")


def format_options(fn, options: dict, *, context: tuple[str, ...] = (), what: str) -> dict:
    """The keyword options ``fn`` (a format's read or write) takes, out of ``options``.

    Options left at None are dropped, and so are ``context`` entries (what a caller offers every
    format, e.g. ``base``) that ``fn`` does not take. Any other option ``fn`` does not take is
    refused, never silently ignored.

    Raises:
        InputError: naming the option and ``what`` it does not apply to.
    """
    accepted = inspect.signature(fn).parameters
    given = {}
    for key, value in options.items():
        if value is None or (key in context and key not in accepted):
            continue
        if key not in accepted:
            raise InputError(f"the option {key} (--{key.replace('_', '-')}) does not apply to {what}")
        given[key] = value
    return given


def read_adapter(path: Path | str, *, format: str | None = None, **options) -> Adapter:
    """Read any supported adapter into the canonical model.

    Args:
        path: adapter folder or file.
        format: a format name; detected when None.
        **options: format options (``adapter_name``, ``alpha``, ``scale``, ``legacy_qkv``...) and
            ``base`` (a ``BaseModel``: names, shapes and head counts, for the formats that use it).
    Raises:
        FormatError, UnsupportedError.
        InputError: also for an option the format does not take.
    """
    path = Path(path)
    name = format or detect_format(path)
    reader = get_format(name).read
    return reader(path, **format_options(reader, options, context=("base",), what=f"{name} adapters ({path})"))


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

    ``options`` are the format's writing options (``outtype`` for GGUF, ``container`` for
    scratch...) and ``base``; an option the format does not take is refused.

    Raises:
        OutputExistsError, InputError, UnsupportedError.
    """
    mod = get_format(format)
    out = Path(out)
    options = format_options(mod.write, options, context=WRITE_CONTEXT, what=f"writing {format} adapters")
    guard = atomic_output_file if getattr(mod, "OUTPUT_IS_FILE", False) else atomic_output_dir
    with guard(out, force=force, inputs=inputs) as tmp:
        mod.write(adapter, tmp, **options)
    return out
