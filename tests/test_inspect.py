"""inspect against PEFT's own resolution, on every fixture and every real adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _oracle import load_base_model
from conftest import ADAPTER_BASE, ADAPTERS, BASES, invoke, peft_resolution
from realworld import PEFT_REALWORLD, REALWORLD, build_model

import loratool


@pytest.mark.parametrize("name", sorted(n for n in ADAPTER_BASE if n != "llama-adalora"))
def test_inspect_matches_peft_on_fixtures(name):
    base = ADAPTER_BASE[name]
    code, out, err = invoke("inspect", ADAPTERS / name, "--base", BASES / base, "--json")
    assert code == 0, err
    report = json.loads(out)
    ours = {m["name"]: m for m in report["modules"]}
    theirs = peft_resolution(load_base_model(base), ADAPTERS / name)
    assert set(ours) == set(theirs)
    for mod, (r, alpha, scaling) in theirs.items():
        assert ours[mod]["rank"] == r, mod
        assert ours[mod]["alpha"] == pytest.approx(alpha), mod
        assert ours[mod]["scale"] == pytest.approx(scaling, rel=1e-12), mod
    # parameter counts against the tensors themselves
    from safetensors.torch import load_file

    sd = load_file(ADAPTERS / name / "adapter_model.safetensors")
    assert report["total_params"] == sum(t.numel() for t in sd.values())
    assert report["lora_params"] == sum(t.numel() for k, t in sd.items() if "lora_" in k)
    model = load_base_model(base)
    assert report["base_params"] == model.num_parameters()
    assert report["percent_of_base"] == pytest.approx(100 * report["lora_params"] / model.num_parameters())
    assert report["format"] == "peft"


def test_inspect_adalora_scale_matches_peft():
    from peft import PeftModel

    adapter = loratool.read_adapter(ADAPTERS / "llama-adalora")
    pm = PeftModel.from_pretrained(load_base_model("llama"), ADAPTERS / "llama-adalora")
    for name, mod in pm.named_modules():
        if hasattr(mod, "ranknum") and "default" in getattr(mod, "ranknum", {}):
            short = name[len("base_model.model."):]
            ours = adapter.modules[short]
            expected = mod.scaling["default"] / (mod.ranknum["default"].item() + 1e-5)
            assert ours.scale == pytest.approx(expected, rel=1e-9)
            E = mod.lora_E["default"]
            ref = mod.lora_B["default"] @ (mod.lora_A["default"] * E) * expected
            assert torch.allclose(ours.delta(), ref.detach(), atol=1e-6)


def test_rank_alpha_patterns_resolved():
    adapter = loratool.read_adapter(ADAPTERS / "llama-patterns")
    mods = adapter.modules
    assert mods["model.layers.0.self_attn.q_proj"].rank == 4
    assert mods["model.layers.1.mlp.down_proj"].rank == 2
    assert mods["model.layers.0.mlp.down_proj"].rank == 8
    assert mods["model.layers.0.self_attn.v_proj"].alpha == 4
    assert mods["model.layers.0.mlp.down_proj"].alpha == 3
    assert mods["model.layers.1.mlp.down_proj"].alpha == 16


def test_rslora_scale():
    adapter = loratool.read_adapter(ADAPTERS / "llama-rslora")
    for m in adapter:
        assert m.scale == pytest.approx(m.alpha / math.sqrt(m.rank))


@pytest.mark.realworld
@pytest.mark.parametrize("name", PEFT_REALWORLD)
def test_inspect_matches_peft_on_realworld(name):

    code, out, err = invoke("inspect", REALWORLD / name, "--json")
    assert code == 0, err
    report = json.loads(out)
    ours = {m["name"]: m for m in report["modules"]}
    theirs = peft_resolution(build_model(name, device="meta"), REALWORLD / name, low_cpu_mem_usage=True)
    assert set(ours) == set(theirs)
    for mod, (r, alpha, scaling) in theirs.items():
        assert (ours[mod]["rank"], ours[mod]["alpha"], ours[mod]["scale"]) == (r, pytest.approx(alpha), pytest.approx(scaling))


@pytest.mark.realworld
def test_realworld_quirks():
    tig = loratool.read_adapter(REALWORLD / "gpt2-tigrinya")
    mlp = tig.modules["transformer.h.0.mlp.c_proj"]
    assert mlp.A.shape == (8, 3072) and mlp.kind.value == "conv1d"
    anirudh = loratool.read_adapter(REALWORLD / "gpt2-anirudh")
    assert list(anirudh.modules_to_save) == ["score.weight"]
    emo = loratool.read_adapter(REALWORLD / "distilbert-emotion-dayanidhi")
    assert set(emo.modules_to_save) == {"classifier.weight", "classifier.bias", "pre_classifier.weight", "pre_classifier.bias"}
    qwen = loratool.read_adapter(REALWORLD / "qwen25-05b-muzammel")
    assert qwen.modules["model.layers.0.self_attn.v_proj"].B.shape == (128, 8)


@pytest.mark.realworld
def test_inspect_with_base_reports_target_that_matches_nothing(realworld_bases):
    code, out, err = invoke("inspect", REALWORLD / "distilbert-sidkris-bin", "--base", realworld_bases("distilbert-sidkris-bin"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert any("'q'" in w and "matches nothing" in w for w in report["warnings"])
    assert report["base_params"] > 60_000_000


def test_inspect_human_output():
    code, out, err = invoke("inspect", ADAPTERS / "llama-lora", "--base", BASES / "llama")
    assert code == 0
    assert "linear modules: 14" in out
    assert "LoRA parameters: 16,384" in out
    assert "rank histogram: r=8: 14" in out


def test_inspect_warns_on_zero_b_and_nan(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    for mode in ("zero", "nan"):
        dst = tmp_path / mode
        shutil.copytree(ADAPTERS / "llama-rslora", dst)
        sd = load_file(dst / "adapter_model.safetensors")
        for k in sd:
            if "lora_B" in k:
                sd[k] = torch.zeros_like(sd[k]) if mode == "zero" else sd[k].fill_(float("nan"))
        save_file(sd, dst / "adapter_model.safetensors")
        code, out, err = invoke("inspect", dst)
        assert code == 0
        assert ("all zeros" if mode == "zero" else "NaN") in err


def test_sub_adapter_by_name():
    code, out, err = invoke("inspect", ADAPTERS / "llama-multi", "--adapter-name", "second", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert {m["name"].rsplit(".", 1)[-1] for m in report["modules"]} == {"v_proj"}
    assert {m["rank"] for m in report["modules"]} == {2}


@pytest.mark.realworld
def test_legacy_bin_realworld_loads_weights_only():
    adapter = loratool.read_adapter(REALWORLD / "gpt2-begreat-bin")
    assert len(adapter) == 12
    assert adapter.modules["transformer.h.0.attn.c_attn"].B.load().shape == (2304, 8)


def test_half_precision_dtype_reported():
    for name, dtype in (("llama-fp16", "float16"), ("llama-bf16", "bfloat16")):
        code, out, _ = invoke("inspect", ADAPTERS / name, "--json")
        assert json.loads(out)["dtype"] == dtype


@pytest.mark.parametrize("name", sorted(ADAPTER_BASE))
def test_lora_params_counts_every_stored_lora_tensor(name):
    """lora_params = every lora_* tensor in the file (AdaLoRA's lora_E included), as PEFT saved it."""
    from safetensors import safe_open

    stored = 0
    for path in (ADAPTERS / name).glob("adapter_model.safetensors"):  # the default adapter (inspect reads that one)
        with safe_open(str(path), "pt") as f:
            stored += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if ".lora_" in k)
    code, out, err = invoke("inspect", ADAPTERS / name, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["lora_params"] == stored


def test_binding_and_inspect_leave_the_adapter_unchanged():
    """Binding returns a bound copy (kinds as the base lays them out); the adapter read stays as read."""
    import dataclasses

    from loratool.adapter import ModuleKind
    from loratool.base import BaseModel, bind_adapter
    from loratool.inspect import inspect_adapter

    read = loratool.read_adapter(ADAPTERS / "gpt2-lora")
    # as a format that cannot tell Conv1D from linear would read it
    ad = read.replace_modules({n: dataclasses.replace(m, kind=ModuleKind.LINEAR) for n, m in read.modules.items()})
    base = BaseModel.open(BASES / "gpt2")
    binding = bind_adapter(ad, base)
    assert {m.kind for m in binding.adapter} == {ModuleKind.CONV1D}
    assert {m.kind for m in ad} == {ModuleKind.LINEAR}
    report = inspect_adapter(ad, base=base)
    assert {m["kind"] for m in report["modules"]} == {"conv1d"}
    assert {m.kind for m in ad} == {ModuleKind.LINEAR} and ad.warnings == read.warnings
    with pytest.raises(dataclasses.FrozenInstanceError):
        ad.modules[next(iter(ad.modules))].kind = ModuleKind.CONV1D
