"""GGUF (llama.cpp LoRA): layout checked with gguf.GGUFReader, deltas checked with PEFT."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from _convert_helpers import assert_same_peft, base_of, llama_cpp_permute, peft_deltas, without_modules_to_save
from conftest import ADAPTERS, BASES, assert_one_line_error, invoke
from _numeric import rel_diff

import loratool
from loratool.conversion import convert
from loratool.errors import InputError, UnsupportedError



def _fields(reader):
    return {k: f.contents() for k, f in reader.fields.items()}


def _tensors(reader):
    """name -> (ggml ne shape, numpy data as float32, type name)."""
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (tuple(int(x) for x in t.shape), np.asarray(data, dtype=np.float32), t.tensor_type.name)
    return out


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "llama-lora.gguf"
    code, _, err = invoke("convert", ADAPTERS / "llama-lora", out, "--to", "gguf", "--base", BASES / "llama")
    assert code == 0, err
    return out


def test_llama_layout_names_metadata_and_row_order(llama_gguf):
    reader = gguf.GGUFReader(str(llama_gguf))
    f = _fields(reader)
    assert f["general.type"] == "adapter"
    assert f["adapter.type"] == "lora"
    assert f["general.architecture"] == "llama"
    assert f["adapter.lora.alpha"] == pytest.approx(16.0)
    tensors = _tensors(reader)
    expected_names = {
        f"blk.{i}.{t}.weight.lora_{ab}"
        for i in range(2)
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        for ab in "ab"
    }
    assert set(tensors) == expected_names
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    src = loratool.read_adapter(ADAPTERS / "llama-lora")
    config = json.loads((BASES / "llama" / "config.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    for i in range(2):
        for g, h in hf.items():
            m = src.modules[f"model.layers.{i}.{h}"]
            A, B = m.A.load(), m.B.load()
            ne_a, a, ta = tensors[f"blk.{i}.{g}.weight.lora_a"]
            ne_b, b, tb = tensors[f"blk.{i}.{g}.weight.lora_b"]
            assert (ta, tb) == ("F32", "F32")
            assert ne_a == (m.in_features, m.rank)  # ggml order: in, r
            assert ne_b == (m.rank, m.out_features)
            assert np.array_equal(a, A.numpy())  # A is never permuted
            if g == "attn_q":
                expected_b = llama_cpp_permute(B, n_head, n_head)
            elif g == "attn_k":
                expected_b = llama_cpp_permute(B, n_head, n_kv)
            else:
                expected_b = B
            assert np.array_equal(b, expected_b.numpy()), f"{g}: rows not in llama.cpp's order"
            if g in ("attn_q", "attn_k"):
                assert not torch.equal(expected_b, B)  # the permutation really moves rows


def test_llama_round_trip_to_peft(llama_gguf, tmp_path):
    out = tmp_path / "back"
    code, _, err = invoke("convert", llama_gguf, out, "--to", "peft")  # head counts are in the file
    assert code == 0, err
    assert_same_peft(peft_deltas("llama", ADAPTERS / "llama-lora"), peft_deltas("llama", out))


def test_qwen2_is_not_permuted(tmp_path):
    out = tmp_path / "q.gguf"
    code, _, err = invoke("convert", ADAPTERS / "qwen2-lora", out, "--to", "gguf", "--base", BASES / "qwen2")
    assert code == 0, err
    reader = gguf.GGUFReader(str(out))
    assert _fields(reader)["general.architecture"] == "qwen2"
    tensors = _tensors(reader)
    src = loratool.read_adapter(ADAPTERS / "qwen2-lora")
    for name, m in src.modules.items():
        i = name.split(".")[2]
        g = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}[name.rsplit(".", 1)[-1]]
        assert np.array_equal(tensors[f"blk.{i}.{g}.weight.lora_b"][1], m.B.load().numpy())


@pytest.mark.parametrize("name", ["llama-lora", "llama-patterns", "llama-rslora", "llama-fp16", "llama-bf16", "llama-adalora", "llama-layers", "qwen2-lora", "gpt2-lora", "llama-sharded-lora"])
def test_peft_gguf_peft_keeps_every_delta(name, tmp_path):
    base = BASES / base_of(name)
    g = tmp_path / "a.gguf"
    code, _, err = invoke("convert", ADAPTERS / name, g, "--to", "gguf", "--base", base)
    assert code == 0, err
    back = tmp_path / "back"
    code, _, err = invoke("convert", g, back, "--to", "peft", "--base", base)
    assert code == 0, err
    assert_same_peft(peft_deltas(base_of(name), ADAPTERS / name), peft_deltas(base_of(name), back), tol=1e-6)


def test_patterns_alpha_baked_into_b(tmp_path):
    g = tmp_path / "p.gguf"
    report = convert(ADAPTERS / "llama-patterns", g, to="gguf", base=BASES / "llama")
    assert any("baked" in line for line in report["baked"])
    reader = gguf.GGUFReader(str(g))
    alpha = _fields(reader)["adapter.lora.alpha"]
    back = loratool.read_adapter(g)
    src = loratool.read_adapter(ADAPTERS / "llama-patterns")
    for name, m in src.modules.items():
        b = back.modules[name]
        assert b.scale == pytest.approx(alpha / m.rank)  # llama.cpp's rule: alpha / r
        assert rel_diff(b.delta(), m.delta()) < 1e-6


@pytest.mark.parametrize("outtype,tol,types", [("f16", 2e-3, {"F16"}), ("bf16", 2e-2, {"BF16"}), ("q8_0", 2e-2, {"Q8_0", "F16"})])
def test_outtypes(outtype, tol, types, tmp_path):
    g = tmp_path / f"{outtype}.gguf"
    code, _, err = invoke("convert", ADAPTERS / "llama-lora", g, "--to", "gguf", "--base", BASES / "llama", "--outtype", outtype)
    assert code == 0, err
    reader = gguf.GGUFReader(str(g))
    seen = {t.tensor_type.name for t in reader.tensors}
    assert seen == types
    if outtype == "q8_0":
        # lora_a (r, 64) quantizes; lora_b (out, 8) cannot (rows of 8) and falls back to F16, as llama.cpp does
        kinds = {t.name.rsplit(".", 1)[-1]: t.tensor_type.name for t in reader.tensors}
        assert kinds == {"lora_a": "Q8_0", "lora_b": "F16"}
    back = tmp_path / "back"
    code, _, err = invoke("convert", g, back, "--to", "peft")
    assert code == 0, err
    assert_same_peft(peft_deltas("llama", ADAPTERS / "llama-lora"), peft_deltas("llama", back), tol=tol)


def test_token_embedding_lora_a_transposed(tmp_path):
    ad = without_modules_to_save("llama-embedding")
    g = tmp_path / "e.gguf"
    convert(ad, g, to="gguf", base=BASES / "llama")
    tensors = _tensors(gguf.GGUFReader(str(g)))
    m = ad.modules["model.embed_tokens"]
    ne_a, a, _ = tensors["token_embd.weight.lora_a"]
    ne_b, b, _ = tensors["token_embd.weight.lora_b"]
    assert a.shape == (m.in_features, m.rank)  # numpy (vocab, r): A^T, as llama.cpp's converter stores it
    assert np.array_equal(a, m.A.load().T.numpy())
    assert np.array_equal(b, m.B.load().numpy())
    back = loratool.read_adapter(g)
    assert back.modules["model.embed_tokens"].kind.value == "embedding"
    for name, mod in ad.modules.items():
        assert rel_diff(back.modules[name].delta(), mod.delta()) < 1e-6


def _strip_head_counts(src, dst):
    """Rewrite a GGUF without loratool's head-count keys, like llama.cpp's converter output."""
    reader = gguf.GGUFReader(str(src))
    f = _fields(reader)
    w = gguf.GGUFWriter(str(dst), f["general.architecture"])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, f["adapter.lora.alpha"])
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_llama_cpp_file_without_head_counts_needs_base(llama_gguf, tmp_path):
    bare = tmp_path / "bare.gguf"
    _strip_head_counts(llama_gguf, bare)
    code, _, err = invoke("inspect", bare)
    assert code == 2
    assert "--base" in assert_one_line_error(err)
    code, out, err = invoke("inspect", bare, "--base", BASES / "llama", "--json")
    assert code == 0, err
    back = tmp_path / "back"
    code, _, err = invoke("convert", bare, back, "--to", "peft", "--base", BASES / "llama")
    assert code == 0, err
    assert_same_peft(peft_deltas("llama", ADAPTERS / "llama-lora"), peft_deltas("llama", back))


def test_config_only_base_is_enough(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text((BASES / "llama" / "config.json").read_text())
    g = tmp_path / "c.gguf"
    code, _, err = invoke("convert", ADAPTERS / "llama-lora", g, "--to", "gguf", "--base", cfg)
    assert code == 0, err
    assert _fields(gguf.GGUFReader(str(g)))["llama.attention.head_count_kv"] == 2


@pytest.mark.parametrize(
    "name,base,needle",
    [
        ("llama-dora", "llama", "DoRA"),
        ("qwen2-bias", "qwen2", "bias"),
        ("roberta-cls", "roberta", "modules_to_save"),
        # llama-embedding's saved embedding copy equals the base: dropped (test_embedding_copies.py)
    ],
)
def test_refusals(name, base, needle, tmp_path):
    out = tmp_path / "x.gguf"
    code, _, err = invoke("convert", ADAPTERS / name, out, "--to", "gguf", "--base", BASES / base)
    assert code == 2
    assert needle in assert_one_line_error(err)
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_refused_without_base_and_for_unknown_architectures(tmp_path):
    with pytest.raises(InputError, match="--base"):
        convert(ADAPTERS / "llama-lora", tmp_path / "a.gguf", to="gguf")
    ad = without_modules_to_save("roberta-cls")
    with pytest.raises(UnsupportedError, match="architecture"):
        convert(ad, tmp_path / "r.gguf", to="gguf", base=BASES / "roberta")


def test_tied_lm_head_refused(tmp_path):
    from loratool.adapter import LoraModule, ModuleKind
    from loratool.io.store import LazyTensor

    ad = loratool.read_adapter(ADAPTERS / "qwen2-lora")
    head = LoraModule("lm_head", ModuleKind.LINEAR, LazyTensor.of(torch.randn(4, 64)), LazyTensor.of(torch.randn(256, 4)), alpha=8.0, scale=2.0)
    ad.modules["lm_head"] = head
    cfg = tmp_path / "cfg"  # config only: the checkpoint of a tied base has no lm_head.weight to bind to
    cfg.mkdir()
    (cfg / "config.json").write_text((BASES / "qwen2" / "config.json").read_text())
    with pytest.raises(UnsupportedError, match="lm_head"):
        convert(ad, tmp_path / "t.gguf", to="gguf", base=cfg)


def test_detection_and_garbage(tmp_path):
    from loratool.formats import detect_format

    g = tmp_path / "a.gguf"
    convert(ADAPTERS / "qwen2-lora", g, to="gguf", base=BASES / "qwen2")
    assert detect_format(g) == "gguf"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 7)
    code, _, err = invoke("inspect", bad)
    assert code == 2
    assert_one_line_error(err)


def test_names_table_agrees_with_gguf_package():
    """Every HF template names the tensor gguf's own TensorNameMap gives, and back."""
    from loratool import names

    for hf_arch, arch in names.GGUF_ARCHITECTURES.items():
        known = {t.name for t in gguf.MODEL_TENSORS[arch.model_arch]}
        for tensor, template in names.hf_templates(arch).items():
            if tensor not in known:
                continue  # e.g. gemma has no separate output tensor
            hf = template.format(bid=3)
            expected = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, tensor)].format(bid=3)
            assert names.gguf_tensor_name(hf, arch, 4) == expected, (hf_arch, hf)
            assert names.hf_module_name(expected, arch) == hf, (hf_arch, expected)


def test_permutation_helpers_match_llama_cpp():
    from loratool.names import permute_qk_rows, unpermute_qk_rows

    t = torch.randn(96, 5)
    for heads in (1, 2, 3, 6):
        assert torch.equal(permute_qk_rows(t, heads), llama_cpp_permute(t, heads, heads))
        assert torch.equal(unpermute_qk_rows(permute_qk_rows(t, heads), heads), t)
    with pytest.raises(UnsupportedError):
        permute_qk_rows(torch.randn(10, 2), 4)
