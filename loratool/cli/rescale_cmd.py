"""`loratool rescale` (and the input options shared by the surgery commands)."""

from __future__ import annotations

import functools
from typing import Callable

import click

from loratool.cli.common import (
    FACTOR_DTYPES,
    Output,
    common_options,
    emit_warnings,
    json_option,
    lazy,
)
from loratool.cli.resolve import adapter_input_options, open_adapter
from loratool.formats import write_adapter

parse_dtype = lazy("loratool.surgery", "parse_dtype")
rescale = lazy("loratool.surgery", "rescale")

# like the usual adapter options, with the source alpha spelled --source-alpha because --alpha
# names the output's alpha here
surgery_input_options = adapter_input_options(alpha_flag="--source-alpha", scale_flag="--source-scale")


def output_options(fn: Callable) -> Callable:
    """--dtype and --force of commands that write an adapter."""

    @click.option("--dtype", type=click.Choice(FACTOR_DTYPES), help="Storage dtype of the output factors (default: the input's).")
    @click.option("--force", is_flag=True, help="Replace OUT if it exists.")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def input_paths(adapter) -> list:
    return [f for f in ([adapter.path] + list(adapter.files)) if f is not None]


@click.command("rescale")
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--alpha", type=float, help="New lora_alpha for every module (default: keep each module's alpha).")
@click.option("--rslora/--no-rslora", default=None, help="Switch the scaling rule to alpha/sqrt(r) or alpha/r (default: keep).")
@click.option("--split", type=click.Choice(["b", "balanced"]), default="b", show_default=True,
              help="Put the factor on B only (A kept bit for bit) or sqrt of it on both A and B.")
@output_options
@surgery_input_options
@json_option
@common_options
def command(adapter, out, alpha, rslora, split, dtype, force, as_json, quiet, **adapter_opts):
    """Change lora_alpha or the scaling rule of ADAPTER, keeping every module's update.

    Each module's dW = scale * B @ A stays the same: B (or A and B with --split balanced) absorbs
    old scale / new scale; lora_bias terms are rescaled the same way; ranks, target modules and
    modules_to_save are carried over. OUT is a PEFT adapter.

    \b
    Example:
      loratool rescale fixtures/adapters/llama-lora rescaled --alpha 8 --rslora
    """
    o = Output(json_mode=as_json, quiet=quiet)
    ad = open_adapter(adapter, **adapter_opts)
    new, report = rescale(ad, alpha=alpha, rslora=rslora, split=split, dtype=parse_dtype(dtype))
    write_adapter(new, out, format="peft", force=force, inputs=input_paths(ad))
    report["output"] = str(out)
    if as_json:
        o.json(report)
        return
    rows = report["modules"]
    groups: dict = {}
    for r in rows:
        key = (r["alpha_before"], r["scale_before"], r["alpha_after"], r["scale_after"])
        groups[key] = groups.get(key, 0) + 1
    rule = lambda on: "alpha/sqrt(r)" if on else "alpha/r"  # noqa: E731
    o.info(f"rescaled {len(rows)} modules: rule {rule(report['rslora_before'])} -> {rule(report['rslora_after'])}, split {split}")
    for (a0, s0, a1, s1), n in sorted(groups.items()):
        o.info(f"  {n:>4} x  alpha {a0:g} -> {a1:g}   scale {s0:.6g} -> {s1:.6g}   factor {s0 / s1:.6g}")
    o.info(f"wrote {out}")
    emit_warnings(o, report["warnings"])
