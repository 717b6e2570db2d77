"""Turning CLI path arguments into library objects (local path or Hub repo id)."""

from __future__ import annotations

from typing import Callable

import click

from loratool.formats import OPTIONS, READ_OPTIONS, format_names, read_adapter
from loratool.hub import resolve_path


def adapter_input_options(*, alpha_flag: str = "--alpha", scale_flag: str = "--scale") -> Callable:
    """Options shared by commands that read an adapter (rescale spells alpha/scale --source-*)."""
    flags = {"alpha": (alpha_flag, "src_alpha"), "scale": (scale_flag, "src_scale")}  # rescale renames these two
    options = [click.option("--from", "from_format", type=click.Choice(format_names()), help="Adapter format (detected when omitted).")]
    for name in READ_OPTIONS:  # every reader option the formats declare, as the registry describes it
        opt = OPTIONS[name]
        flag, dest = flags.get(name, (opt.flag, name))
        kind = click.Choice(opt.choices) if opt.choices else opt.type
        options.append(click.option(flag, dest, type=kind, help=opt.help))
    options.append(click.option("--token", envvar="HF_TOKEN", help="Hugging Face token for repo ids (default: HF_TOKEN)."))

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


adapter_argument_options = adapter_input_options()


def open_adapter(spec: str, *, from_format=None, adapter_name=None, src_alpha=None, src_scale=None, legacy_qkv=None, token=None, base=None):
    """Read ADAPTER (path or repo id) into the canonical model; an option its format does not take is refused."""
    path = resolve_path(spec, kind="adapter", token=token, subfolder=adapter_name)
    return read_adapter(path, format=from_format, adapter_name=adapter_name, alpha=src_alpha, scale=src_scale, legacy_qkv=legacy_qkv, base=base)


def open_base(spec: str, *, token=None, **_ignored):
    """Open BASE (path or repo id) lazily (a ``BaseModel``)."""
    from loratool.base import BaseModel

    return BaseModel.open(resolve_path(spec, kind="model", token=token))
