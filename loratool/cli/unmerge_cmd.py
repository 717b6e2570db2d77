"""`loratool unmerge`."""

from __future__ import annotations

import click

from loratool.cli.common import Output, common_options, json_option
from loratool.cli.merge_cmd import DEVICE_CHOICE, DTYPE_CHOICE, run_merge
from loratool.cli.resolve import adapter_argument_options


@click.command("unmerge")
@click.argument("merged")
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--keep-modules-to-save", is_flag=True, help="Keep modules_to_save tensors as they are in MERGED (their originals are gone).")
@click.option("--dtype", type=DTYPE_CHOICE, help="Output dtype of floating tensors (default: MERGED's own).")
@click.option("--device", type=DEVICE_CHOICE, default="auto", show_default=True, help="Where the math runs (float32).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--report", type=click.Path(), help="Write a JSON report, with the half-precision rounding bound.")
@adapter_argument_options
@json_option
@common_options
def command(merged, adapter, out, keep_modules_to_save, dtype, device, force, report, as_json, quiet, **adapter_opts):
    """Subtract ADAPTER's delta from MERGED and write the result to OUT, streaming.

    The inverse of `loratool merge`, with the same output rules. DoRA adapters are refused
    (the pre-merge norm cannot be recovered), and so are modules_to_save unless
    --keep-modules-to-save. Half-precision weights come back within a rounding bound that
    --report states.

    \b
    Example:
      loratool unmerge merged-llama fixtures/adapters/llama-lora llama-again --report unmerge.json
    """
    o = Output(json_mode=as_json, quiet=quiet)
    rep = run_merge(
        o, merged, adapter, out, sign=-1, dtype=dtype, device=device, force=force, strict=False, report=report,
        keep_modules_to_save=keep_modules_to_save, adapter_opts=adapter_opts,
    )
    if as_json:
        o.json(rep)
