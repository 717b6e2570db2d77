"""combine: weighted sums of adapters, exact (cat) or optimal low rank (svd), checked against PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from _surgery_helpers import full_svd_truncation, peft_view
from conftest import ADAPTERS, assert_one_line_error, invoke
from _numeric import rel_diff

import loratool
from loratool.adapter import LoraModule
from loratool.io.store import LazyTensor

# different ranks, alphas, rsLoRA and alpha/rank patterns, partly overlapping modules
INPUTS = ["llama-lora", "llama-rslora", "llama-patterns"]
WEIGHTS = [0.7, -0.3, 0.5]


def _weighted_sum(names, weights):
    total: dict[str, torch.Tensor] = {}
    for name, w in zip(names, weights):
        for mod, m in loratool.read_adapter(ADAPTERS / name).modules.items():
            d = m.delta(dtype=torch.float64) * w
            total[mod] = total[mod] + d if mod in total else d
    return total


def test_combine_cat_equals_weighted_sum(tmp_path):
    code, out, err = invoke("combine", *(ADAPTERS / n for n in INPUTS), tmp_path / "out",
                            "--weights", ",".join(map(str, WEIGHTS)), "--json")
    assert code == 0, err
    report = json.loads(out)
    expected = _weighted_sum(INPUTS, WEIGHTS)
    loaded, _, _ = peft_view("llama", tmp_path / "out")
    assert set(loaded) == set(expected)
    ads = [loratool.read_adapter(ADAPTERS / n) for n in INPUTS]
    for mod, d in expected.items():
        assert loaded[mod]["r"] == sum(a.modules[mod].rank for a in ads if mod in a.modules)
        assert rel_diff(loaded[mod]["delta"], d) < 1e-6, mod
    assert report["method"] == "cat" and report["weights"] == WEIGHTS
    # the output follows the first input's rule (no rsLoRA)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["use_rslora"] is False


def test_combine_rslora_first_keeps_rule(tmp_path):
    code, _, err = invoke("combine", ADAPTERS / "llama-rslora", ADAPTERS / "llama-lora", tmp_path / "out", "--weights", "1,1")
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True
    loaded, _, _ = peft_view("llama", tmp_path / "out")
    for mod, d in _weighted_sum(["llama-rslora", "llama-lora"], [1, 1]).items():
        assert rel_diff(loaded[mod]["delta"], d) < 1e-6, mod


@pytest.mark.parametrize("rank", [2, 5])
def test_combine_svd_is_optimal_truncation(rank, tmp_path):
    code, out, err = invoke("combine", *(ADAPTERS / n for n in INPUTS), tmp_path / "out", "--weights",
                            ",".join(map(str, WEIGHTS)), "--method", "svd", "--rank", rank, "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)["modules"]}
    loaded, _, _ = peft_view("llama", tmp_path / "out")
    for mod, d in _weighted_sum(INPUTS, WEIGHTS).items():
        assert loaded[mod]["r"] == rank
        assert rel_diff(loaded[mod]["delta"], full_svd_truncation(d, rank)) < 1e-6, mod
        S = torch.linalg.svdvals(d)
        assert rows[mod]["kept_energy"] == pytest.approx(float((S[:rank] ** 2).sum() / (S ** 2).sum()), rel=1e-6)


def test_combine_svd_single_adapter_is_a_truncation_not_linear(tmp_path):
    """PEFT's add_weighted_adapter turns a one-adapter svd into linear; here it is the SVD."""
    code, _, err = invoke("combine", ADAPTERS / "llama-lora", tmp_path / "out", "--weights", "2", "--method", "svd", "--rank", 3)
    assert code == 0, err
    loaded, _, _ = peft_view("llama", tmp_path / "out")
    for mod, m in loratool.read_adapter(ADAPTERS / "llama-lora").modules.items():
        assert loaded[mod]["r"] == 3
        assert rel_diff(loaded[mod]["delta"], full_svd_truncation(2 * m.delta(dtype=torch.float64), 3)) < 1e-6


def test_combine_svd_rank_above_sum_pads_exactly(tmp_path):
    code, _, err = invoke("combine", ADAPTERS / "llama-rslora", ADAPTERS / "llama-rslora", tmp_path / "out",
                          "--weights", "1,0.5", "--method", "svd", "--rank", 12)
    assert code == 0, err
    loaded, _, _ = peft_view("llama", tmp_path / "out")
    for mod, m in loratool.read_adapter(ADAPTERS / "llama-rslora").modules.items():
        assert loaded[mod]["r"] == 12
        assert rel_diff(loaded[mod]["delta"], 1.5 * m.delta(dtype=torch.float64)) < 1e-6


def test_combine_bias_terms_add(tmp_path):
    code, _, err = invoke("combine", ADAPTERS / "qwen2-bias", ADAPTERS / "qwen2-bias", tmp_path / "out",
                          "--weights", "0.5,0.25", "--alpha", "3")
    assert code == 0, err
    loaded, _, _ = peft_view("qwen2", tmp_path / "out")
    for mod, m in loratool.read_adapter(ADAPTERS / "qwen2-bias").modules.items():
        assert rel_diff(loaded[mod]["delta"], 0.75 * m.delta(dtype=torch.float64)) < 1e-6
        assert torch.allclose(loaded[mod]["bias_term"], 0.75 * m.scale * m.bias.load().double(), rtol=1e-6, atol=1e-8)
        assert loaded[mod]["alpha"] == 3


def test_combine_gpt2_and_modules_to_save(tmp_path):
    code, _, err = invoke("combine", ADAPTERS / "roberta-cls", ADAPTERS / "roberta-cls", tmp_path / "out", "--weights", "1,-0.5")
    assert code == 0, err
    loaded, to_save, _ = peft_view("roberta", tmp_path / "out")
    ad = loratool.read_adapter(ADAPTERS / "roberta-cls")
    for mod, m in ad.modules.items():
        assert rel_diff(loaded[mod]["delta"], 0.5 * m.delta(dtype=torch.float64)) < 1e-6
    assert torch.equal(to_save["classifier"]["out_proj.weight"], ad.modules_to_save["classifier.out_proj.weight"].load())
    code, _, err = invoke("combine", ADAPTERS / "gpt2-lora", tmp_path / "g", "--weights", "3")
    assert code == 0, err
    loaded, _, _ = peft_view("gpt2", tmp_path / "g")
    for mod, m in loratool.read_adapter(ADAPTERS / "gpt2-lora").modules.items():
        assert rel_diff(loaded[mod]["delta"], 3 * m.delta(dtype=torch.float64)) < 1e-6


def test_combine_refuses_different_bases(tmp_path):
    code, _, err = invoke("combine", ADAPTERS / "llama-lora", ADAPTERS / "qwen2-lora", tmp_path / "out")
    assert code == 2
    assert "different bases" in assert_one_line_error(err)
    # same base name but other shapes: a llama-lora copy whose q_proj is 64 -> 96
    ad = loratool.read_adapter(ADAPTERS / "llama-lora")
    name = "model.layers.0.self_attn.q_proj"
    m = ad.modules[name]
    ad.modules[name] = LoraModule(name, m.kind, m.A, LazyTensor.of(torch.randn(96, m.rank)), alpha=m.alpha, scale=m.scale)
    loratool.write_adapter(ad, tmp_path / "other")
    code, _, err = invoke("combine", ADAPTERS / "llama-lora", tmp_path / "other", tmp_path / "out", "--ignore-base-name")
    assert code == 2
    line = assert_one_line_error(err)
    assert "different bases" in line and name in line
    assert not (tmp_path / "out").exists()


def test_combine_refuses_conflicting_modules_to_save(tmp_path):
    ad = loratool.read_adapter(ADAPTERS / "roberta-cls")
    key = "classifier.out_proj.bias"
    ad.modules_to_save[key] = LazyTensor.of(ad.modules_to_save[key].load() + 1)
    loratool.write_adapter(ad, tmp_path / "other")
    code, _, err = invoke("combine", ADAPTERS / "roberta-cls", tmp_path / "other", tmp_path / "out")
    assert code == 2
    assert key in assert_one_line_error(err)


@pytest.mark.parametrize("args", [
    ["--weights", "1"], ["--weights", "1,x"], ["--weights", "1,nan"], ["--method", "svd", "--rank", "0"],
    ["--rank", "4"], ["--alpha", "0"], ["--method", "mean"],
])
def test_combine_bad_arguments_exit_2(args, tmp_path):
    code, out, err = invoke("combine", ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora", tmp_path / "out", *args)
    assert code == 2, (args, out, err)
    assert_one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_combine_refuses_dora_and_needs_out(tmp_path):
    code, _, err = invoke("combine", ADAPTERS / "llama-lora", ADAPTERS / "llama-dora", tmp_path / "out")
    assert code == 2 and "DoRA" in assert_one_line_error(err)
    code, _, err = invoke("combine", ADAPTERS / "llama-lora")
    assert code == 2
    assert_one_line_error(err)
