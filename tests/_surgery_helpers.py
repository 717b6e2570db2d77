"""Oracles for the surgery tests: what PEFT itself loads from an adapter folder."""

from __future__ import annotations


import torch

from _oracle import load_base_model, peft_model  # noqa: F401 (load_base_model: re-exported for the surgery tests)


def peft_view(base_name, adapter_path):
    """Everything PEFT loads from ``adapter_path`` onto the fixture base, in float64.

    Returns:
        (modules, to_save, model): ``modules`` maps module names to dicts with ``delta``
        (scaling * B @ A, (out, in)), ``r``, ``scaling``, ``bias_term`` (scaling * lora_B.bias
        or None) and ``magnitude``; ``to_save`` maps modules_to_save module names to their
        state dicts; ``model`` is the PeftModel.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    pm = peft_model(base_name, adapter_path)
    modules, to_save = {}, {}
    for name, mod in pm.named_modules():
        short = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
        if isinstance(mod, LoraLayer) and "default" in mod.r:
            s = mod.scaling["default"]
            if "default" in mod.lora_A:
                A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                bias = mod.lora_B["default"].bias
            else:
                A, B = mod.lora_embedding_A["default"], mod.lora_embedding_B["default"]
                bias = None
            mag = mod.lora_magnitude_vector["default"].weight if "default" in getattr(mod, "lora_magnitude_vector", {}) else None
            modules[short] = {
                "delta": (B.detach().double() @ A.detach().double()) * s,
                "r": mod.r["default"],
                "scaling": s,
                "alpha": mod.lora_alpha["default"],
                "bias_term": None if bias is None else bias.detach().double() * s,
                "magnitude": None if mag is None else mag.detach().double(),
            }
        elif isinstance(mod, ModulesToSaveWrapper):
            to_save[short] = {k: v.detach().clone() for k, v in mod.modules_to_save["default"].state_dict().items()}
    return modules, to_save, pm


def full_svd_truncation(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The oracle: best rank-k approximation from torch.linalg.svd of the full matrix, float64."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def assert_full_tensors_carried(ad, to_save, pm):
    """modules_to_save (and full embeddings saved beside their LoRA) are what PEFT loaded."""
    for tname, t in ad.modules_to_save.items():
        module, leaf = tname.rsplit(".", 1)
        wrapper = next((w for w in to_save if tname.startswith(w + ".")), None)
        if wrapper is not None:
            got = to_save[wrapper][tname[len(wrapper) + 1:]]
        else:  # a LoRA-adapted embedding saved whole: PEFT loads it into the base layer
            got = getattr(pm.get_submodule(f"base_model.model.{module}").base_layer, leaf)
        assert torch.equal(got.detach(), t.load()), tname
