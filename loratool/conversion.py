"""``convert``: any adapter format to any other, through the canonical model.

The source is read into canonical form (detecting its format unless told), the target
writer refuses what its format cannot hold (DoRA, a LoRA bias, modules_to_save...) unless it
can bake it in exactly, and the written result is read back and compared with the source,
module by module, before it replaces OUT: a conversion never drops a delta silently.

Saved copies of base layers (PEFT's ``save_embedding_layers``) are not deltas: for a target
that holds only LoRA factors, a copy identical to the base's tensor is dropped with a
warning, and one that differs is refused (``drop_identical_copies``).
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
from loratool.base import (
    BaseModel,
    bind_adapter,
    bind_with_tied_heads,
    read_model_config,
)
from loratool.engine.delta import combination_norm
from loratool.errors import FormatError, InputError, UnsupportedError
from loratool.formats import (
    FORMATS,
    READ_OPTIONS,
    WRITE_CONTEXT,
    check_writable,
    detect_format,
    format_names,
    format_options,
    get_format,
    read_adapter,
)
from loratool.hub import resolve_path
from loratool.io.atomic import atomic_output_dir, atomic_output_file
from loratool.io.store import TensorStore, checkpoint_files

_MERGE_HINT = "merge the adapter into the base instead (loratool merge BASE ADAPTER OUT)"
_CHUNK_ROWS = 4096

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
            return BaseModel(path=path, config=read_model_config(path / "config.json"), store=TensorStore([]))
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
    experts: str | None = None,
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
        experts: "per-expert" writes fused MoE expert modules as one LoRA pair per stored expert
            tensor (needs ``base``); "fused" groups per-expert modules into PEFT's fused
            ``target_parameters`` layout (``loratool.experts``); both exact.
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
    adapter = _expert_layout(adapter, experts, base_model)
    target = FORMATS[to]
    if adapter.saved_copies and not target.holds_full_tensors:
        # before the shape checks: a resized vocabulary is explained by its copy
        adapter = drop_identical_copies(adapter, base_model, holder=target.title)
    if base_model is not None and len(base_model.store):
        # PEFT loads a LoRA on a head the base ties to its embedding (and does not store): keep it;
        # the other formats name tensors of the base and refuse it as before
        adapter = bind_with_tied_heads(base_model, adapter, [])[0] if to == "peft" else bind_adapter(adapter, base_model).adapter

    out = Path(out)
    mod = get_format(to)
    inputs = [p for p in [src_path, *adapter.files, base_model.path if base_model is not None else None] if p is not None]
    report: dict[str, Any] = {"baked": [], "notes": []}
    write_opts = format_options(mod.write, dict(options, base=base_model, out_name=out.name, report=report), context=WRITE_CONTEXT, what=f"--to {to}")
    is_file = bool(getattr(mod, "OUTPUT_IS_FILE", False))
    check = bool(verify)
    check_writable(adapter, to)  # before OUT or its temporary sibling exists
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
                    compare(adapter, read_back(written, to, base=base_model), base=base_model, outtype=options.get("outtype"))
                os.replace(written, tmp)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        else:
            mod.write(adapter, tmp, **write_opts)
            if check:
                compare(adapter, read_back(tmp, to, base=base_model), base=base_model, outtype=options.get("outtype"))
    return {
        "source": str(src_path) if src_path is not None else None,
        "from": adapter.format,
        "to": to,
        "out": str(out),
        "modules": len(adapter),
        "modules_to_save": sorted(adapter.trained_to_save),
        "saved_copies": sorted(adapter.saved_copies),
        "verified": check,
        "baked": report["baked"],
        "notes": report["notes"],
        "warnings": list(adapter.warnings),
    }


def _expert_layout(adapter: Adapter, experts: str | None, base: BaseModel | None) -> Adapter:
    """The adapter with its MoE experts in the layout asked for (``experts``), or as it is."""
    if experts is None:
        return adapter
    from loratool.experts import to_fused, to_per_expert

    if experts == "fused":
        return to_fused(adapter)
    if experts != "per-expert":
        raise InputError(f"--experts must be fused or per-expert, got {experts!r}")
    if base is None or not len(base.store):
        raise InputError("--experts per-expert needs --base (the per-expert tensor names come from the base checkpoint)")
    return to_per_expert(adapter, base)


def drop_identical_copies(adapter: Adapter, base: BaseModel | None, *, holder: str) -> Adapter:
    """The adapter without its saved base-layer copies, each checked to equal the base's tensor.

    A copy (PEFT's ``save_embedding_layers``) restates the base layer; a format that holds only
    LoRA factors loses nothing by leaving out one that is bit-identical to the base (same
    values where the dtypes differ). Each dropped copy is reported as a warning of the
    returned adapter; ``adapter`` itself is not changed.

    Args:
        adapter: the adapter read from SRC.
        base: the base given to convert (``--base``); when None or config-only, the adapter's
            own ``base_model_name_or_path`` is used if it is a local folder or in the Hub cache.
        holder: the target format's name, for messages.
    Raises:
        UnsupportedError: no base to check against, the base lacks the tensor, or a copy differs
            from it (a resized vocabulary, a trained embedding): naming the tensor, both shapes
            and the largest absolute difference.
    """
    reference = _reference_base(adapter, base)
    notes = []
    for name, copy in sorted(adapter.saved_copies.items()):
        if reference is None:
            raise UnsupportedError(_no_base_message(adapter, name, copy, holder))
        notes.append(_check_copy(name, copy, reference, holder))
    return adapter.without_saved_copies(adapter.saved_copies, warnings=notes)


def read_back(path: Path, to: str, *, base=None) -> Adapter:
    """A written adapter read as a user would read it: its format detected from its content.

    Raises:
        FormatError: loratool would not recognize its own output as ``to``.
    """
    found = detect_format(path)
    if found != to:
        raise FormatError(path, f"written as {to} but read back as {found}: loratool would not recognize its own output")
    return read_adapter(path, base=base)


def _reference_base(adapter: Adapter, base: BaseModel | None) -> BaseModel | None:
    """A base with weights to check saved copies against: ``base``, else the adapter's own base
    when it is a local folder or cached from the Hub (never downloaded), else None."""
    if base is not None and len(base.store):
        return base
    name = adapter.base_model
    if not name:
        return None
    try:
        path = Path(name) if Path(name).is_dir() else resolve_path(name, kind="model", local_only=True)
        found = BaseModel.open(path)
    except (InputError, OSError):
        return None
    return found if len(found.store) else None


def _no_base_message(adapter: Adapter, name: str, copy, holder: str) -> str:
    """The refusal for a saved copy that no base can vouch for."""
    recorded = f" (its base {adapter.base_model} is neither a local folder nor in the Hub cache)" if adapter.base_model else ""
    return (
        f"{name}: the adapter carries a saved copy of this base layer {tuple(copy.shape)} (PEFT save_embedding_layers) "
        f"that {holder} cannot hold{recorded}; pass --base so loratool can check that it equals the base's tensor and drop it"
    )


def _check_copy(name: str, copy, base: BaseModel, holder: str) -> str:
    """The note for a saved copy identical to the base's tensor.

    Raises:
        UnsupportedError: the base lacks the tensor, or the copy differs from it.
    """
    key = _base_tensor_key(base, name)
    if key is None:
        raise UnsupportedError(
            f"{name}: the adapter carries a saved copy of this base layer {tuple(copy.shape)} but the base {base.path} "
            f"has no such tensor; {holder} holds only LoRA factors, so {_MERGE_HINT}"
        )
    saved, original = copy.load(), base.store.get(key)
    if _bit_identical(saved, original):
        same = "bit-identical" if saved.dtype == original.dtype else f"equal in value ({_dtype_name(saved.dtype)} vs {_dtype_name(original.dtype)})"
        return (
            f"{name}: dropped the adapter's saved copy of the base layer {tuple(saved.shape)} (PEFT save_embedding_layers): "
            f"{same} to {key} of the base {base.path}, which {holder} uses as it is"
        )
    raise UnsupportedError(_differs_message(name, saved, key, original, holder))


def _differs_message(name: str, saved: torch.Tensor, key: str, original: torch.Tensor, holder: str) -> str:
    """The refusal for a saved copy that differs from the base: both shapes, the largest difference."""
    resized = saved.shape != original.shape
    over = f" over the common {tuple(min(a, b) for a, b in zip(saved.shape, original.shape))}" if resized else ""
    dtypes = "" if saved.dtype == original.dtype else f"; saved as {_dtype_name(saved.dtype)}, base {_dtype_name(original.dtype)}"
    # merging into a base of another shape is refused as well: it needs the adapter's own (resized) base
    remedy = (
        f"so {_MERGE_HINT}" if not resized
        else "and the shapes differ (a resized vocabulary), so merge the adapter into a base of its own vocabulary instead (loratool merge BASE ADAPTER OUT)"
    )
    return (
        f"{name}: the adapter's saved copy of the base layer {tuple(saved.shape)} differs from the base's {key} "
        f"{tuple(original.shape)} (largest absolute difference {_max_abs_difference(saved, original):.6g}{over}{dtypes}); "
        f"{holder} holds only LoRA factors, {remedy}"
    )


def _base_tensor_key(base: BaseModel, name: str) -> str | None:
    """The base's key for tensor ``name``; a tied output head the checkpoint lacks is its input embedding."""
    key = base.tensor_name(name)
    if key is not None or not name.endswith(".weight"):
        return key
    return base.tied_head_key(name[: -len(".weight")])


def _bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and same bits (same dtype), or the same values exactly (different dtypes)."""
    if a.shape != b.shape:
        return False
    if a.dtype == b.dtype and a.dtype.itemsize in _BITS:
        bits = _BITS[a.dtype.itemsize]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return _max_abs_difference(a, b) == 0.0


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a - b| over the block both tensors cover, in float64, a chunk of rows at a time."""
    if a.dim() != b.dim():
        return math.nan
    common = tuple(slice(0, min(x, y)) for x, y in zip(a.shape, b.shape))
    a, b = a[common], b[common]
    if a.numel() == 0:
        return 0.0
    if a.dim() == 0:
        return abs(float(a.double() - b.double()))
    worst = 0.0
    for start in range(0, a.shape[0], _CHUNK_ROWS):
        diff = (a[start:start + _CHUNK_ROWS].double() - b[start:start + _CHUNK_ROWS].double()).abs()
        if diff.isnan().any():
            return math.nan
        worst = max(worst, float(diff.max()))
    return worst


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _gram_distance(m1: LoraModule, m2: LoraModule) -> tuple[float, float]:
    """(||dW1 - dW2||_F, ||dW1||_F) from the factors, never forming the (out, in) deltas."""
    return combination_norm([m1, m2], [1.0, -1.0]), combination_norm([m1], [1.0])


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
