"""`loratool unmerge`: round trips against the base, refusals, half-precision rounding bounds."""

from __future__ import annotations

import json

import pytest
import torch

from _merge_helpers import edit_adapter, fixture, load_dir, load_model, siblings
from conftest import BASES, assert_one_line_error, invoke

import loratool
from loratool.merge import merge_model

# fp32 bases, no DoRA, no modules_to_save: unmerge(merge(x)) must give x back
ROUND_TRIP = ["llama-lora", "llama-rslora", "llama-patterns", "llama-embedding", "llama-fp16", "llama-bf16", "llama-layers", "llama-adalora", "llama-multi", "gpt2-lora", "qwen2-lora", "qwen2-bias"]


def _delta_scale(base_sd, merged_sd, key):
    return float((merged_sd[key].double() - base_sd[key].double()).abs().max())


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_float32(name, tmp_path):
    base, adapter = fixture(name)
    code, _, err = invoke("merge", base, adapter, tmp_path / "merged")
    assert code == 0, err
    code, out, err = invoke("unmerge", tmp_path / "merged", adapter, tmp_path / "back", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "unmerged" in out
    base_sd, merged_sd, back = load_dir(base), load_dir(tmp_path / "merged"), load_dir(tmp_path / "back")
    assert set(back) == set(base_sd)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["command"] == "unmerge" and report["rounding"]["half_precision"] == []
    touched = {m["tensor"] for m in report["modules"]}
    ad = loratool.read_adapter(adapter)
    bm = loratool.BaseModel.open(base)
    touched |= {bm.tensor_name(f"{m.name}.bias") for m in ad if m.bias is not None}
    for key, t in back.items():
        if key in touched:
            scale = _delta_scale(base_sd, merged_sd, key)
            assert scale > 0, key
            err_ = float((t.double() - base_sd[key].double()).abs().max())
            assert err_ <= 1e-6 * max(scale, 1.0), (key, err_, scale)
        else:
            assert torch.equal(t, base_sd[key]), key
    # the unmerged folder is a loadable model again
    load_model(tmp_path / "back")


def test_round_trip_bfloat16_within_reported_bound(tmp_path):
    base, adapter = fixture("llama-sharded-lora")
    merge_model(base, adapter, tmp_path / "merged", device="cpu")
    rep = merge_model(tmp_path / "merged", adapter, tmp_path / "back", sign=-1, device="cpu", report_path=tmp_path / "r.json")
    assert rep["rounding"]["half_precision"] == ["bfloat16"]
    assert rep["rounding"]["max_abs_bound"] > 0
    assert "ulp" in rep["rounding"]["note"]
    base_sd, back = load_dir(base), load_dir(tmp_path / "back")
    exact_hits = 0
    for m in rep["modules"]:
        err = (back[m["tensor"]].float() - base_sd[m["tensor"]].float()).abs().max()
        assert float(err) <= m["rounding_bound"] * 1.0001, (m["name"], float(err), m["rounding_bound"])
        exact_hits += int(torch.equal(back[m["tensor"]], base_sd[m["tensor"]]))
    assert exact_hits < len(rep["modules"])  # half precision really is lossy here: the bound is not vacuous
    assert sorted(p.name for p in (tmp_path / "back").glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))


def test_round_trip_fp32_base_merged_to_bfloat16(tmp_path):
    # merge --dtype bfloat16, unmerge back to float32: error bounded by half an ulp of the merged bf16 weight
    base, adapter = fixture("llama-lora")
    merge_model(base, adapter, tmp_path / "merged", dtype="bfloat16", device="cpu")
    rep = merge_model(tmp_path / "merged", adapter, tmp_path / "back", dtype="float32", sign=-1, device="cpu")
    base_sd, back = load_dir(base), load_dir(tmp_path / "back")
    for m in rep["modules"]:
        err = float((back[m["tensor"]] - base_sd[m["tensor"]]).abs().max())
        assert 0 < err <= m["rounding_bound"] * 1.0001 + 1e-6, m["name"]


def test_round_trip_tied_head(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    pm = get_peft_model(load_model(BASES / "qwen2"), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    merge_model(BASES / "qwen2", tmp_path / "ad", tmp_path / "merged", device="cpu")
    merge_model(tmp_path / "merged", tmp_path / "ad", tmp_path / "back", sign=-1, device="cpu")
    base_sd, back = load_dir(BASES / "qwen2"), load_dir(tmp_path / "back")
    for key in base_sd:
        assert torch.allclose(back[key], base_sd[key], atol=1e-5), key


def test_refuses_dora(tmp_path):
    base, adapter = fixture("llama-dora")
    merge_model(base, adapter, tmp_path / "merged", device="cpu")
    code, _, err = invoke("unmerge", tmp_path / "merged", adapter, tmp_path / "back")
    assert code == 2
    assert "DoRA" in assert_one_line_error(err)
    assert not (tmp_path / "back").exists() and not siblings(tmp_path / "back")


@pytest.mark.parametrize("name", ["roberta-cls", "distilbert-cls"])
def test_modules_to_save_refused_or_kept(name, tmp_path):
    base, adapter = fixture(name)
    merge_model(base, adapter, tmp_path / "merged", device="cpu")
    code, _, err = invoke("unmerge", tmp_path / "merged", adapter, tmp_path / "back")
    assert code == 2
    line = assert_one_line_error(err)
    assert "modules_to_save" in line and "--keep-modules-to-save" in line and "classifier" in line
    assert not (tmp_path / "back").exists()
    code, _, err = invoke("unmerge", tmp_path / "merged", adapter, tmp_path / "back", "--keep-modules-to-save", "--json")
    assert code == 0, err
    base_sd, merged_sd, back = load_dir(base), load_dir(tmp_path / "merged"), load_dir(tmp_path / "back")
    ad = loratool.read_adapter(adapter)
    for key, t in back.items():
        if key in ad.modules_to_save:
            assert torch.equal(t, merged_sd[key]), key  # kept as merged
        else:
            assert torch.allclose(t, base_sd[key], atol=1e-6), key


def test_unmerge_refusals_share_merge_rules(tmp_path):
    base, adapter = fixture("llama-lora")
    merge_model(base, adapter, tmp_path / "merged", device="cpu")
    bad = edit_adapter(adapter, tmp_path / "nan", tensors={"layers.0.self_attn.v_proj.lora_A": lambda t: t.fill_(float("inf"))})
    code, _, err = invoke("unmerge", tmp_path / "merged", bad, tmp_path / "back")
    assert code == 2 and "NaN or Inf" in assert_one_line_error(err)
    assert not (tmp_path / "back").exists() and not siblings(tmp_path / "back")
    (tmp_path / "exists").mkdir()
    code, _, err = invoke("unmerge", tmp_path / "merged", adapter, tmp_path / "exists")
    assert code == 2 and "already exists" in assert_one_line_error(err)
    code, _, err = invoke("unmerge", tmp_path / "merged", adapter, tmp_path / "merged" / "inside")
    assert code == 2 and "must not be an input" in assert_one_line_error(err)
    code, _, err = invoke("unmerge", BASES / "gpt2", adapter, tmp_path / "back")
    assert code == 2 and "not in the base model" in assert_one_line_error(err)


def test_unmerge_help_has_example():
    code, out, _ = invoke("unmerge", "--help")
    assert code == 0 and "Example:" in out and "--keep-modules-to-save" in out
