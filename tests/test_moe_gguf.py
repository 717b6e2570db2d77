"""GGUF (llama.cpp) expert LoRA from fused MoE expert parameters (PEFT target_parameters).

The oracle is llama.cpp's own convert_lora_to_gguf.py, run on the per-expert form of the same
adapter (``loratool convert --experts per-expert``): its HF converter stacks the per-expert pairs
into 3-D ``blk.N.ffn_{gate,up,down}_exps.weight.lora_{a,b}``. loratool's file must hold the same
tensors, byte for byte. The converter comes from the llama-cpp-python source package that
.ci/interop prepares ($LORATOOL_LLAMA_CPP, or the cache under .ci/.interop-cache), or /tmp/eng.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_line_error, invoke

import loratool
from loratool.base import BaseModel
from loratool.conversion import convert
from loratool.engine.delta import experts_delta
from loratool.errors import UnsupportedError

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
CONFIGS = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(SMALL, intermediate_size=64, moe_intermediate_size=24, num_experts=4,
                                         num_experts_per_tok=2, head_dim=8), ("q_proj", "k_proj", "gate")),
    "mixtral": ("MixtralConfig", dict(SMALL, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
                ("q_proj", "k_proj")),  # q/k rows are permuted for llama.cpp: checked with the experts
    "gpt_oss": ("GptOssConfig", dict(SMALL, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=8),
                ("q_proj",)),
}


def _llama_cpp() -> Path | None:
    """llama.cpp's source tree with convert_lora_to_gguf.py and gguf-py, where one is prepared."""
    cache = Path(os.environ.get("LORATOOL_INTEROP_CACHE") or ROOT / ".ci" / ".interop-cache")
    candidates = [os.environ.get("LORATOOL_LLAMA_CPP"), *sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp")),
                  *sorted(Path("/tmp/eng").glob("llama_cpp_python-*/vendor/llama.cpp"))]
    for c in candidates:
        if c and (Path(c) / "convert_lora_to_gguf.py").is_file() and (Path(c) / "gguf-py" / "gguf").is_dir():
            return Path(c)
    return None


def _model(arch: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cls, kwargs, _ = CONFIGS[arch]
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs)).eval()


def _adapter(arch: str, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=list(CONFIGS[arch][2]), target_parameters=EXPERTS, init_lora_weights=False)
    get_peft_model(_model(arch), config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """arch -> (base folder, fused adapter folder, loratool's GGUF)."""
    root = tmp_path_factory.mktemp("moe-gguf")
    made = {}
    for arch in CONFIGS:
        base = root / f"{arch}-base"
        _model(arch).save_pretrained(base)
        adapter = _adapter(arch, root / f"{arch}-lora")
        out = root / f"{arch}.gguf"
        if arch != "gpt_oss":
            code, _, err = invoke("convert", adapter, out, "--to", "gguf", "--base", base)
            assert code == 0, err
        made[arch] = (base, adapter, out)
    return made


def _tensors(path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (GGML type, ggml ne shape, raw data)."""
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.array(t.data)) for t in gguf.GGUFReader(str(path)).tensors}


def _fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


def _llama_cpp_gguf(moe, arch, tmp_path, outtype="f32") -> Path:
    """llama.cpp's convert_lora_to_gguf.py on the per-expert PEFT form of the adapter."""
    root = _llama_cpp()
    if root is None:
        pytest.skip("llama.cpp's convert_lora_to_gguf.py not found ($LORATOOL_LLAMA_CPP, .ci/.interop-cache or /tmp/eng; .ci/interop prepares it)")
    base, adapter, _ = moe[arch]
    per = tmp_path / "per-expert"
    code, _, err = invoke("convert", adapter, per, "--to", "peft", "--experts", "per-expert", "--base", base)
    assert code == 0, err
    out = tmp_path / "llama-cpp.gguf"
    env = dict(os.environ, PYTHONPATH=str(root / "gguf-py"))
    run = subprocess.run([sys.executable, str(root / "convert_lora_to_gguf.py"), str(per), "--base", str(base), "--outfile", str(out),
                          "--outtype", outtype], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.mark.parametrize("arch,outtype", [("qwen3_moe", "f32"), ("mixtral", "f32"), ("qwen3_moe", "q8_0")])
def test_equals_llama_cpp_converter_on_the_per_expert_adapter(arch, outtype, moe, tmp_path):
    theirs_path = _llama_cpp_gguf(moe, arch, tmp_path, outtype)
    base, adapter, ours_path = moe[arch]
    if outtype != "f32":
        ours_path = tmp_path / "ours.gguf"
        code, _, err = invoke("convert", adapter, ours_path, "--to", "gguf", "--base", base, "--outtype", outtype)
        assert code == 0, err
    ours, theirs = _tensors(ours_path), _tensors(theirs_path)
    assert set(ours) == set(theirs)
    assert any(name.endswith("ffn_up_exps.weight.lora_a") for name in theirs)
    for name, (ttype, shape, data) in theirs.items():
        assert ours[name][:2] == (ttype, shape), name
        assert np.array_equal(ours[name][2], data), f"{name}: values differ from llama.cpp's"
    mine, llama = _fields(ours_path), _fields(theirs_path)
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert mine[key] == llama[key], key


def test_expert_layout(moe):
    """lora_a (E, r, in) = A_e stacked, shared by gate and up; lora_b (E, rows, r) = B_e's rows."""
    base, adapter, path = moe["qwen3_moe"]
    src = loratool.read_adapter(adapter)
    tensors = _tensors(path)
    m = src.modules["model.layers.1.mlp.experts.gate_up_proj"]
    E, r, half = m.experts, m.rank, m.out_features // 2
    A, B = m.A.load(), m.B.load()
    _, ne_a, a = tensors["blk.1.ffn_gate_exps.weight.lora_a"]
    _, ne_b, b = tensors["blk.1.ffn_up_exps.weight.lora_b"]
    assert ne_a == (m.in_features, r, E) and ne_b == (r, half, E)  # ggml order
    assert np.array_equal(a, tensors["blk.1.ffn_up_exps.weight.lora_a"][2])
    for e in range(E):
        assert np.array_equal(a[e], A[e * r : (e + 1) * r].numpy())
        assert np.array_equal(b[e], B[half:, e::E].numpy())


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("which", ["loratool", "llama.cpp"])
def test_read_back_equals_the_source_deltas(arch, which, moe, tmp_path):
    base, adapter, path = moe[arch]
    if which == "llama.cpp":
        path = _llama_cpp_gguf(moe, arch, tmp_path)
    src = loratool.read_adapter(adapter)
    back = loratool.read_adapter(path, base=BaseModel.open(base))
    assert set(back.modules) == set(src.modules)
    for name, m in src.modules.items():
        got = back.modules[name]
        if m.experts:
            assert (got.experts, got.rank) == (m.experts, m.rank), name
            assert torch.equal(experts_delta(got, dtype=torch.float64), experts_delta(m, dtype=torch.float64)), name
        else:
            assert torch.allclose(got.delta(dtype=torch.float64), m.delta(dtype=torch.float64), rtol=0, atol=1e-12), name


def test_gguf_back_to_peft_gives_the_same_logits(moe, tmp_path):
    import transformers
    from peft import PeftModel

    base, adapter, path = moe["qwen3_moe"]
    code, _, err = invoke("convert", path, tmp_path / "back", "--to", "peft", "--base", base)
    assert code == 0, err
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    logits = []
    for folder in (adapter, tmp_path / "back"):
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            logits.append(PeftModel.from_pretrained(model, str(folder)).eval()(input_ids=ids).logits)
    assert float((logits[0] - logits[1]).abs().max()) <= 1e-5


def test_gate_and_up_with_their_own_lora_a_read_exactly(tmp_path):
    """A file whose gate and up pairs do not share lora_a (per-expert training with separate
    gate/up LoRA, of other ranks) reads as one fused module of rank r_gate + r_up, each part at
    llama.cpp's scale for it (alpha / its rank)."""
    E, n_in, rows, rg, ru, alpha = 3, 8, 5, 2, 4, 6.0
    g = torch.Generator().manual_seed(0)
    t = {k: torch.randn(*s, generator=g) for k, s in {"ga": (E, rg, n_in), "gb": (E, rows, rg), "ua": (E, ru, n_in),
                                                      "ub": (E, rows, ru)}.items()}
    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, key in (("ffn_gate_exps", "g"), ("ffn_up_exps", "u")):
        w.add_tensor(f"blk.0.{name}.weight.lora_a", t[key + "a"].numpy())
        w.add_tensor(f"blk.0.{name}.weight.lora_b", t[key + "b"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = loratool.read_adapter(path).modules["model.layers.0.mlp.experts.gate_up_proj"]
    assert (m.experts, m.rank) == (E, rg + ru)
    D = experts_delta(m, dtype=torch.float64)
    for e in range(E):
        gate = alpha / rg * t["gb"][e].double() @ t["ga"][e].double()
        up = alpha / ru * t["ub"][e].double() @ t["ua"][e].double()
        assert torch.allclose(D[e], torch.cat([gate, up]), rtol=1e-6, atol=1e-6)  # each part's scale baked into float32 B


def test_gpt_oss_is_refused_naming_the_parameter(moe, tmp_path):
    base, adapter, _ = moe["gpt_oss"]
    out = tmp_path / "g.gguf"
    code, _, err = invoke("convert", adapter, out, "--to", "gguf", "--base", base)
    assert code == 2
    line = assert_one_line_error(err)
    assert "experts.gate_up_proj" in line and "gpt-oss" in line and "convert_lora_to_gguf.py" in line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_architecture_without_expert_lora_is_refused(moe, tmp_path):
    """A base llama.cpp is not given expert LoRA for here (config only: no binding)."""
    import json

    base, adapter, _ = moe["qwen3_moe"]
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    config = json.loads((base / "config.json").read_text())
    (cfg / "config.json").write_text(json.dumps(dict(config, architectures=["Qwen2ForCausalLM"], model_type="qwen2")))
    with pytest.raises(UnsupportedError, match=r"experts\.(gate_up|down)_proj: GGUF expert LoRA is written only for .*not qwen2"):
        convert(adapter, tmp_path / "x.gguf", to="gguf", base=cfg)
    assert not (tmp_path / "x.gguf").exists()
