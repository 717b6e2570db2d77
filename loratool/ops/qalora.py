"""QA-LoRA (Xu et al., 2023, arXiv:2309.14717): pooled LoRA deltas and their fold into GPTQ zeros.

A QA-LoRA module's ``A`` is (r, in / Lp): it acts on the input pooled over blocks of ``Lp``
consecutive features. Every input inside one block therefore sees the same column of
``B @ A``, and the delta in nn.Linear orientation is

    dW[o, i] = c * (B @ A)[o, i // Lp],      c = scale * pooling factor

with the pooling factor of the convention the adapter was trained with:

    avg   1 / Lp             the original QA-LoRA code (nn.AvgPool1d(Lp))
    sum   1                  the sum variant in the QA-LoRA README (average times Lp)
    peft  (in / Lp) / Lp     PEFT's use_qalora: mean over each block times the number of blocks

With GPTQ's ``W[i, o] = s[g, o] * (q[i, o] - z[g, o])`` (g = g_idx[i]), a delta constant inside
every quantization group folds into the zero points: ``z'[g, o] = z[g, o] - dW[o, i] / s[g, o]``
for any i of group g. That holds when each group lies inside one pooling block
(g_idx[i] == g_idx[j] implies i // Lp == j // Lp); with g_idx = i // G it means Lp % G == 0.
"""

from __future__ import annotations

import torch

from loratool.engine.delta import factor_product

POOLINGS = ("avg", "sum", "peft")


def pooling_factor(pooling: str, in_features: int, pool_size: int) -> float:
    """The factor a pooling convention puts between ``scale * B @ A`` and the per-input delta.

    Raises:
        ValueError: unknown convention, or ``in_features`` not a multiple of ``pool_size``.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pool_size <= 0 or in_features % pool_size:
        raise ValueError(f"in_features {in_features} is not a multiple of the pooling group size {pool_size}")
    if pooling == "avg":
        return 1.0 / pool_size
    if pooling == "sum":
        return 1.0
    return (in_features // pool_size) / pool_size


def block_delta(
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    *,
    pooling: str,
    in_features: int,
    pool_size: int,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The delta of each pooling block: (out, in / Lp) = scale * factor * B @ A.

    Raises:
        ValueError: ``A`` does not have ``in_features / pool_size`` columns.
    """
    if A.shape[1] * pool_size != in_features:
        raise ValueError(f"lora_A has {A.shape[1]} columns; pooling {in_features} inputs by {pool_size} needs {in_features // max(pool_size, 1)}")
    c = scale * pooling_factor(pooling, in_features, pool_size)
    return factor_product(A, B, c, dtype=dtype)  # (out, in / Lp)


def expand_blocks(blocks: torch.Tensor, pool_size: int) -> torch.Tensor:
    """(out, in / Lp) block deltas -> the full (out, in) delta."""
    return blocks.repeat_interleave(pool_size, dim=1)


def pooled_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, *, pooling: str, pool_size: int) -> torch.Tensor:
    """The adapter's contribution to a layer's output, computed the way it was trained (pool, then A, B).

    Args:
        x: (..., in) input.
    Returns:
        (..., out) tensor in ``x``'s dtype.
    """
    in_features = x.shape[-1]
    pooling_factor(pooling, in_features, pool_size)  # validates the convention and the sizes
    pooled = x.reshape(*x.shape[:-1], in_features // pool_size, pool_size).mean(-1)
    if pooling == "sum":
        pooled = pooled * pool_size
    elif pooling == "peft":
        pooled = pooled * (in_features // pool_size)
    return (pooled @ A.to(x.dtype).T) @ B.to(x.dtype).T * scale


def group_blocks(g_idx: torch.Tensor, groups: int, pool_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooling block of every quantization group.

    Returns:
        (first, last): (groups,) int64 tensors, the lowest and highest block index among the
        inputs of each group (-1 for a group no input uses). A group folds exactly when
        ``first == last``.
    """
    g = g_idx.to(torch.int64)
    blocks = torch.arange(g.numel(), dtype=torch.int64) // pool_size
    big = torch.iinfo(torch.int64).max
    first = torch.full((groups,), big, dtype=torch.int64).scatter_reduce(0, g, blocks, reduce="amin")
    last = torch.full((groups,), -1, dtype=torch.int64).scatter_reduce(0, g, blocks, reduce="amax")
    first = torch.where(last < 0, torch.full_like(first, -1), first)
    return first, last


def fold_obstacle(g_idx: torch.Tensor, groups: int, pool_size: int, *, group_size: int | None = None) -> str | None:
    """Why a pooled delta does not fold into the zero points, or None when it folds exactly.

    The message names the condition: an act-order (permuted) g_idx, or a pooling group size
    that is not a multiple of the quantization group size.
    """
    first, last = group_blocks(g_idx, groups, pool_size)
    bad = (first != last).nonzero().flatten()
    if bad.numel() == 0:
        return None
    g = int(bad[0])
    members = (g_idx.to(torch.int64) == g).nonzero().flatten()
    where = f"quantization group {g} holds inputs {int(members[0])}..{int(members[-1])}, which span pooling blocks {int(first[g])}..{int(last[g])} of {pool_size} inputs"
    g64 = g_idx.to(torch.int64)
    sorted_ = bool((g64[1:] >= g64[:-1]).all()) if g64.numel() > 1 else True
    if not sorted_:
        return (
            f"g_idx is permuted (act-order / desc_act), so a quantization group does not lie inside one "
            f"pooling block: {where}; the delta is not constant per group and cannot fold into the zero points"
        )
    gs = group_size if group_size and group_size > 0 else int(members.numel())
    return (
        f"the pooling group size Lp={pool_size} is not a multiple of the quantization group size G={gs} "
        f"(Lp % G == 0 is needed): {where}; the delta is not constant per group and cannot fold into the zero points"
    )


def fold_into_zeros(
    zeros: torch.Tensor,
    scales: torch.Tensor,
    blocks: torch.Tensor,
    g_idx: torch.Tensor,
    pool_size: int,
) -> torch.Tensor:
    """Zero points that absorb a pooled delta: ``z'[g, o] = z[g, o] - dW_block[o, b(g)] / s[g, o]``.

    Args:
        zeros: (groups, out) zero points (integers or floats).
        scales: (groups, out).
        blocks: (out, in / Lp) block deltas from ``block_delta``.
        g_idx: (in,) group of each input.
        pool_size: Lp.
    Returns:
        (groups, out) float64 zero points.
    Raises:
        ValueError: a group spans pooling blocks (check ``fold_obstacle`` first), or a zero
            scale meets a non-zero delta (that group's weights are 0 whatever the zero point).
    """
    groups = zeros.shape[0]
    first, last = group_blocks(g_idx, groups, pool_size)
    if bool((first != last).any()):
        raise ValueError(fold_obstacle(g_idx, groups, pool_size))
    used = first >= 0
    z = zeros.to(torch.float64).clone()
    s = scales.to(torch.float64)
    d = blocks.to(torch.float64).T.index_select(0, first.clamp(min=0))  # (groups, out)
    d = torch.where(used.unsqueeze(1), d, torch.zeros_like(d))
    stuck = (s == 0) & (d != 0)
    if bool(stuck.any()):
        g, o = (int(v) for v in stuck.nonzero()[0])
        raise ValueError(f"scale is 0 at group {g}, output {o} but the delta there is not: it cannot fold into a zero point")
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return z - d / safe


def round_zeros(zeros: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, dict]:
    """Round float zero points to integers in ``[lo, hi]`` and measure what it costs in zero units.

    Returns:
        (integer zeros int64, {"max_zero_rounding": max |z - round(z)|, "clamped": count of
        zeros outside [lo, hi]}).
    """
    r = torch.round(zeros)
    rounded = r.clamp(lo, hi)
    stats = {
        "max_zero_rounding": float((zeros - r).abs().max()) if zeros.numel() else 0.0,
        "clamped": int((r != rounded).sum()),
    }
    return rounded.to(torch.int64), stats
