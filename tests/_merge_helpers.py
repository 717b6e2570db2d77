"""Helpers shared by test_merge.py and test_unmerge.py: loading outputs, PEFT oracles, tolerances."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import ADAPTERS, BASES


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a folder."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def model_class(folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    arch = (AutoConfig.from_pretrained(folder).architectures or [""])[0]
    return AutoModelForSequenceClassification if "SequenceClassification" in arch else AutoModelForCausalLM


def load_model(folder: Path, dtype="auto"):
    model = model_class(folder).from_pretrained(folder, dtype=dtype)
    return model.eval()


def peft_merged(base: Path, adapter: Path, out: Path) -> Path:
    """PEFT's merge_and_unload + save_pretrained of ``adapter`` on ``base`` (the oracle)."""
    from peft import PeftModel

    model = load_model(base)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)
    return out


def peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the unmerged PeftModel."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load_model(base), str(adapter)).eval()
    with torch.no_grad():
        return pm(input_ids=ids).logits.float()


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model, info = model_class(folder).from_pretrained(folder, dtype="auto", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (normal range), as float32."""
    finfo = torch.finfo(dtype)
    mant = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[dtype]
    x = x.float().abs().clamp(min=finfo.tiny)
    return torch.exp2(torch.floor(torch.log2(x)) - mant)


def assert_close_rounding(ours: torch.Tensor, theirs: torch.Tensor, name: str, *, ulps: float = 1.0) -> None:
    """Equal up to rounding of the output dtype (float32: a few ulps; half: ``ulps`` ulp)."""
    assert ours.dtype == theirs.dtype, (name, ours.dtype, theirs.dtype)
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    a, b = ours.float(), theirs.float()
    if ours.dtype == torch.float32:
        # float32 rounding of W + dW is relative to the operands, not to a result that may cancel:
        # measure it at the scale of the tensor
        tol = 4 * ulp(b.abs().max().reshape(1), torch.float32) if b.numel() else 0
    else:
        tol = ulps * ulp(torch.maximum(a.abs(), b.abs()), ours.dtype)
    bad = (a - b).abs() > tol
    assert not bad.any(), f"{name}: {int(bad.sum())} elements differ beyond rounding, max {float((a - b).abs().max())}"


def edit_adapter(src: Path, dst: Path, *, tensors=None, config=None) -> Path:
    """A copy of a PEFT adapter with some tensors or config fields changed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if tensors:
        sd = load_file(dst / "adapter_model.safetensors")
        for key, fn in tensors.items():
            hits = [k for k in sd if key in k]
            assert hits, key
            for k in hits:
                sd[k] = fn(sd[k])
        save_file(sd, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def siblings(out: Path) -> list[Path]:
    """Temporary siblings of OUT left behind."""
    return list(out.parent.glob(f".{out.name}.loratool-*"))


def fixture(name: str) -> tuple[Path, Path]:
    from conftest import ADAPTER_BASE

    return BASES / ADAPTER_BASE[name], ADAPTERS / name
