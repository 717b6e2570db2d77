"""MLX-LM adapters: the real one from ../shared/realworld, and PEFT -> MLX -> PEFT round trips."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from _convert_helpers import assert_same_peft, base_of, peft_deltas, without_modules_to_save
from _oracle import load_base_model
from conftest import ADAPTERS, BASES, assert_one_line_error, invoke
from _numeric import rel_diff
from realworld import REALWORLD, build_model

import loratool
from loratool.conversion import convert
from loratool.errors import FormatError, UnsupportedError
from loratool.formats import detect_format

REAL = REALWORLD / "mlx-qwen25-05b-wyek1n"


def _raw_deltas(folder, scale):
    sd = load_file(folder / "adapters.safetensors")
    mods = sorted({k.rsplit(".", 1)[0] for k in sd})
    return {m: scale * sd[f"{m}.lora_b"].T.double() @ sd[f"{m}.lora_a"].T.double() for m in mods}, sd


@pytest.mark.realworld
def test_real_adapter_read():
    ad = loratool.read_adapter(REAL)
    assert ad.format == "mlx"
    raw, sd = _raw_deltas(REAL, 10.0)
    assert len(sd) == 16
    assert len(ad) == 8
    assert {m.rank for m in ad} == {8}
    assert {m.scale for m in ad} == {10.0}
    assert sorted({int(n.split(".")[2]) for n in ad.modules}) == [20, 21, 22, 23]
    assert {n.rsplit(".", 1)[-1] for n in ad.modules} == {"q_proj", "v_proj"}
    assert ad.modules["model.layers.20.self_attn.v_proj"].B.shape == (128, 8)
    for name, d in raw.items():
        assert torch.allclose(ad.modules[name].delta(dtype=torch.float64), d, rtol=1e-12, atol=1e-12)


@pytest.mark.realworld
def test_real_adapter_to_peft_loads_on_real_shape(tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    out = tmp_path / "peft"
    code, _, err = invoke("convert", REAL, out, "--to", "peft")
    assert code == 0, err
    raw, _ = _raw_deltas(REAL, 10.0)
    # the real Qwen2.5-0.5B shape, memory left uninitialized (bf16: 1 GB): PEFT only needs the modules
    model = build_model("mlx-qwen25-05b-wyek1n", device="meta").to(torch.bfloat16).to_empty(device="cpu")
    pm = PeftModel.from_pretrained(model, str(out))
    seen = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            A = mod.lora_A["default"].weight
            assert A.device.type == "cpu"
            seen[name[len("base_model.model."):]] = (mod.lora_B["default"].weight.double() @ A.double()) * mod.scaling["default"]
    assert set(seen) == set(raw)
    for name, d in raw.items():
        assert rel_diff(seen[name], d) < 1e-12
    assert {mod.scaling["default"] for mod in pm.modules() if isinstance(mod, LoraLayer)} == {10.0}


@pytest.mark.realworld
def test_inspect_real_adapter():
    code, out, err = invoke("inspect", REAL, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "mlx"
    assert len(report["modules"]) == 8
    assert {(m["rank"], m["scale"]) for m in report["modules"]} == {(8, 10.0)}
    assert report["lora_params"] == sum(t.numel() for t in load_file(REAL / "adapters.safetensors").values())


@pytest.mark.realworld
def test_real_adapter_mlx_round_trip_keeps_config_and_bytes(tmp_path):
    out = tmp_path / "again"
    code, _, err = invoke("convert", REAL, out, "--to", "mlx")
    assert code == 0, err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora"
    assert cfg["num_layers"] == 4
    assert cfg["lora_parameters"]["rank"] == 8
    assert cfg["lora_parameters"]["scale"] == 10.0
    assert sorted(cfg["lora_parameters"]["keys"]) == ["self_attn.q_proj", "self_attn.v_proj"]
    a, b = load_file(REAL / "adapters.safetensors"), load_file(out / "adapters.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["llama-lora", "llama-patterns", "llama-rslora", "llama-fp16", "llama-bf16", "llama-layers", "llama-dora", "qwen2-lora", "gpt2-lora", "llama-adalora"])
def test_peft_mlx_peft_keeps_every_delta(name, tmp_path):
    base = BASES / base_of(name)
    mlx = tmp_path / "mlx"
    code, _, err = invoke("convert", ADAPTERS / name, mlx, "--to", "mlx", "--base", base)
    assert code == 0, err
    assert detect_format(mlx) == "mlx"
    back = tmp_path / "back"
    code, _, err = invoke("convert", mlx, back, "--to", "peft", "--base", base)
    assert code == 0, err
    tol = 1e-6 if name not in ("llama-fp16", "llama-bf16") else 1e-2
    assert_same_peft(peft_deltas(base_of(name), ADAPTERS / name), peft_deltas(base_of(name), back), tol=tol)


def test_patterns_padded_and_scale_baked(tmp_path):
    out = tmp_path / "mlx"
    report = convert(ADAPTERS / "llama-patterns", out, to="mlx", base=BASES / "llama")
    assert any("zero-padded" in b for b in report["baked"]) and any("scale" in b for b in report["baked"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    sd = load_file(out / "adapters.safetensors")
    r, s = cfg["lora_parameters"]["rank"], cfg["lora_parameters"]["scale"]
    assert r == 8
    assert all(t.shape[1] == r for k, t in sd.items() if k.endswith("lora_a"))
    src = loratool.read_adapter(ADAPTERS / "llama-patterns")
    for name, m in src.modules.items():  # mlx-lm's own formula on the written tensors
        d = s * sd[f"{name}.lora_b"].T.double() @ sd[f"{name}.lora_a"].T.double()
        assert rel_diff(d, m.delta(dtype=torch.float64)) < 1e-6
    assert cfg["num_layers"] == 2  # layers 0 and 1 of a 2-layer base


def test_dora_matches_mlx_lm_fuse_formula(tmp_path):
    """MLX's DoRALinear.fuse (m / ||W + s B^T A^T||_row * (W + ...)) equals PEFT's merged DoRA weight."""
    from peft import PeftModel

    out = tmp_path / "mlx"
    convert(ADAPTERS / "llama-dora", out, to="mlx", base=BASES / "llama")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "dora"
    sd = load_file(out / "adapters.safetensors")
    s = cfg["lora_parameters"]["scale"]
    base_sd = load_base_model("llama").state_dict()
    merged = PeftModel.from_pretrained(load_base_model("llama"), str(ADAPTERS / "llama-dora")).merge_and_unload().state_dict()
    modules = sorted({k.rsplit(".", 1)[0] for k in sd})
    assert modules
    for m in modules:
        W = base_sd[f"{m}.weight"].double()
        adapted = W + s * sd[f"{m}.lora_b"].T.double() @ sd[f"{m}.lora_a"].T.double()
        fused = (sd[f"{m}.m"].double() / adapted.norm(dim=1))[:, None] * adapted
        assert rel_diff(fused, merged[f"{m}.weight"]) < 1e-6


def test_embedding_layout(tmp_path):
    ad = without_modules_to_save("llama-embedding")
    out = tmp_path / "mlx"
    convert(ad, out, to="mlx", base=BASES / "llama")
    sd = load_file(out / "adapters.safetensors")
    m = ad.modules["model.embed_tokens"]
    assert sd["model.embed_tokens.lora_a"].shape == (m.in_features, m.rank)  # (num_embeddings, r)
    assert sd["model.embed_tokens.lora_b"].shape == (m.rank, m.out_features)  # (r, dim)
    back = loratool.read_adapter(out)
    assert back.modules["model.embed_tokens"].kind.value == "embedding"
    assert rel_diff(back.modules["model.embed_tokens"].delta(), m.delta()) < 1e-7


@pytest.mark.parametrize("name,needle", [("qwen2-bias", "bias"), ("roberta-cls", "modules_to_save"), ("distilbert-cls", "modules_to_save")])
def test_refusals(name, needle, tmp_path):
    out = tmp_path / "mlx"
    code, _, err = invoke("convert", ADAPTERS / name, out, "--to", "mlx")
    assert code == 2
    assert needle in assert_one_line_error(err)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_mixed_dora_refused(tmp_path):
    from dataclasses import replace

    ad = loratool.read_adapter(ADAPTERS / "llama-dora")
    first = next(iter(ad.modules))
    ad.modules[first] = replace(ad.modules[first], magnitude=None)
    with pytest.raises(UnsupportedError, match="DoRA"):
        convert(ad, tmp_path / "m", to="mlx")


@pytest.mark.realworld
def test_detection_does_not_confuse_peft_and_mlx(tmp_path):
    assert detect_format(REAL) == "mlx"
    assert detect_format(REAL / "adapters.safetensors") == "mlx"
    assert detect_format(ADAPTERS / "llama-lora") == "peft"
    assert detect_format(ADAPTERS / "llama-lora" / "adapter_model.safetensors") == "peft"


@pytest.mark.realworld
def test_missing_scale_and_full_fine_tune(tmp_path):
    folder = tmp_path / "noscale"
    shutil.copytree(REAL, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    del cfg["lora_parameters"]["scale"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="--scale"):
        loratool.read_adapter(folder)
    code, out, err = invoke("inspect", folder, "--scale", "5", "--json")
    assert code == 0, err
    assert {m["scale"] for m in json.loads(out)["modules"]} == {5.0}
    cfg["fine_tune_type"] = "full"
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = invoke("inspect", folder)
    assert code == 2
    assert "full" in assert_one_line_error(err)


@pytest.mark.realworld
def test_explicit_scale_overrides_the_stored_one_with_a_warning():
    ad = loratool.read_adapter(REAL, scale=2.5)  # the file stores 10
    assert {m.scale for m in ad} == {2.5}
    assert any("overridden by --scale 2.5" in w for w in ad.warnings)
    raw, _ = _raw_deltas(REAL, 2.5)
    for name, d in raw.items():
        assert torch.allclose(ad.modules[name].delta(dtype=torch.float64), d, rtol=1e-12, atol=1e-12)
    assert not any("overridden" in w for w in loratool.read_adapter(REAL, scale=10.0).warnings)
    code, _, err = invoke("inspect", REAL, "--alpha", "16")  # MLX has no alpha: refused, not ignored
    assert code == 2 and "alpha" in assert_one_line_error(err) and "mlx" in err
