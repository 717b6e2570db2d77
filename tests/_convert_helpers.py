"""Helpers for the convert / scratch / MLX / GGUF tests: PEFT as the oracle for every delta."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch

from _numeric import rel_diff
from _oracle import lora_layers, peft_model
from conftest import ADAPTER_BASE, ADAPTERS


def peft_deltas(base_name: str, adapter_path: Path | str) -> dict[str, dict[str, torch.Tensor]]:
    """What PEFT itself makes of an adapter: per module the delta (weight layout) and magnitude/bias."""
    path = Path(adapter_path)
    if path.resolve().is_relative_to(ADAPTERS.resolve()):
        return _fixture_deltas(base_name, str(path))
    return _peft_deltas(base_name, path)


@lru_cache(maxsize=32)
def _fixture_deltas(base_name: str, path: str):
    return _peft_deltas(base_name, Path(path))


def _peft_deltas(base_name: str, adapter_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for short, mod in lora_layers(peft_model(base_name, adapter_path)):
        if "default" not in mod.lora_A and "default" not in getattr(mod, "lora_embedding_A", {}):
            continue
        entry = {"delta": mod.get_delta_weight("default").detach().double()}
        mag = getattr(mod, "lora_magnitude_vector", None)
        if mag is not None and "default" in mag:
            entry["magnitude"] = mag["default"].weight.detach().double().reshape(-1)
        if "default" in mod.lora_B and getattr(mod.lora_B["default"], "bias", None) is not None:
            entry["bias"] = (mod.lora_B["default"].bias.detach().double() * mod.scaling["default"])
        out[short] = entry
    return out


def assert_same_peft(ref: dict, got: dict, *, tol: float = 1e-6) -> float:
    """Every module of ``ref`` is in ``got`` with the same delta (relative Frobenius <= tol); returns the worst."""
    assert set(ref) == set(got), (sorted(set(ref) ^ set(got)))[:5]
    worst = 0.0
    for name, r in ref.items():
        g = got[name]
        assert r["delta"].shape == g["delta"].shape, name
        err = rel_diff(g["delta"], r["delta"])
        worst = max(worst, err)
        assert err <= tol, f"{name}: relative delta error {err:.3g} > {tol:g}"
        for k in ("magnitude", "bias"):
            assert (k in r) == (k in g), f"{name}: {k} lost"
            if k in r:
                assert rel_diff(g[k], r[k]) <= tol, f"{name}: {k} differs"
    return worst


def without_modules_to_save(name: str):
    """A fixture adapter read with its modules_to_save removed (for formats that cannot hold them)."""
    import loratool

    ad = loratool.read_adapter(ADAPTERS / name)
    return replace(ad, modules_to_save={})


def base_of(adapter_name: str) -> str:
    return ADAPTER_BASE[adapter_name]


def llama_cpp_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, transcribed as the test oracle."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)
