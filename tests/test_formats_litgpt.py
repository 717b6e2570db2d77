"""LitGPT LoRA checkpoints: the fused qkv layer (current and legacy layouts), round trips, refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from _oracle import peft_deltas as _peft_deltas
from conftest import ADAPTER_BASE, ADAPTERS, BASES, assert_one_line_error, invoke

import loratool
from loratool.base import BaseModel
from loratool.errors import InputError, UnsupportedError
from loratool.formats import detect_format
from loratool.formats import litgpt as litgpt_format

# the GQA fixture base: 4 heads, 2 key/value heads, head size 16, hidden 64, 2 layers
H, G, HS, C = 4, 2, 16, 64


# ---- an oracle: LitGPT's LoRAQKVLinear.get_lora_AB, as its source defines it ----


def _lora_ind(enable, H, G, hs, layout):
    """Rows of the base qkv weight that receive the fused delta's rows, per LitGPT version."""
    q, kv = H * hs, G * hs
    out = q + 2 * kv
    if layout in ("current", "contiguous"):
        ranges = [range(0, q), range(q, q + kv), range(q + kv, out)]
        return [i for e, rg in zip(enable, ranges) if e for i in rg]
    # "scattered": the legacy interleaved weight [q.. k v | q.. k v | ...], each projection's own rows
    group = (H // G + 2) * hs
    slot = [(i % group) // hs for i in range(out)]
    sets = [[i for i in range(out) if slot[i] < H // G], [i for i in range(out) if slot[i] == H // G], [i for i in range(out) if slot[i] == H // G + 1]]
    return [i for e, s in zip(enable, sets) if e for i in s]


def litgpt_qkv_delta(lora_A, lora_B, scaling, enable, H, G, hs, layout="current"):
    """The (out, in) delta LitGPT adds to its qkv weight (conv1d per projection, then zero_pad)."""
    n = sum(enable)
    sizes = [s for s, e in zip((H * hs, G * hs, G * hs), enable) if e]
    inp = lora_A.unsqueeze(0)  # (1, n*r, C)
    weight = lora_B.unsqueeze(-1)  # (rows, r, 1)
    lora = torch.cat([F.conv1d(a, b) for a, b in zip(inp.chunk(n, dim=1), weight.split(sizes))], dim=1).squeeze(0)
    out = torch.zeros((H + 2 * G) * hs, lora_A.shape[1])
    out[_lora_ind(enable, H, G, hs, layout)] = lora * scaling
    return out


def deinterleave(w, H, G, hs):
    """Legacy interleaved qkv rows -> [Q | K | V] (LitGPT's qkv_reassemble)."""
    qs, ks, vs = [], [], []
    for chunk in torch.chunk(w, G):
        q, k, v = torch.split(chunk, [hs * (H // G), hs, hs])
        qs.append(q)
        ks.append(k)
        vs.append(v)
    return torch.cat([torch.cat(qs), torch.cat(ks), torch.cat(vs)])


def _qkv_of(adapter, layer, H=H, G=G, hs=HS, c=C):
    """[q; k; v] deltas of one layer from loratool's modules (zeros where absent)."""
    sizes = {"q_proj": H * hs, "k_proj": G * hs, "v_proj": G * hs}
    parts = []
    for p, size in sizes.items():
        m = adapter.modules.get(f"model.layers.{layer}.self_attn.{p}")
        parts.append(m.delta() if m is not None else torch.zeros(size, c))
    return torch.cat(parts)


def _write_checkpoint(folder, sd, hparams=None, model_config=None, name="lit_model.pth.lora"):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd}, folder / name)
    if hparams is not None:
        (folder / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams))
    if model_config is not None:
        (folder / "model_config.yaml").write_text(yaml.safe_dump(model_config))
    return folder


# ---- PEFT -> LitGPT -> PEFT ----


@pytest.mark.parametrize("name", ["llama-lora", "llama-patterns", "llama-rslora", "llama-layers", "llama-bf16", "qwen2-lora"])
def test_peft_to_litgpt_to_peft_keeps_every_delta(tmp_path, name):
    base_name = ADAPTER_BASE[name]
    base = BaseModel.open(BASES / base_name)
    src = loratool.read_adapter(ADAPTERS / name)
    lit = tmp_path / "lit"
    loratool.write_adapter(src, lit, format="litgpt", base=base)
    assert detect_format(lit) == "litgpt"
    back = loratool.read_adapter(lit, base=base)  # q/k/v sizes from the base (no attn.proj LoRA to tell them)
    assert back.format == "litgpt" and not back.warnings
    peft_out = tmp_path / "peft"
    loratool.write_adapter(back, peft_out)
    theirs = _peft_deltas(base_name, ADAPTERS / name)
    ours = _peft_deltas(base_name, peft_out)
    assert set(theirs) <= set(ours)
    for mod, d in theirs.items():
        torch.testing.assert_close(ours[mod], d, rtol=1e-5, atol=1e-6)
    for mod in set(ours) - set(theirs):  # projections LitGPT needs in every layer: zero-padded
        assert not ours[mod].any(), mod


def test_written_file_is_litgpt_math(tmp_path):
    """The qkv factors written, merged as LoRAQKVLinear merges them, give PEFT's q/k/v deltas."""
    src = loratool.read_adapter(ADAPTERS / "llama-patterns")  # q rank 4, v alpha 4, down_proj mixed: padding and baking
    out = tmp_path / "lit"
    loratool.write_adapter(src, out, format="litgpt", base=BaseModel.open(BASES / "llama"))
    hp = yaml.safe_load((out / "hyperparameters.yaml").read_text())
    assert (hp["lora_query"], hp["lora_key"], hp["lora_value"], hp["lora_projection"], hp["lora_mlp"], hp["lora_head"]) == (True, False, True, False, True, False)
    assert hp["lora_r"] == 8
    sd = torch.load(out / "lit_model.pth.lora", weights_only=True)["model"]
    assert set(sd) == {f"transformer.h.{i}.{m}.lora_{p}" for i in range(2) for m in ("attn.qkv", "mlp.fc_1", "mlp.fc_2", "mlp.proj") for p in "AB"}
    scaling = hp["lora_alpha"] / hp["lora_r"]
    theirs = _peft_deltas("llama", ADAPTERS / "llama-patterns")
    for i in range(2):
        A, B = sd[f"transformer.h.{i}.attn.qkv.lora_A"], sd[f"transformer.h.{i}.attn.qkv.lora_B"]
        assert A.shape == (16, C) and B.shape == (H * HS + G * HS, 8)
        delta = litgpt_qkv_delta(A, B, scaling, (True, False, True), H, G, HS)
        torch.testing.assert_close(delta[: H * HS], theirs[f"model.layers.{i}.self_attn.q_proj"], rtol=1e-5, atol=1e-6)
        assert not delta[H * HS:(H + G) * HS].any()
        torch.testing.assert_close(delta[(H + G) * HS:], theirs[f"model.layers.{i}.self_attn.v_proj"], rtol=1e-5, atol=1e-6)
        down = sd[f"transformer.h.{i}.mlp.proj.lora_B"] @ sd[f"transformer.h.{i}.mlp.proj.lora_A"] * scaling
        torch.testing.assert_close(down, theirs[f"model.layers.{i}.mlp.down_proj"], rtol=1e-5, atol=1e-6)
        assert not sd[f"transformer.h.{i}.mlp.fc_1.lora_B"].any()


def test_litgpt_to_litgpt_keeps_hyperparameters_and_config(tmp_path):
    torch.manual_seed(0)
    r = 2
    sd = {"transformer.h.0.attn.qkv.lora_A": torch.randn(2 * r, C), "transformer.h.0.attn.qkv.lora_B": torch.randn(H * HS + G * HS, r),
          "lm_head.lora_A": torch.randn(r, C), "lm_head.lora_B": torch.randn(256, r)}
    hp = {"checkpoint_dir": "checkpoints/meta-llama/Llama-2-7b-hf", "precision": "bf16-true", "lora_r": r, "lora_alpha": 4, "lora_dropout": 0.05,
          "lora_query": True, "lora_key": False, "lora_value": True, "lora_projection": False, "lora_mlp": False, "lora_head": True}
    mc = {"name": "tiny", "n_layer": 1, "n_head": H, "n_query_groups": G, "head_size": HS, "n_embd": C}
    src = _write_checkpoint(tmp_path / "src", sd, hp, mc)
    ad = loratool.read_adapter(src)
    assert ad.base_model == "meta-llama/Llama-2-7b-hf"
    assert set(ad.modules) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "lm_head"}
    out = tmp_path / "out"
    loratool.write_adapter(ad, out, format="litgpt")
    assert yaml.safe_load((out / "hyperparameters.yaml").read_text()) == hp
    assert yaml.safe_load((out / "model_config.yaml").read_text()) == mc
    sd2 = torch.load(out / "lit_model.pth.lora", weights_only=True)["model"]
    assert set(sd2) == set(sd)
    for k, t in sd.items():
        torch.testing.assert_close(sd2[k], t, rtol=0, atol=0)


# ---- reading checkpoints laid out by LitGPT ----


@pytest.mark.parametrize("enable", [(True, False, True), (True, True, True), (False, True, True), (True, False, False)])
def test_current_layout_against_litgpt_math(tmp_path, enable):
    torch.manual_seed(1)
    r = 3
    sizes = [s for s, e in zip((H * HS, G * HS, G * HS), enable) if e]
    sd = {}
    for i in range(2):
        sd[f"transformer.h.{i}.attn.qkv.lora_A"] = torch.randn(sum(enable) * r, C)
        sd[f"transformer.h.{i}.attn.qkv.lora_B"] = torch.randn(sum(sizes), r)
    hp = {"lora_r": r, "lora_alpha": 7, "lora_query": enable[0], "lora_key": enable[1], "lora_value": enable[2],
          "lora_projection": False, "lora_mlp": False, "lora_head": False}
    folder = _write_checkpoint(tmp_path / "ck", sd, hp)
    base = BaseModel.open(BASES / "llama")
    ad = loratool.read_adapter(folder, base=base)  # head sizes from the base
    expected_names = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p, e in zip(("q_proj", "k_proj", "v_proj"), enable) if e}
    assert set(ad.modules) == expected_names
    for i in range(2):
        ref = litgpt_qkv_delta(sd[f"transformer.h.{i}.attn.qkv.lora_A"], sd[f"transformer.h.{i}.attn.qkv.lora_B"], 7 / r, enable, H, G, HS)
        torch.testing.assert_close(_qkv_of(ad, i), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["scattered", "contiguous"])
@pytest.mark.parametrize("enable", [(True, False, True), (True, True, True)])
def test_legacy_attn_attn_layout(tmp_path, layout, enable):
    """The attn.attn layout of LitGPT before v0.5.5: the base qkv weight interleaved per query group."""
    torch.manual_seed(2)
    r = 2
    sizes = [s for s, e in zip((H * HS, G * HS, G * HS), enable) if e]
    sd = {"transformer.h.0.attn.attn.lora_A": torch.randn(sum(enable) * r, C), "transformer.h.0.attn.attn.lora_B": torch.randn(sum(sizes), r),
          "transformer.h.0.attn.proj.lora_A": torch.randn(r, H * HS), "transformer.h.0.attn.proj.lora_B": torch.randn(C, r)}
    hp = {"lora_r": r, "lora_alpha": 16, "lora_query": enable[0], "lora_key": enable[1], "lora_value": enable[2],
          "lora_projection": True, "lora_mlp": False, "lora_head": False}
    mc = {"n_head": H, "n_query_groups": G, "head_size": HS, "n_embd": C}
    folder = _write_checkpoint(tmp_path / "ck", sd, hp, mc)
    ad = loratool.read_adapter(folder, legacy_qkv=layout)
    ref_interleaved = litgpt_qkv_delta(sd["transformer.h.0.attn.attn.lora_A"], sd["transformer.h.0.attn.attn.lora_B"], 16 / r, enable, H, G, HS, layout)
    torch.testing.assert_close(_qkv_of(ad, 0), deinterleave(ref_interleaved, H, G, HS), rtol=1e-5, atol=1e-5)
    proj = ad.modules["model.layers.0.self_attn.o_proj"]
    torch.testing.assert_close(proj.delta(), sd["transformer.h.0.attn.proj.lora_B"] @ sd["transformer.h.0.attn.proj.lora_A"] * 8, rtol=1e-5, atol=1e-5)
    # PEFT -> LitGPT writes the current layout, which keeps the same deltas
    out = tmp_path / "out"
    loratool.write_adapter(ad, out, format="litgpt")
    again = loratool.read_adapter(out)
    assert "transformer.h.0.attn.qkv.lora_A" in torch.load(out / "lit_model.pth.lora", weights_only=True)["model"]
    torch.testing.assert_close(_qkv_of(again, 0), _qkv_of(ad, 0), rtol=1e-5, atol=1e-5)


def _legacy_qkv_only(folder, seed: int, name="lit_model.pth.lora"):
    """A legacy attn.attn checkpoint with q, k and v all enabled, r=2 (scale 8); its state dict."""
    torch.manual_seed(seed)
    r = 2
    sd = {"transformer.h.0.attn.attn.lora_A": torch.randn(3 * r, C), "transformer.h.0.attn.attn.lora_B": torch.randn((H + 2 * G) * HS, r)}
    hp = {"lora_r": r, "lora_alpha": 16, "lora_query": True, "lora_key": True, "lora_value": True}
    mc = {"n_head": H, "n_query_groups": G, "head_size": HS, "n_embd": C}
    return _write_checkpoint(folder, sd, hp, mc, name=name), sd


def _legacy_reference(sd, layout):
    ref = litgpt_qkv_delta(sd["transformer.h.0.attn.attn.lora_A"], sd["transformer.h.0.attn.attn.lora_B"], 8, (True,) * 3, H, G, HS, layout)
    return deinterleave(ref, H, G, HS)


def test_legacy_default_follows_the_file_name(tmp_path):
    new, sd = _legacy_qkv_only(tmp_path / "new", 3)
    ad = loratool.read_adapter(new)
    torch.testing.assert_close(_qkv_of(ad, 0), _legacy_reference(sd, "scattered"), rtol=1e-5, atol=1e-5)
    assert any("legacy_qkv='contiguous'" in w for w in ad.warnings)  # q, k, v all on: LitGPT versions differed
    old, _ = _legacy_qkv_only(tmp_path / "old", 3, name="lit_model_lora_finetuned.pth")
    assert detect_format(old / "lit_model_lora_finetuned.pth") == "litgpt"
    ad_old = loratool.read_adapter(old / "lit_model_lora_finetuned.pth")
    torch.testing.assert_close(_qkv_of(ad_old, 0), _legacy_reference(sd, "contiguous"), rtol=1e-5, atol=1e-5)
    assert any("legacy_qkv='scattered'" in w for w in ad_old.warnings)


def test_legacy_layout_from_the_command_line(tmp_path):
    """--legacy-qkv reaches the reader: convert to PEFT gives the deltas of the chosen layout, the flag on a
    PEFT adapter is refused, and the default (guessed) layout warns naming the flag."""
    folder, sd = _legacy_qkv_only(tmp_path / "ck", 5)
    for layout in ("scattered", "contiguous"):
        out = tmp_path / f"peft-{layout}"
        code, _, err = invoke("convert", folder, out, "--to", "peft", "--legacy-qkv", layout)
        assert code == 0, err
        assert "warning" not in err  # the layout was chosen: nothing guessed
        torch.testing.assert_close(_qkv_of(loratool.read_adapter(out), 0), _legacy_reference(sd, layout), rtol=1e-5, atol=1e-5)
    code, _, err = invoke("convert", folder, tmp_path / "guessed", "--to", "peft")
    assert code == 0 and "--legacy-qkv contiguous" in err
    code, _, err = invoke("inspect", ADAPTERS / "llama-lora", "--legacy-qkv", "contiguous")
    assert code == 2 and "legacy_qkv" in assert_one_line_error(err) and "peft" in err


def test_sizes_inferred_from_attn_proj_without_base(tmp_path):
    torch.manual_seed(4)
    r = 2
    sd = {"transformer.h.0.attn.qkv.lora_A": torch.randn(2 * r, C), "transformer.h.0.attn.qkv.lora_B": torch.randn(H * HS + G * HS, r),
          "transformer.h.0.attn.proj.lora_A": torch.randn(r, H * HS), "transformer.h.0.attn.proj.lora_B": torch.randn(C, r)}
    hp = {"lora_r": r, "lora_alpha": 16, "lora_query": True, "lora_key": False, "lora_value": True, "lora_projection": True}
    ad = loratool.read_adapter(_write_checkpoint(tmp_path / "ck", sd, hp))
    assert ad.modules["model.layers.0.self_attn.q_proj"].out_features == H * HS
    assert ad.modules["model.layers.0.self_attn.v_proj"].out_features == G * HS


def test_mlp_and_head_names(tmp_path):
    torch.manual_seed(5)
    r, I = 2, 128
    sd = {"lm_head.lora_A": torch.randn(r, C), "lm_head.lora_B": torch.randn(256, r)}
    for lit, (o, i) in {"mlp.fc_1": (I, C), "mlp.fc_2": (I, C), "mlp.proj": (C, I)}.items():
        sd[f"transformer.h.1.{lit}.lora_A"] = torch.randn(r, i)
        sd[f"transformer.h.1.{lit}.lora_B"] = torch.randn(o, r)
    ad = loratool.read_adapter(_write_checkpoint(tmp_path / "ck", sd, {"lora_r": r, "lora_alpha": 4, "lora_mlp": True, "lora_head": True}), format="litgpt")
    names = {"lm_head": "lm_head", "model.layers.1.mlp.gate_proj": "transformer.h.1.mlp.fc_1",
             "model.layers.1.mlp.up_proj": "transformer.h.1.mlp.fc_2", "model.layers.1.mlp.down_proj": "transformer.h.1.mlp.proj"}
    assert set(ad.modules) == set(names)
    for hf, lit in names.items():
        torch.testing.assert_close(ad.modules[hf].delta(), sd[f"{lit}.lora_B"] @ sd[f"{lit}.lora_A"] * 2, rtol=1e-6, atol=1e-6)


def test_inspect_cli_names_hf_modules(tmp_path):
    out = tmp_path / "lit"
    loratool.write_adapter(loratool.read_adapter(ADAPTERS / "llama-lora"), out, format="litgpt", base=BaseModel.open(BASES / "llama"))
    code, stdout, err = invoke("inspect", out, "--base", BASES / "llama", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["format"] == "litgpt" and not report["warnings"]
    assert len(report["modules"]) == 14 and all(m["scale"] == 2.0 for m in report["modules"])


# ---- refusals ----


@pytest.mark.parametrize(
    "fixture, what",
    [("llama-dora", "DoRA"), ("qwen2-bias", "bias"), ("roberta-cls", "modules_to_save"), ("llama-embedding", "embed_tokens"), ("gpt2-lora", "c_attn")],
)
def test_write_refuses_what_would_be_lost(tmp_path, fixture, what):
    ad = loratool.read_adapter(ADAPTERS / fixture)
    with pytest.raises(UnsupportedError) as exc:
        loratool.write_adapter(ad, tmp_path / "x", format="litgpt")
    assert exc.value.exit_code == 2 and what in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "x").exists()


def test_write_refuses_unmappable_module(tmp_path):
    ad = loratool.read_adapter(ADAPTERS / "llama-lora")
    mods = dict(ad.modules)
    m = mods.pop("model.layers.0.self_attn.q_proj")
    mods["model.layers.0.self_attn.rotary_proj"] = m
    with pytest.raises(UnsupportedError, match="would lose rotary_proj"):
        loratool.write_adapter(ad.replace_modules(mods), tmp_path / "x", format="litgpt")


def _inspect_fails(path, *extra, expect):
    code, out, err = invoke("inspect", path, "--from", "litgpt", *extra)
    assert code == 2, (out, err)
    line = assert_one_line_error(err)
    assert expect in line, line


def test_cli_refuses_unknown_litgpt_module(tmp_path):
    sd = {"transformer.h.0.mlp.fc.lora_A": torch.randn(2, C), "transformer.h.0.mlp.fc.lora_B": torch.randn(128, 2)}
    _inspect_fails(_write_checkpoint(tmp_path / "ck", sd, {"lora_r": 2, "lora_alpha": 4}), expect="transformer.h.0.mlp.fc.lora_A")


def test_cli_refuses_non_lora_tensor(tmp_path):
    sd = {"transformer.h.0.attn.proj.lora_A": torch.randn(2, C), "transformer.h.0.attn.proj.lora_B": torch.randn(C, 2), "transformer.wte.weight": torch.randn(4, C)}
    _inspect_fails(_write_checkpoint(tmp_path / "ck", sd, {"lora_r": 2, "lora_alpha": 4}), expect="not a LoRA factor")


def test_cli_refuses_rank_mismatch(tmp_path):
    sd = {"transformer.h.0.attn.proj.lora_A": torch.randn(2, C), "transformer.h.0.attn.proj.lora_B": torch.randn(C, 2)}
    _inspect_fails(_write_checkpoint(tmp_path / "ck", sd, {"lora_r": 4, "lora_alpha": 4}), expect="lora_r is 4")


def test_cli_qkv_sizes_need_base(tmp_path):
    sd = {"transformer.h.0.attn.qkv.lora_A": torch.randn(4, C), "transformer.h.0.attn.qkv.lora_B": torch.randn(96, 2)}
    folder = _write_checkpoint(tmp_path / "ck", sd, {"lora_r": 2, "lora_alpha": 4, "lora_query": True, "lora_key": False, "lora_value": True})
    _inspect_fails(folder, expect="pass --base")
    ad = loratool.read_adapter(folder, base=BaseModel.open(BASES / "llama"))
    assert ad.modules["model.layers.0.self_attn.v_proj"].out_features == 32


def test_cli_refuses_malformed_yaml(tmp_path):
    sd = {"transformer.h.0.attn.proj.lora_A": torch.randn(2, C), "transformer.h.0.attn.proj.lora_B": torch.randn(C, 2)}
    folder = _write_checkpoint(tmp_path / "ck", sd)
    (folder / "hyperparameters.yaml").write_text("lora_r: [1,\n")
    _inspect_fails(folder, expect="malformed YAML")


def test_contiguous_legacy_needs_head_counts(tmp_path):
    sd = {"transformer.h.0.attn.attn.lora_A": torch.randn(6, C), "transformer.h.0.attn.attn.lora_B": torch.randn(128, 2),
          "transformer.h.0.attn.proj.lora_A": torch.randn(2, C), "transformer.h.0.attn.proj.lora_B": torch.randn(C, 2)}
    folder = _write_checkpoint(tmp_path / "ck", sd, {"lora_r": 2, "lora_alpha": 4}, name="lit_model_lora_finetuned.pth")
    with pytest.raises(InputError, match="needs the head counts"):
        loratool.read_adapter(folder / "lit_model_lora_finetuned.pth", format="litgpt")


def test_missing_alpha_is_assumed_with_a_warning(tmp_path):
    sd = {"transformer.h.0.attn.proj.lora_A": torch.randn(2, C), "transformer.h.0.attn.proj.lora_B": torch.randn(C, 2)}
    folder = _write_checkpoint(tmp_path / "ck", sd, model_config={"n_head": H, "n_query_groups": G, "head_size": HS, "n_embd": C})
    ad = loratool.read_adapter(folder)
    assert ad.modules["model.layers.0.self_attn.o_proj"].scale == 8.0
    assert any("no lora_alpha" in w for w in ad.warnings)
    assert loratool.read_adapter(folder, alpha=4).modules["model.layers.0.self_attn.o_proj"].scale == 2.0
    assert loratool.read_adapter(folder, scale=0.5).modules["model.layers.0.self_attn.o_proj"].scale == 0.5


def test_detection_does_not_misfire(tmp_path):
    for name in ("llama-lora", "gpt2-lora", "llama-multi"):
        assert detect_format(ADAPTERS / name) == "peft"
        assert not litgpt_format.detect(ADAPTERS / name)
    torch.save({"transformer.h.0.attn.c_attn.lora_A": torch.randn(4, 64), "transformer.h.0.attn.c_attn.lora_B": torch.randn(128, 2)}, tmp_path / "ll.pth")
    assert not litgpt_format.detect(tmp_path / "ll.pth")
    (tmp_path / "hyperparameters.yaml").write_text("lora_r: 2\n")
    assert not litgpt_format.detect(tmp_path / "ll.pth")


# ---- through `loratool convert` ----


def test_cli_convert_round_trip(tmp_path):
    lit, back = tmp_path / "lit", tmp_path / "peft"
    code, out, err = invoke("convert", ADAPTERS / "llama-patterns", lit, "--to", "litgpt", "--base", BASES / "llama", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert any("baked into lora_B" in b for b in report["baked"]) and any("written as zeros" in n for n in report["notes"])
    assert sorted(p.name for p in lit.iterdir()) == ["hyperparameters.yaml", "lit_model.pth.lora"]
    code, out, err = invoke("convert", lit, back, "--to", "peft", "--base", BASES / "llama")
    assert code == 0, err
    theirs, ours = _peft_deltas("llama", ADAPTERS / "llama-patterns"), _peft_deltas("llama", back)
    for name, d in theirs.items():
        torch.testing.assert_close(ours[name], d, rtol=1e-5, atol=1e-6)
    assert all(not ours[n].any() for n in set(ours) - set(theirs))


@pytest.mark.parametrize("fixture, expect", [("llama-dora", "DoRA"), ("qwen2-bias", "lora_B.bias"), ("roberta-cls", "modules_to_save"), ("gpt2-lora", "conv1d")])
def test_cli_convert_refusals(tmp_path, fixture, expect):
    code, out, err = invoke("convert", ADAPTERS / fixture, tmp_path / "x", "--to", "litgpt")
    assert code == 2
    assert expect in assert_one_line_error(err)
    assert not (tmp_path / "x").exists()


# ---- Phi-3: fused qkv_proj / gate_up_proj (LitGPT's copy_weights_phi: qkv as is, gate_up chunked into fc_1, fc_2) ----


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """A tiny Phi-3 base (fused qkv_proj (128 rows: 64 q + 32 k + 32 v), gate_up_proj (256 rows)) and a PEFT LoRA on
    qkv_proj, o_proj, gate_up_proj, down_proj."""
    from _interop_bases import make_adapter, make_base

    top = tmp_path_factory.mktemp("phi3")
    base = make_base("phi3", top / "base")
    return base, make_adapter("phi3", base, top / "lora", rslora=True)


def test_phi3_fused_modules_written_as_litgpt_parts_exactly(phi3, tmp_path):
    base_path, src = phi3
    base = BaseModel.open(base_path)
    ad = loratool.read_adapter(src)
    loratool.write_adapter(ad, tmp_path / "lit", format="litgpt", base=base)
    sd = torch.load(tmp_path / "lit" / "lit_model.pth.lora", weights_only=True)["model"]
    hp = yaml.safe_load((tmp_path / "lit" / "hyperparameters.yaml").read_text())
    scaling = hp["lora_alpha"] / hp["lora_r"]
    for layer in range(2):
        pre = f"model.layers.{layer}."
        qkv = litgpt_qkv_delta(sd[f"transformer.h.{layer}.attn.qkv.lora_A"].float(), sd[f"transformer.h.{layer}.attn.qkv.lora_B"].float(),
                               scaling, (True, True, True), H, G, HS)
        torch.testing.assert_close(qkv, ad.modules[pre + "self_attn.qkv_proj"].delta(), rtol=1e-5, atol=1e-6)
        fc = [sd[f"transformer.h.{layer}.mlp.{k}.lora_B"].float() @ sd[f"transformer.h.{layer}.mlp.{k}.lora_A"].float() * scaling
              for k in ("fc_1", "fc_2")]
        torch.testing.assert_close(torch.cat(fc), ad.modules[pre + "mlp.gate_up_proj"].delta(), rtol=1e-5, atol=1e-6)
    back = loratool.read_adapter(tmp_path / "lit", base=base)  # fused again: the parts share lora_A, so rank r
    assert set(back.modules) == set(ad.modules)
    for name, m in ad.modules.items():
        assert back.modules[name].rank == m.rank
        torch.testing.assert_close(back.modules[name].delta(), m.delta(), rtol=1e-5, atol=1e-6)


def test_phi3_parts_with_their_own_lora_a_fuse_block_diagonally(phi3, tmp_path):
    """LitGPT trains q, k, v (and fc_1, fc_2) with separate lora_A: fused into rank 3r / 2r, the same deltas."""
    base_path, _ = phi3
    base = BaseModel.open(base_path)
    gen = torch.Generator().manual_seed(5)
    r, inter = 2, 128
    sd = {}
    for layer in range(2):
        p = f"transformer.h.{layer}."
        sd[p + "attn.qkv.lora_A"] = torch.randn(3 * r, C, generator=gen)
        sd[p + "attn.qkv.lora_B"] = torch.randn((H + 2 * G) * HS, r, generator=gen)
        for k, shape in (("fc_1", (inter, C)), ("fc_2", (inter, C)), ("proj", (C, inter))):
            sd[p + f"mlp.{k}.lora_A"] = torch.randn(r, shape[1], generator=gen)
            sd[p + f"mlp.{k}.lora_B"] = torch.randn(shape[0], r, generator=gen)
    hp = {"lora_r": r, "lora_alpha": 4, "lora_query": True, "lora_key": True, "lora_value": True, "lora_mlp": True}
    _write_checkpoint(tmp_path / "lit", sd, hp)
    ad = loratool.read_adapter(tmp_path / "lit", base=base)
    assert sorted(n.rsplit(".", 1)[-1] for n in ad.modules if ".0." in n) == ["down_proj", "gate_up_proj", "qkv_proj"]
    qkv, gate_up = ad.modules["model.layers.0.self_attn.qkv_proj"], ad.modules["model.layers.0.mlp.gate_up_proj"]
    assert (qkv.rank, gate_up.rank) == (3 * r, 2 * r)
    want = litgpt_qkv_delta(sd["transformer.h.0.attn.qkv.lora_A"], sd["transformer.h.0.attn.qkv.lora_B"], 2.0, (True, True, True), H, G, HS)
    torch.testing.assert_close(qkv.delta(), want, rtol=1e-5, atol=1e-5)
    fc = [sd[f"transformer.h.0.mlp.{k}.lora_B"] @ sd[f"transformer.h.0.mlp.{k}.lora_A"] * 2.0 for k in ("fc_1", "fc_2")]
    torch.testing.assert_close(gate_up.delta(), torch.cat(fc), rtol=1e-5, atol=1e-5)
    loratool.write_adapter(ad, tmp_path / "peft")  # PEFT holds the fused ranks through rank_pattern, same deltas
    again = loratool.read_adapter(tmp_path / "peft")
    torch.testing.assert_close(again.modules[qkv.name].delta(), qkv.delta(), rtol=1e-5, atol=1e-5)


def test_phi3_qkv_split_needs_the_base(phi3, tmp_path):
    _, src = phi3
    code, _, err = invoke("convert", src, tmp_path / "lit", "--to", "litgpt")
    assert code == 2 and "qkv_proj" in assert_one_line_error(err) and "--base" in err
    assert not (tmp_path / "lit").exists()
