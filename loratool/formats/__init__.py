"""Adapter formats: one registry of symmetric reader/writer pairs with detection.

Each format module provides ``NAME``, ``detect(path) -> bool``, ``read(path, *, options...) ->
Adapter``, ``write(adapter, target, *, options...)`` and, unless it holds everything,
``check_writable(adapter)``; ``OUTPUT_IS_FILE`` marks formats that write one file instead of a
folder. ``FORMATS`` declares, without importing any format, what each reads and writes and
which user options each takes (``OPTIONS``): the CLI builds its flags from it. ``read_adapter``
/ ``write_adapter`` are the entry points: they hand each function the keyword options its
signature declares and refuse any other (``format_options``), so an option never silently
vanishes; ``write_adapter`` (and convert) refuse what a format cannot hold before OUT is opened.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from loratool.errors import FormatError, InputError, UnsupportedError

if TYPE_CHECKING:  # the registry itself is read by `--help`, which must not import torch
    from loratool.adapter import Adapter


@dataclass(frozen=True)
class FormatOption:
    """A user option some formats' readers or writers take (the keyword of read() / write())."""

    name: str
    help: str
    type: type = str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class FormatSpec:
    """What one format is, declared without importing it."""

    name: str
    title: str  # for messages
    module: str
    read_options: tuple[str, ...]  # keys of OPTIONS its reader takes
    write_options: tuple[str, ...]  # keys of OPTIONS its writer takes
    holds_full_tensors: bool = False  # modules_to_save and saved base-layer copies beside the factors
    holds_fused_experts: bool = False  # fused MoE expert LoRA (PEFT target_parameters)


OPTIONS = {
    "adapter_name": FormatOption("adapter_name", "Sub-adapter folder inside ADAPTER (PEFT multi-adapter layouts)."),
    "alpha": FormatOption("alpha", "lora_alpha where the adapter does not record it (scratch, Lit-LLaMA, LitGPT); refused for formats that store it.", float),
    "scale": FormatOption("scale", "Absolute scale where the adapter records none (scratch, Lit-LLaMA, LitGPT, MLX); refused for PEFT and GGUF.", float),
    "legacy_qkv": FormatOption("legacy_qkv", "LitGPT's pre-0.5.5 attn.attn layout: where the fused q/k/v delta landed (guessed when omitted; docs/formats.md).",
                               choices=("scattered", "contiguous")),
    "outtype": FormatOption("outtype", "GGUF tensor type (default f32).", choices=("f32", "f16", "bf16", "q8_0")),
}

# detection order matters: the most specific layouts first
FORMATS = {
    "peft": FormatSpec("peft", "PEFT", "loratool.formats.peft", ("adapter_name",), (), holds_full_tensors=True,
                       holds_fused_experts=True),
    "mlx": FormatSpec("mlx", "MLX", "loratool.formats.mlx", ("scale",), ()),
    "gguf": FormatSpec("gguf", "GGUF", "loratool.formats.gguf", (), ("outtype",), holds_fused_experts=True),
    "litgpt": FormatSpec("litgpt", "LitGPT", "loratool.formats.litgpt", ("alpha", "scale", "legacy_qkv"), ()),
    "lit-llama": FormatSpec("lit-llama", "Lit-LLaMA", "loratool.formats.lit_llama", ("alpha", "scale"), ("alpha",)),
    "scratch": FormatSpec("scratch", "scratch", "loratool.formats.scratch", ("alpha", "scale"), (), holds_full_tensors=True),
}
READ_OPTIONS = tuple(dict.fromkeys(o for f in FORMATS.values() for o in f.read_options))
WRITE_OPTIONS = tuple(dict.fromkeys(o for f in FORMATS.values() for o in f.write_options))
_FORMAT_MODULES = {name: spec.module for name, spec in FORMATS.items()}

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


def detect_format(path: Path | str) -> str:
    """Name of the format of the adapter at ``path``.

    Raises:
        FormatError: nothing recognizes it.
    """
    from loratool.io.store import refuse_special_file

    path = Path(path)
    if not path.exists():
        raise FormatError(path, "adapter not found")
    refuse_special_file(path)
    for name in _FORMAT_MODULES:  # imported one at a time: a PEFT folder loads only the PEFT reader
        try:
            mod = get_format(name)
        except InputError:
            continue
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
    from loratool.io.store import refuse_special_file

    path = Path(path)
    refuse_special_file(path)  # also when --from names the format (detection checks it otherwise)
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


def check_writable(adapter: Adapter, format: str) -> None:
    """Refuse, before anything is written, what the format cannot hold (DoRA, a LoRA bias,
    modules_to_save...); formats without ``check_writable`` hold everything.

    Raises:
        UnsupportedError: naming what would be lost.
    """
    fused = [m.name for m in adapter.modules.values() if m.experts]
    if fused and not FORMATS[format].holds_fused_experts:
        raise UnsupportedError(
            f"{fused[0]}: {FORMATS[format].title} has no layout for LoRA on fused MoE experts ({len(fused)} such modules); "
            "convert to one LoRA pair per expert first: loratool convert SRC OUT --to peft --experts per-expert --base BASE"
        )
    check = getattr(get_format(format), "check_writable", None)
    if check is not None:
        check(adapter)


def write_adapter(adapter: Adapter, out: Path | str, *, format: str = "peft", force: bool = False, inputs=(), **options) -> Path:
    """Write an adapter atomically in the given format; returns OUT.

    ``options`` are the format's writing options (``outtype`` for GGUF, ``container`` for
    scratch...) and ``base``; an option the format does not take is refused.

    Raises:
        OutputExistsError, InputError, UnsupportedError.
    """
    from loratool.io.atomic import atomic_output_dir, atomic_output_file

    mod = get_format(format)
    out = Path(out)
    options = format_options(mod.write, options, context=WRITE_CONTEXT, what=f"writing {format} adapters")
    check_writable(adapter, format)
    guard = atomic_output_file if getattr(mod, "OUTPUT_IS_FILE", False) else atomic_output_dir
    with guard(out, force=force, inputs=inputs) as tmp:
        mod.write(adapter, tmp, **options)
    return out
