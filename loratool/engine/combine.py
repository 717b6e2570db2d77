"""Several adapters on one weight: the combined delta term (linear, TIES, DARE, magnitude pruning).

The methods work on whole task vectors, as the papers define them, never on A and B separately:
for the tensors of one base weight, each adapter's delta dW_i = scale_i * B_i @ A_i (its own rank,
alpha, rsLoRA, layout) is formed in PEFT's (out, in) orientation, in float32, and

    linear           D = sum_i w_i dW_i
    magnitude_prune  D = sum_i w_i top_k(dW_i)                      k = int(density * numel), by |value|
    ties             T_i = top_k(dW_i); s = sign(sum_i T_i)          ("total"; "frequency": sign(sum_i sign(T_i)))
                     D = sum_i w_i T_i [sign T_i = s] / max(1, #{i : sign T_i = s})
                                                                    (TIES-Merging, Yadav et al. 2023, section 3)
    dare_linear      T_i = dW_i * mask_i / density,  mask_i ~ Bernoulli(density)   (DARE, Yu et al. 2023, eq. 2)
                     D = sum_i w_i T_i
    dare_ties        the DARE T_i, then TIES' sign election and disjoint mean

(as ``peft.utils.merge_utils`` computes them from dense deltas; s = +1 where the sum is 0).

Memory: the N deltas of one weight at a time, never N models.

Random stream (DARE): one CPU ``torch.Generator`` per (seed, adapter index, weight name: the adapted
module's name + ``.weight``, whatever the base calls the tensor), seeded
with the first 8 bytes of SHA-256("loratool-dare/<seed>/<index>/<weight name>"), draws one float32
uniform per element of dW_i in (out, in) row-major order; an element is kept when its draw is
< density. The mask depends on nothing else: not the row blocks, the thread count or the device.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from loratool.engine.delta import dense_delta
from loratool.engine.methods import CombineSpec

__all__ = ["CombineSpec", "CombinedTerm", "CombinedStats", "combined_delta", "dare_mask", "top_k_mask"]

F32 = torch.float32
_ELECTS_SIGN = ("ties", "dare_ties")
_RANDOM = ("dare_linear", "dare_ties")


@dataclass(frozen=True)
class CombinedTerm:
    """The delta term of one base weight that several adapters target: (adapter index, module) pairs
    (a module absent from an adapter simply has no pair) and the spec."""

    tensor: str
    parts: tuple[tuple[int, object], ...]  # (adapter index, LoraModule bound to the base)
    spec: CombineSpec

    @property
    def transposed(self) -> bool:
        return self.parts[0][1].kind.transposed

    @property
    def mask_key(self) -> str:
        """The weight name DARE's masks are drawn for: the adapted module's (``<module>.weight``), so that
        merge (which names weights by the base's keys) and combine (by the module) draw the same masks."""
        return f"{self.parts[0][1].name}.weight"

    @property
    def modules(self) -> list:
        return [m for _, m in self.parts]


@dataclass
class CombinedStats:
    """What the combination did to one weight (the report's per-tensor row)."""

    tensor: str
    adapters: list[int]
    delta_norms: list[float]  # ||dW_i||, before weights and pruning
    kept_fraction: list[float] = field(default_factory=list)  # share of dW_i's entries kept
    kept: list[int] = field(default_factory=list)  # how many (the outvoted share's denominator)
    dropped_norms: list[float] = field(default_factory=list)  # ||dW_i - T_i|| (DARE: before rescaling)
    outvoted: float | None = None  # share of kept entries whose sign lost the election
    combined_norm: float = 0.0  # ||D||
    weight_norm: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        d = {"tensor": self.tensor, "adapters": self.adapters, "delta_norms": self.delta_norms,
             "combined_norm": self.combined_norm, "weight_norm": self.weight_norm,
             "relative_delta": self.combined_norm / self.weight_norm if self.weight_norm else None,
             "seconds": round(self.seconds, 6)}
        if self.kept_fraction:
            d.update(kept_fraction=self.kept_fraction, dropped_norms=self.dropped_norms)
        if self.outvoted is not None:
            d["outvoted"] = self.outvoted
        return d


MaskHook = Callable[[str, int, torch.Tensor], None]  # (weight name, adapter index, kept mask (out, in))


def combined_delta(term: CombinedTerm, *, device: str | torch.device = "cpu", layout: str = "stored",
                   on_mask: MaskHook | None = None) -> tuple[torch.Tensor, CombinedStats]:
    """The combined delta D of one weight in float32 (``layout`` "stored" as the base stores it, or
    "out_in"), and its statistics. ``on_mask`` sees each kept mask (tests check DARE against the formula)."""
    spec = term.spec
    deltas = [dense_delta(m, dtype=F32, device=device) for _, m in term.parts]  # each (out, in)
    weights = [spec.weights[i] for i, _ in term.parts]
    stats = CombinedStats(term.tensor, [i for i, _ in term.parts], [_norm(d) for d in deltas])
    if spec.sparsifying:
        deltas = [_sparsify(d, i, term, spec, stats, on_mask) for d, (i, _) in zip(deltas, term.parts)]
    if spec.method in _ELECTS_SIGN:
        D = _disjoint_mean(deltas, weights, spec.majority_sign, stats)
    else:
        D = deltas[0].mul_(weights[0])
        for d, w in zip(deltas[1:], weights[1:]):
            D.add_(d, alpha=w)
    stats.combined_norm = _norm(D)
    if layout != "stored" or not term.transposed:
        return D, stats
    return (D.transpose(1, 2) if D.dim() == 3 else D.T), stats  # fused experts: (E, in, out)


def _norm(t: torch.Tensor) -> float:
    """||t||_F for the report (float32 sums: these are statistics, not checks)."""
    return float(torch.linalg.vector_norm(t)) if t.numel() else 0.0


def _sparsify(d: torch.Tensor, index: int, term: CombinedTerm, spec: CombineSpec, stats: CombinedStats,
              on_mask: MaskHook | None) -> torch.Tensor:
    """T_i from dW_i (in place): the top-k entries by magnitude, or DARE's random drop and rescale."""
    tensor = term.tensor
    if spec.method in _RANDOM:
        keep = dare_mask(term.mask_key, index, tuple(d.shape), spec.density, spec.seed).to(d.device)
        kept = int(torch.count_nonzero(keep))
    else:
        keep = top_k_mask(d, spec.density)
        kept = d.numel() if spec.density >= 1.0 else int(spec.density * d.numel())  # exactly k by construction
    if on_mask is not None:
        on_mask(tensor, index, keep)
    stats.kept.append(kept)
    stats.kept_fraction.append(kept / max(1, keep.numel()))
    total_sq = _norm(d) ** 2
    d.mul_(keep)
    kept_sq = _norm(d) ** 2
    stats.dropped_norms.append(math.sqrt(max(total_sq - kept_sq, 0.0)))
    if spec.method in _RANDOM and spec.density < 1.0:
        d.div_(spec.density)  # E[T_i] = dW_i
    return d


def top_k_mask(d: torch.Tensor, density: float) -> torch.Tensor:
    """The k = int(density * numel) entries of largest |value| (PEFT's ``magnitude_based_pruning``;
    density 1 keeps all). Entries tied with the k-th largest are taken in row-major order, so the
    mask is deterministic."""
    n = d.numel()
    if density >= 1.0:
        return torch.ones_like(d, dtype=torch.bool)
    k = int(density * n)
    if k <= 0:
        return torch.zeros_like(d, dtype=torch.bool)
    mags = d.abs().reshape(-1)
    threshold = _kth_largest(mags, k)
    keep = mags > threshold
    short = k - int(torch.count_nonzero(keep))
    if short > 0:  # entries equal to the threshold, first ones first
        ties = torch.nonzero(mags == threshold).reshape(-1)[:short]
        keep[ties] = True
    return keep.reshape(d.shape)


_SAMPLE = 1 << 16  # entries sampled to bracket the k-th largest before an exact selection


def _kth_largest(m: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of the 1-D tensor ``m``, exactly. For large tensors a strided sample
    brackets it between two of its order statistics (about 4 standard errors either side), so the
    exact selection runs on the few entries inside the bracket; when the bracket misses (a sample
    that does not represent the data), the selection runs on everything."""
    n = m.numel()
    if n <= 16 * _SAMPLE:
        return torch.kthvalue(m.cpu(), n - k + 1).values.to(m.device)
    sample = torch.sort(m[:: n // _SAMPLE]).values  # ascending
    s, p = sample.numel(), k / n
    margin = 4.0 * math.sqrt(p * (1.0 - p) / s) + 2.0 / s
    lo = sample[max(0, int((1.0 - p - margin) * s))]
    hi = sample[min(s - 1, int(math.ceil((1.0 - p + margin) * s)))]
    above = int((m > hi).sum())
    band = m[(m > lo) & (m <= hi)]
    if above < k <= above + band.numel():
        return torch.kthvalue(band.cpu(), band.numel() - (k - above) + 1).values.to(m.device)
    return torch.kthvalue(m.cpu(), n - k + 1).values.to(m.device)


def dare_mask(tensor: str, index: int, shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    """DARE's kept entries for adapter ``index`` on ``tensor``: Bernoulli(density) per element, drawn
    on the CPU from a generator seeded by (seed, index, tensor) alone (see the module docstring)."""
    if density >= 1.0:
        return torch.ones(shape, dtype=torch.bool)
    digest = hashlib.sha256(f"loratool-dare/{seed}/{index}/{tensor}".encode()).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand(shape, generator=gen, dtype=F32) < density


def _disjoint_mean(deltas: list[torch.Tensor], weights: list[float], rule: str, stats: CombinedStats) -> torch.Tensor:
    """TIES' elect and disjoint merge: the majority sign per entry (from the unweighted T_i, as
    PEFT's ``calculate_majority_sign_mask``), then the mean of the weighted T_i that agree with it."""
    votes = torch.zeros_like(deltas[0])  # (out, in)
    for d in deltas:
        votes.add_(d if rule == "total" else torch.sign(d))
    elected = torch.where(votes >= 0, 1.0, -1.0).to(deltas[0].dtype)
    del votes
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    agreeing = 0
    for d, w in zip(deltas, weights):
        agree = (d * elected) > 0  # kept, with the elected sign (a dropped entry is 0: never agrees)
        total.add_(torch.where(agree, d, 0.0), alpha=w)
        count.add_(agree)
        agreeing += int(torch.count_nonzero(agree))
    kept = sum(stats.kept) if stats.kept else sum(int(torch.count_nonzero(d)) for d in deltas)
    stats.outvoted = (kept - agreeing) / kept if kept else 0.0
    return total.div_(count.clamp_(min=1.0))
