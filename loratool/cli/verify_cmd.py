"""`loratool verify`."""

from __future__ import annotations

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
from loratool.errors import CheckFailedError

DEVICE_CHOICE = click.Choice(["auto", "cpu", "cuda", "mps"])


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


class SizeType(click.ParamType):
    """A byte count: ``1073741824``, ``800MB``, ``1GiB``, ``1.5 GB``."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        import re

        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            self.fail(f"{value!r} is not a size (a number of bytes, or with a unit: 800MB, 1GiB)", param, ctx)
        return int(float(m.group(1)) * _UNITS[unit])


def failure_summary(report: dict) -> str:
    """One line for the error boundary: how many checks failed and the worst one."""
    fails = report.get("failures") or []
    out_rep = report.get("outputs")
    parts = []
    if fails:
        parts.append(f"{len(fails)} weight check{'s' if len(fails) != 1 else ''} failed (first: {fails[0]})")
    if out_rep is not None and not out_rep["passed"]:
        parts.append(f"outputs differ: relative difference {out_rep['relative_diff']:.3g} > allowed {out_rep['allowed_relative_diff']:.3g}")
        if out_rep.get("first_divergent"):
            parts[-1] += f" (first diverging at {out_rep['first_divergent']})"
    return "verification failed: " + "; ".join(parts) if parts else "verification failed"


def _split_paths(paths: tuple[str, ...], several: bool) -> tuple[str, list[str]]:
    """(MERGED, adapters) from the arguments after BASE: ADAPTER MERGED, or with --adapters MERGED A1 A2 ..."""
    if several:
        if len(paths) < 2:
            raise click.UsageError("--adapters: give MERGED and then at least one adapter")
        return paths[0], list(paths[1:])
    if len(paths) != 2:
        raise click.UsageError(f"expected ADAPTER MERGED after BASE, got {len(paths)} paths (several adapters: verify BASE MERGED --adapters A1 A2 ...)")
    return paths[1], [paths[0]]


def run_verify(out: Output, base_model, ad, merged_model, *, outputs: bool, tolerance, device: str, prompts=(), samples=4, seq_len=32,
               combine=None, max_memory=None) -> dict:
    """Run the weight check (and the output check); print it unless in JSON mode; return the report.

    Used by ``verify`` and ``merge --verify``, which print the JSON themselves. Raises
    CheckFailedError (with the report as ``.report``) when a check fails.
    """
    from loratool.cli.reports import format_outputs_report, format_weights_report
    from loratool.verify import verify_outputs, verify_weights

    device = resolve_device(device)
    total = sum(e.end - e.begin if e.begin is not None else 0 for e in base_model.store.entries())
    with out.progress(total=total, desc="verify") as bar:
        report = verify_weights(base_model, ad, merged_model, tolerance=tolerance, device=device, progress=bar, combine=combine)
    if outputs:
        report["outputs"] = verify_outputs(
            base_model, ad, merged_model, prompts=list(prompts) or None, samples=samples, seq_len=seq_len,
            tolerance=tolerance, device=device, max_memory=max_memory, combine=combine,
        )
        report["passed"] = bool(report["passed"] and report["outputs"]["passed"])
    if not out.json_mode:
        out.info(format_weights_report(report))
        if outputs:
            out.info(format_outputs_report(report["outputs"]))
        for note in report["notes"]:
            out.warn(note)
    if not report["passed"]:
        exc = CheckFailedError(failure_summary(report))
        exc.report = report
        raise exc
    return report


@click.command("verify")
@click.argument("base")
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER MERGED")
@click.option("--adapters", "several", is_flag=True, help="MERGED comes first, then the adapters merged into it together: verify BASE MERGED --adapters A1 A2 ... (with --method, --weights, --density, --seed as given to merge).")
@click.option("--outputs", is_flag=True, help="Also run BASE + ADAPTER (unmerged) and MERGED layer by layer and compare their hidden states and outputs (with --adapters: their combined delta, applied on the fly).")
@click.option("--tolerance", type=float, help="Fixed limit on residual / ||delta|| per module (and on the relative output difference) instead of the bound derived from the dtypes.")
@click.option("--prompt", "prompts", multiple=True, help="With --outputs: a text to run through the base's tokenizer (repeatable). Default: random token ids.")
@click.option("--samples", type=click.IntRange(min=1, max=4096), default=4, show_default=True, help="With --outputs: how many random sequences (at most 4096).")
@click.option("--seq-len", type=click.IntRange(min=1, max=1 << 16), default=32, show_default=True, help="With --outputs: tokens per random sequence (capped by the model's positions).")
@click.option("--device", type=DEVICE_CHOICE, default="cpu", show_default=True, help="Where the checks compute.")
@click.option("--max-memory", type=SizeType(), help="With --outputs: the most the layer-streamed run may hold at once (800MB, 1GiB); refused when one layer needs more.")
@click.option("--qalora", is_flag=True, help="BASE is a GPTQ checkpoint, ADAPTER a QA-LoRA adapter and MERGED a merge --qalora output (dense, float-zeros or gptq): check the outputs layer by layer against QA-LoRA's pooled forward (implies --outputs).")
@click.option("--pooling", type=click.Choice(["avg", "sum", "peft"]), help="With --qalora: the adapter's pooling, as given to merge --qalora.")
@click.option("--group-size", "group_size", type=click.IntRange(min=1), help="With --qalora: the pooling group size Lp, as given to merge --qalora.")
@combine_options
@adapter_argument_options
@json_option
@common_options
def command(base, paths, several, outputs, tolerance, prompts, samples, seq_len, device, max_memory, qalora, pooling, group_size,
            weights, method, density, majority_sign, seed, as_json, quiet, **adapter_opts):
    """Prove that MERGED is BASE + ADAPTER, tensor by tensor (streaming).

    Each adapted module's residual MERGED - (BASE + dW) is measured against ||dW|| and must be
    within what rounding to the merged dtype allows; every other tensor must be identical.
    A bitsandbytes-quantized MERGED reports the fraction of each delta that survived.
    Exit 0 pass, 1 a check failed (one line per failing module), 2 bad input.

    \b
    Example:
      loratool merge fixtures/bases/llama fixtures/adapters/llama-lora merged-llama
      loratool verify fixtures/bases/llama fixtures/adapters/llama-lora merged-llama --outputs
    """
    if not qalora and (pooling is not None or group_size is not None):
        raise click.UsageError("--pooling and --group-size apply only with --qalora")
    outputs = outputs or qalora
    if not outputs and (prompts or samples != 4 or seq_len != 32 or max_memory is not None):
        raise click.UsageError("--prompt, --samples, --seq-len and --max-memory apply only with --outputs")
    if tolerance is not None and not tolerance >= 0:
        raise click.BadParameter("must be a non-negative number", param_hint="--tolerance")
    merged, adapters = _split_paths(paths, several)
    if qalora:
        if several or any(v is not None for v in (weights, method, density, seed)):
            raise click.UsageError("--qalora checks one QA-LoRA adapter (no --adapters, --method, --weights, --density, --seed)")
        return _verify_qalora(Output(json_mode=as_json, quiet=quiet), base, adapters[0], merged, pooling=pooling, group_size=group_size,
                              tolerance=tolerance, device=device, prompts=prompts, samples=samples, seq_len=seq_len, max_memory=max_memory)
    spec = combine_spec(len(adapters), weights=weights, method=method, density=density, majority_sign=majority_sign, seed=seed)
    out = Output(json_mode=as_json, quiet=quiet)
    ads = [open_adapter(a, **adapter_opts) for a in adapters]
    base_model = open_base(base, **adapter_opts)
    merged_model = open_base(merged, **adapter_opts)
    for a in ads:
        emit_warnings(out, a.warnings)
    ads = [a.without_warnings() for a in ads]  # printed above
    try:
        report = run_verify(out, base_model, ads if spec is not None else ads[0], merged_model, outputs=outputs, tolerance=tolerance,
                            device=device, prompts=prompts, samples=samples, seq_len=seq_len, combine=spec, max_memory=max_memory)
    except CheckFailedError as exc:
        if out.json_mode:
            out.json(exc.report)  # a failed check still prints what it found
        raise
    if out.json_mode:
        out.json(report)


def _verify_qalora(out: Output, base, adapter, merged, *, pooling, group_size, tolerance, device, prompts, samples, seq_len,
                   max_memory, print_json: bool = True) -> dict:
    """``verify --qalora`` (and ``merge --qalora --verify``): the output check of a merge --qalora output;
    prints it, returns the report; CheckFailedError (exit 1) when it fails."""
    from loratool.cli.reports import format_outputs_report
    from loratool.verify.qalora_outputs import verify_outputs_qalora

    rep = verify_outputs_qalora(base, adapter, merged, pooling=pooling, group_size=group_size, prompts=list(prompts) or None,
                                samples=samples, seq_len=seq_len, tolerance=tolerance, device=resolve_device(device), max_memory=max_memory)
    report = {"passed": rep["passed"], "failures": [], "notes": rep["notes"], "outputs": rep}
    if out.json_mode:
        if print_json:
            out.json(report)
    else:
        out.info(format_outputs_report(rep))
        for note in rep["notes"]:
            out.warn(note)
    if not rep["passed"]:
        exc = CheckFailedError(failure_summary(report))
        exc.report = report
        raise exc
    return report


def verify_after_qalora_merge(out: Output, base, adapter, dest, *, pooling, group_size) -> dict:
    """``merge --qalora --verify``: the layer-streamed output check of the OUT just written (the only
    check a GPTQ merge has: its weights are codes). Raises CheckFailedError naming OUT when it fails."""
    try:
        return _verify_qalora(out, base, adapter, str(dest), pooling=pooling, group_size=group_size, tolerance=None, device="cpu",
                              prompts=(), samples=4, seq_len=32, max_memory=None, print_json=False)
    except CheckFailedError as exc:
        failed = CheckFailedError(f"{exc}; the suspect merged model is at {dest}")
        failed.report = exc.report
        raise failed from None


def verify_after_merge(out: Output, base, adapter, dest, *, mode: str, adapter_opts: dict, quantization=None, combine=None) -> dict:
    """``merge --verify [weights|outputs]``: check the OUT just written against BASE + ADAPTER.

    Prints the check unless in JSON mode and returns its report. Raises CheckFailedError naming
    OUT (the report as ``.report``) when it fails.
    """
    if combine is not None:  # several adapters (a list), combined as merge did
        ads = [open_adapter(a, **adapter_opts).without_warnings() for a in adapter]
        try:
            return run_verify(out, open_base(base, **adapter_opts), ads, open_base(str(dest)), outputs=mode == "outputs",
                              tolerance=None, device="cpu", combine=combine)
        except CheckFailedError as exc:
            failed = CheckFailedError(f"{exc}; the suspect merged model is at {dest}")
            failed.report = exc.report
            raise failed from None
    ad = open_adapter(adapter, **adapter_opts).without_warnings()  # the merge printed them
    base_model = open_base(base, **adapter_opts)
    if quantization is not None and getattr(quantization, "qlora", None):
        # --qlora merged into dequantize(quantize(W)): that is the base OUT must equal plus the delta
        from loratool.quantized import QuantOptions, setup_quantization

        opts = QuantOptions(qlora=quantization.qlora, blocksize=quantization.blocksize, double_quant=quantization.double_quant)
        base_model = setup_quantization(base_model, ad, opts)[0]
    merged_model = open_base(str(dest))
    try:
        return run_verify(out, base_model, ad, merged_model, outputs=mode == "outputs", tolerance=None, device="cpu")
    except CheckFailedError as exc:
        failed = CheckFailedError(f"{exc}; the suspect merged model is at {dest}")
        failed.report = exc.report
        raise failed from None
