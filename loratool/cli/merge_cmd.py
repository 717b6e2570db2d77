"""`loratool merge`."""

from __future__ import annotations

import click

from loratool.cli.common import Output, common_options, emit_warnings, json_option
from loratool.cli.resolve import adapter_argument_options, open_adapter, open_base

DEVICE_CHOICE = click.Choice(["auto", "cpu", "cuda", "mps"])
DTYPE_CHOICE = click.Choice(["float32", "float16", "bfloat16"])


def run_merge(out: Output, base, adapter, dest, *, sign: int, dtype, device, force, strict, report, keep_modules_to_save=False, adapter_opts=None):
    """Shared body of merge and unmerge: open the inputs, stream, print a summary."""
    from loratool.merge import merge_model

    adapter_opts = adapter_opts or {}
    ad = open_adapter(adapter, **adapter_opts)
    base_model = open_base(base, **adapter_opts)
    emit_warnings(out, ad.warnings)
    ad.warnings = []  # printed above; merge_model's warn callback prints the rest
    total = sum(e.end - e.begin if e.begin is not None else 0 for e in base_model.store.entries()) or None
    bar = out.progress(total=total or 0, desc="unmerge" if sign < 0 else "merge")
    try:
        rep = merge_model(
            base_model,
            ad,
            dest,
            dtype=dtype,
            device=device,
            force=force,
            strict=strict,
            sign=sign,
            keep_modules_to_save=keep_modules_to_save,
            report_path=report,
            progress=bar,
            warn=out.warn,
        )
    finally:
        bar.close()
    if out.json_mode:
        out.json(rep)
    else:
        t = rep["tensors"]
        verb = "unmerged" if sign < 0 else "merged"
        out.info(
            f"{verb} {len(rep['modules'])} modules into {rep['out']}: {t['total']} tensors "
            f"({t['merged']} {verb}, {t['replaced'] + t['added']} replaced/added, {t['copied']} copied, {t['converted']} converted), "
            f"{rep['bytes_written']:,} bytes in {rep['timings']['total_s']:.2f} s on {rep['device']}"
        )
        if sign < 0 and rep.get("rounding", {}).get("half_precision"):
            out.info(f"half precision: unmerged weights are within {rep['rounding']['max_abs_bound']:.3g} of the originals (see --report)")
    return rep


@click.command("merge")
@click.argument("base")
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--dtype", type=DTYPE_CHOICE, help="Output dtype of floating tensors (default: the base's own, tensor by tensor).")
@click.option("--device", type=DEVICE_CHOICE, default="auto", show_default=True, help="Where the merge math runs (float32); auto picks CUDA, then MPS, then CPU.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--strict", is_flag=True, help="Refuse an adapter whose base_model_name_or_path names another model.")
@click.option("--report", type=click.Path(), help="Write a JSON report: per-module ||dW||, ||dW||/||W||, timings.")
@click.option("--push", "push_repo", metavar="REPO_ID", help="After a successful merge, upload OUT to this Hub repo (see `loratool push`).")  # push (hub)
@click.option("--private", is_flag=True, help="With --push: create the repo private.")  # push (hub)
@adapter_argument_options
@json_option
@common_options
def command(base, adapter, out, dtype, device, force, strict, report, as_json, quiet, **adapter_opts):
    """Merge ADAPTER into BASE and write the merged model to OUT, streaming.

    OUT is what PEFT's merge_and_unload() + save_pretrained() would give: the base's tensor
    names, dtypes and sharding, its config and tokenizer files; tensors the adapter does not
    touch are copied byte for byte. Peak memory does not grow with the model.

    \b
    Example:
      loratool merge fixtures/bases/llama fixtures/adapters/llama-lora merged-llama --report merge.json
    """
    o = Output(json_mode=as_json, quiet=quiet)
    # --- push (loratool.hub): hold the merge JSON to print it with the push result ---
    push_repo, private = adapter_opts.pop("push_repo", None), adapter_opts.pop("private", False)
    held = []
    if push_repo:
        from loratool.hub import check_push_repo_id

        check_push_repo_id(push_repo)  # before the merge, not after it
    if push_repo and as_json:
        o.json = held.append
    # --- end push ---
    run_merge(o, base, adapter, out, sign=1, dtype=dtype, device=device, force=force, strict=strict, report=report, adapter_opts=adapter_opts)
    # --- push (loratool.hub): upload the merged model once the merge succeeded ---
    if push_repo:
        from loratool.cli.push_cmd import report_push
        from loratool.hub import push

        result = push(out, push_repo, private=private, token=adapter_opts.get("token"), base=base, adapter=adapter)
        if as_json:
            Output.json(o, dict(held[0], push=result) if held else {"push": result})
        else:
            report_push(o, result)
    # --- end push ---
