"""The weight check: every tensor of MERGED against BASE + the adapter, streamed one tensor at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratool.adapter import Adapter, LoraModule
from loratool.base import _BUFFER_SUFFIXES, BaseModel, bind_adapter
from loratool.engine.codecs import bnb
from loratool.engine.combine import CombinedTerm, CombineSpec, combined_delta
from loratool.engine.delta import DeltaKernel, ExpertsKernel, dora_merged, dora_rows
from loratool.errors import InputError
from loratool.io.store import TensorEntry, TensorStore, entries_in_file_order
from loratool.names import is_output_head
from loratool.verify._common import (
    U32,
    Progress,
    _bits_equal,
    _coarser,
    _dtype_name,
    _gamma,
    _norm,
    _num,
    _open_adapter,
    _open_model,
    _ratio,
    _subnormal,
    _Views,
    unit_roundoff,
)

# ----------------------------------------------------------------------------- quantized tensors


def _quant_kind(merged: BaseModel, key: str) -> str | None:
    """"4bit" / "int8" when the merged checkpoint stores ``key`` quantized by bitsandbytes."""
    if key not in merged.store or merged.store.dtype(key).is_floating_point:
        return None
    return bnb.stored_kind(key, merged.store)


def _dequantize(merged: BaseModel, key: str, device) -> bnb.Decoded:
    """The merged weight ``key`` decoded by the bitsandbytes codec, with its requantizer."""
    names = [key, *bnb.aux_keys(key, merged.store)]
    return bnb.decode_stored(bnb.relative_entries(key, {k: merged.store.get(k) for k in names}), device=device)


# ----------------------------------------------------------------------------- per-tensor checks


@dataclass
class _Check:
    name: str
    tensor: str
    kind: str  # lora | dora | lora_bias | modules_to_save
    dtype: str | None
    shape: list[int]
    delta_norm: float = 0.0
    residual_norm: float = 0.0
    bound_norm: float | None = None
    passed: bool | None = None
    status: str = "ok"
    applied_fraction: float | None = None
    retention: float | None = None
    expected_retention: float | None = None
    quantization: str | None = None
    hint: str | None = None

    @property
    def residual(self) -> float:
        return _ratio(self.residual_norm, self.delta_norm)

    @property
    def bound(self) -> float | None:
        return None if self.bound_norm is None else _ratio(self.bound_norm, self.delta_norm)

    def as_dict(self, tolerance: float | None) -> dict[str, Any]:
        d = {
            "name": self.name,
            "tensor": self.tensor,
            "kind": self.kind,
            "dtype": self.dtype,
            "shape": self.shape,
            "status": self.status,
            "passed": self.passed,
            "residual": _num(self.residual) if self.delta_norm > 0 or self.residual_norm == 0 else None,
            "bound": _num(self.bound),
            "tolerance": tolerance if tolerance is not None else _num(self.bound),
            "delta_norm": _num(self.delta_norm),
            "residual_norm": _num(self.residual_norm) if math.isfinite(self.residual_norm) else None,
            "applied_fraction": _num(self.applied_fraction),
            "hint": self.hint,
        }
        if self.quantization is not None:
            d["quantization"] = self.quantization
            d["retention"] = _num(self.retention)
            d["expected_retention"] = _num(self.expected_retention)
        return d

    def sort_key(self) -> tuple:
        # failures first, then by residual relative to what was allowed
        order = {"missing": 0, "fail": 1, "quantized": 2, "ok": 3}.get(self.status, 3)
        if self.quantization is not None:
            score = -abs((self.expected_retention or 0.0) - (self.retention or 0.0))
        else:
            allowed = self.bound_norm if self.bound_norm else 0.0
            score = -_ratio(self.residual_norm, allowed) if math.isfinite(self.residual_norm) else -math.inf
        return (order, score, self.name)


def _judge(check: _Check, tolerance: float | None) -> None:
    """Set passed/status from the residual and the bound (or the user's tolerance)."""
    if not math.isfinite(check.residual_norm):
        check.passed, check.status = False, "fail"
        check.hint = check.hint or "merged tensor holds NaN or Inf"
        return
    if tolerance is not None:
        ok = check.residual <= tolerance
    else:
        ok = check.residual_norm <= check.bound_norm
    check.passed = bool(ok)
    check.status = "ok" if ok else "fail"


def _hint(k: float, delta_rel_perp: float, module: LoraModule | None) -> str | None:
    """Describe a failed module's residual: a scaled delta, or something else."""
    if not math.isfinite(k):
        return None
    if delta_rel_perp < max(abs(k - 1) / 2, 1e-12):
        text = f"merged delta is {k:.3g} x the expected one"
        if abs(k) < 0.05:
            return "delta not applied (the tensor equals the base)"
        if abs(k - 2) < 0.05:
            return text + " (applied twice?)"
        if module is not None and module.rank > 1:
            root = math.sqrt(module.rank)
            if abs(k - root) < 0.05 * root or abs(k - 1 / root) < 0.05 / root:
                return text + " (alpha/r vs alpha/sqrt(r) scale mix-up?)"
        return text
    return None


def _row_hint(row_res: torch.Tensor, what: str = "rows") -> str | None:
    """When the residual sits in a contiguous block of rows, name the block."""
    sq = row_res.double() ** 2
    total = float(sq.sum())
    if total <= 0 or sq.numel() < 2:
        return None
    order = torch.argsort(sq, descending=True)
    cum = torch.cumsum(sq[order], 0)
    n = int(torch.searchsorted(cum, 0.99 * total).item()) + 1
    rows = torch.sort(order[:n]).values
    lo, hi = int(rows[0]), int(rows[-1])
    span = hi - lo + 1
    # a hint only when the residual is confined to one contiguous block of a minority of rows
    if span > max(n, 1) * 1.05 + 1 or span > sq.numel() // 2:
        return None
    where = f"{what[:-1]} {lo}" if span == 1 else f"{what} {lo}-{hi}"
    return f"residual sits in {where} of {sq.numel()} (a block missing or wrong)"


def _lora_bound(*, Enorm: float, dnorm: float, rnorm: float, fac: float, rank: int, numel: int,
                merged_dtype: torch.dtype, store_dtype: torch.dtype, factor_dtype: torch.dtype) -> float:
    """Largest ||M - (W + dW)|| (Frobenius) a correct merge can show.

    A correct merger may store W + dW, and intermediates (dW, scale * B @ A) in the coarser of the
    base and merged dtypes (``us`` per rounding), may have cast the factors to that dtype when it
    is coarser than theirs (``uf``), accumulates in float32 (gamma_r), and the check itself adds
    float32 roundings. Elementwise bounds |err| <= u |x| sum in quadrature to u ||x||_F, and
    || |s| |B||A| ||_F <= |s| ||B||_F ||A||_F (``fac``).
    """
    us = unit_roundoff(store_dtype)  # store_dtype is at least as coarse as the merged dtype
    uf = us if torch.finfo(store_dtype).eps > torch.finfo(factor_dtype).eps else 0.0
    theirs = us * Enorm + 2 * us * dnorm + 2 * uf * fac + U32 * (Enorm + dnorm) + _gamma(rank, U32) * fac
    ours = U32 * (dnorm + rnorm) + _gamma(rank + 1, U32) * (dnorm + rnorm + fac)
    return theirs + ours + math.sqrt(numel) * _subnormal(merged_dtype)


def _check_lora(module: LoraModule, W: torch.Tensor, M: torch.Tensor, *, name: str, key: str,
                merged_dtype: torch.dtype, base_dtype: torch.dtype, device) -> tuple:
    """Plain LoRA: R = M - W - dW, computed in the weight's own layout without forming dW."""
    k = DeltaKernel.of(module, device=device)
    A, B, s = k.A, k.B, k.scale
    check = _Check(name, key, "lora", _dtype_name(merged_dtype), list(M.shape))
    if M.dim() != 2:
        raise InputError(f"{module.name}: expected a 2-D weight, got shape {tuple(M.shape)}")
    mnorm, check.residual_norm, dot = k.residual_norms(W, M)
    check.delta_norm = math.sqrt(k.norm_sq())
    if check.delta_norm > 0 and math.isfinite(dot):
        check.applied_fraction = 1 + dot / check.delta_norm**2
    fac = abs(s) * float(torch.linalg.vector_norm(B)) * float(torch.linalg.vector_norm(A))
    check.bound_norm = _lora_bound(
        Enorm=mnorm + check.residual_norm, dnorm=check.delta_norm, rnorm=check.residual_norm, fac=fac,
        rank=module.rank, numel=M.numel(), merged_dtype=merged_dtype, store_dtype=_coarser(merged_dtype, base_dtype),
        factor_dtype=module.A.dtype if module.A.dtype.is_floating_point else torch.float32,
    )
    return check, k


def _diagnose_lora(check: _Check, module: LoraModule, kernel: DeltaKernel, W: torch.Tensor, M: torch.Tensor) -> None:
    """On failure: how much of the delta is there, and where the residual sits."""
    R = kernel.residual(W, M)
    dn = check.delta_norm
    k = check.applied_fraction
    if dn > 0 and k is not None and math.isfinite(check.residual_norm):
        perp = math.sqrt(max(check.residual_norm**2 - (k - 1) ** 2 * dn**2, 0.0)) / dn
        check.hint = _hint(k, perp, module)
        if check.hint is None and R.shape[0] == R.shape[1]:
            dW = kernel.dense()
            alt = _norm(R + dW - dW.T)
            if alt <= check.bound_norm:
                check.hint = "delta transposed"
    if check.hint is None and R.dim() == 2:
        check.hint = _row_hint(torch.linalg.vector_norm(R, dim=1))
    if check.hint is None:
        check.hint = "residual is not along the delta (another module's delta, or a different adapter?)"


def _check_dora(module: LoraModule, W: torch.Tensor, M: torch.Tensor, *, name: str, key: str,
                merged_dtype: torch.dtype, base_dtype: torch.dtype, device) -> tuple:
    """DoRA: W' = m / ||W + dW||_row * (W + dW), rows of the (out, in) weight (PEFT's merge)."""
    k = DeltaKernel.of(module, device=device)
    A, B, s = k.A, k.B, k.scale
    t = k.transposed
    Wo = W.to(torch.float32)
    Wo = Wo.T if t else Wo
    Mo = M.to(torch.float32)
    Mo = Mo.T if t else Mo
    E = torch.addmm(Wo, B, A, alpha=s)  # (out, in)
    n = torch.linalg.vector_norm(E, dim=1)
    mag = module.magnitude.load().to(device=device, dtype=torch.float32).reshape(-1)
    if mag.numel() != E.shape[0]:
        raise InputError(f"{name}: DoRA magnitude has {mag.numel()} entries, the weight has {E.shape[0]} output rows")
    Wp = dora_rows(E.clone(), mag)
    R = Mo - Wp
    D = Wp - Wo
    check = _Check(name, key, "dora", _dtype_name(merged_dtype), list(M.shape))
    check.residual_norm = _norm(R)
    check.delta_norm = _norm(D)
    # per-row error bound (see docs/verify.md): a row of W' has norm |m|, and its error comes from
    # the error e of the merger's W + dW row, the row norm (float32 accumulation over `in` terms)
    # and three roundings (norm, factor, product) at the storage precision, plus the final store.
    store = _coarser(merged_dtype, base_dtype)
    us, um = unit_roundoff(store), unit_roundoff(merged_dtype)
    factor_dtype = module.A.dtype if module.A.dtype.is_floating_point else torch.float32
    uf = us if torch.finfo(store).eps > torch.finfo(factor_dtype).eps else 0.0
    n_in = E.shape[1]
    row_B = torch.linalg.vector_norm(B, dim=1).double()
    normA = float(torch.linalg.vector_norm(A))
    dW_rows = torch.linalg.vector_norm(E - Wo, dim=1).double()
    En = n.double().clamp_min(torch.finfo(torch.float32).tiny)
    e_theirs = us * (En + 2 * dW_rows) + U32 * En + (2 * uf + _gamma(module.rank, U32)) * abs(s) * row_B * normA
    e_ours = U32 * En + _gamma(module.rank, U32) * abs(s) * row_B * normA
    m_abs = mag.double().abs()
    rel = (2 * (e_theirs + e_ours) / En) + 2 * _gamma(n_in, U32) + 3 * us + 3 * U32 + max(um, uf)
    rows = m_abs * rel + U32 * torch.linalg.vector_norm(R, dim=1).double()
    check.bound_norm = float(torch.linalg.vector_norm(rows)) + math.sqrt(M.numel()) * _subnormal(merged_dtype)
    if check.delta_norm > 0:
        check.applied_fraction = 1 + float((R.double() * D.double()).sum()) / check.delta_norm**2
    return check, R, D


def _diagnose_dora(check: _Check, R: torch.Tensor, D: torch.Tensor) -> None:
    dn = check.delta_norm
    k = check.applied_fraction
    if dn > 0 and k is not None and math.isfinite(check.residual_norm):
        perp = math.sqrt(max(check.residual_norm**2 - (k - 1) ** 2 * dn**2, 0.0)) / dn
        check.hint = _hint(k, perp, None)
    if check.hint is None:
        check.hint = _row_hint(torch.linalg.vector_norm(R, dim=1), "output rows")
    if check.hint is None:
        check.hint = "residual is not along the DoRA update"


def _check_plain(name: str, key: str, kind: str, expected: torch.Tensor, M: torch.Tensor, reference: torch.Tensor | None,
                 *, merged_dtype: torch.dtype, extra_u: float = 0.0, extra_norm: float = 0.0) -> _Check:
    """A tensor that must equal ``expected`` up to storage rounding; the delta is expected - reference."""
    check = _Check(name, key, kind, _dtype_name(merged_dtype), list(M.shape))
    E = expected.to(torch.float32)
    R = M.to(torch.float32) - E
    check.residual_norm = _norm(R)
    if reference is not None and tuple(reference.shape) == tuple(E.shape):
        check.delta_norm = _norm(E - reference.to(torch.float32))
    else:
        check.delta_norm = _norm(E)
    En = _norm(E)
    check.bound_norm = (unit_roundoff(merged_dtype) + 2 * U32) * En + extra_u * extra_norm + math.sqrt(max(M.numel(), 1)) * _subnormal(merged_dtype)
    if check.delta_norm > 0 and math.isfinite(check.residual_norm) and reference is not None and tuple(reference.shape) == tuple(E.shape):
        D = (E - reference.to(torch.float32)).double()
        k = 1 + float((R.double() * D).sum()) / check.delta_norm**2
        check.applied_fraction = k
    return check


# ----------------------------------------------------------------------------- the weight check


def verify_weights(
    base: BaseModel | str | Path,
    adapter: Adapter | str | Path,
    merged: BaseModel | str | Path,
    *,
    tolerance: float | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    combine: CombineSpec | None = None,
) -> dict[str, Any]:
    """Check, tensor by tensor, that MERGED = BASE + ADAPTER (or BASE + the combination of several).

    Reads one tensor of each model at a time (the adapter's small factors are read per module).

    Args:
        base: the base model (folder or ``BaseModel``).
        adapter: the adapter (path or ``Adapter``), in any format loratool reads.
        merged: the merged model (folder or ``BaseModel``), possibly bitsandbytes-quantized.
        tolerance: a fixed limit on residual / ||delta|| replacing the bound derived from the dtypes
            (for a quantized MERGED: a limit on |1 - retention|).
        device: where to compute ("cpu", "cuda", ...).
        progress: called as ``progress(nbytes, label)`` after each base tensor.
        combine: ``adapter`` is a list of adapters merged together as this spec says (method,
            weights, density, seed): each weight must be W + their combined delta (``engine.combine``).
    Returns:
        A JSON-ready report: ``passed``, ``modules`` (worst first), ``untouched``, ``missing``,
        ``extra``, ``notes`` and ``summary``.
    Raises:
        InputError (ModuleMismatchError, FormatError): the adapter does not fit the base, files are unreadable.
        UnsupportedError: a quantized MERGED without bitsandbytes.
    """
    if tolerance is not None and (not math.isfinite(tolerance) or tolerance < 0):
        raise InputError(f"tolerance must be a non-negative number, got {tolerance}")
    base_m = _open_model(base)
    merged_m = _open_model(merged)
    if combine is not None or isinstance(adapter, (list, tuple)):
        adapters = [_open_adapter(a) for a in (adapter if isinstance(adapter, (list, tuple)) else [adapter])]
        notes: list[str] = [w for a in adapters for w in a.warnings]
        targets = _Targets.of_combination(adapters, base_m, combine or CombineSpec.checked(len(adapters)))
    else:
        ad = _open_adapter(adapter)
        notes = list(ad.warnings)
        base_m = _dequantized_view(base_m, ad, notes)
        targets = _Targets.of(ad, base_m)
    run = _WeightRun(base_m, merged_m, targets, tolerance, torch.device(device), notes)
    threads = torch.get_num_threads()
    if run.device.type == "cpu":
        # the work comes in cache-sized blocks, too small for threads to pay off (and threads
        # that spin-wait on a busy machine cost far more than they give)
        torch.set_num_threads(1)
    grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # adapter tensors loaded from pickles may require grad
    try:
        for entry in entries_in_file_order(base_m.store):
            try:
                run.check_entry(entry)
            finally:
                if progress is not None:
                    progress(int(math.prod(entry.shape)) * entry.dtype.itemsize, entry.name)
        run.check_additions()
    finally:
        run.views.close()
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
    run.check_orphan_biases()
    extra = run.extras()
    return _report(base_m, run.targets.adapter, merged_m, run.checks, run.untouched, run.missing, extra, notes, tolerance, run.quantized)


@dataclass
class _Targets:
    """What the adapter does to each base tensor: a module's delta (``by_key``), a lora_bias
    (``bias_of``), a modules_to_save replacement (``to_save``), or a tensor it adds (``save_pending``)."""

    adapter: Adapter  # bound to the base
    by_key: dict[str, LoraModule]
    bias_of: dict[str, LoraModule | list[LoraModule]]
    to_save: dict[str, tuple[str, Any]]  # base key -> (adapter name, lazy tensor)
    save_pending: dict[str, Any]
    combined: dict[str, CombinedTerm] = field(default_factory=dict)  # base key -> several adapters' term

    @classmethod
    def of(cls, ad: Adapter, base: BaseModel) -> "_Targets":
        binding = bind_adapter(ad, base)
        ad, mapping = binding.adapter, binding.keys  # module -> base weight key
        by_key = {key: ad.modules[name] for name, key in mapping.items() if name not in binding.experts}
        for name, layout in binding.experts.items():  # fused experts: the module, or a linear term per stored expert tensor
            by_key.update(layout.terms(ad.modules[name]))
        bias_of = {key[: -len("weight")] + "bias": ad.modules[name] for name, key in mapping.items() if ad.modules[name].bias is not None}
        to_save: dict[str, tuple[str, Any]] = {}
        pending: dict[str, Any] = {}
        for tname, lazy in ad.modules_to_save.items():
            bkey = base.tensor_name(tname)
            if bkey is not None:
                to_save[bkey] = (tname, lazy)
            else:
                pending[tname] = lazy
        return cls(ad, by_key, bias_of, to_save, pending)

    @classmethod
    def of_combination(cls, adapters: list[Adapter], base: BaseModel, spec: CombineSpec) -> "_Targets":
        """Several adapters merged together: the terms the merge planned (``merge.plan_combined_merge``)."""
        from loratool.merge import plan_combined_merge

        plan = plan_combined_merge(base, adapters, spec)
        combined = {t.name: t.combined for t in plan.tasks() if t.combined is not None}
        bias_of = {t.name: list(t.biases) for t in plan.tasks() if t.biases}
        to_save: dict[str, tuple[str, Any]] = {}
        pending: dict[str, Any] = {}
        for t in plan.tasks():
            if t.replacement is not None:
                target = to_save if t.source is not None else pending
                target[t.name] = (t.name, t.replacement) if t.source is not None else t.replacement
        return cls(plan.adapter, {}, bias_of, to_save, pending, combined)


class _WeightRun:
    """One pass of the weight check: the per-tensor checks and what they found."""

    def __init__(self, base: BaseModel, merged: BaseModel, targets: _Targets, tolerance: float | None, device: torch.device, notes: list[str]):
        self.base, self.merged, self.targets = base, merged, targets
        self.tolerance, self.device, self.notes = tolerance, device, notes
        self.views = _Views()
        self.consumed: set[str] = set()
        self.checks: list[_Check] = []
        self.untouched = {"checked": 0, "identical": 0, "cast": 0, "quantized": 0, "differ": []}
        self.missing: list[str] = []
        self.quantized = False

    def merged_key(self, bkey: str) -> str | None:
        return bkey if bkey in self.merged.store else self.merged.tensor_name(bkey)

    def check_entry(self, entry: TensorEntry) -> None:
        """The base tensor against its counterpart in MERGED, by what the adapter does to it."""
        bkey, t, mstore = entry.name, self.targets, self.merged.store
        mkey = self.merged_key(bkey)
        if mkey is None:
            self._absent(entry)
            return
        self.consumed.add(mkey)
        qkind = _quant_kind(self.merged, mkey) if not mstore.dtype(mkey).is_floating_point and entry.dtype.is_floating_point else None
        if qkind is not None:
            self.quantized = True
            self.consumed.update(bnb.aux_keys(mkey, mstore))
        args = (self.base, self.merged, bkey, mkey)
        if bkey in t.by_key:
            # PEFT's saved base_layer.weight (or a modules_to_save copy) replaces the base weight first
            replaced = t.to_save[bkey][1].load() if bkey in t.to_save else None
            self.checks.append(_weight_check(t.by_key[bkey], *args, qkind, self.tolerance, self.device, self.views, replaced))
        elif bkey in t.combined:
            replaced = t.to_save[bkey][1].load() if bkey in t.to_save else None
            self.checks.append(_combined_check(t.combined[bkey], *args, self.tolerance, self.device, self.views, replaced))
        elif bkey in t.bias_of:
            self.checks.append(_bias_check(t.bias_of[bkey], *args, self.tolerance, self.device))
        elif bkey in t.to_save:
            tname, lazy = t.to_save[bkey]
            self.checks.append(_save_check(tname, lazy, *args, self.tolerance, self.device))
        else:
            _untouched_check(self.base, self.merged, entry, mkey, qkind, self.untouched, self.device, self.views)

    def _absent(self, entry: TensorEntry) -> None:
        """A base tensor MERGED does not store: a buffer, a tied head, or missing."""
        bkey = entry.name
        if bkey.endswith(_BUFFER_SUFFIXES):
            self.notes.append(f"{bkey}: buffer of the base not stored in the merged model")
        elif _tied_alias(self.base, self.merged, bkey):
            self.notes.append(f"{bkey}: tied to the input embedding in the merged model (not stored)")
        else:
            self.missing.append(bkey)
            mod = self.targets.by_key.get(bkey)
            if mod is not None:
                self.checks.append(_missing_check(mod.name, bkey, "dora" if mod.magnitude is not None else "lora", list(entry.shape)))
            elif bkey in self.targets.combined:
                self.checks.append(_missing_check(_combined_name(self.targets.combined[bkey]), bkey, "combined", list(entry.shape)))

    def check_additions(self) -> None:
        """modules_to_save tensors the base lacks (a new head): MERGED must carry them."""
        for tname, lazy in self.targets.save_pending.items():
            mkey = self.merged.tensor_name(tname)
            if mkey is None:
                self.missing.append(tname)
                self.checks.append(_missing_check(tname, tname, "modules_to_save", list(lazy.shape)))
                continue
            self.consumed.add(mkey)
            self.checks.append(_save_check(tname, lazy, None, self.merged, None, mkey, self.tolerance, self.device))

    def check_orphan_biases(self) -> None:
        """A lora_bias module whose base layer has no bias."""
        for bkey, mods in self.targets.bias_of.items():
            mod = mods[0] if isinstance(mods, list) else mods
            if bkey not in self.base.store:
                c = _Check(mod.name, bkey, "lora_bias", None, [mod.out_features])
                c.passed, c.status, c.residual_norm = False, "fail", math.inf
                c.hint = "the adapter has a lora_B bias but the base layer has no bias"
                self.checks.append(c)

    def extras(self) -> list[str]:
        """Tensors of MERGED no check consumed (buffers and tied copies become notes)."""
        extra = []
        for k in self.merged.store.keys():
            if k in self.consumed:
                continue
            if k.endswith(_BUFFER_SUFFIXES):
                self.notes.append(f"{k}: buffer stored in the merged model only")
            elif _tied_copy(self.merged, k):
                self.notes.append(f"{k}: a copy of the tied input embedding")
            else:
                extra.append(k)
        return extra


def _missing_check(name: str, tensor: str, kind: str, shape: list[int]) -> _Check:
    c = _Check(name, tensor, kind, None, shape)
    c.passed, c.status, c.residual_norm, c.hint = False, "missing", math.inf, "the merged model lacks this tensor"
    return c


def _dequantized_view(base: BaseModel, ad: Adapter, notes: list[str]) -> BaseModel:
    """A bitsandbytes-quantized BASE seen through its dequantized weights (what a merge into it starts from)."""
    try:
        from loratool.quantized import find_prequantized, setup_quantization
    except ImportError:  # pragma: no cover - the quantization support is part of loratool
        return base
    if isinstance(base.store, TensorStore) and find_prequantized(base):
        notes.append(f"{base.path}: BASE is quantized with bitsandbytes; MERGED is compared with its dequantized weights")
        return setup_quantization(base, ad, None)[0]
    return base


def _tied_alias(base: BaseModel, merged: BaseModel, key: str) -> bool:
    """An output embedding the merged model ties to its input embedding instead of storing."""
    if not merged.config.get("tie_word_embeddings", True):
        return False
    return _equals_input_embedding(base, key)


def _tied_copy(merged: BaseModel, key: str) -> bool:
    """An output embedding the merged model stores although it is tied (an identical copy)."""
    return bool(merged.config.get("tie_word_embeddings", True)) and _equals_input_embedding(merged, key)


def _equals_input_embedding(model: BaseModel, key: str) -> bool:
    """Whether ``key`` is an output head whose stored bits equal the model's input embedding."""
    if not key.endswith(".weight") or not is_output_head(key[: -len(".weight")]):
        return False
    emb = model.input_embedding_key()
    if emb is None or model.store.shape(emb) != model.store.shape(key):
        return False
    return _bits_equal(model.store.get(emb), model.store.get(key))


def _shape_fail(name: str, key: str, kind: str, M_shape, expected_shape, dtype) -> _Check:
    c = _Check(name, key, kind, _dtype_name(dtype), list(M_shape))
    c.passed, c.status, c.residual_norm = False, "fail", math.inf
    c.hint = f"merged tensor has shape {tuple(M_shape)}, expected {tuple(expected_shape)}"
    return c


def _weight_check(mod: LoraModule, base: BaseModel, merged: BaseModel, bkey: str, mkey: str, qkind: str | None,
                  tolerance: float | None, device, views: _Views, replaced: torch.Tensor | None = None) -> _Check:
    W = views.get(base.store, bkey) if replaced is None else replaced
    mdtype = merged.store.dtype(mkey)
    if qkind is not None:
        return _quantized_check(mod, W.to(device), merged, bkey, mkey, qkind, tolerance, device)
    M = views.get(merged.store, mkey)
    kind = "dora" if mod.magnitude is not None else "experts" if mod.experts else "lora"
    if mod.experts:
        return _experts_check(mod, W, M, mkey, mdtype, tolerance, device)
    if tuple(M.shape) != tuple(W.shape):
        return _shape_fail(mod.name, mkey, kind, M.shape, W.shape, mdtype)
    if not mdtype.is_floating_point:
        c = _Check(mod.name, mkey, kind, _dtype_name(mdtype), list(M.shape))
        c.passed, c.status, c.residual_norm = False, "fail", math.inf
        c.hint = f"merged tensor is {_dtype_name(mdtype)} but not a recognised bitsandbytes layout"
        return c
    if mod.magnitude is not None:
        check, R, D = _check_dora(mod, W.to(device), M.to(device), name=mod.name, key=mkey, merged_dtype=mdtype, base_dtype=W.dtype, device=device)
        _judge(check, tolerance)
        if not check.passed:
            _diagnose_dora(check, R, D)
        return check
    check, kernel = _check_lora(mod, W, M, name=mod.name, key=mkey, merged_dtype=mdtype, base_dtype=W.dtype, device=device)
    _judge(check, tolerance)
    if not check.passed:
        _diagnose_lora(check, mod, kernel, W, M)
    return check


def _experts_check(mod: LoraModule, W: torch.Tensor, M: torch.Tensor, mkey: str, mdtype: torch.dtype, tolerance, device) -> _Check:
    """A fused experts tensor: M = W + dW_e for every expert (the stored 3-D layout), one expert at a
    time (a fused tensor can be the size of a small model): the sums of ``_check_plain``, streamed."""
    if tuple(M.shape) != tuple(W.shape):
        return _shape_fail(mod.name, mkey, "experts", M.shape, W.shape, mdtype)
    kernel = ExpertsKernel.of(mod, device=device)
    sums = dict(e2=0.0, r2=0.0, d2=0.0, rd=0.0, w2=0.0)
    for e in range(W.shape[0]):
        w = W[e].to(device=device, dtype=torch.float32)  # (d1, d2)
        d = kernel.add_(torch.zeros((1, *w.shape), device=device), e)[0]  # dW_e, stored layout
        exp = w + d
        r = M[e].to(device=device, dtype=torch.float32) - exp
        for key, x, y in (("e2", exp, exp), ("r2", r, r), ("d2", d, d), ("rd", r, d), ("w2", w, w)):
            sums[key] += float(torch.sum(x.double() * y.double()))
    c = _Check(mod.name, mkey, "experts", _dtype_name(mdtype), list(M.shape))
    c.residual_norm, c.delta_norm = math.sqrt(sums["r2"]), math.sqrt(sums["d2"])
    extra = unit_roundoff(W.dtype) * math.sqrt(sums["w2"]) if W.dtype != torch.float32 else 0.0
    c.bound_norm = (unit_roundoff(mdtype) + 2 * U32) * math.sqrt(sums["e2"]) + extra + math.sqrt(max(M.numel(), 1)) * _subnormal(mdtype)
    if c.delta_norm > 0 and math.isfinite(c.residual_norm):
        c.applied_fraction = 1 + sums["rd"] / c.delta_norm**2
    _judge(c, tolerance)
    if not c.passed:
        k = c.applied_fraction
        c.hint = (f"about {k:.3g} of the experts' delta is there" if k is not None else None) or "differs from base + the experts' delta"
    return c


def _quantized_check(mod: LoraModule, W: torch.Tensor, merged: BaseModel, bkey: str, mkey: str, qkind: str,
                     tolerance: float | None, device) -> _Check:
    """A quantized merged weight: how much of the delta survived quantization.

    retention = <deq(M) - Q(W), dW> / ||dW||^2, where Q re-quantizes with the merged tensor's own
    scheme; expected_retention is the same for Q(W + dW), what a correct merge quantized would
    keep; the residual is ||deq(M) - Q(W + dW)|| / ||dW||.
    """
    dq = _dequantize(merged, mkey, device)
    kind = "dora" if mod.magnitude is not None else "lora"
    Mq = dq.weight
    Wf = W.to(torch.float32)
    if mod.magnitude is not None:
        dW = dora_merged(Wf, mod, device=device) - Wf.to(device)
    else:
        dW = DeltaKernel.of(mod, device=device).dense()
    if tuple(Mq.shape) == tuple(W.shape):
        pass
    elif tuple(Mq.shape) == tuple(W.shape[::-1]):
        Wf, dW = Wf.T, dW.T  # stored (out, in) where the float weight is (in, out)
    else:
        return _shape_fail(mod.name, mkey, kind, Mq.shape, W.shape, torch.uint8)
    QW = dq.requantize(Wf).reshape(Mq.shape)
    QE = dq.requantize(Wf + dW).reshape(Mq.shape)
    c = _Check(mod.name, mkey, kind, qkind, list(Mq.shape))
    c.quantization = dq.scheme
    c.delta_norm = _norm(dW)
    c.residual_norm = _norm(Mq - QE)
    dd = dW.double()
    if c.delta_norm > 0:
        c.retention = float(((Mq - QW).double() * dd).sum()) / c.delta_norm**2
        c.expected_retention = float(((QE - QW).double() * dd).sum()) / c.delta_norm**2
    c.applied_fraction = c.retention
    c.status = "quantized"
    c.passed = None
    if tolerance is not None and c.retention is not None:
        c.passed = abs(c.retention - c.expected_retention) <= tolerance
        c.status = "ok" if c.passed else "fail"
    if c.retention is not None:
        c.hint = f"{100 * c.retention:.1f}% of the delta survived quantization (a correct merge keeps {100 * c.expected_retention:.1f}%)"
    return c


def _bias_check(mods: LoraModule | list[LoraModule], base: BaseModel, merged: BaseModel, bkey: str, mkey: str, tolerance, device) -> _Check:
    """A bias = base bias + the sum of scale * lora_B.bias of the module(s) with a lora_bias on it."""
    mods = mods if isinstance(mods, list) else [mods]
    mod = mods[0]
    b = base.store.get(bkey).to(device)
    M = merged.store.get(mkey).to(device)
    mdtype = M.dtype
    if tuple(M.shape) != tuple(b.shape):
        return _shape_fail(mod.name, mkey, "lora_bias", M.shape, b.shape, mdtype)
    db = sum(m.bias.load().to(device=device, dtype=torch.float32) * float(m.scale) for m in mods)
    expected = b.to(torch.float32) + db
    store = _coarser(mdtype, b.dtype)
    c = _check_plain(mod.name, mkey, "lora_bias", expected, M, b, merged_dtype=mdtype,
                     extra_u=unit_roundoff(store) * 3, extra_norm=_norm(expected) + _norm(db))
    _judge(c, tolerance)
    if not c.passed and c.applied_fraction is not None:
        c.hint = _hint(c.applied_fraction, math.sqrt(max(c.residual**2 - (c.applied_fraction - 1) ** 2, 0.0)), mod) or "bias differs from base bias + scale * lora_B.bias"
    return c


def _combined_name(term: CombinedTerm) -> str:
    """The module name a combined term reports under (its first part's: the adapters' modules share it)."""
    return term.parts[0][1].name


def _combined_check(term: CombinedTerm, base: BaseModel, merged: BaseModel, bkey: str, mkey: str, tolerance, device,
                    views: _Views, replaced: torch.Tensor | None = None) -> _Check:
    """A weight several adapters merged into: M = W + D, D their combined delta (the same masks:
    DARE's are drawn from the seed, so verify draws them again)."""
    name = _combined_name(term)
    W = views.get(base.store, bkey) if replaced is None else replaced
    M = views.get(merged.store, mkey)
    mdtype = merged.store.dtype(mkey)
    if tuple(M.shape) != tuple(W.shape):
        return _shape_fail(name, mkey, "combined", M.shape, W.shape, mdtype)
    D, _ = combined_delta(term, device=device)  # stored layout, float32
    E = D.add_(W.to(device=device, dtype=torch.float32))
    c = _check_plain(name, mkey, "combined", E, M.to(device), W.to(device), merged_dtype=mdtype,
                     extra_u=unit_roundoff(W.dtype) if W.dtype != torch.float32 else 0.0, extra_norm=_norm(W.float()))
    _judge(c, tolerance)
    if not c.passed:
        k = c.applied_fraction
        c.hint = (f"about {k:.3g} of the combined delta is there" if k is not None else None) or "differs from base + the combined delta"
    return c


def _save_check(tname: str, lazy, base: BaseModel | None, merged: BaseModel, bkey: str | None, mkey: str, tolerance, device) -> _Check:
    T = lazy.load().to(device)
    M = merged.store.get(mkey).to(device)
    ref = base.store.get(bkey).to(device) if base is not None and bkey is not None else None
    if tuple(M.shape) != tuple(T.shape):
        return _shape_fail(tname, mkey, "modules_to_save", M.shape, T.shape, M.dtype)
    c = _check_plain(tname, mkey, "modules_to_save", T, M, ref, merged_dtype=M.dtype)
    _judge(c, tolerance)
    if not c.passed:
        k = c.applied_fraction
        if k is not None and abs(k) < 0.05:
            c.hint = "the base tensor was kept instead of the adapter's modules_to_save copy"
        else:
            c.hint = "differs from the adapter's modules_to_save tensor"
    return c


def _untouched_check(base: BaseModel, merged: BaseModel, entry: TensorEntry, mkey: str, qkind: str | None, acc: dict, device, views: _Views) -> None:
    acc["checked"] += 1
    ment = merged.store.entry(mkey)
    if qkind is not None:
        dq = _dequantize(merged, mkey, device)
        W = base.store.get(entry.name).to(device)
        QW = dq.requantize(W).reshape(dq.weight.shape)
        if _bits_equal(QW, dq.weight):
            acc["quantized"] += 1
        else:
            err = _ratio(_norm(dq.weight - QW), _norm(W))
            acc["differ"].append({"tensor": mkey, "reason": f"quantized tensor differs from the quantized base ({err:.3g} of its norm)", "max_abs_diff": None})
        return
    if ment.dtype == entry.dtype and tuple(ment.shape) == tuple(entry.shape):
        same = _bits_equal(views.get(base.store, entry.name), views.get(merged.store, mkey))
        if same:
            acc["identical"] += 1
            return
    elif tuple(ment.shape) == tuple(entry.shape):
        W = views.get(base.store, entry.name)
        M = views.get(merged.store, mkey)
        if M.dtype.is_floating_point == W.dtype.is_floating_point and _bits_equal(W.to(M.dtype), M):
            acc["cast"] += 1
            return
    else:
        acc["differ"].append({"tensor": mkey, "reason": f"shape {tuple(ment.shape)} differs from the base's {tuple(entry.shape)}", "max_abs_diff": None})
        return
    W = base.store.get(entry.name).to(device)
    M = merged.store.get(mkey).to(device)
    if W.dtype.is_floating_point or M.dtype.is_floating_point:
        diff = (M.to(torch.float64) - W.to(torch.float64)).abs()
        mad = float(diff.max()) if diff.numel() else 0.0
        rel = _ratio(_norm(M.to(torch.float32) - W.to(torch.float32)), _norm(W))
        reason = f"untouched by the adapter but differs from the base (max |diff| {mad:.3g}, {rel:.3g} of its norm)"
    else:
        mad = None
        reason = "untouched by the adapter but differs from the base"
    acc["differ"].append({"tensor": mkey, "reason": reason, "max_abs_diff": _num(mad) if mad is not None else None})


def _report(base: BaseModel, ad: Adapter, merged: BaseModel, checks: list[_Check], untouched: dict, missing: list[str],
            extra: list[str], notes: list[str], tolerance: float | None, quantized: bool) -> dict[str, Any]:
    checks.sort(key=_Check.sort_key)
    modules = [c.as_dict(tolerance) for c in checks]
    failed = [c for c in checks if c.passed is False]
    q = [c for c in checks if c.quantization is not None]
    judged = [c for c in checks if c.passed is not None and math.isfinite(c.residual_norm) and c.delta_norm > 0]
    passed = not failed and not untouched["differ"] and not missing and not extra
    dtypes = sorted({c.dtype for c in checks if c.dtype})
    summary: dict[str, Any] = {
        "modules": len(checks),
        "passed": sum(1 for c in checks if c.passed is True),
        "failed": len(failed),
        "quantized": len(q),
        "untouched": untouched["checked"],
        "untouched_identical": untouched["identical"],
        "untouched_cast": untouched["cast"],
        "untouched_quantized": untouched["quantized"],
        "untouched_differ": len(untouched["differ"]),
        "missing": len(missing),
        "extra": len(extra),
        "worst": checks[0].name if checks else None,
        "max_residual": _num(max((c.residual for c in judged), default=0.0)),
    }
    # where the bound reaches the delta itself, a merge that left the delta out would pass too
    blind = [c for c in judged if c.kind in ("lora", "dora") and c.bound is not None and c.bound >= 1]
    summary["unresolved"] = len(blind)
    if blind:
        fr = [c.applied_fraction for c in blind if c.applied_fraction is not None]
        span = f"; their applied_fraction is {min(fr):.3g}..{max(fr):.3g} (1 when the whole delta is there)" if fr else ""
        notes = notes + [
            f"{len(blind)} module(s), e.g. {blind[0].name}: rounding to {blind[0].dtype} may move the weights by as much as "
            f"the whole delta (bound {blind[0].bound:.3g} of it), so the bound cannot tell whether their delta was applied{span}"
        ]
    if q:
        rets = [c.retention for c in q if c.retention is not None]
        summary["min_retention"] = _num(min(rets)) if rets else None
        summary["mean_retention"] = _num(sum(rets) / len(rets)) if rets else None
    failures = [f"{c.name}: {_failure_text(c, tolerance)}" for c in failed]
    failures += [f"{d['tensor']}: {d['reason']}" for d in untouched["differ"]]
    failures += [f"{k}: missing from the merged model" for k in missing if not any(c.tensor == k or c.name == k for c in failed)]
    failures += [f"{k}: in the merged model but not in the base or the adapter" for k in extra]
    return {
        "check": "weights",
        "passed": passed,
        "base": str(base.path),
        "adapter": str(ad.path) if ad.path else None,
        "merged": str(merged.path),
        "merged_dtypes": dtypes,
        "quantized": quantized,
        "tolerance": tolerance,
        "modules": modules,
        "untouched": untouched,
        "missing": missing,
        "extra": extra,
        "notes": notes,
        "failures": failures,
        "summary": summary,
    }


def _failure_text(c: _Check, tolerance: float | None) -> str:
    if c.status == "missing":
        return "missing from the merged model"
    if not math.isfinite(c.residual_norm):
        return c.hint or "failed"
    if c.quantization is not None:
        return f"retention {c.retention:.3g} of the delta, a correct merge keeps {c.expected_retention:.3g} (outside --tolerance)"
    if c.delta_norm == 0:
        return f"the delta is zero but the tensor differs from the expected one by {c.residual_norm:.3g} (norm)"
    allowed = tolerance if tolerance is not None else c.bound
    text = f"residual {c.residual:.3g} of the delta"
    if allowed is not None:
        text += f" (allowed {allowed:.2g})"
    if c.hint:
        text += f"; {c.hint}"
    return text
