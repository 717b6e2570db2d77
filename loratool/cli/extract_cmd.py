"""`loratool extract`."""

from __future__ import annotations

import math

import click

from loratool.cli.common import (
    FACTOR_DTYPES,
    Output,
    common_options,
    emit_warnings,
    json_option,
    lazy,
)
from loratool.cli.resolve import open_base
from loratool.errors import InputError
from loratool.formats import write_adapter

extract = lazy("loratool.surgery", "extract")
parse_dtype = lazy("loratool.surgery", "parse_dtype")


@click.command("extract")
@click.argument("base")
@click.argument("finetuned")
@click.argument("out", type=click.Path())
@click.option("--rank", type=int, help="Rank of every extracted module.")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping at least this fraction of ||dW||_F^2 (0 < F <= 1).")
@click.option("--modules", "modules", multiple=True,
              help="Modules to extract (PEFT target_modules: names or suffixes, comma-separated or repeated; default: all linear modules outside the heads).")
@click.option("--alpha", type=float, help="lora_alpha of every module (default: its rank, i.e. scale 1).")
@click.option("--modules-to-save", "keep_others", is_flag=True,
              help="Store changed modules that LoRA cannot represent (embeddings, norms, heads, biases) whole, as PEFT modules_to_save.")
@click.option("--exact/--randomized", "exact", default=None,
              help="Force the exact SVD, or the randomized one (default: exact when the smaller side is at most 1024).")
@click.option("--niter", type=int, default=4, show_default=True, help="Power iterations of the randomized SVD.")
@click.option("--dtype", type=click.Choice(FACTOR_DTYPES), help="Storage dtype of the factors (default: FINETUNED's).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--token", envvar="HF_TOKEN", help="Hugging Face token for repo ids (default: HF_TOKEN).")
@json_option
@common_options
def command(base, finetuned, out, rank, energy, modules, alpha, keep_others, exact, niter, dtype, force, token, as_json, quiet):
    """Extract a LoRA adapter approximating FINETUNED - BASE, tensor by tensor.

    Every changed linear module's weight difference gets a truncated SVD (exact for small
    matrices, randomized with power iterations for big ones); unchanged tensors are skipped;
    other changed tensors are reported (or kept whole with --modules-to-save). OUT is a PEFT
    adapter for BASE.

    \b
    Example:
      loratool extract fixtures/bases/llama my-finetuned-llama extracted --rank 8 --modules q_proj,v_proj
    """
    o = Output(json_mode=as_json, quiet=quiet)
    if (rank is None) == (energy is None):
        raise InputError("give exactly one of --rank or --energy")
    targets = [t.strip() for m in modules for t in m.split(",") if t.strip()] or None
    base_model = open_base(base, token=token)
    ft_model = open_base(finetuned, token=token)
    total = sum(math.prod(e.shape) * e.dtype.itemsize for e in ft_model.store.entries())
    with o.progress(total=total, desc="extract") as bar:
        adapter, report = extract(base_model, ft_model, rank=rank, energy=energy, modules=targets, alpha=alpha,
                                  dtype=parse_dtype(dtype), modules_to_save=keep_others, exact=exact, niter=niter,
                                  base_name=base, progress=bar)
    write_adapter(adapter, out, format="peft", force=force, inputs=[base_model.path, ft_model.path])
    report["output"] = str(out)
    if as_json:
        o.json(report)
        return
    rows = report["modules"]
    width = max([len("module")] + [len(r["name"]) for r in rows])
    o.info(f"{'module':<{width}}  {'shape':>11}  {'rank':>4}  {'kept energy':>12}  {'rel. error':>10}  svd")
    for r in rows:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        o.info(f"{r['name']:<{width}}  {shape:>11}  {r['rank']:>4}  {r['kept_energy']:>12.6f}  {r['relative_error']:>10.3e}  {r['method']}")
    o.info(f"{len(rows)} modules extracted, {report['unchanged_tensors']} unchanged tensors skipped")
    for other in report["other_changed"]:
        o.info(f"changed, not LoRA: {other['tensor']} ({other['kind']}, {other['change']})")
    if report["modules_to_save"]:
        o.info("kept whole (modules_to_save): " + ", ".join(report["modules_to_save"]))
    o.info(f"LoRA parameters: {report['lora_params']:,}")
    o.info(f"wrote {out}")
    emit_warnings(o, report["warnings"])
