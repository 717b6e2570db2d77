"""Human-readable reports: what the commands print without ``--json``.

The library returns JSON-ready dicts; turning them into text for a terminal happens here.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


def format_inspect_report(report: dict[str, Any]) -> str:
    """The human-readable summary printed by ``inspect`` without ``--json``."""
    lines = [f"format: {report['format']}  ({report['variant']}, dtype {report['dtype']}, {report['file_size']:,} bytes)"]
    if report.get("base_model"):
        lines.append(f"base model: {report['base_model']}")
    flags = [f for f in ("rslora", "dora", "bias") if report.get(f)]
    lines.append(f"flags: {', '.join(flags) if flags else 'none'}")
    lines.append(f"target_modules: {report['target_modules']}")
    by_kind: dict[str, list[dict]] = {}
    for m in report["modules"]:
        by_kind.setdefault(m["kind"], []).append(m)
    for kind, mods in by_kind.items():
        label = {"experts": "fused experts (E, out, in)", "experts_t": "fused experts (E, in, out)"}.get(kind, kind)
        lines.append(f"{label} modules: {len(mods)}")
        groups = Counter((m["rank"], m["alpha"], round(m["scale"], 6), m["in_features"], m["out_features"], m.get("experts")) for m in mods)
        for (r, a, s, i, o, e), n in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
            per = f"  x {e} experts (r={r} each, {r * (i + o):,} params per expert)" if e else ""
            lines.append(f"  {n:>4} x  r={r:<4} alpha={a:<8g} scale={s:<10g} {i} -> {o}{per}")
    hist = ", ".join(f"r={r}: {n}" for r, n in report["rank_histogram"].items())
    lines.append(f"rank histogram: {hist or 'empty'}")
    if report["modules_to_save"]:
        lines.append("modules_to_save: " + ", ".join(f"{n} {tuple(s)}" for n, s in report["modules_to_save"].items()))
    lines.append(f"LoRA parameters: {report['lora_params']:,}")
    lines.append(f"total stored parameters: {report['total_params']:,}")
    if "base_params" in report:
        pct = report["percent_of_base"]
        lines.append(f"base parameters: {report['base_params']:,}  (LoRA = {pct:.4f}% of base)" if pct is not None else f"base parameters: {report['base_params']:,}")
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def format_retention(report: dict) -> str:
    """The human summary table of ``report["quantization"]`` (empty when there is none)."""
    info = report.get("quantization")
    if not info or not info.get("retention"):
        return ""
    out = info["output"]
    target = out["method"] if out.get("method") else out.get("dtype") or "unquantized"
    ref = info.get("reference")
    head = f"delta retention in the {target} output"
    if ref is not None:
        head += f", against the {ref['method']} base the adapter was trained on"
    lines = [head + ":", f"  {'module':<16} {'n':>4} {'kept (mean)':>12} {'kept (min)':>11} {'rel.error':>10} {'unchanged':>10} {'|dW|/|W|':>9}"]
    for r in info["retention"]:
        lines.append(
            f"  {r['module']:<16} {r['count']:>4} {r['retained_mean']:>12.1%} {r['retained_min']:>11.1%} "
            f"{r['rel_error_mean']:>10.3f} {r['unchanged_mean']:>10.1%} {r['delta_ratio_mean']:>9.2%}"
        )
    return "\n".join(lines)


def format_weights_report(report: dict[str, Any], *, limit: int = 12) -> str:
    """The short table printed by ``verify`` without ``--json``: worst modules first."""
    s = report["summary"]
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [
        f"verify weights: {verdict}  ({s['modules']} checked, {s['failed']} failed"
        + (f", {s['quantized']} quantized" if s["quantized"] else "")
        + f"; untouched: {s['untouched_identical']} identical"
        + (f", {s['untouched_cast']} cast" if s["untouched_cast"] else "")
        + (f", {s['untouched_quantized']} re-quantized" if s["untouched_quantized"] else "")
        + (f", {s['untouched_differ']} differ" if s["untouched_differ"] else "")
        + f"; {s['missing']} missing, {s['extra']} extra)"
    ]
    mods = report["modules"]
    if mods:
        quant = any(m.get("quantization") for m in mods)
        head = f"{'module':<48} {'kind':<15} {'dtype':<9} {'residual':>9} {'allowed':>9}"
        head += f" {'retained':>9} {'expected':>9}  status" if quant else "  status"
        lines.append(head)
        for m in mods[:limit]:
            res = "-" if m["residual"] is None else f"{m['residual']:.2e}"
            allowed = m["tolerance"] if report.get("tolerance") is not None else m["bound"]
            allowed = "-" if allowed is None else f"{allowed:.2e}"
            name = m["name"] if len(m["name"]) <= 48 else "..." + m["name"][-45:]
            row = f"{name:<48} {m['kind']:<15} {str(m['dtype']):<9} {res:>9} {allowed:>9}"
            if quant:
                for key in ("retention", "expected_retention"):
                    v = m.get(key)
                    row += f" {'-' if v is None else f'{v:.3f}':>9}"
            lines.append(row + f"  {m['status'].upper() if m['status'] != 'ok' else 'ok'}")
        if len(mods) > limit:
            rest = mods[limit:]
            counts = Counter(m["status"] for m in rest)
            lines.append(f"... {len(rest)} more (" + ", ".join(f"{n} {st}" for st, n in sorted(counts.items())) + ")")
    if report["failures"]:
        lines.append("failures:")
        lines.extend(f"  {f}" for f in report["failures"])
    return "\n".join(lines)


def format_outputs_report(report: dict[str, Any]) -> str:
    """The human summary of the output check."""
    verdict = "PASS" if report["passed"] and report.get("judged", True) else ("REPORTED" if report["passed"] else "FAIL")

    def f(x, fmt=".3g"):
        return "-" if x is None else format(x, fmt)

    lines = [
        f"verify outputs: {verdict}  ({report['task']}, {report['samples']} samples, {report['tokens']} tokens, {report['inputs']}; merged {report['merged_dtype']})",
        f"  relative diff {f(report['relative_diff'])} (allowed {f(report['allowed_relative_diff'])}; PEFT's own merge: "
        f"{f(report['floor_float32'])} in float32, {f(report['floor_merged_dtype'])} at {report['merged_dtype']})",
        f"  max |diff| {f(report['max_abs_diff'])}  mean |diff| {f(report['mean_abs_diff'])}"
        + (f"  KL {f(report['kl_divergence'])}  top-1 agreement {f(report['top1_agreement'], '.4f')}" if report["kl_divergence"] is not None else ""),
    ]
    lines.extend(_layers_lines(report))
    lines.extend(f"  note: {n}" for n in report.get("notes", []))
    return "\n".join(lines)


def _layers_lines(report: dict[str, Any]) -> list[str]:
    """The per-stage comparison of the layer-streamed check: where MERGED first leaves its bound."""
    stages = report.get("layers") or []
    if not stages:
        return []
    first = next((s for s in stages if s["passed"] is False), None)
    if first is not None:
        return [f"  first diverging at {first['stage']}: relative diff {first['relative_diff']:.3g} > allowed {first['allowed_relative_diff']:.3g}"
                f" ({len(stages)} stages compared: embeddings, {len(stages) - 2} layers, output)"]
    worst = max(stages, key=lambda s: (s["relative_diff"] or 0) / (s["allowed_relative_diff"] or 1))
    return [f"  {len(stages)} stages compared (embeddings, {len(stages) - 2} layers, output), each within its bound; "
            f"closest: {worst['stage']} ({worst['relative_diff']:.3g} of {worst['allowed_relative_diff']:.3g})"]


def format_combined(report: dict[str, Any]) -> str:
    """The per-weight table of a merge of several adapters: each adapter's ||dW_i||, the share of
    entries kept, the share outvoted (TIES), ||D|| of the combined delta."""
    spec = report["combination"]
    opts = ", ".join(f"{k} {v}" for k, v in spec.items() if k not in ("method", "weights"))
    lines = [f"{spec['method']} of {len(report['adapters'])} adapters, weights {', '.join(f'{w:g}' for w in spec['weights'])}"
             + (f" ({opts})" if opts else "")]
    lines.append(f"{'tensor':<48} {'||dW_i||':<28} {'kept':<18} {'outvoted':>8} {'||D||':>10}")
    for row in report["combined"]:
        norms = " ".join(f"{i + 1}:{n:.3g}" for i, n in zip(row["adapters"], row["delta_norms"]))
        kept = " ".join(f"{k:.2f}" for k in row.get("kept_fraction", [])) or "all"
        outvoted = f"{row['outvoted']:.3f}" if row.get("outvoted") is not None else "-"
        lines.append(f"{row['tensor']:<48} {norms:<28} {kept:<18} {outvoted:>8} {row['combined_norm']:>10.4g}")
    return "\n".join(lines)
