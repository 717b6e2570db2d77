"""`loratool check`."""

from __future__ import annotations

import click

from loratool.cli.common import Output, common_options, emit_warnings, json_option, lazy
from loratool.cli.resolve import adapter_argument_options, open_adapter
from loratool.errors import CheckFailedError
from loratool.hub import resolve_path
from loratool.serving.rules import engine_names

check_adapter = lazy("loratool.serving.check", "check_adapter")
write_fixed = lazy("loratool.serving.fix", "write_fixed")
load_base = lazy("loratool.conversion", "load_base")


@click.command("check")
@click.argument("adapter")
@click.option("--target", required=True, type=click.Choice(engine_names()), help="The serving engine.")
@click.option("--base", help="Base model folder or repo id: module names, architecture, tied embeddings, saved copies, DoRA.")
@click.option("--max-rank", type=int, help="The engine's rank limit (vLLM --max-lora-rank, default 16; SGLang --max-lora-rank).")
@click.option("--fix", "fix_out", type=click.Path(), help="Write the nearest adapter the engine accepts to this folder.")
@click.option("--rank", type=int, help="With --fix: the rank DoRA modules become (default: their own, capped by the limit).")
@click.option("--force", is_flag=True, help="With --fix: replace the output if it exists.")
@click.option("--no-outputs", is_flag=True, help="With --fix: do not measure a lossy fix on the outputs (base + fixed "
              "against base + original, log-probabilities of 4 random sequences).")
@adapter_argument_options
@json_option
@common_options
def command(adapter, target, base, max_rank, fix_out, rank, force, no_outputs, as_json, quiet, **adapter_opts):
    """Would TARGET load ADAPTER and serve all of it? One line per problem: module, what, why, the fix.

    The rules (docs/serving.md) were read from each engine's source and cite it. With --fix,
    writes the nearest adapter the engine accepts and what each change costs (per-module
    relative error of the delta and, with --base, of the log-probabilities). Exit 0 compatible (or fixed), 1 not compatible, 2 bad input
    or a problem no change of the adapter fixes (merge instead).

    \b
    Examples:
      loratool check fixtures/adapters/llama-dora --target vllm --base fixtures/bases/llama
      loratool check fixtures/adapters/llama-dora --target vllm --base fixtures/bases/llama --fix served
    """
    if (rank is not None or force or no_outputs) and fix_out is None:
        raise click.UsageError("--rank, --force and --no-outputs apply only with --fix")
    out = Output(json_mode=as_json, quiet=quiet)
    base_model = load_base(resolve_path(base, kind="model", token=adapter_opts.get("token"))) if base else None
    ad = open_adapter(adapter, base=base_model, **adapter_opts)
    emit_warnings(out, ad.warnings)
    ad = ad.without_warnings()
    if fix_out is not None:
        inputs = [f for f in [ad.path, *ad.files, base_model.path if base_model is not None else None] if f is not None]
        report = write_fixed(ad, fix_out, target=target, base=base_model, max_rank=max_rank, rank=rank, force=force, inputs=inputs,
                             outputs=not no_outputs)
        _print_fix(out, report)
        return _verdict(out, report["check"], fixed=True)
    report = check_adapter(ad, target=target, base=base_model, max_rank=max_rank)
    if as_json:
        out.json(report)
    else:
        _print_check(out, report)
    return _verdict(out, report)


def _print_check(out: Output, report: dict) -> None:
    from loratool.serving.check import problem_line

    for p in report["problems"]:
        out.info(problem_line(p))
    for note in report["notes"]:
        out.info(f"note: {note}")
    if report["compatible"]:
        out.info(f"compatible with {report['engine']}")


def _print_fix(out: Output, report: dict) -> None:
    if out.json_mode:
        out.json(report)
        return
    for c in report["changes"]:
        out.info(f"{c['module']}: {c['change']}; relative error {c['relative_error']:.3e}")
    if not report["changes"]:
        out.info("no change needed")
    out.info(f"wrote {report['output']} ({report['format']}) for {report['engine']}; largest relative error {report['max_relative_error']:.3e}")
    cost = report.get("output_error")
    if cost is not None and cost["relative"] is not None:
        out.info(f"on the outputs: relative error {cost['relative']:.3e} of the adapter's effect on the {cost['on']}, "
                 f"largest difference {cost['max_abs']:.3e} ({cost['tokens']} tokens, {cost['inputs']})")
    for note in report.get("notes", []):
        out.info(f"note: {note}")


def _verdict(out: Output, report: dict, *, fixed: bool = False) -> None:
    if report["compatible"]:
        return
    n = len(report["problems"])
    first = report["problems"][0]
    what = "the fixed adapter still has" if fixed else "not compatible:"
    raise CheckFailedError(f"{what} {n} problem{'s' if n != 1 else ''} for {report['target']} (first: {first['module']}: {first['what']})")
