"""PEFT reading edge cases and writing: PEFT must load what loratool writes, unchanged."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from _oracle import lora_layers, peft_model
from conftest import ADAPTER_BASE, ADAPTERS, assert_one_line_error, invoke

import loratool
from loratool.formats.peft import pattern_key, target_matches


def _peft_deltas(base_name, adapter_dir):
    """Each module's delta as PEFT computes it (get_delta_weight), in (out, in) order, and the PeftModel."""
    pm = peft_model(base_name, adapter_dir)
    return {name: mod.get_delta_weight("default").detach().float() for name, mod in lora_layers(pm)}, pm


@pytest.mark.parametrize(
    "name", ["llama-lora", "llama-patterns", "llama-rslora", "gpt2-lora", "llama-embedding", "qwen2-bias", "roberta-cls", "llama-adalora", "llama-layers"]
)
def test_write_peft_roundtrip_loads_in_peft(tmp_path, name):
    adapter = loratool.read_adapter(ADAPTERS / name)
    out = tmp_path / "out"
    loratool.write_adapter(adapter, out)
    base = ADAPTER_BASE[name]
    ours, pm = _peft_deltas(base, out)
    ref_adapter = loratool.read_adapter(ADAPTERS / name)
    assert set(ours) == set(ref_adapter.modules)
    for mod_name, mod in ref_adapter.modules.items():
        from loratool.engine.delta import dense_delta

        expected = dense_delta(mod, layout="stored")
        got = ours[mod_name]
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    # modules_to_save survive
    sd = pm.state_dict()
    for tname, t in ref_adapter.modules_to_save.items():
        module, leaf = tname.rsplit(".", 1)
        key = f"base_model.model.{module}.modules_to_save.default.{leaf}"
        if key in sd:
            torch.testing.assert_close(sd[key], t.load())


def test_write_refuses_existing_out(tmp_path):
    adapter = loratool.read_adapter(ADAPTERS / "llama-rslora")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(loratool.OutputExistsError):
        loratool.write_adapter(adapter, out)
    loratool.write_adapter(adapter, out, force=True)
    assert (out / "adapter_config.json").exists()
    assert not list(tmp_path.glob(".out.loratool-*"))


def test_pattern_key_rule():
    keys = ["q_proj", "^model.layers.1.mlp.down_proj"]
    assert pattern_key(keys, "model.layers.0.self_attn.q_proj") == "q_proj"
    assert pattern_key(keys, "model.layers.1.mlp.down_proj") == "^model.layers.1.mlp.down_proj"
    assert pattern_key(keys, "model.layers.0.mlp.down_proj") is None
    assert pattern_key(["proj"], "model.layers.0.self_attn.q_proj") is None  # whole components only


def test_target_matches_rule():
    assert target_matches(["q_proj"], "model.layers.0.self_attn.q_proj")
    assert not target_matches(["proj"], "model.layers.0.self_attn.q_proj")
    assert target_matches(r".*\.q_proj", "model.layers.0.self_attn.q_proj")
    assert not target_matches(r"q_proj", "model.layers.0.self_attn.q_proj")
    assert target_matches(["q_proj"], "model.layers.1.self_attn.q_proj", layers_to_transform=[1])
    assert not target_matches(["q_proj"], "model.layers.0.self_attn.q_proj", layers_to_transform=[1])


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(ADAPTERS / name, dst)
    return dst


@pytest.mark.parametrize("peft_type", ["LOHA", "LOKR", "IA3", "VERA", "OFT", "PROMPT_TUNING", "PREFIX_TUNING"])
def test_non_lora_types_refused(tmp_path, peft_type):
    dst = _copy("llama-rslora", tmp_path)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["peft_type"] = peft_type
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    code, out, err = invoke("inspect", dst)
    assert code == 2
    assert peft_type in assert_one_line_error(err)


def test_legacy_merged_qkv_refused(tmp_path):
    dst = _copy("llama-rslora", tmp_path)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["enable_lora"] = [True, False, True]
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = invoke("inspect", dst)
    assert code == 2 and "merged-QKV" in assert_one_line_error(err)


def test_old_and_new_configs(tmp_path):
    # PEFT 0.3-era config: few fields, merge_weights, enable_lora null
    dst = _copy("llama-lora", tmp_path)
    old = {"base_model_name_or_path": "x", "bias": "none", "enable_lora": None, "fan_in_fan_out": False, "inference_mode": True,
           "lora_alpha": 16, "lora_dropout": 0.05, "merge_weights": False, "modules_to_save": None, "peft_type": "LORA", "r": 8,
           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "task_type": "CAUSAL_LM"}
    (dst / "adapter_config.json").write_text(json.dumps(old))
    code, out, err = invoke("inspect", dst, "--json")
    assert code == 0, err
    assert {m["scale"] for m in json.loads(out)["modules"]} == {2.0}
    # a config from a future PEFT with unknown fields: a warning, not a crash
    new = dict(old, some_future_field={"x": 1}, another_one=3)
    new.pop("enable_lora")
    (dst / "adapter_config.json").write_text(json.dumps(new))
    code, out, err = invoke("inspect", dst, "--json")
    assert code == 0
    assert any("some_future_field" in w for w in json.loads(out)["warnings"])


def test_adapter_model_bin_and_file_path(tmp_path):
    from safetensors.torch import load_file

    dst = _copy("llama-rslora", tmp_path)
    sd = load_file(dst / "adapter_model.safetensors")
    (dst / "adapter_model.safetensors").unlink()
    torch.save(sd, dst / "adapter_model.bin")
    a = loratool.read_adapter(dst)
    b = loratool.read_adapter(ADAPTERS / "llama-rslora" / "adapter_model.safetensors")
    assert set(a.modules) == set(b.modules)
    for n in a.modules:
        torch.testing.assert_close(a.modules[n].delta(), b.modules[n].delta())
