"""The delta kernel: every LoRA delta in loratool is computed here.

A LoRA module holds A (r, in), B (out, r) and a scale; its delta in PEFT's (out, in)
orientation is dW = scale * B @ A. The base stores the weight in one of two layouts:

    linear           W (out, in)    rows of W are output features:  dW[rows]   = scale * B[rows] @ A
    Conv1D/embedding W (in, out)    rows of W are input features:   dW.T[rows] = scale * A[:, rows].T @ B.T

(GPT-2's Conv1D stores (in, out); PEFT's embedding LoRA has lora_embedding_A (r, num) and
lora_embedding_B (dim, r), and the embedding weight is (num, dim): the transposed layout.)

``DeltaKernel`` applies a row block of ``sign * dW`` to a float32 block of the stored weight in
place: merge adds it (+1), unmerge subtracts it (-1), verify subtracts it from M - W to get the
residual, retention and QA-LoRA read it. DoRA's row scaling (``dora_rows``) is the one other
formula, and also lives here. Nothing else in loratool forms B @ A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

F32 = torch.float32


@dataclass(frozen=True)
class DeltaKernel:
    """A module's factors in float32 on one device, applied to row blocks of the stored weight."""

    A: torch.Tensor  # (r, in) float32
    B: torch.Tensor  # (out, r) float32
    scale: float
    transposed: bool  # the stored weight is (in, out): Conv1D, embedding

    @classmethod
    def of(cls, module, *, device: str | torch.device = "cpu") -> "DeltaKernel":
        """Load a ``LoraModule``'s factors once, as float32 on ``device`` (detached: a pickled
        adapter may hold them as parameters that require grad)."""
        A = module.A.load().detach().to(device=device, dtype=F32)  # (r, in)
        B = module.B.load().detach().to(device=device, dtype=F32)  # (out, r)
        return cls(A, B, float(module.scale), module.kind.transposed)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def row_factors(self, *, sign: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) with sign * dW[rows] = L[rows] @ R in the stored layout, the scale folded into L.

        Linear: L = s * B (out, r), R = A (r, in). Conv1D / embedding: L = s * A.T (in, r), R = B.T (r, out).
        """
        s = float(sign) * self.scale
        if self.transposed:
            return (self.A.T * s).contiguous(), self.B.T.contiguous()  # (in, r), (r, out)
        return (self.B * s).contiguous(), self.A.contiguous()  # (out, r), (r, in)

    def add_(self, block: torch.Tensor, start: int, *, sign: int = 1) -> torch.Tensor:
        """block += sign * dW[start:start + len(block)] in place; ``block``: float32 rows of the stored weight."""
        stop = start + block.shape[0]
        alpha = float(sign) * self.scale
        if self.transposed:
            return block.addmm_(self.A[:, start:stop].T, self.B.T, alpha=alpha)  # (rows, r) @ (r, out)
        return block.addmm_(self.B[start:stop], self.A, alpha=alpha)  # (rows, r) @ (r, in)

    def lora_term(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The unmerged LoRA output for inputs x (..., in): scale * ((x @ A.T) @ B.T + bias) -> (..., out).

        PEFT's forward, ``lora_B(lora_A(x)) * scaling``, in the same order (the optional ``bias`` is
        lora_B's, PEFT's lora_bias); the same for the linear and the Conv1D layout (A and B are
        always (r, in) and (out, r)).
        """
        import torch.nn.functional as F

        return F.linear(F.linear(x, self.A), self.B, bias) * self.scale  # (..., r) -> (..., out)

    def embedding_term(self, ids: torch.Tensor) -> torch.Tensor:
        """The unmerged embedding LoRA output for token ids (...): scale * A.T[ids] @ B.T -> (..., out).

        PEFT's ``(F.embedding(x, lora_embedding_A.T) @ lora_embedding_B.T) * scaling``: A is (r, num), B (dim, r).
        """
        import torch.nn.functional as F

        return (F.embedding(ids, self.A.T) @ self.B.T) * self.scale  # (..., r) @ (r, dim)

    def dense(self, *, layout: str = "stored") -> torch.Tensor:
        """The whole delta in float32: ``layout="stored"`` as the base stores it, ``"out_in"`` as PEFT's (out, in)."""
        d = factor_product(self.A, self.B, self.scale)  # (out, in)
        return d.T if layout == "stored" and self.transposed else d

    def max_abs_bound(self) -> float:
        """An upper bound of every |dW[i, j]| (and of every partial sum forming it): by Cauchy-Schwarz,
        |scale * B[i] . A[:, j]| <= |scale| * max_i ||B[i]|| * max_j ||A[:, j]||. Cheap: no B @ A."""
        if self.A.numel() == 0 or self.B.numel() == 0:
            return 0.0
        rows_b = float(torch.linalg.vector_norm(self.B.double(), dim=1).max())  # (out,) -> max
        cols_a = float(torch.linalg.vector_norm(self.A.double(), dim=0).max())  # (in,) -> max
        return abs(self.scale) * rows_b * cols_a

    def norm_sq(self) -> float:
        """||dW||_F^2 from the r x r Gram matrices, never forming B @ A: scale^2 * sum((A A^T) * (B^T B))."""
        return gram_norm_sq(self.A, self.B, self.scale)

    def residual_norms(self, W: torch.Tensor, M: torch.Tensor, *, block_elems: int = 1 << 18) -> tuple[float, float, float]:
        """(||M||, ||R||, <R, dW>) for R = M - W - dW, in row blocks that stay in cache.

        Each block of M is widened to float32 once; W is subtracted and dW subtracted in place,
        so neither dW nor a float32 copy of the tensor is formed. <R, dW> = sum(L[rows] * (R[rows] @ R_f.T))
        with (L, R_f) = ``row_factors()``. Sums accumulate in float64.
        """
        if M.dim() != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(M.shape)}")
        left, right = self.row_factors()
        rows, cols = M.shape
        step = max(1, block_elems // max(cols, 1))
        buf = torch.empty(min(step, rows) * cols, dtype=F32, device=self.A.device)
        rt = right.T.contiguous()
        msq = rsq = dot = 0.0
        for i in range(0, rows, step):
            h = min(step, rows - i)
            flat = buf[: h * cols]
            blk = flat.view(h, cols)
            blk.copy_(M[i : i + h])
            msq += float(torch.dot(flat, flat))
            blk.sub_(W[i : i + h].to(blk.device))
            blk.addmm_(left[i : i + h], right, alpha=-1.0)  # R rows = M - W - dW
            rsq += float(torch.dot(flat, flat))
            dot += float(torch.sum(left[i : i + h] * (blk @ rt), dtype=torch.float64))
        return math.sqrt(msq), math.sqrt(rsq), dot

    def residual(self, W: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """R = M - W - dW as one float32 tensor in the stored layout (for diagnosis)."""
        R = M.to(device=self.A.device, dtype=F32, copy=True).sub_(W.to(self.A.device))
        return self.add_(R, 0, sign=-1)


@dataclass(frozen=True)
class ExpertsKernel:
    """A fused experts module's factors in float32, applied to blocks of whole experts of the stored
    (E, out, in) or, ``transposed``, (E, in, out) tensor: expert e gets sign * scale * B_e @ A_e
    (``expert_factors``), or its transpose."""

    A: torch.Tensor  # (E, r, in) float32
    B: torch.Tensor  # (E, out, r) float32
    scale: float
    transposed: bool

    @classmethod
    def of(cls, module, *, device: str | torch.device = "cpu") -> "ExpertsKernel":
        E, r = module.experts, module.rank
        A = module.A.load().detach().to(device=device, dtype=F32)  # (E * r, in)
        B = module.B.load().detach().to(device=device, dtype=F32)  # (out, r * E)
        Ae = A.reshape(E, r, A.shape[1]).contiguous()  # (E, r, in)
        Be = B.reshape(B.shape[0], r, E).permute(2, 0, 1).contiguous()  # (E, out, r)
        return cls(Ae, Be, float(module.scale), module.kind.transposed)

    def add_(self, block: torch.Tensor, start: int, *, sign: int = 1) -> torch.Tensor:
        """block += sign * dW for experts [start, start + len(block)); ``block``: float32 (n, d1, d2)."""
        alpha = float(sign) * self.scale
        for i in range(block.shape[0]):
            e = start + i
            if self.transposed:
                block[i].addmm_(self.A[e].T, self.B[e].T, alpha=alpha)  # (in, r) @ (r, out)
            else:
                block[i].addmm_(self.B[e], self.A[e], alpha=alpha)  # (out, r) @ (r, in)
        return block

    def norm_sq(self) -> float:
        """||dW||_F^2 over all experts, from each expert's r x r Gram matrices."""
        return sum(gram_norm_sq(self.A[e], self.B[e], self.scale) for e in range(self.A.shape[0]))


def factor_product(A: torch.Tensor, B: torch.Tensor, scale: float, *, dtype: torch.dtype = F32) -> torch.Tensor:
    """scale * B @ A in ``dtype``: (out, r) @ (r, in) -> (out, in). The only place B @ A is formed."""
    return torch.mm(B.to(dtype), A.to(dtype)).mul_(scale)  # (out, in)


def gram_norm_sq(A: torch.Tensor, B: torch.Tensor, scale: float) -> float:
    """||scale * B @ A||_F^2 without forming B @ A: scale^2 * sum((A A^T) * (B^T B)), the r x r Gram
    matrices accumulated in float64 over blocks of A's columns and B's rows (never a float64 copy of
    a whole factor: a factor can be gigabytes)."""
    return max(float((_gram(A) * _gram(B.T)).sum()), 0.0) * scale * scale


def _gram(M: torch.Tensor, *, block: int = 1 << 16) -> torch.Tensor:
    """M @ M.T in float64 for M (r, n), summed over column blocks of at most ``block``."""
    r, n = M.shape
    G = torch.zeros((r, r), dtype=torch.float64, device=M.device)
    for i in range(0, n, block):
        part = M[:, i : i + block].double()  # (r, <= block)
        G.addmm_(part, part.T)
    return G


def combination_norm(modules: list, weights: list[float]) -> float:
    """||sum_i w_i * dW_i||_F for LoRA modules of one weight, from the stacked factors (for fused
    experts modules: over every expert, sqrt(sum_e ||sum_i w_i dW_ie||^2))."""
    loaded = [(m.A.load(), m.B.load(), float(m.scale) * float(w)) for m, w in zip(modules, weights)]
    E = getattr(modules[0], "experts", 0)
    if not E:
        return math.sqrt(_stacked_norm_sq(loaded))
    if any(getattr(m, "experts", 0) != E for m in modules):
        raise ValueError(f"modules with different expert counts: {[getattr(m, 'experts', 0) for m in modules]}")
    per_expert = ([(*expert_factors(A, B, E, e), c) for A, B, c in loaded] for e in range(E))
    return math.sqrt(sum(_stacked_norm_sq(terms) for terms in per_expert))


def _stacked_norm_sq(terms: list[tuple[torch.Tensor, torch.Tensor, float]]) -> float:
    """||sum_i c_i B_i A_i||_F^2 from the stacked factors: sum((As As^T) * (diag(c) Bs^T Bs diag(c))),
    the coefficients applied to the r x r Gram exactly in float64 (no float64 copy of a factor)."""
    dtype = torch.promote_types(torch.float32, max((A.dtype for A, _, _ in terms), key=lambda d: d.itemsize))
    As = torch.cat([A.to(dtype) for A, _, _ in terms], dim=0)  # (sum r, in)
    Bs = torch.cat([B.to(dtype) for _, B, _ in terms], dim=1)  # (out, sum r)
    c = torch.cat([torch.full((A.shape[0],), c, dtype=torch.float64) for A, _, c in terms])  # (sum r,)
    GB = _gram(Bs.T) * c[:, None] * c[None, :]
    return max(float((_gram(As) * GB).sum()), 0.0)


def expert_factors(A: torch.Tensor, B: torch.Tensor, experts: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e``'s (A_e, B_e) from PEFT's fused ParamWrapper factors (lora/layer.py ParamWrapper.get_delta_weight):
    A (E * r, in) is expert-major, A_e = A[e * r:(e + 1) * r] (r, in); B (out, r * E) is rank-major,
    B_e = B[:, e::E] (out, r)."""
    r = A.shape[0] // experts
    return A[e * r : (e + 1) * r], B[:, e::experts]  # (r, in), (out, r)


def join_experts(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's fused factors from per-expert (A_e (r, in), B_e (out, r)), the inverse of ``expert_factors``:
    A (E * r, in) expert-major, B (out, r * E) rank-major."""
    A = torch.cat([a for a, _ in pairs], dim=0)  # (E * r, in)
    B = torch.stack([b for _, b in pairs], dim=2).reshape(pairs[0][1].shape[0], -1)  # (out, r, E) -> (out, r * E)
    return A, B


def experts_delta(module, *, dtype: torch.dtype = F32, device: str | torch.device = "cpu", layout: str = "out_in") -> torch.Tensor:
    """Every expert's delta of a fused experts module: (E, out, in), or ``layout="stored"`` as the
    base stores it ((E, in, out) for ``EXPERTS_T``)."""
    A = module.A.load().detach().to(device=device, dtype=dtype)  # (E * r, in)
    B = module.B.load().detach().to(device=device, dtype=dtype)  # (out, r * E)
    E, r = module.experts, module.rank
    Ae = A.reshape(E, r, A.shape[1])  # (E, r, in)
    Be = B.reshape(B.shape[0], r, E).permute(2, 0, 1)  # (E, out, r)
    d = torch.bmm(Be, Ae).mul_(float(module.scale))  # (E, out, in)
    return d.transpose(1, 2) if layout == "stored" and module.kind.transposed else d


def dense_delta(module, *, dtype: torch.dtype = F32, device: str | torch.device = "cpu", layout: str = "out_in") -> torch.Tensor:
    """The whole delta of one ``LoraModule`` in ``dtype``: PEFT's (out, in) by default, or ``layout="stored"``
    ((E, out, in) / the stored 3-D layout for a fused experts module)."""
    if getattr(module, "experts", 0):
        return experts_delta(module, dtype=dtype, device=device, layout=layout)
    A = module.A.load().detach().to(device=device)  # (r, in)
    B = module.B.load().detach().to(device=device)  # (out, r)
    d = factor_product(A, B, float(module.scale), dtype=dtype)  # (out, in)
    return d.T if layout == "stored" and module.kind.transposed else d


def dora_rows(E: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight from E = W + dW in PEFT's (out, in) orientation, in place:
    E * m / ||E||_row, the norm over ``in`` for each output feature (PEFT's ``get_weight_norm``)."""
    return E.mul_((magnitude.reshape(-1) / torch.linalg.vector_norm(E, dim=1)).unsqueeze(1))


def dora_merged(W: torch.Tensor, module, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """m / ||W + dW|| * (W + dW) for a whole stored weight ``W``, float32, in the stored layout."""
    k = DeltaKernel.of(module, device=device)
    Wo = W.to(device=device, dtype=F32)
    Wo = Wo.T if k.transposed else Wo  # (out, in)
    E = torch.addmm(Wo, k.B, k.A, alpha=k.scale)  # (out, in)
    mag = module.magnitude.load().to(device=device, dtype=F32)
    out = dora_rows(E, mag)
    return out.T if k.transposed else out
