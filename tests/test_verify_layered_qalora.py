"""verify --qalora: merge --qalora outputs (dense, float-zeros, gptq) checked layer by layer against the
GPTQ base with QA-LoRA's pooled forward; the reference is PEFT's own QA-LoRA layer (GPTQLoraLinear)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _qalora_helpers import make_gptq_folder, make_qalora_adapter, peft_qalora_layer
from conftest import BASES, assert_one_line_error, invoke
from safetensors.torch import load_file, save_file

from loratool.qalora import DequantizedCheckpoint
from loratool.verify.qalora_outputs import (
    qalora_unmerged_outputs,
    verify_outputs_qalora,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """(GPTQ 4-bit base of the llama fixture, a PEFT use_qalora adapter with Lp = 16)."""
    root = tmp_path_factory.mktemp("qalora-outputs")
    return make_gptq_folder(root / "base", bits=4, group_size=16), make_qalora_adapter(root / "adapter", pool_size=16)


def _peft_reference(base_dir, adapter_dir=None):
    """The llama fixture with deq(base) weights and PEFT's QA-LoRA layers on the adapted modules (none: the base)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(BASES / "llama")).float().eval()
    deq = DequantizedCheckpoint(base_dir)
    model.load_state_dict({k: deq.get(k, dtype=torch.float32) for k in deq.keys()}, strict=True)
    if adapter_dir is None:
        return model
    sd = load_file(adapter_dir / "adapter_model.safetensors")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    for k, A in sd.items():
        if k.endswith("lora_A.weight"):
            module = k[len("base_model.model."):-len(".lora_A.weight")]
            parent, _, leaf = module.rpartition(".")
            layer = peft_qalora_layer(model.get_submodule(module), A.float(), sd[k.replace("lora_A", "lora_B")].float(), r=cfg["r"],
                                      alpha=cfg["lora_alpha"], pool_size=cfg["qalora_group_size"], dtype=torch.float32)
            setattr(model.get_submodule(parent), leaf, layer)
    return model


def test_unmerged_reference_equals_peft_qalora(qa):
    """The pooled unmerged side (GPTQ base dequantized layer by layer) is PEFT's QA-LoRA model to float32 rounding."""
    base, adapter = qa
    inputs, ours = qalora_unmerged_outputs(base, adapter)
    with torch.no_grad():
        theirs = torch.cat([_peft_reference(base, adapter)(**b).logits.reshape(-1, ours.shape[-1]) for b in inputs])
        plain = torch.cat([_peft_reference(base)(**b).logits.reshape(-1, ours.shape[-1]) for b in inputs])
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=64 * torch.finfo(torch.float32).eps * scale)
    assert float((plain - theirs).abs().max()) > 1e-3 * scale


@pytest.mark.parametrize("to", ["dense", "float-zeros", "gptq"])
def test_merge_qalora_outputs_pass(qa, to, tmp_path):
    base, adapter = qa
    code, _, err = invoke("merge", base, adapter, tmp_path / "m", "--qalora", "--to", to)
    assert code == 0, err
    code, out, err = invoke("verify", base, adapter, tmp_path / "m", "--qalora", "--json")
    assert code == 0, err
    rep = json.loads(out)["outputs"]
    assert rep["passed"] and all(s["passed"] for s in rep["layers"]) and len(rep["layers"]) == 4
    assert rep["qalora"]["merged_layout"] == to and rep["qalora"]["pooling"] == "peft"
    if to == "gptq":  # integer zero points: judged against what a correct gptq merge keeps
        assert rep["floor_merged_dtype"] > 1e-3 and rep["relative_diff"] == pytest.approx(rep["floor_merged_dtype"], rel=1e-4)
    else:
        assert rep["relative_diff"] < 1e-2


def _edit(src, dst, fn):
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    fn(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("to", ["dense", "float-zeros"])
def test_fault_in_layer_1_is_named(qa, to, tmp_path):
    base, adapter = qa
    code, _, err = invoke("merge", base, adapter, tmp_path / "m", "--qalora", "--to", to)
    assert code == 0, err
    key = "model.layers.1.mlp.down_proj." + ("weight" if to == "dense" else "zeros")

    def plant(sd):
        sd[key][:2] += 1 if to == "float-zeros" else 0.01 * float(sd[key].float().abs().max())

    bad = _edit(tmp_path / "m", tmp_path / "bad", plant)
    report = verify_outputs_qalora(base, adapter, bad)
    assert not report["passed"]
    assert report["first_divergent_layer"] == 1 and report["first_divergent"] == "model.layers.1"
    assert all(s["passed"] for s in report["layers"][:2])


def test_wrong_pooling_fails_and_bad_options(qa, tmp_path):
    base, adapter = qa
    code, _, err = invoke("merge", base, adapter, tmp_path / "m", "--qalora", "--to", "float-zeros")
    assert code == 0, err
    code, out, err = invoke("verify", base, adapter, tmp_path / "m", "--qalora", "--pooling", "avg")
    assert code == 1 and "first diverging at model.layers.0" in assert_one_line_error(err)
    code, _, err = invoke("verify", base, adapter, tmp_path / "m", "--pooling", "avg")
    assert code == 2 and "--qalora" in assert_one_line_error(err)
    code, _, err = invoke("verify", base, adapter, tmp_path / "m", "--qalora", "--group-size", "32")
    assert code == 2 and "--group-size 32" in assert_one_line_error(err)
