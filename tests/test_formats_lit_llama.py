"""Lit-LLaMA LoRA files: the published MergedLinear layout, the rotary permutation, round trips, refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from _oracle import peft_deltas as _peft_deltas
from conftest import ADAPTERS, BASES, assert_one_line_error, invoke

import loratool
from loratool.base import BaseModel
from loratool.errors import InputError, UnsupportedError
from loratool.formats import detect_format
from loratool.formats.lit_llama import hf_to_meta, meta_to_hf


def transformers_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf ``permute``: Meta rows -> Hugging Face rows."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def merged_linear_delta(lora_A, lora_B, alpha):
    """Lit-LLaMA's MergedLinear merge (enable_lora [True, False, True]): the (3C, C) c_attn delta, Meta rows."""
    r = lora_B.shape[1]
    C = lora_A.shape[1]
    delta = F.conv1d(lora_A.unsqueeze(0), lora_B.unsqueeze(-1), groups=2).squeeze(0)  # (2C, C)
    lora_ind = torch.zeros(3, C, dtype=torch.bool)
    lora_ind[[0, 2]] = True
    full = torch.zeros(3 * C, C)
    full[lora_ind.view(-1)] = delta * (alpha / r)
    return full


def _tiny_llama(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mha(tmp_path_factory):
    """A non-GQA Llama base and a PEFT q_proj/v_proj adapter on it with mixed ranks and alphas."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("lit-llama")
    base = _tiny_llama(root / "base")
    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     rank_pattern={"v_proj": 2}, alpha_pattern={"model.layers.1.self_attn.q_proj": 12})
    get_peft_model(model, cfg).save_pretrained(root / "peft")
    return {"base": base, "peft": root / "peft", "root": root}


def test_permutation_helpers_match_transformers():
    t = torch.randn(64, 3)
    torch.testing.assert_close(meta_to_hf(t, 4), transformers_permute(t, 4), rtol=0, atol=0)
    torch.testing.assert_close(hf_to_meta(meta_to_hf(t, 4), 4), t, rtol=0, atol=0)


def test_peft_to_lit_llama_to_peft_keeps_every_delta(mha, tmp_path):
    base = BaseModel.open(mha["base"])
    src = loratool.read_adapter(mha["peft"])
    out = tmp_path / "lit-llama-lora-finetuned.pth"
    loratool.write_adapter(src, out, format="lit-llama", base=base)
    assert detect_format(out) == "lit-llama"
    sd = torch.load(out, weights_only=True)
    assert sorted(sd) == sorted(f"transformer.h.{i}.attn.c_attn.lora_{p}" for i in range(2) for p in "AB")
    assert sd["transformer.h.0.attn.c_attn.lora_A"].shape == (8, 64)  # 2r x C, r = the largest rank (4)
    assert sd["transformer.h.0.attn.c_attn.lora_B"].shape == (128, 4)  # 2C x r

    # the file, merged as Lit-LLaMA merges it (alpha 16), then permuted to HF, is PEFT's delta
    theirs = _peft_deltas(mha["base"], mha["peft"])
    for i in range(2):
        meta = merged_linear_delta(sd[f"transformer.h.{i}.attn.c_attn.lora_A"], sd[f"transformer.h.{i}.attn.c_attn.lora_B"], 16.0)
        torch.testing.assert_close(transformers_permute(meta[:64], 4), theirs[f"model.layers.{i}.self_attn.q_proj"], rtol=1e-5, atol=1e-6)
        assert not meta[64:128].any()
        torch.testing.assert_close(meta[128:], theirs[f"model.layers.{i}.self_attn.v_proj"], rtol=1e-5, atol=1e-6)

    back = loratool.read_adapter(out, base=base, alpha=16)
    assert back.format == "lit-llama" and not back.warnings
    peft_out = tmp_path / "peft"
    loratool.write_adapter(back, peft_out)
    ours = _peft_deltas(mha["base"], peft_out)
    assert set(ours) == set(theirs)
    for name, d in theirs.items():
        torch.testing.assert_close(ours[name], d, rtol=1e-5, atol=1e-6)


def test_published_layout_read_against_rotary_permutation(mha, tmp_path):
    """A checkpoint laid out as lit_llama/lora.py saves it, read with the base's head count."""
    torch.manual_seed(3)
    C, r, layers = 64, 3, 2
    sd = {}
    for i in range(layers):
        sd[f"transformer.h.{i}.attn.c_attn.lora_A"] = torch.randn(2 * r, C)
        sd[f"transformer.h.{i}.attn.c_attn.lora_B"] = torch.randn(2 * C, r)
    path = tmp_path / "lit-llama-lora-finetuned.pth"
    torch.save(sd, path)
    assert detect_format(path) == "lit-llama"
    ad = loratool.read_adapter(path, base=BaseModel.open(mha["base"]), alpha=32)
    assert set(ad.modules) == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "qv"}
    for i in range(layers):
        meta = merged_linear_delta(sd[f"transformer.h.{i}.attn.c_attn.lora_A"], sd[f"transformer.h.{i}.attn.c_attn.lora_B"], 32.0)
        q, v = ad.modules[f"model.layers.{i}.self_attn.q_proj"], ad.modules[f"model.layers.{i}.self_attn.v_proj"]
        assert q.rank == r and q.scale == pytest.approx(32 / r)
        torch.testing.assert_close(q.delta(), transformers_permute(meta[:C], 4), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v.delta(), meta[2 * C:], rtol=1e-5, atol=1e-5)
    # alpha is not in the file: without --alpha the reference scripts' 16 is assumed, with a warning
    ad16 = loratool.read_adapter(path, base=BaseModel.open(mha["base"]))
    assert ad16.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(16 / r)
    assert any("does not store alpha" in w for w in ad16.warnings)
    # Lit-LLaMA -> Lit-LLaMA reproduces the file
    again = tmp_path / "again.pth"
    loratool.write_adapter(ad, again, format="lit-llama", base=BaseModel.open(mha["base"]), alpha=32)
    sd2 = torch.load(again, weights_only=True)
    for k, t in sd.items():
        torch.testing.assert_close(sd2[k], t, rtol=0, atol=0)


def test_llama7b_hidden_size_needs_no_base(tmp_path):
    """Lit-LLaMA's own model sizes fix the head count (4096 -> 32 heads), as lit_llama does."""
    torch.manual_seed(4)
    C, r = 4096, 1
    sd = {"transformer.h.0.attn.c_attn.lora_A": torch.randn(2 * r, C), "transformer.h.0.attn.c_attn.lora_B": torch.randn(2 * C, r)}
    path = tmp_path / "iter-000100-ckpt.pth"
    torch.save(sd, path)
    ad = loratool.read_adapter(path, format="lit-llama", alpha=16)
    q = ad.modules["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(q.B.load(), transformers_permute(sd["transformer.h.0.attn.c_attn.lora_B"][:C], 32), rtol=0, atol=0)
    torch.testing.assert_close(ad.modules["model.layers.0.self_attn.v_proj"].B.load(), sd["transformer.h.0.attn.c_attn.lora_B"][C:], rtol=0, atol=0)


def test_wrapped_keys_are_accepted(tmp_path, mha):
    torch.manual_seed(5)
    sd = {"_forward_module.transformer.h.0.attn.c_attn.lora_A": torch.randn(4, 64),
          "_forward_module.transformer.h.0.attn.c_attn.lora_B": torch.randn(128, 2)}
    path = tmp_path / "wrapped.pth"
    torch.save(sd, path)
    ad = loratool.read_adapter(path, format="lit-llama", base=BaseModel.open(mha["base"]), alpha=16)
    assert set(ad.modules) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}


def test_bf16_with_baked_scale_is_written_float32(mha, tmp_path):
    src = loratool.read_adapter(mha["peft"])
    modules = {n: m.with_factors(m.A.load().bfloat16(), m.B.load().bfloat16()) for n, m in src.modules.items()}
    ad = src.replace_modules(modules)
    out = tmp_path / "bf16.pth"
    loratool.write_adapter(ad, out, format="lit-llama", base=BaseModel.open(mha["base"]))
    sd = torch.load(out, weights_only=True)
    assert all(t.dtype == torch.float32 for t in sd.values())
    back = loratool.read_adapter(out, base=BaseModel.open(mha["base"]), alpha=16)
    for n, m in ad.modules.items():
        torch.testing.assert_close(back.modules[n].delta(), m.delta(), rtol=1e-6, atol=1e-7)


# ---- refusals ----


def test_write_refuses_modules_lit_llama_cannot_hold(tmp_path):
    ad = loratool.read_adapter(ADAPTERS / "llama-lora")
    with pytest.raises(UnsupportedError) as exc:
        loratool.write_adapter(ad, tmp_path / "x.pth", format="lit-llama")
    msg = str(exc.value)
    assert exc.value.exit_code == 2 and "\n" not in msg
    assert "q_proj and v_proj only" in msg and "k_proj" in msg
    assert not (tmp_path / "x.pth").exists()


def test_write_refuses_grouped_query_base(tmp_path):
    ad = loratool.read_adapter(ADAPTERS / "llama-bf16")  # q_proj/v_proj on the GQA fixture base
    with pytest.raises(UnsupportedError, match="v_proj: delta is 32x64"):
        loratool.write_adapter(ad, tmp_path / "x.pth", format="lit-llama", base=BaseModel.open(BASES / "llama"))


def test_read_refuses_grouped_query_base(mha, tmp_path):
    sd = {"transformer.h.0.attn.c_attn.lora_A": torch.randn(4, 64), "transformer.h.0.attn.c_attn.lora_B": torch.randn(128, 2)}
    path = tmp_path / "a.pth"
    torch.save(sd, path)
    with pytest.raises(UnsupportedError, match="grouped-query attention"):
        loratool.read_adapter(path, base=BaseModel.open(BASES / "llama"))


@pytest.mark.parametrize("fixture, what", [("llama-dora", "DoRA"), ("qwen2-bias", "bias"), ("roberta-cls", "modules_to_save"), ("llama-embedding", "embed_tokens")])
def test_write_refuses_what_would_be_lost(tmp_path, fixture, what):
    ad = loratool.read_adapter(ADAPTERS / fixture)
    with pytest.raises(UnsupportedError) as exc:
        loratool.write_adapter(ad, tmp_path / "x.pth", format="lit-llama")
    assert what in str(exc.value) and "\n" not in str(exc.value)


def test_write_without_base_and_unknown_hidden_size_needs_base(mha, tmp_path):
    ad = loratool.read_adapter(mha["peft"])
    with pytest.raises(InputError, match="--base is needed"):
        loratool.write_adapter(ad, tmp_path / "x.pth", format="lit-llama")


def test_cli_read_needs_base_for_unknown_hidden_size(tmp_path):
    sd = {"transformer.h.0.attn.c_attn.lora_A": torch.randn(4, 64), "transformer.h.0.attn.c_attn.lora_B": torch.randn(128, 2)}
    path = tmp_path / "a.pth"
    torch.save(sd, path)
    code, out, err = invoke("inspect", path, "--from", "lit-llama")
    assert code == 2
    assert "--base is needed" in assert_one_line_error(err)


def test_cli_inspect_llama7b_shaped_file(tmp_path):
    sd = {"transformer.h.0.attn.c_attn.lora_A": torch.randn(2, 4096), "transformer.h.0.attn.c_attn.lora_B": torch.randn(8192, 1)}
    path = tmp_path / "lit-llama-lora-finetuned.pth"
    torch.save(sd, path)
    code, out, err = invoke("inspect", path, "--alpha", "16", "--json")
    assert code == 0, err
    import json

    report = json.loads(out)
    assert report["format"] == "lit-llama"
    assert {m["name"] for m in report["modules"]} == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    assert all(m["scale"] == 16.0 for m in report["modules"])


@pytest.mark.parametrize(
    "sd, expect",
    [
        ({"transformer.h.0.attn.c_attn.lora_A": torch.randn(4, 64), "transformer.h.0.attn.c_attn.lora_B": torch.randn(128, 2),
          "transformer.wte.weight": torch.randn(8, 64)}, "not a LoRA factor"),
        ({"transformer.h.0.attn.c_attn.lora_A": torch.randn(4, 64)}, "without its pair"),
        ({"transformer.h.0.attn.c_attn.lora_A": torch.randn(4, 64), "transformer.h.0.attn.c_attn.lora_B": torch.randn(192, 2)}, "(2r, C) / (2C, r)"),
    ],
)
def test_cli_read_refuses_malformed_files(tmp_path, sd, expect):
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    code, out, err = invoke("inspect", path, "--from", "lit-llama")
    assert code == 2
    assert expect in assert_one_line_error(err)


def test_detection_does_not_misfire(tmp_path):
    for name in ("llama-lora", "gpt2-lora", "qwen2-lora"):
        assert detect_format(ADAPTERS / name) == "peft"
    from loratool.formats import lit_llama

    assert not lit_llama.detect(ADAPTERS / "llama-lora" / "adapter_model.safetensors")
    # a flat c_attn dict whose lora_B is not (2C, r) is not Lit-LLaMA
    torch.save({"transformer.h.0.attn.c_attn.lora_A": torch.randn(4, 64), "transformer.h.0.attn.c_attn.lora_B": torch.randn(192, 4)}, tmp_path / "g.pth")
    assert not lit_llama.detect(tmp_path / "g.pth")


# ---- through `loratool convert` ----


def test_cli_convert_round_trip(mha, tmp_path):
    import json

    lit = tmp_path / "lit-llama-lora-finetuned.pth"
    code, out, err = invoke("convert", mha["peft"], lit, "--to", "lit-llama", "--base", mha["base"], "--json")
    assert code == 0, err
    report = json.loads(out)
    assert any("baked into lora_B" in b for b in report["baked"]) and any("rank zero-padded to 4" in b for b in report["baked"])
    assert any("load this one with alpha 16" in n for n in report["notes"])
    back = tmp_path / "peft"
    code, out, err = invoke("convert", lit, back, "--to", "peft", "--base", mha["base"], "--alpha", "16")
    assert code == 0, err
    theirs, ours = _peft_deltas(mha["base"], mha["peft"]), _peft_deltas(mha["base"], back)
    assert set(ours) == set(theirs)
    for name, d in theirs.items():
        torch.testing.assert_close(ours[name], d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "fixture, base, expect",
    [
        ("llama-lora", None, "would lose down_proj, gate_proj, up_proj, k_proj, o_proj (10 modules"),
        ("llama-dora", None, "DoRA"),
        ("llama-bf16", BASES / "llama", "no grouped-query attention"),
    ],
)
def test_cli_convert_refusals(tmp_path, fixture, base, expect):
    args = ["convert", ADAPTERS / fixture, tmp_path / "x.pth", "--to", "lit-llama"] + (["--base", base] if base else [])
    code, out, err = invoke(*args)
    assert code == 2
    assert expect in assert_one_line_error(err)
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("name", ["adapter", "adapter.lora", "lit-llama.weights"])
def test_written_under_any_name_reads_back(name, mha, tmp_path):
    """Detection is by content: a Lit-LLaMA file without the .pth suffix is still read (CLI, as a user would)."""
    out = tmp_path / name
    code, _, err = invoke("convert", mha["peft"], out, "--to", "lit-llama", "--base", mha["base"])
    assert code == 0, err
    assert detect_format(out) == "lit-llama"
    code, stdout, err = invoke("inspect", out, "--base", mha["base"], "--json")
    assert code == 0, err
    assert json.loads(stdout)["format"] == "lit-llama"
