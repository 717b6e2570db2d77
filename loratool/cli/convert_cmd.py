"""`loratool convert`."""

from __future__ import annotations

import click

from loratool.cli.common import Output, common_options, emit_warnings, json_option, lazy
from loratool.cli.resolve import adapter_argument_options, open_adapter
from loratool.formats import OPTIONS, format_names
from loratool.hub import resolve_path

convert = lazy("loratool.conversion", "convert")
load_base = lazy("loratool.conversion", "load_base")


@click.command("convert")
@click.argument("src")
@click.argument("out", type=click.Path())
@click.option("--to", "to_format", required=True, type=click.Choice(format_names()), help="Target format.")
@click.option("--base", help="Base model folder or repo id (a folder with only config.json will do for GGUF): names, shapes, architecture, head counts.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--experts", type=click.Choice(["fused", "per-expert"]), help="MoE expert LoRA: group per-expert modules into PEFT's fused target_parameters layout, or write fused ones as one pair per expert (needs --base). Exact.")
@click.option(OPTIONS["outtype"].flag, type=click.Choice(OPTIONS["outtype"].choices), help=OPTIONS["outtype"].help)
@adapter_argument_options
@json_option
@common_options
def command(src, out, to_format, base, force, experts, outtype, as_json, quiet, **adapter_opts):
    """Convert the adapter SRC to another format, written to OUT.

    SRC's format is detected unless --from says it. Every module's delta is read back from
    OUT and compared before OUT appears. What the target cannot hold (DoRA, a LoRA bias,
    modules_to_save) is baked in where that is exact, otherwise refused with exit 2.
    A saved copy of a base layer (PEFT's embedding / lm_head base_layer.weight) that the
    target cannot hold is dropped when it is identical to the base's tensor (--base, or the
    adapter's own base when local or cached), otherwise refused.

    \b
    Example:
      loratool convert fixtures/adapters/llama-lora out.gguf --to gguf --base fixtures/bases/llama
    """
    out_ = Output(json_mode=as_json, quiet=quiet)
    base_model = load_base(resolve_path(base, kind="model", token=adapter_opts.get("token"))) if base else None
    adapter = open_adapter(src, base=base_model, **adapter_opts)
    report = convert(adapter, out, to=to_format, base=base_model, force=force, outtype=outtype, experts=experts)
    if as_json:
        out_.json(report)
        return
    out_.info(f"converted {src} ({report['from']}, {report['modules']} modules) -> {out} ({report['to']})")
    if report["modules_to_save"]:
        out_.info(f"modules_to_save: {', '.join(report['modules_to_save'])}")
    if report["saved_copies"]:
        out_.info(f"saved base-layer copies: {', '.join(report['saved_copies'])}")
    for line in report["baked"]:
        out_.info(f"baked: {line}")
    for line in report["notes"]:
        out_.info(f"note: {line}")
    emit_warnings(out_, report["warnings"])
