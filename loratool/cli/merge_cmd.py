"""`loratool merge`."""

from __future__ import annotations

import math

import click

from loratool.cli.common import Output, common_options, emit_warnings, json_option
from loratool.cli.resolve import adapter_argument_options, open_adapter, open_base

DEVICE_CHOICE = click.Choice(["auto", "cpu", "cuda", "mps"])
DTYPE_CHOICE = click.Choice(["float32", "float16", "bfloat16"])


def run_merge(out: Output, base, adapter, dest, *, sign: int, dtype, device, force, strict, report, keep_modules_to_save=False, adapter_opts=None, quantization=None):
    """Shared body of merge and unmerge: open the inputs, stream, print a summary."""
    from loratool.merge import merge_model

    adapter_opts = adapter_opts or {}
    ad = open_adapter(adapter, **adapter_opts)
    base_model = open_base(base, **adapter_opts)
    emit_warnings(out, ad.warnings)
    ad.warnings = []  # printed above; merge_model's warn callback prints the rest
    bar = out.progress(total=_output_bytes(base_model, dtype), desc="unmerge" if sign < 0 else "merge")
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
            weight_norms=bool(report) or out.json_mode,
            quantization=quantization,  # quantization (loratool.quantized)
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
        # --- quantization (loratool.quantized): the retention summary table ---
        from loratool.quantized import format_retention

        if format_retention(rep):
            out.info(format_retention(rep))
        # --- end quantization ---
    return rep


# --- qalora (loratool.qalora): the QA-LoRA merge into a GPTQ checkpoint ---
def run_qalora_merge(out: Output, base, adapter, dest, *, pooling, group_size, to, dtype, force, report, adapter_opts):
    """`merge --qalora`: open the inputs, call merge_qalora, print a summary (one line per module for --to gptq)."""
    import torch

    from loratool.qalora import merge_qalora

    ad = open_adapter(adapter, **adapter_opts)
    base_model = open_base(base, **adapter_opts)
    torch_dtype = getattr(torch, dtype) if dtype else None
    rep = merge_qalora(base_model, ad, dest, pooling=pooling, group_size=group_size, to=to or "dense", force=force, report_path=report, dtype=torch_dtype)
    if out.json_mode:
        out.json(rep)
        emit_warnings(out, rep["warnings"])
        return rep
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
# --- end qalora ---

def _output_bytes(base_model, dtype: str | None) -> int:
    """What OUT will hold, for the progress bar (tensors the adapter adds are not counted)."""
    from loratool.merge import CONVERTIBLE, resolve_dtype

    out_dtype = resolve_dtype(dtype)
    total = 0
    for e in base_model.store.entries():
        d = out_dtype if out_dtype is not None and e.dtype in CONVERTIBLE else e.dtype
        total += math.prod(e.shape) * d.itemsize
    return total


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
# --- qalora (loratool.qalora): QA-LoRA into a GPTQ checkpoint, see docs/qalora.md ---
@click.option("--qalora", is_flag=True, help="BASE is a GPTQ checkpoint and ADAPTER a QA-LoRA adapter: fold the adapter into the quantized model (docs/qalora.md).")
@click.option("--pooling", type=click.Choice(["avg", "sum", "peft"]), help="With --qalora: the adapter's pooling (default: peft when adapter_config.json sets use_qalora, else avg as in the original QA-LoRA code).")
@click.option("--group-size", "group_size", type=click.IntRange(min=1), help="With --qalora: the pooling group size Lp (checked against lora_A, which is r x in/Lp).")
@click.option("--to", "to", type=click.Choice(["dense", "float-zeros", "gptq"]), help="With --qalora: dense 16-bit weights (default, exact), float-zeros (low-bit codes, float zero points, exact) or gptq (integer zeros, not exact).")
# --- end qalora ---
# --- quantization (loratool.quantized): bitsandbytes-aware merging, see docs/quantization.md ---
@click.option("--qlora", type=click.Choice(["nf4", "fp4"]), help="Merge into the 4-bit base the adapter was trained on (QLoRA): every weight transformers quantizes becomes dequantize(quantize(W)); 16-bit output.")
@click.option("--quantize", type=click.Choice(["nf4", "fp4", "int8"]), help="Write OUT quantized with bitsandbytes, loadable by transformers as Linear4bit / Linear8bitLt.")
@click.option("--blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]), default="64", show_default=True, help="4-bit block size for --qlora / --quantize (transformers always uses 64).")
@click.option("--double-quant", is_flag=True, help="4-bit double quantization (bnb_4bit_use_double_quant) for --qlora / --quantize.")
@click.option("--retention-threshold", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True, help="Warn about modules that keep less than this share of their delta.")
# --- end quantization ---
# --- verify (loratool.verify): check OUT after writing it, see docs/verify.md ---
@click.option("--verify", "verify", type=click.Choice(["weights", "outputs"]), is_flag=False, flag_value="weights", default=None, help="After writing, check OUT against BASE + ADAPTER: `--verify` the weights, `--verify outputs` the model outputs too; exit 1 if OUT fails.")
# --- end verify ---
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
    # --- verify (loratool.verify): hold the merge JSON to print it with the verification ---
    verify_mode = adapter_opts.pop("verify", None)
    verify_held = []
    if verify_mode and adapter_opts.get("qalora"):
        raise click.UsageError("--verify does not apply to --qalora")
    if verify_mode and as_json and not push_repo:
        o.json = verify_held.append
    # --- end verify ---
    # --- quantization (loratool.quantized): collect --qlora / --quantize and their settings ---
    from loratool.quantized import QuantOptions

    quant = QuantOptions(
        qlora=adapter_opts.pop("qlora", None),
        quantize=adapter_opts.pop("quantize", None),
        blocksize=int(adapter_opts.pop("blocksize", "64")),
        double_quant=adapter_opts.pop("double_quant", False),
        retention_threshold=adapter_opts.pop("retention_threshold", 0.5),
    )
    if quant.active and adapter_opts.get("qalora"):
        raise click.UsageError("--qlora / --quantize do not combine with --qalora")
    # --- end quantization ---
    # --- qalora (loratool.qalora): dispatch to the QA-LoRA merge ---
    qalora_opts = {k: adapter_opts.pop(k, None) for k in ("qalora", "pooling", "group_size", "to")}
    if qalora_opts.pop("qalora"):
        run_qalora_merge(o, base, adapter, out, dtype=dtype, force=force, report=report, adapter_opts=adapter_opts, **qalora_opts)
    elif any(v is not None for v in qalora_opts.values()):
        raise click.UsageError("--pooling, --group-size and --to apply only with --qalora")
    else:
        run_merge(o, base, adapter, out, sign=1, dtype=dtype, device=device, force=force, strict=strict, report=report, adapter_opts=adapter_opts, quantization=quant)
    # --- end qalora ---
    # --- verify (loratool.verify): check OUT now that it is written, before any upload ---
    if verify_mode:
        from loratool.cli.verify_cmd import verify_after_merge

        verify_after_merge(o, base, adapter, out, mode=verify_mode, adapter_opts=adapter_opts, quantization=quant,
                           merge_json=(held or verify_held or [None])[0], print_json=not push_repo)
    # --- end verify ---
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
