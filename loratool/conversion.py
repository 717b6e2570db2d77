"""``convert``: any adapter format to any other, through the canonical model.

The source is read into canonical form (detecting its format unless told), the target
writer refuses what its format cannot hold (DoRA, a LoRA bias, modules_to_save...) unless it
can bake it in exactly, and the written result is read back and compared with the source,
module by module, before it replaces OUT: a conversion never drops a delta silently.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from loratool.adapter import Adapter, LoraModule
from loratool.base import BaseModel, bind_adapter
from loratool.errors import FormatError, InputError, UnsupportedError
from loratool.formats import WRITE_CONTEXT, format_names, format_options, get_format, read_adapter
from loratool.io.atomic import atomic_output_dir, atomic_output_file
from loratool.io.store import TensorStore, checkpoint_files, read_json

READ_OPTIONS = ("adapter_name", "alpha", "scale", "legacy_qkv")

_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 8e-3, torch.bfloat16: 6e-2}
_Q8_TOLERANCE = 3e-2


def load_base(base: BaseModel | str | os.PathLike | None) -> BaseModel | None:
    """A BaseModel from a folder; a folder with only config.json gives a config-only base.

    Raises:
        FormatError: not a model folder.
    """
    if base is None or isinstance(base, BaseModel):
        return base
    path = Path(base)
    try:
        return BaseModel.open(path)
    except FormatError:
        if not path.is_dir() or not (path / "config.json").is_file():
            raise
        try:
            checkpoint_files(path)
        except FormatError:
            config = read_json(path / "config.json")
            if not isinstance(config, dict):
                raise FormatError(path / "config.json", "is not a JSON object") from None
            return BaseModel(path=path, config=config, store=TensorStore([]))
        raise


def convert(
    src: str | os.PathLike | Adapter,
    out: str | os.PathLike,
    *,
    to: str,
    from_format: str | None = None,
    base: BaseModel | str | os.PathLike | None = None,
    force: bool = False,
    verify: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Convert an adapter to another format.

    Args:
        src: the source adapter (path) or an ``Adapter`` already read.
        out: the output file or folder (refused if it exists, unless ``force``).
        to: target format name (peft, scratch, lit-llama, litgpt, mlx, gguf).
        from_format: source format; detected when None.
        base: base model (``BaseModel`` or folder; a folder with only config.json will do for
            GGUF): names, shapes, architecture and head counts where a format needs them.
        force: replace an existing OUT.
        verify: read the output back (with ``base``) and compare every module with the source
            before committing it.
        **options: reading options (``adapter_name``, ``alpha``, ``scale``, ``legacy_qkv``) and
            writing options (``outtype`` for GGUF, ``container`` for scratch, ...); an option the
            source or target format does not take is refused (InputError).
    Returns:
        A JSON-ready report: formats, counts, what was baked in, notes and warnings.
    Raises:
        UnsupportedError: the target cannot hold something of the source (exit 2).
        InputError, FormatError, OutputExistsError, ModuleMismatchError.
    """
    if to not in format_names():
        raise InputError(f"unknown target format {to!r} (known: {', '.join(format_names())})")
    base_model = load_base(base)
    read_opts = {k: options.pop(k) for k in READ_OPTIONS if options.get(k) is not None}
    if isinstance(src, Adapter):
        if read_opts:
            raise InputError(f"reading options ({', '.join(read_opts)}) apply when SRC is a path, not an Adapter already read")
        adapter = src
        src_path = adapter.path
    else:
        src_path = Path(src)
        adapter = read_adapter(src_path, format=from_format, base=base_model, **read_opts)
    if base_model is not None and len(base_model.store):
        bind_adapter(adapter, base_model)

    out = Path(out)
    mod = get_format(to)
    inputs = [p for p in [src_path, *adapter.files, base_model.path if base_model is not None else None] if p is not None]
    report: dict[str, Any] = {"baked": [], "notes": []}
    write_opts = format_options(mod.write, dict(options, base=base_model, out_name=out.name, report=report), context=WRITE_CONTEXT, what=f"--to {to}")
    is_file = bool(getattr(mod, "OUTPUT_IS_FILE", False))
    check = bool(verify)
    guard = atomic_output_file if is_file else atomic_output_dir
    with guard(out, force=force, inputs=inputs) as tmp:
        if is_file:
            # write under OUT's own name (readers look at the suffix), then move into tmp
            work = out.parent / f".{out.name}.loratool-tmp-{os.getpid()}-verify-{uuid.uuid4().hex[:8]}"
            work.mkdir()
            try:
                written = work / out.name
                mod.write(adapter, written, **write_opts)
                if check:
                    compare(adapter, read_adapter(written, format=to, base=base_model), base=base_model, outtype=options.get("outtype"))
                os.replace(written, tmp)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        else:
            mod.write(adapter, tmp, **write_opts)
            if check:
                compare(adapter, read_adapter(tmp, format=to, base=base_model), base=base_model, outtype=options.get("outtype"))
    return {
        "source": str(src_path) if src_path is not None else None,
        "from": adapter.format,
        "to": to,
        "out": str(out),
        "modules": len(adapter),
        "modules_to_save": sorted(adapter.modules_to_save),
        "verified": check,
        "baked": report["baked"],
        "notes": report["notes"],
        "warnings": list(adapter.warnings),
    }


def _gram_distance(m1: LoraModule, m2: LoraModule) -> tuple[float, float]:
    """(||dW1 - dW2||_F, ||dW1||_F) from the factors, never forming the (out, in) deltas."""
    a1, b1 = m1.A.load().double(), m1.B.load().double() * m1.scale
    a2, b2 = m2.A.load().double(), m2.B.load().double() * m2.scale
    U = torch.cat([b1, -b2], dim=1)  # (out, r1 + r2)
    V = torch.cat([a1, a2], dim=0)  # (r1 + r2, in)
    diff = torch.trace((U.T @ U) @ (V @ V.T)).clamp_min(0).sqrt().item()
    norm = torch.trace((b1.T @ b1) @ (a1 @ a1.T)).clamp_min(0).sqrt().item()
    return diff, norm


def _tolerance(*dtypes: torch.dtype, outtype: str | None = None) -> float:
    tol = max(_TOLERANCE.get(d, 1e-5) for d in dtypes)
    if outtype == "q8_0":
        tol = max(tol, _Q8_TOLERANCE)
    return tol


def compare(expected: Adapter, actual: Adapter, *, base: BaseModel | None = None, outtype: str | None = None) -> None:
    """Check that ``actual`` (a written adapter read back) holds every delta of ``expected``.

    Raises:
        UnsupportedError: a module, magnitude, bias or modules_to_save tensor was lost or differs.
    """

    def key(name: str) -> str:
        if base is not None and len(base.store):
            k = base.weight_name(name)
            if k is not None:
                return k[: -len(".weight")]
        return name

    got = {key(n): m for n, m in actual.modules.items()}
    for name, m in expected.modules.items():
        other = got.pop(key(name), None)
        if other is None:
            raise UnsupportedError(f"conversion check: module {name} is missing from the written adapter; nothing was written")
        if (other.out_features, other.in_features) != (m.out_features, m.in_features):
            raise UnsupportedError(f"conversion check: {name} changed shape ({m.out_features}x{m.in_features} -> {other.out_features}x{other.in_features})")
        tol = _tolerance(m.A.dtype, m.B.dtype, other.A.dtype, other.B.dtype, outtype=outtype)
        diff, norm = _gram_distance(m, other)
        if not (diff <= tol * max(norm, 1e-30)) and not (norm == 0 and diff == 0):
            raise UnsupportedError(f"conversion check: the delta of {name} differs by {diff / max(norm, 1e-30):.3g} (relative) after writing; nothing was written")
        for what in ("magnitude", "bias"):
            t1, t2 = getattr(m, what), getattr(other, what)
            if (t1 is None) != (t2 is None):
                raise UnsupportedError(f"conversion check: the {what} of {name} was lost; nothing was written")
            if t1 is not None:
                x1, x2 = t1.load().double(), t2.load().double()
                if what == "bias":
                    x1, x2 = x1 * m.scale, x2 * other.scale
                if x1.shape != x2.shape or not torch.allclose(x1, x2, rtol=tol, atol=tol * float(x1.abs().max().clamp_min(1e-30))):
                    raise UnsupportedError(f"conversion check: the {what} of {name} differs after writing; nothing was written")
    for name, m in got.items():  # a format may pad a fused layer with zero pairs: harmless
        if m.B.load().any() and m.A.load().any() and m.scale != 0:
            raise UnsupportedError(f"conversion check: the written adapter has an extra module {name}")
    saved = {key(n.rsplit('.', 1)[0]) + "." + n.rsplit(".", 1)[-1]: t for n, t in actual.modules_to_save.items()}
    for name, t in expected.modules_to_save.items():
        k = key(name.rsplit(".", 1)[0]) + "." + name.rsplit(".", 1)[-1]
        if k not in saved:
            raise UnsupportedError(f"conversion check: modules_to_save tensor {name} was lost; nothing was written")
        if not torch.equal(t.load().to(saved[k].dtype), saved[k].load()):
            raise UnsupportedError(f"conversion check: modules_to_save tensor {name} differs after writing; nothing was written")


def delta_error(m1: LoraModule, m2: LoraModule) -> float:
    """Relative Frobenius distance of two modules' deltas (0 when both are zero)."""
    diff, norm = _gram_distance(m1, m2)
    return 0.0 if diff == 0 else diff / max(norm, 1e-30) if norm else math.inf
