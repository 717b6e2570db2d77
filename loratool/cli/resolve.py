"""Turning CLI path arguments into library objects (local path or Hub repo id)."""

from __future__ import annotations

from typing import Callable

import click

from loratool.base import BaseModel
from loratool.formats import format_names, read_adapter
from loratool.hub import resolve_path


def adapter_input_options(*, alpha_flag: str = "--alpha", scale_flag: str = "--scale") -> Callable:
    """Options shared by commands that read an adapter (rescale spells alpha/scale --source-*)."""
    from loratool.formats.litgpt import LEGACY_MODES

    options = [
        click.option("--from", "from_format", type=click.Choice(format_names()), help="Adapter format (detected when omitted)."),
        click.option("--adapter-name", help="Sub-adapter folder inside ADAPTER (PEFT multi-adapter layouts)."),
        click.option(alpha_flag, "src_alpha", type=float, help="lora_alpha where the adapter does not record it (scratch, Lit-LLaMA, LitGPT); refused for formats that store it."),
        click.option(scale_flag, "src_scale", type=float, help="Absolute scale where the adapter records none (scratch, Lit-LLaMA, LitGPT, MLX); refused for PEFT and GGUF."),
        click.option("--legacy-qkv", type=click.Choice(LEGACY_MODES),
                     help="LitGPT's pre-0.5.5 attn.attn layout: where the fused q/k/v delta landed (guessed when omitted; docs/formats.md)."),
        click.option("--token", envvar="HF_TOKEN", help="Hugging Face token for repo ids (default: HF_TOKEN)."),
    ]

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


def open_base(spec: str, *, token=None, **_ignored) -> BaseModel:
    """Open BASE (path or repo id) lazily."""
    return BaseModel.open(resolve_path(spec, kind="model", token=token))
