"""`loratool rerank`."""

from __future__ import annotations

from pathlib import Path

import click

from loratool.cli.common import Output, common_options, emit_warnings, json_option, lazy
from loratool.cli.rescale_cmd import input_paths, output_options, surgery_input_options
from loratool.cli.resolve import open_adapter
from loratool.errors import InputError
from loratool.formats import write_adapter
from loratool.io.atomic import check_output_path, write_side_output

parse_dtype = lazy("loratool.surgery", "parse_dtype")
rerank = lazy("loratool.surgery", "rerank")


@click.command("rerank")
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--rank", type=int, help="Every module at this rank (modules already at or below it are kept as they are).")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping at least this fraction of ||dW||_F^2 (0 < F <= 1).")
@click.option("--sv-ratio", type=float, help="Keep singular values >= largest / X (X >= 1).")
@click.option("--fro-error", type=float, help="Per module, the smallest rank with ||dW - dW_k||_F <= E ||dW||_F (0 <= E < 1).")
@click.option("--max-rank", type=int, help="Upper bound on the rank any rule picks.")
@click.option("--pad", is_flag=True, help="With --rank: zero-pad modules below the rank up to it (exact).")
@click.option("--plot", "plot_path", type=click.Path(), help="Draw the singular value spectra and the cut into this PNG (needs matplotlib).")
@output_options
@surgery_input_options
@json_option
@common_options
def command(adapter, out, rank, energy, sv_ratio, fro_error, max_rank, pad, plot_path, dtype, force, as_json, quiet, **adapter_opts):
    """Truncate every module of ADAPTER to its optimal lower-rank approximation.

    Each module's dW = scale * B @ A is decomposed from its factors (QR of B and A^T, SVD of the
    r x r core), never forming the out x in matrix, and cut by exactly one rule. Each module keeps
    its alpha; per-module ranks go into rank_pattern. OUT is a PEFT adapter.

    \b
    Examples:
      loratool rerank fixtures/adapters/llama-lora small --rank 4
      loratool rerank fixtures/adapters/llama-lora small --energy 0.9 --plot spectra.png --json
    """
    o = Output(json_mode=as_json, quiet=quiet)
    rules = [n for n, v in (("--rank", rank), ("--energy", energy), ("--sv-ratio", sv_ratio), ("--fro-error", fro_error)) if v is not None]
    if len(rules) != 1:
        raise InputError("give exactly one of --rank, --energy, --sv-ratio, --fro-error" + (f" (got {', '.join(rules)})" if rules else ""))
    ad = open_adapter(adapter, **adapter_opts)
    if plot_path:  # before any work, with the rules of OUT
        check_output_path(Path(plot_path), force=force, inputs=input_paths(ad))
        _require_matplotlib()
    new, report = rerank(ad, rank=rank, energy=energy, sv_ratio=sv_ratio, fro_error=fro_error, max_rank=max_rank,
                         pad=pad, dtype=parse_dtype(dtype))
    write_adapter(new, out, format="peft", force=force, inputs=input_paths(ad))
    report["output"] = str(out)
    if plot_path:
        write_side_output(Path(plot_path), lambda tmp: plot_spectra(report, tmp), force=force, inputs=input_paths(ad), completed=Path(out))
        report["plot"] = str(plot_path)
    if as_json:
        o.json({**report, "modules": [{k: v for k, v in m.items() if k != "singular_values"} for m in report["modules"]]})
        return
    o.info(format_table(report))
    o.info(f"wrote {out}" + (f" and {plot_path}" if plot_path else ""))
    emit_warnings(o, report["warnings"])


def format_table(report: dict) -> str:
    """The per-module table printed by rerank (and combine --method svd)."""
    rows = report["modules"]
    width = max([len("module")] + [len(r["name"]) for r in rows])
    lines = [f"{'module':<{width}}  {'rank':>11}  {'kept energy':>12}  {'rel. error':>10}  note"]
    for r in rows:
        before = r.get("rank_before")
        ranks = f"{before} -> {r['rank']}" if before is not None else str(r["rank"])
        note = r.get("action", "")
        if note == "unchanged" and report.get("criterion", {}).get("rank") is not None:
            note = "unchanged (already at or below the rank)"
        lines.append(f"{r['name']:<{width}}  {ranks:>11}  {r['kept_energy']:>12.6f}  {r['relative_error']:>10.3e}  {note}")
    counts = report.get("counts", {})
    if counts:
        lines.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    if counts.get("unchanged") and report.get("criterion", {}).get("rank") is not None:
        lines.append(f"{counts['unchanged']} modules already at or below rank {report['criterion']['rank']} were kept as they are"
                     + ("" if report.get("pad") else " (--pad pads them with zeros)"))
    if "lora_params_before" in report:
        lines.append(f"LoRA parameters: {report['lora_params_before']:,} -> {report['lora_params']:,}")
    return "\n".join(lines)


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'loratool[plot]'") from None


def plot_spectra(report: dict, path: Path) -> None:
    """Singular values of every module (normalized to the largest), grouped by module type, with
    a marker where each module was cut."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups: dict[str, list[dict]] = {}
    for r in report["modules"]:
        groups.setdefault(r["name"].rsplit(".", 1)[-1], []).append(r)
    n = len(groups)
    cols = min(4, max(1, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (leaf, mods) in zip(axes.flat, groups.items()):
        for r in mods:
            s = list(r["singular_values"])
            top = s[0] if s and s[0] > 0 else 1.0
            ys = [max(x / top, 1e-12) for x in s]
            xs = list(range(1, len(ys) + 1))
            ax.plot(xs, ys, color="tab:blue", alpha=0.35, linewidth=1)
            k = min(r["rank"], len(ys))
            if k >= 1:
                ax.plot([k], [ys[k - 1]], marker="o", color="tab:red", markersize=3)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{leaf} ({len(mods)} modules)", fontsize=9)
        ax.set_xlabel("index", fontsize=8)
        ax.set_ylabel("sigma / sigma_1", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    crit = ", ".join(f"{k}={v}" for k, v in report.get("criterion", {}).items())
    fig.suptitle(f"singular values and cut (red) — {crit}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
