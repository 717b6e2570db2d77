"""`loratool combine`."""

from __future__ import annotations

import click

from loratool.cli.common import Output, common_options, emit_warnings, json_option, lazy
from loratool.cli.rerank_cmd import format_table
from loratool.cli.rescale_cmd import input_paths, output_options, surgery_input_options
from loratool.cli.resolve import open_adapter
from loratool.engine.methods import MAJORITY_SIGN, SPARSIFYING
from loratool.errors import InputError
from loratool.formats import write_adapter

combine = lazy("loratool.surgery", "combine")
parse_dtype = lazy("loratool.surgery", "parse_dtype")


def parse_weights(text: str | None) -> list[float] | None:
    """``"1,0.5,-0.2"`` -> ``[1.0, 0.5, -0.2]``.

    Raises:
        InputError: not a comma-separated list of numbers.
    """
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise InputError(f"--weights must be comma-separated numbers, got {text!r}") from None


@click.command("combine")
@click.argument("paths", nargs=-1, required=True, metavar="A1 [A2 ...] OUT")
@click.option("--weights", help="Comma-separated weight per adapter (default: 1 each).")
@click.option("--method", type=click.Choice(["cat", "svd", "linear", *SPARSIFYING]), default="cat", show_default=True,
              help="cat (= linear): exact weighted sum, ranks add. svd (= linear --rank R): its optimal rank-R approximation. "
                   "ties, dare_linear, dare_ties, magnitude_prune: the whole deltas combined as the papers define them, "
                   "then optimally truncated to --rank.")
@click.option("--rank", type=int, help="Output rank for svd and the sparsifying methods (default: the largest input rank of each module).")
@click.option("--density", type=float, help="ties, dare_*, magnitude_prune: the fraction of each delta's entries kept, in (0, 1].")
@click.option("--majority-sign", "majority_sign", type=click.Choice(MAJORITY_SIGN), default="total", show_default=True,
              help="ties, dare_ties: elect each entry's sign by the sum of the deltas (total) or by counting signs (frequency).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="dare_*: the seed of the drop masks.")
@click.option("--alpha", type=float, help="lora_alpha of every output module (default: the first input's).")
@click.option("--ignore-base-name", is_flag=True, help="Combine even if the inputs name different base models (shapes are still checked).")
@output_options
@surgery_input_options
@json_option
@common_options
def command(paths, weights, method, rank, density, majority_sign, seed, alpha, ignore_base_name, dtype, force, as_json, quiet, **adapter_opts):
    """Weighted sum of adapters A1 A2 ... for the same base, written to OUT (the last path).

    Every input's own scaling (alpha, rank, rsLoRA) is applied before summing, so adapters with
    different ranks, alphas and scaling rules combine correctly; --method svd never forms an
    out x in matrix. OUT is a PEFT adapter following the first input's scaling rule.

    \b
    Examples:
      loratool combine a1 a2 both --weights 0.7,0.3
      loratool combine a1 a2 both --method svd --rank 8 --json
      loratool combine a1 a2 a3 both --method ties --density 0.3 --rank 16
    """
    o = Output(json_mode=as_json, quiet=quiet)
    if len(paths) < 2:
        raise InputError("combine needs at least one adapter and OUT")
    *specs, out = paths
    adapters = [open_adapter(s, **adapter_opts) for s in specs]
    new, report = combine(adapters, weights=parse_weights(weights), method=method, rank=rank, alpha=alpha,
                          dtype=parse_dtype(dtype), ignore_base_name=ignore_base_name, labels=list(specs),
                          density=density, majority_sign=majority_sign, seed=seed)
    write_adapter(new, out, format="peft", force=force, inputs=[p for a in adapters for p in input_paths(a)])
    report["output"] = str(out)
    if as_json:
        o.json({**report, "modules": [{k: v for k, v in m.items() if k != "singular_values"} for m in report["modules"]]})
        return
    ws = ", ".join(f"{w:g}" for w in report["weights"])
    o.info(f"combined {len(adapters)} adapters ({method}, weights {ws}) into {len(report['modules'])} modules")
    if method not in ("cat", "linear") or rank is not None:
        o.info(format_table(report))
    else:
        hist = ", ".join(f"r={r}: {n}" for r, n in report["rank_histogram"].items())
        o.info(f"ranks: {hist}")
    o.info(f"LoRA parameters: {report['lora_params']:,}")
    o.info(f"wrote {out}")
    emit_warnings(o, report["warnings"])
