"""`loratool merge`."""

from __future__ import annotations

import math

import click

from loratool.cli.common import (
    Output,
    combine_options,
    combine_spec,
    common_options,
    emit_warnings,
    json_option,
)
from loratool.cli.resolve import adapter_argument_options, open_adapter, open_base

DEVICE_CHOICE = click.Choice(["auto", "cpu", "cuda", "mps"])
DTYPE_CHOICE = click.Choice(["float32", "float16", "bfloat16"])


def run_merge(out: Output, base, adapter, dest, *, sign: int, dtype, device, force, strict, report, keep_modules_to_save=False,
              adapter_opts=None, quantization=None, combine=None) -> dict:
    """Shared body of merge and unmerge: open the inputs, stream, print a summary (not in JSON mode); the report.
    ``adapter`` is a list with ``combine`` (several adapters)."""
    from loratool.cli.reports import format_combined, format_retention
    from loratool.merge import merge_model

    adapter_opts = adapter_opts or {}
    ads = [open_adapter(a, **adapter_opts) for a in (adapter if isinstance(adapter, list) else [adapter])]
    base_model = open_base(base, **adapter_opts)
    for a in ads:
        emit_warnings(out, a.warnings)
    ads = [a.without_warnings() for a in ads]  # printed above; merge_model's warn callback adds the rest
    ad = ads if isinstance(adapter, list) else ads[0]
    with out.progress(total=_output_bytes(base_model, dtype), desc="unmerge" if sign < 0 else "merge") as bar:
        rep = merge_model(
            base_model, ad, dest, dtype=dtype, device=device, force=force, strict=strict, sign=sign,
            keep_modules_to_save=keep_modules_to_save, report_path=report, progress=bar, warn=out.warn,
            weight_norms=bool(report) or out.json_mode, quantization=quantization, combine=combine,
        )
    if not out.json_mode:
        t = rep["tensors"]
        verb = "unmerged" if sign < 0 else "merged"
        if combine is not None:
            out.info(format_combined(rep))
        out.info(
            f"{verb} {len(rep['modules']) or len(rep.get('combined', []))} modules into {rep['out']}: {t['total']} tensors "
            f"({t['merged']} {verb}, {t['replaced'] + t['added']} replaced/added, {t['copied']} copied, {t['converted']} converted), "
            f"{rep['bytes_written']:,} bytes in {rep['timings']['total_s']:.2f} s on {rep['device']}"
        )
        if sign < 0 and rep.get("rounding", {}).get("half_precision"):
            out.info(f"half precision: unmerged weights are within {rep['rounding']['max_abs_bound']:.3g} of the originals (see --report)")
        if format_retention(rep):  # --qlora / --quantize: how much of each delta survived
            out.info(format_retention(rep))
    return rep


def run_qalora_merge(out: Output, base, adapter, dest, *, pooling, group_size, to, dtype, force, report, adapter_opts) -> dict:
    """`merge --qalora`: open the inputs, call merge_qalora, print a summary (one line per module for --to gptq); the report."""
    import torch

    from loratool.qalora import merge_qalora

    ad = open_adapter(adapter, **adapter_opts)
    base_model = open_base(base, **adapter_opts)
    torch_dtype = getattr(torch, dtype) if dtype else None
    rep = merge_qalora(base_model, ad, dest, pooling=pooling, group_size=group_size, to=to or "dense", force=force, report_path=report, dtype=torch_dtype)
    if not out.json_mode:
        q, c = rep["quantization"], rep["convention"]
        out.info(
            f"merged {len(rep['modules'])} QA-LoRA modules into {rep['out']} (--to {rep['to']}, {'exact' if rep['exact'] else 'NOT exact'}); "
            f"GPTQ {q['bits']}-bit {q['checkpoint_format']} ({q['zero_format']} zero points), group size {q['group_size']}; "
            f"pooling {c['pooling']} Lp={c['pool_size']} ({c['source']}): {c['delta']}"
        )
        if rep["to"] == "gptq":
            for m in rep["modules"]:
                if "max_weight_error" in m:
                    out.info(f"  {m['name']}: max |zero' - round(zero')| {m['max_zero_rounding']:.4g}, max weight error {m['max_weight_error']:.4g}, clamped {m['clamped']}")
    emit_warnings(out, rep["warnings"])
    return rep


def _output_bytes(base_model, dtype: str | None) -> int:
    """What OUT will hold, for the progress bar (tensors the adapter adds are not counted)."""
    from loratool.engine.codecs.float import CONVERTIBLE
    from loratool.merge import resolve_dtype

    out_dtype = resolve_dtype(dtype)
    total = 0
    for e in base_model.store.entries():
        d = out_dtype if out_dtype is not None and e.dtype in CONVERTIBLE else e.dtype
        total += math.prod(e.shape) * d.itemsize
    return total


@click.command("merge")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.argument("out", type=click.Path())
@click.option("--dtype", type=DTYPE_CHOICE, help="Output dtype of floating tensors (default: the base's own, tensor by tensor).")
@click.option("--device", type=DEVICE_CHOICE, default="auto", show_default=True, help="Where the merge math runs (float32); auto picks CUDA, then MPS, then CPU.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--strict", is_flag=True, help="Refuse an adapter whose base_model_name_or_path names another model.")
@click.option("--report", type=click.Path(), help="Write a JSON report: per-module ||dW||, ||dW||/||W||, timings.")
@click.option("--verify", "verify_mode", type=click.Choice(["weights", "outputs"]), is_flag=False, flag_value="weights", default=None, help="After writing, check OUT against BASE + ADAPTER: `--verify` the weights, `--verify outputs` the model outputs too; exit 1 if OUT fails (docs/verify.md).")
@click.option("--push", "push_repo", metavar="REPO_ID", help="After a successful merge (and check), upload OUT to this Hub repo (see `loratool push`).")
@click.option("--private", is_flag=True, help="With --push: create the repo private.")
# bitsandbytes-aware merging, docs/quantization.md
@click.option("--qlora", type=click.Choice(["nf4", "fp4"]), help="Merge into the 4-bit base the adapter was trained on (QLoRA): every weight transformers quantizes becomes dequantize(quantize(W)); 16-bit output.")
@click.option("--quantize", type=click.Choice(["nf4", "fp4", "int8"]), help="Write OUT quantized with bitsandbytes, loadable by transformers as Linear4bit / Linear8bitLt.")
@click.option("--blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]), default="64", show_default=True, help="4-bit block size for --qlora / --quantize (transformers always uses 64).")
@click.option("--double-quant", is_flag=True, help="4-bit double quantization (bnb_4bit_use_double_quant) for --qlora / --quantize.")
@click.option("--retention-threshold", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True, help="Warn about modules that keep less than this share of their delta.")
# QA-LoRA into a GPTQ checkpoint, docs/qalora.md
@click.option("--qalora", is_flag=True, help="BASE is a GPTQ checkpoint and ADAPTER a QA-LoRA adapter: fold the adapter into the quantized model (docs/qalora.md).")
@click.option("--pooling", type=click.Choice(["avg", "sum", "peft"]), help="With --qalora: the adapter's pooling (default: peft when adapter_config.json sets use_qalora, else avg as in the original QA-LoRA code).")
@click.option("--group-size", "group_size", type=click.IntRange(min=1), help="With --qalora: the pooling group size Lp (checked against lora_A, which is r x in/Lp).")
@click.option("--to", "to", type=click.Choice(["dense", "float-zeros", "gptq"]), help="With --qalora: dense 16-bit weights (default, exact), float-zeros (low-bit codes, float zero points, exact) or gptq (integer zeros, not exact).")
# several adapters at once, docs/merge.md#several-adapters
@combine_options
@adapter_argument_options
@json_option
@common_options
def command(base, adapters, out, dtype, device, force, strict, report, verify_mode, push_repo, private,
            qlora, quantize, blocksize, double_quant, retention_threshold, qalora, pooling, group_size, to,
            weights, method, density, majority_sign, seed, as_json, quiet, **adapter_opts):
    """Merge ADAPTER into BASE and write the merged model to OUT, streaming.

    Several adapters (BASE A1 A2 ... OUT) merge in one pass, combined by --method with --weights.

    OUT is what PEFT's merge_and_unload() + save_pretrained() would give: the base's tensor
    names, dtypes and sharding, its config and tokenizer files; tensors the adapter does not
    touch are copied byte for byte. Peak memory does not grow with the model.

    \b
    Example:
      loratool merge fixtures/bases/llama fixtures/adapters/llama-lora merged-llama --report merge.json
    """
    from loratool.quantized import QuantOptions

    o = Output(json_mode=as_json, quiet=quiet)
    spec = combine_spec(len(adapters), weights=weights, method=method, density=density, majority_sign=majority_sign, seed=seed)
    adapter = adapters[0] if spec is None else list(adapters)
    if spec is not None and (qalora or qlora or quantize):
        raise click.UsageError("several adapters (or --method / --weights) do not combine with --qalora, --qlora or --quantize")
    if spec is not None and push_repo:
        raise click.UsageError("--push takes a merge of one adapter; push OUT with `loratool push` after a merge of several")
    quant = QuantOptions(qlora=qlora, quantize=quantize, blocksize=int(blocksize), double_quant=double_quant,
                         retention_threshold=retention_threshold)
    # flag combinations are refused before any work
    if qalora and quant.active:
        raise click.UsageError("--qlora / --quantize do not combine with --qalora")
    if not qalora and any(v is not None for v in (pooling, group_size, to)):
        raise click.UsageError("--pooling, --group-size and --to apply only with --qalora")
    if push_repo:
        from loratool.hub import check_push_repo_id

        check_push_repo_id(push_repo)

    if qalora:
        rep = run_qalora_merge(o, base, adapter, out, pooling=pooling, group_size=group_size, to=to, dtype=dtype,
                               force=force, report=report, adapter_opts=adapter_opts)
    else:
        rep = run_merge(o, base, adapter, out, sign=1, dtype=dtype, device=device, force=force, strict=strict,
                        report=report, adapter_opts=adapter_opts, quantization=quant, combine=spec)
    # one JSON object in the end: the merge report, with the check and the upload inside
    if verify_mode:
        from loratool.cli.verify_cmd import verify_after_merge
        from loratool.errors import CheckFailedError

        try:
            if qalora:  # a GPTQ merge is checked at the outputs, whichever --verify mode was asked
                from loratool.cli.verify_cmd import verify_after_qalora_merge

                rep["verify"] = verify_after_qalora_merge(o, base, adapter, out, pooling=pooling, group_size=group_size)
            else:
                rep["verify"] = verify_after_merge(o, base, adapter, out, mode=verify_mode, adapter_opts=adapter_opts, quantization=quant, combine=spec)
        except CheckFailedError as exc:
            if as_json:
                o.json(dict(rep, verify=exc.report))  # a failed check still prints what it found
            raise
    if push_repo:
        from loratool.cli.push_cmd import report_push
        from loratool.hub import push

        rep["push"] = push(out, push_repo, private=private, token=adapter_opts.get("token"), base=base, adapter=adapter)
        if not as_json:
            report_push(o, rep["push"])
    if as_json:
        o.json(rep)
