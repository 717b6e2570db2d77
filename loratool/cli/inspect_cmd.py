"""`loratool inspect`."""

from __future__ import annotations

import click

from loratool.cli.common import Output, common_options, emit_warnings, json_option, lazy
from loratool.cli.reports import format_inspect_report
from loratool.cli.resolve import adapter_argument_options, open_adapter, open_base

inspect_adapter = lazy("loratool.inspect", "inspect_adapter")


@click.command("inspect")
@click.argument("adapter")
@click.option("--base", help="Base model folder or repo id: base naming, base_params, missing-module checks.")
@adapter_argument_options
@json_option
@common_options
def command(adapter, base, as_json, quiet, **adapter_opts):
    """Audit ADAPTER from its files alone (no model is instantiated).

    \b
    Example:
      loratool inspect fixtures/adapters/llama-lora --base fixtures/bases/llama --json
    """
    out = Output(json_mode=as_json, quiet=quiet)
    base_model = open_base(base, **adapter_opts) if base else None
    ad = open_adapter(adapter, base=base_model, **adapter_opts)
    report = inspect_adapter(ad, base=base_model)
    if as_json:
        out.json(report)
    else:
        warnings = report["warnings"]
        report = dict(report, warnings=[])
        out.info(format_inspect_report(report))
        emit_warnings(out, warnings)
