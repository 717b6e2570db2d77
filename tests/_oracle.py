"""The oracle: what PEFT and transformers themselves make of a base and an adapter.

Every test that compares loratool with PEFT loads through here: the fixture (or any) base as
its transformers task model, the adapter with ``PeftModel.from_pretrained``, and each LoRA
module's delta as PEFT computes it (``get_delta_weight``: (out, in) for linear layers, the
stored layout for Conv1D and embeddings).
"""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import BASES


def load_base_model(base_name_or_path, *, dtype: torch.dtype = torch.float32):
    """The transformers task model of a fixture base (its name) or a model folder, in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = Path(base_name_or_path)
    if not folder.is_dir():
        folder = BASES / str(base_name_or_path)
    arch = (AutoConfig.from_pretrained(folder).architectures or [""])[0]
    cls = AutoModelForSequenceClassification if "SequenceClassification" in arch else AutoModelForCausalLM
    return cls.from_pretrained(folder, dtype=dtype)


def peft_model(base_name_or_path, adapter_path):
    """``PeftModel.from_pretrained`` of the adapter on the base."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base_model(base_name_or_path), str(adapter_path))


def lora_layers(pm):
    """(module name without PEFT's ``base_model.model.`` prefix, LoraLayer) of the default adapter."""
    from peft.tuners.lora import LoraLayer

    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.r:
            yield (name[len("base_model.model."):] if name.startswith("base_model.model.") else name), mod


def peft_deltas(base_name_or_path, adapter_path, *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Each module's delta as PEFT computes it (``get_delta_weight``), in ``dtype``."""
    pm = peft_model(base_name_or_path, adapter_path)
    return {name: mod.get_delta_weight("default").detach().to(dtype) for name, mod in lora_layers(pm)}
