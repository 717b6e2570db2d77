"""verify --outputs, layer-streamed, for several adapters merged together and for fused MoE expert LoRA.

Several adapters: the unmerged side applies their combined delta D of each weight (the merge's own
spec: DARE's masks come from the seed) as x D^T; with linear weights 1 it is PEFT with both adapters
active. Experts: the unmerged side holds each fused expert parameter as W + dW, which is PEFT's own
ParamWrapper forward; Qwen3-MoE checkpoints store one expert at a time, gpt-oss the fused (E, in, out).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _oracle import load_base_model
from conftest import ADAPTERS, BASES, assert_one_line_error, invoke
from safetensors.torch import load_file, save_file

from loratool.engine.combine import CombineSpec
from loratool.merge import merge_model
from loratool.verify import verify_outputs
from loratool.verify.layered import unmerged_outputs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _close(ours: torch.Tensor, theirs: torch.Tensor, plain: torch.Tensor) -> None:
    """Equal to float32 rounding, and the adapter's effect far beyond it."""
    assert ours.shape == theirs.shape
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=64 * torch.finfo(torch.float32).eps * scale)
    assert float((plain - theirs).abs().max()) > 1e-3 * scale


def _peft_outputs(pm, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(PEFT's outputs with its active adapters, the base's) on the inputs, (tokens, vocab)."""
    with torch.no_grad():
        ys = torch.cat([pm(**b).logits.reshape(-1, pm.config.vocab_size) for b in inputs])
        with pm.disable_adapter():
            plain = torch.cat([pm(**b).logits.reshape(-1, pm.config.vocab_size) for b in inputs])
    return ys, plain


def _edit(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    fn(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# ----------------------------------------------------------------------------- several adapters

LLAMA = [ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora", ADAPTERS / "llama-layers"]
SPECS = {
    "linear": {"weights": [0.6, 0.3, 0.5]},
    "ties": {"weights": [0.6, 0.3, 0.5], "density": 0.5},
    "dare_ties": {"weights": [0.6, 0.3, 0.5], "density": 0.5, "seed": 9},
}


def test_combined_reference_equals_peft_with_both_adapters_active():
    """linear, weights 1: the unmerged side is PEFT running both adapters at once."""
    from peft import PeftModel

    spec = CombineSpec.checked(2)
    inputs, ours = unmerged_outputs(BASES / "llama", LLAMA[:2], combine=spec)
    pm = PeftModel.from_pretrained(load_base_model("llama"), str(LLAMA[0]), adapter_name="a").eval()
    pm.load_adapter(str(LLAMA[1]), adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    theirs, plain = _peft_outputs(pm, inputs)
    _close(ours, theirs, plain)


@pytest.mark.parametrize("method", list(SPECS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_combined_merges_pass_every_stage(tmp_path, method, dtype):
    spec = CombineSpec.checked(3, method=method, **SPECS[method])
    merge_model(BASES / "llama", LLAMA, tmp_path / "m", combine=spec, dtype=dtype, force=True)
    report = verify_outputs(BASES / "llama", LLAMA, tmp_path / "m", combine=spec)
    assert report["passed"] and all(s["passed"] for s in report["layers"]), report
    assert report["combine"]["method"] == method and report["adapters"] == [str(a) for a in LLAMA]
    assert report["first_divergent"] is None


@pytest.fixture(scope="module")
def layer1_adapters(tmp_path_factory):
    """Two adapters that touch layer 1 only (PEFT's layers_to_transform)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("layer1")
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "v_proj", "down_proj"], layers_to_transform=[1], init_lora_weights=False)
    get_peft_model(load_base_model("llama"), cfg).save_pretrained(root / "second")
    return [ADAPTERS / "llama-layers", root / "second"]


@pytest.mark.parametrize("wrong", [{"seed": 10}, {"density": 0.6}])
def test_another_seed_or_density_fails_at_the_first_layer_touched(tmp_path, layer1_adapters, wrong):
    good = {"method": "dare_ties", "weights": [0.7, 0.4], "density": 0.5, "seed": 9}
    merge_model(BASES / "llama", layer1_adapters, tmp_path / "m", combine=CombineSpec.checked(2, **good), force=True)
    ok = verify_outputs(BASES / "llama", layer1_adapters, tmp_path / "m", combine=CombineSpec.checked(2, **good))
    assert ok["passed"], ok
    report = verify_outputs(BASES / "llama", layer1_adapters, tmp_path / "m", combine=CombineSpec.checked(2, **{**good, **wrong}))
    assert not report["passed"]
    assert report["first_divergent_layer"] == 1 and report["first_divergent"] == "model.layers.1"
    assert all(s["passed"] for s in report["layers"][:2])  # embeddings, layer 0: untouched


def test_cli_several_adapters_outputs(tmp_path):
    args = ["--method", "dare_ties", "--density", "0.5", "--weights", "0.6,0.3,0.5", "--seed", "9"]
    code, out, err = invoke("merge", BASES / "llama", *LLAMA, tmp_path / "m", *args, "--verify", "outputs", "--json")
    assert code == 0, err
    rep = json.loads(out)["verify"]
    assert rep["passed"] and rep["outputs"]["passed"] and rep["outputs"]["combine"]["seed"] == 9
    code, out, err = invoke("verify", BASES / "llama", tmp_path / "m", "--adapters", *LLAMA, *args, "--outputs")
    assert code == 0, err
    wrong = [a if a != "9" else "10" for a in args]
    code, out, err = invoke("verify", BASES / "llama", tmp_path / "m", "--adapters", *LLAMA, *wrong, "--outputs")
    assert code == 1
    assert "first diverging at model.layers.0" in assert_one_line_error(err)
