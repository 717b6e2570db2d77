"""Low-rank algebra on LoRA factors, never forming the (out, in) matrix.

A module's update is ``dW = scale * B @ A`` with ``B`` (out, r) and ``A`` (r, in). Its SVD
follows from two thin QR factorizations and the SVD of an r x r core:

    B = Qb Rb,  A^T = Qa Ra               Qb (out, p), Qa (in, q), p, q <= r
    scale * Rb @ Ra^T = Uc diag(S) Vc^T   the core, (p, q)
    dW = (Qb Uc) diag(S) (Qa Vc)^T        an exact SVD of dW

Truncating it after k singular values gives the best rank-k approximation in the Frobenius
and spectral norms (Eckart-Young). Cost: O((out + in) r^2) instead of O(out * in * min(out, in)).

Functions here are pure: tensors in, tensors out; the math runs in float64 unless told otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loratool.errors import InputError

# Relative slack when comparing energies and singular values with a threshold: float64 sums of
# r terms are exact to ~r * 1e-16, so a threshold met "exactly" is not missed by rounding.
_TOL = 1e-12


@dataclass(frozen=True)
class LowRankSVD:
    """``dW = U @ diag(S) @ Vh`` with orthonormal columns of ``U`` (out, k) and rows of ``Vh`` (k, in).

    ``S`` is non-negative and descending. ``total`` is ``||dW||_F^2`` (equal to ``sum(S**2)``
    when every singular value is present, larger when ``S`` comes from a partial SVD).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    total: float

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def kept_energy(self, k: int) -> float:
        """Fraction of ``||dW||_F^2`` held by the first ``k`` singular values (1.0 for dW = 0)."""
        if self.total <= 0:
            return 1.0
        return min(1.0, float((self.S[:k].double() ** 2).sum()) / self.total)

    def relative_error(self, k: int) -> float:
        """``||dW - dW_k||_F / ||dW||_F`` for the rank-k truncation (0.0 for dW = 0)."""
        if self.total <= 0:
            return 0.0
        tail = float((self.S[k:].double() ** 2).sum()) + max(0.0, self.total - float((self.S.double() ** 2).sum()))
        return math.sqrt(max(tail, 0.0) / self.total)


def factored_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0, *, dtype: torch.dtype = torch.float64) -> LowRankSVD:
    """The SVD of ``scale * B @ A`` from its factors, via QR of ``B`` and ``A^T``.

    Args:
        B: (out, r) factor.
        A: (r, in) factor.
        scale: the module's scale (may be negative or zero).
        dtype: the precision of the computation.
    Returns:
        A ``LowRankSVD`` with ``min(out, in, r)`` singular values.
    """
    B = B.to(dtype)
    A = A.to(dtype)
    Qb, Rb = torch.linalg.qr(B, mode="reduced")  # (out, p), (p, r)
    Qa, Ra = torch.linalg.qr(A.T, mode="reduced")  # (in, q), (q, r)
    core = (Rb @ Ra.T) * scale  # (p, q)
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    U = Qb @ Uc  # (out, k)
    Vh = Vch @ Qa.T  # (k, in)
    # ||dW||_F = ||core||_F since Qb and Qa have orthonormal columns
    total = float((S.double() ** 2).sum())
    return LowRankSVD(U, S, Vh, total)


def dense_svd(D: torch.Tensor, *, rank: int | None = None, energy: float | None = None, exact: bool | None = None,
              niter: int = 4, oversample: int = 10, exact_below: int = 1024, seed: int = 0) -> LowRankSVD:
    """The leading singular triplets of a dense matrix (used by ``extract``).

    Exact (``torch.linalg.svd`` in float64) for small matrices, otherwise randomized with power
    iterations (``torch.svd_lowrank``), enlarging the sketch until ``rank`` triplets are found or
    ``energy`` of ``||D||_F^2`` is captured (falling back to the exact SVD when the sketch would
    cover half the matrix).

    Args:
        D: (m, n) matrix.
        rank: number of triplets needed (with ``energy`` None).
        energy: fraction of ``||D||_F^2`` the returned triplets must hold.
        exact: force (True) or forbid (False) the exact SVD; by default exact when
            ``min(m, n) <= exact_below``.
        niter: power iterations of the randomized SVD.
        oversample: extra sketch columns beyond ``rank``.
        seed: seed of the random sketch (results are reproducible).
    Returns:
        A ``LowRankSVD`` whose ``total`` is ``||D||_F^2`` (float64).
    """
    m, n = D.shape
    mn = min(m, n)
    total = float((D.double() ** 2).sum())
    if exact is None:
        exact = mn <= exact_below
    if not exact and rank is not None and rank + oversample >= mn // 2:
        exact = True
    if exact:
        U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
        return LowRankSVD(U, S, Vh, total)
    Df = D.float()
    q = min(mn, (rank + oversample) if rank is not None else 32 + oversample)
    while True:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(Df, q=q, niter=niter)
        found = LowRankSVD(U.double(), S.double(), V.T.double(), total)
        if rank is not None:
            return found
        if total <= 0 or float((found.S ** 2).sum()) >= energy * total * (1 - _TOL):
            return found
        if 2 * q >= mn:
            U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
            return LowRankSVD(U, S, Vh, total)
        q = min(mn, 2 * q)


def choose_rank(svd: LowRankSVD, *, rank: int | None = None, energy: float | None = None, sv_ratio: float | None = None,
                fro_error: float | None = None, max_rank: int | None = None) -> int:
    """The rank a truncation rule keeps (exactly one rule; the result is at least 1).

    Args:
        rank: keep this many singular values (fewer if there are fewer).
        energy: the smallest k with ``sum(S[:k]**2) >= energy * ||dW||_F^2``.
        sv_ratio: keep every singular value ``>= S[0] / sv_ratio``.
        fro_error: the smallest k with ``||dW - dW_k||_F <= fro_error * ||dW||_F``.
        max_rank: an upper bound applied after the rule.
    Raises:
        InputError: no rule or several rules, or a value out of range.
    """
    given = [x is not None for x in (rank, energy, sv_ratio, fro_error)]
    if sum(given) != 1:
        raise InputError("give exactly one of rank, energy, sv_ratio, fro_error")
    validate_rule(rank=rank, energy=energy, sv_ratio=sv_ratio, fro_error=fro_error, max_rank=max_rank)
    S = svd.S.double()
    n = int(S.shape[0])
    if n == 0 or svd.total <= 0 or float(S[0]) == 0.0:
        k = 1 if rank is None else rank
    elif rank is not None:
        k = rank
    elif sv_ratio is not None:
        k = int((S >= S[0] / sv_ratio * (1 - _TOL)).sum())
    else:
        energies = torch.cumsum(S ** 2, 0) / svd.total  # kept energy for k = 1..n
        if energy is None:
            # relative error^2 of the rank-k truncation is 1 - kept energy
            energy = 1.0 - fro_error ** 2
        hits = torch.nonzero(energies >= energy - _TOL)
        k = int(hits[0]) + 1 if len(hits) else n
    k = max(1, k)
    if max_rank is not None:
        k = min(k, max_rank)
    return k


def validate_rule(*, rank=None, energy=None, sv_ratio=None, fro_error=None, max_rank=None) -> None:
    """Check the values of truncation rules.

    Raises:
        InputError: rank or max_rank below 1, energy outside (0, 1], sv_ratio below 1,
            fro_error outside [0, 1).
    """
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 1):
        raise InputError(f"rank must be a positive integer, got {rank}")
    if max_rank is not None and (int(max_rank) != max_rank or max_rank < 1):
        raise InputError(f"max rank must be a positive integer, got {max_rank}")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise InputError(f"energy must lie in (0, 1], got {energy}")
    if sv_ratio is not None and not (math.isfinite(sv_ratio) and sv_ratio >= 1.0):
        raise InputError(f"sv-ratio must be at least 1 (largest / smallest kept singular value), got {sv_ratio}")
    if fro_error is not None and not (0.0 <= fro_error < 1.0):
        raise InputError(f"fro-error must lie in [0, 1), got {fro_error}")


def factors_from_svd(svd: LowRankSVD, k: int, scale: float, *, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors ``(A, B)`` of rank ``k`` with ``scale * B @ A`` = the rank-k truncation.

    The singular values are split evenly between the factors (``sqrt(S / |scale|)`` each, the sign
    of ``scale`` on ``B``). A ``k`` above the number of singular values pads with zero rows and
    columns, which changes nothing. A zero scale is allowed only when the matrix is zero.

    Returns:
        A (k, in) and B (out, k) in ``dtype``.
    Raises:
        InputError: scale is zero or not finite while the matrix is not zero, or the factors
            overflow ``dtype``.
    """
    n = min(k, svd.rank)
    S = svd.S[:n].double()
    if scale == 0 or not math.isfinite(scale):
        if float(S.abs().sum()) != 0.0:
            raise InputError(f"cannot express a nonzero update with scale {scale}")
        root = torch.zeros_like(S)
        sign = 1.0
    else:
        root = torch.sqrt(S / abs(scale))
        sign = 1.0 if scale > 0 else -1.0
    A = root[:, None] * svd.Vh[:n].double()
    B = svd.U[:, :n].double() * (root[None, :] * sign)
    if k > n:
        A, B = pad_factors(A, B, k)
    return _cast(A, dtype, "lora_A"), _cast(B, dtype, "lora_B")


def pad_factors(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``A`` (r, in) and ``B`` (out, r) to rank ``rank``; ``B @ A`` is unchanged exactly."""
    r = A.shape[0]
    if rank < r:
        raise InputError(f"cannot pad rank {r} down to {rank}")
    A2 = torch.zeros((rank, A.shape[1]), dtype=A.dtype)
    B2 = torch.zeros((B.shape[0], rank), dtype=B.dtype)
    A2[:r] = A
    B2[:, :r] = B
    return A2, B2


def rescale_factors(A: torch.Tensor, B: torch.Tensor, factor: float, *, split: str = "b",
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors whose product is ``factor * B @ A``.

    Args:
        factor: old scale / new scale.
        split: ``"b"`` multiplies B only (A is kept bit for bit); ``"balanced"`` multiplies both by
            ``sqrt(|factor|)`` (the sign goes to B).
        dtype: output dtype (default: that of the inputs).
    Raises:
        InputError: unknown split, or the result overflows ``dtype``.
    """
    dtype = dtype or B.dtype
    if split == "b":
        A2 = A if A.dtype == dtype else _cast(A.double(), dtype, "lora_A")
        return A2, _cast(B.double() * factor, dtype, "lora_B")
    if split == "balanced":
        root = math.sqrt(abs(factor))
        sign = 1.0 if factor >= 0 else -1.0
        return _cast(A.double() * root, dtype, "lora_A"), _cast(B.double() * (root * sign), dtype, "lora_B")
    raise InputError(f"unknown split {split!r} (use 'b' or 'balanced')")


def stack_factors(terms: list[tuple[torch.Tensor, torch.Tensor, float]], scale: float, *, split: str = "b") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact concatenation: factors with ``scale * B @ A = sum(c_i * B_i @ A_i)``.

    Args:
        terms: ``(A_i, B_i, c_i)``, with ``c_i`` = weight_i * scale_i.
        scale: the scale of the result (nonzero).
        split: how each ``c_i / scale`` is put on the factors (see ``rescale_factors``).
    Returns:
        float64 ``A`` (sum r_i, in) and ``B`` (out, sum r_i).
    """
    As, Bs = [], []
    for A, B, c in terms:
        A2, B2 = rescale_factors(A.double(), B.double(), c / scale, split=split, dtype=torch.float64)
        As.append(A2)
        Bs.append(B2)
    return torch.cat(As, 0), torch.cat(Bs, 1)


def _cast(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    out = t.to(dtype)
    if dtype.is_floating_point and not torch.isfinite(out.double()).all() and torch.isfinite(t.double()).all():  # float8 has no isfinite
        raise InputError(f"{what} overflows {str(dtype).replace('torch.', '')}; use a wider --dtype or a balanced split")
    return out
