"""Turning CLI path arguments into library objects (local path or Hub repo id)."""

from __future__ import annotations

import functools
from typing import Callable

import click

from loratool.base import BaseModel
from loratool.formats import format_names, read_adapter
from loratool.hub import resolve_path


def adapter_argument_options(fn: Callable) -> Callable:
    """Options shared by commands that read an adapter."""

    @click.option("--from", "from_format", type=click.Choice(format_names()), help="Adapter format (detected when omitted).")
    @click.option("--adapter-name", help="Sub-adapter folder inside ADAPTER (PEFT multi-adapter layouts).")
    @click.option("--alpha", "src_alpha", type=float, help="alpha for formats that do not store it (scratch, Lit-LLaMA).")
    @click.option("--scale", "src_scale", type=float, help="Absolute scale for formats that do not store one (scratch).")
    @click.option("--token", envvar="HF_TOKEN", help="Hugging Face token for repo ids (default: HF_TOKEN).")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def open_adapter(spec: str, *, from_format=None, adapter_name=None, src_alpha=None, src_scale=None, token=None, base=None, **_ignored):
    """Read ADAPTER (path or repo id) into the canonical model."""
    path = resolve_path(spec, kind="adapter", token=token, subfolder=adapter_name)
    options = {}
    if adapter_name:
        options["adapter_name"] = adapter_name
    if src_alpha is not None:
        options["alpha"] = src_alpha
    if src_scale is not None:
        options["scale"] = src_scale
    if base is not None:
        options["base"] = base
    return read_adapter(path, format=from_format, **options)


def open_base(spec: str, *, token=None, **_ignored) -> BaseModel:
    """Open BASE (path or repo id) lazily."""
    return BaseModel.open(resolve_path(spec, kind="model", token=token))
