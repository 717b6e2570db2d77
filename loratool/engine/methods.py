"""How several adapters combine (torch-free: the CLI builds its options from it).

The math is in ``engine.combine``; here only the names and the checked spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loratool.errors import InputError

METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SPARSIFYING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
MAJORITY_SIGN = ("total", "frequency")
_NEEDS_DENSITY = SPARSIFYING
_ELECTS_SIGN = ("ties", "dare_ties")
_RANDOM = ("dare_linear", "dare_ties")


@dataclass(frozen=True)
class CombineSpec:
    """How several adapters combine: the method, one weight per adapter and the method's options."""

    method: str = "linear"
    weights: tuple[float, ...] = ()
    density: float | None = None
    majority_sign: str = "total"
    seed: int = 0

    @classmethod
    def checked(cls, n_adapters: int, *, method: str = "linear", weights=None, density: float | None = None,
                majority_sign: str = "total", seed: int = 0) -> "CombineSpec":
        """A spec for ``n_adapters`` adapters, every option checked (weights default to 1 each).

        Raises:
            InputError: an unknown method or sign rule, a weight count that does not match, a
                weight that is not finite, a density outside (0, 1], or missing where the method needs it.
        """
        if method not in METHODS:
            raise InputError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
        if majority_sign not in MAJORITY_SIGN:
            raise InputError(f"unknown --majority-sign {majority_sign!r} (total or frequency)")
        ws = tuple(float(w) for w in (weights if weights is not None else [1.0] * n_adapters))
        if len(ws) != n_adapters:
            raise InputError(f"{len(ws)} weights for {n_adapters} adapters")
        if not all(math.isfinite(w) for w in ws):
            raise InputError(f"weights must be finite numbers, got {list(ws)}")
        if method in _NEEDS_DENSITY and density is None:
            raise InputError(f"--method {method} needs --density (the fraction of each delta's entries to keep, in (0, 1])")
        if density is not None and not (0.0 < float(density) <= 1.0):
            raise InputError(f"--density must be in (0, 1], got {density}")
        if method not in _NEEDS_DENSITY and density is not None:
            raise InputError(f"--density applies to {', '.join(_NEEDS_DENSITY)}, not {method}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise InputError(f"--seed must be a whole number from 0 to 2^63 - 1, got {seed!r}")
        return cls(method, ws, None if density is None else float(density), majority_sign, seed)

    @property
    def sparsifying(self) -> bool:
        return self.method in SPARSIFYING

    def as_dict(self) -> dict:
        d = {"method": self.method, "weights": list(self.weights)}
        if self.density is not None:
            d["density"] = self.density
        if self.method in _ELECTS_SIGN:
            d["majority_sign"] = self.majority_sign
        if self.method in _RANDOM:
            d["seed"] = self.seed
        return d


