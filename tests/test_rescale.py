"""rescale: new alpha / scaling rule, every module's dW (and bias term, DoRA magnitude) kept."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _surgery_helpers import assert_full_tensors_carried, load_base_model, peft_view
from conftest import ADAPTER_BASE, ADAPTERS, assert_one_line_error, invoke
from _numeric import rel_diff

import loratool


@pytest.mark.parametrize("name,args,rslora", [
    ("llama-lora", ["--alpha", "5", "--rslora"], True),
    ("llama-patterns", ["--alpha", "3"], False),
    ("llama-rslora", ["--no-rslora"], False),
    ("llama-dora", ["--alpha", "2", "--split", "balanced"], False),
    ("qwen2-bias", ["--alpha", "1.5", "--rslora"], True),
    ("gpt2-lora", ["--alpha", "7"], False),
    ("roberta-cls", ["--alpha", "64", "--split", "balanced"], False),
    ("llama-embedding", ["--alpha", "2", "--rslora"], True),
    ("llama-adalora", ["--alpha", "6"], False),
])
def test_rescale_keeps_every_delta(name, args, rslora, tmp_path):
    ad = loratool.read_adapter(ADAPTERS / name)
    code, out, err = invoke("rescale", ADAPTERS / name, tmp_path / "out", *args, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["rslora_after"] is rslora
    loaded, to_save, pm = peft_view(ADAPTER_BASE[name], tmp_path / "out")
    assert set(loaded) == set(ad.modules)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] is rslora
    new_alpha = float(args[args.index("--alpha") + 1]) if "--alpha" in args else None
    for mod, src in ad.modules.items():
        got = loaded[mod]
        assert got["r"] == src.rank
        alpha = new_alpha if new_alpha is not None else src.alpha
        assert got["alpha"] == pytest.approx(alpha, rel=1e-12)
        assert got["scaling"] == pytest.approx(alpha / (math.sqrt(src.rank) if rslora else src.rank), rel=1e-12)
        assert rel_diff(got["delta"], src.delta(dtype=torch.float64)) < 1e-6, mod
        if src.bias is not None:
            assert torch.allclose(got["bias_term"], src.bias.load().double() * src.scale, rtol=1e-6, atol=1e-8)
        if src.magnitude is not None:
            assert torch.equal(got["magnitude"], src.magnitude.load().double())
    if new_alpha is not None:
        assert config["lora_alpha"] == new_alpha and not config["alpha_pattern"]
    assert_full_tensors_carried(ad, to_save, pm)


def test_rescale_dora_forward_identical(tmp_path):
    """DoRA normalizes W + dW: with dW kept, the whole model's output is the same."""
    from peft import PeftModel

    code, _, err = invoke("rescale", ADAPTERS / "llama-dora", tmp_path / "out", "--alpha", "1", "--rslora")
    assert code == 0, err
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = PeftModel.from_pretrained(load_base_model("llama"), ADAPTERS / "llama-dora")(x).logits
        new = PeftModel.from_pretrained(load_base_model("llama"), tmp_path / "out")(x).logits
    assert torch.allclose(new, ref, rtol=1e-5, atol=1e-5)


def test_rescale_split_b_keeps_a_bits(tmp_path):
    from safetensors.torch import load_file

    code, _, err = invoke("rescale", ADAPTERS / "llama-lora", tmp_path / "out", "--alpha", "3")
    assert code == 0, err
    before = load_file(ADAPTERS / "llama-lora" / "adapter_model.safetensors")
    after = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for k, v in before.items():
        if "lora_A" in k:
            assert torch.equal(after[k], v)
        else:
            assert torch.allclose(after[k], v * (16 / 3), rtol=1e-6)


def test_rescale_keeps_patterns_when_only_the_rule_changes(tmp_path):
    code, _, err = invoke("rescale", ADAPTERS / "llama-patterns", tmp_path / "out", "--rslora")
    assert code == 0, err
    ad = loratool.read_adapter(ADAPTERS / "llama-patterns")
    out = loratool.read_adapter(tmp_path / "out")
    for n, m in ad.modules.items():
        assert out.modules[n].alpha == m.alpha and out.modules[n].rank == m.rank
        assert rel_diff(out.modules[n].delta(dtype=torch.float64), m.delta(dtype=torch.float64)) < 1e-6
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["target_modules"] == ad.target_modules


def test_rescale_alpha_roundtrip_is_clean(tmp_path):
    """alpha recorded as given, not as scale * sqrt(r) with its rounding."""
    code, _, err = invoke("rescale", ADAPTERS / "llama-rslora", tmp_path / "out", "--alpha", "7")
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 7 and config["alpha_pattern"] == {}


def test_rescale_text_output(tmp_path):
    code, out, err = invoke("rescale", ADAPTERS / "llama-lora", tmp_path / "out", "--alpha", "8")
    assert code == 0, err
    assert "alpha 16 -> 8" in out and "factor 2" in out


@pytest.mark.parametrize("args", [[], ["--alpha", "0"], ["--alpha", "nan"], ["--alpha", "inf"], ["--split", "x", "--alpha", "2"]])
def test_rescale_bad_arguments_exit_2(args, tmp_path):
    code, out, err = invoke("rescale", ADAPTERS / "llama-lora", tmp_path / "out", *args)
    assert code == 2, (args, out, err)
    assert_one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_rescale_fp16_overflow_is_refused(tmp_path):
    code, _, err = invoke("rescale", ADAPTERS / "llama-fp16", tmp_path / "out", "--alpha", "1e-9")
    assert code == 2
    assert "overflows" in assert_one_line_error(err)
