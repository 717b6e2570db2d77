"""Scratch (hand-written) LoRA state dicts: the real RoBERTa tutorial checkpoint and round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from _convert_helpers import assert_same_peft, base_of, peft_deltas
from conftest import ADAPTERS, BASES, assert_one_line_error, invoke
from _numeric import rel_diff
from realworld import REALWORLD, build_model

import loratool
from loratool.conversion import convert
from loratool.formats import detect_format
from loratool.formats.scratch import lora_keys, parse_key

COLA = REALWORLD / "montinger-roberta-scratch" / "model_cola.pth"


def _raw():
    return torch.load(COLA, map_location="cpu", weights_only=True)


def test_key_scheme():
    assert parse_key("model.encoder.layer.0.attention.self.lora_query_matrix_A") == ("model.encoder.layer.0.attention.self.query", "A", "attr")
    assert parse_key("blocks.1.fc.lora_matrix_B") == ("blocks.1.fc", "B", "generic")
    assert parse_key("encoder.layer.0.attention.self.query.weight") is None
    assert parse_key("x.lora_A.weight") is None
    assert lora_keys("a.b.value") == ("a.b.lora_value_matrix_A", "a.b.lora_value_matrix_B")
    assert lora_keys("seq.0", "attr") == ("seq.0.lora_matrix_A", "seq.0.lora_matrix_B")


@pytest.mark.realworld
def test_real_checkpoint_read_without_base():
    sd = _raw()
    ad = loratool.read_adapter(COLA)
    assert ad.format == "scratch"
    assert len(ad) == 24
    assert {m.rank for m in ad} == {8} and {m.scale for m in ad} == {1.0}
    assert ad.base_model == "roberta-base"
    for i in range(12):
        for w in ("query", "value"):
            m = ad.modules[f"model.encoder.layer.{i}.attention.self.{w}"]
            p = f"model.encoder.layer.{i}.attention.self.lora_{w}_matrix_"
            assert torch.equal(m.delta(dtype=torch.float64), sd[p + "B"].double() @ sd[p + "A"].double())
    text = " ".join(ad.warnings)
    assert "non-LoRA tensor" in text and "lora_rank=8" in text
    assert not ad.modules_to_save


@pytest.mark.realworld
def test_real_checkpoint_to_peft_on_roberta_base(realworld_bases, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    base = realworld_bases("montinger-roberta-scratch")
    out = tmp_path / "peft"
    code, stdout, err = invoke("convert", COLA, out, "--to", "peft", "--base", base, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["from"] == "scratch" and report["verified"]
    assert "finetune_head_classifier.weight" in " ".join(report["warnings"])  # the custom head is reported, not dropped silently
    assert "query.bias" in " ".join(report["warnings"])
    mts = set(report["modules_to_save"])
    # whole modules only (PEFT replaces modules): every LayerNorm; lone biases are reported
    assert mts == {f"{m}.{p}" for m in ["embeddings.LayerNorm"] + [f"encoder.layer.{i}.{x}.LayerNorm" for i in range(12) for x in ("attention.output", "output")] for p in ("weight", "bias")}
    assert "key.bias" in " ".join(report["warnings"])

    sd = _raw()
    model = build_model("montinger-roberta-scratch", device="meta").to_empty(device="cpu")
    pm = PeftModel.from_pretrained(model, str(out))
    seen = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            seen[name[len("base_model.model."):]] = mod.get_delta_weight("default").double()
    assert set(seen) == {f"encoder.layer.{i}.attention.self.{w}" for i in range(12) for w in ("query", "value")}
    for name, d in seen.items():
        p = "model." + name.replace(".query", ".lora_query_matrix_").replace(".value", ".lora_value_matrix_")
        assert rel_diff(d, sd[p + "B"].double() @ sd[p + "A"].double()) < 1e-7
    ln = pm.base_model.model.embeddings.LayerNorm
    assert torch.equal(ln.modules_to_save["default"].weight.detach(), sd["model.embeddings.LayerNorm.weight"])


@pytest.mark.realworld
def test_inspect_real_checkpoint(realworld_bases):
    code, out, err = invoke("inspect", COLA, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "scratch" and len(report["modules"]) == 24
    assert {(m["rank"], m["scale"]) for m in report["modules"]} == {(8, 1.0)}
    code, out, err = invoke("inspect", COLA, "--base", realworld_bases("montinger-roberta-scratch"), "--json")
    assert code == 0, err
    names = {m["name"] for m in json.loads(out)["modules"]}
    assert "encoder.layer.0.attention.self.query" in names


@pytest.mark.realworld
def test_alpha_and_scale_options(tmp_path):
    code, out, _ = invoke("inspect", COLA, "--alpha", "16", "--json")
    assert {m["scale"] for m in json.loads(out)["modules"]} == {2.0}
    code, out, _ = invoke("inspect", COLA, "--scale", "3", "--json")
    assert {m["scale"] for m in json.loads(out)["modules"]} == {3.0}
    code, _, err = invoke("inspect", COLA, "--scale", "3", "--alpha", "2")
    assert code == 2
    assert_one_line_error(err)


@pytest.mark.realworld
def test_scratch_to_scratch_keeps_everything(tmp_path):
    out = tmp_path / "again.pth"
    code, _, err = invoke("convert", COLA, out, "--to", "scratch")
    assert code == 0, err
    a, b = _raw(), torch.load(out, map_location="cpu", weights_only=True)
    assert set(a) == set(b)
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
        else:
            assert v == b[k], k


@pytest.mark.parametrize(
    "name,suffix",
    [(n, ".safetensors") for n in ("llama-lora", "llama-patterns", "llama-rslora", "llama-bf16", "gpt2-lora", "roberta-cls", "distilbert-cls", "llama-adalora", "qwen2-lora")]
    + [("llama-lora", ".pth"), ("roberta-cls", ".pth")],
)
def test_peft_scratch_peft_keeps_every_delta(name, suffix, tmp_path):
    base = BASES / base_of(name)
    f = tmp_path / f"a{suffix}"
    code, _, err = invoke("convert", ADAPTERS / name, f, "--to", "scratch")
    assert code == 0, err
    assert detect_format(f) == "scratch"
    back = tmp_path / "back"
    code, _, err = invoke("convert", f, back, "--to", "peft")  # no base: names, scale 1 and modules_to_save from the file
    assert code == 0, err
    tol = 1e-2 if name == "llama-bf16" else 1e-6
    assert_same_peft(peft_deltas(base_of(name), ADAPTERS / name), peft_deltas(base_of(name), back), tol=tol)
    src, got = loratool.read_adapter(ADAPTERS / name), loratool.read_adapter(back)
    assert set(src.modules_to_save) == set(got.modules_to_save)
    for k, t in src.modules_to_save.items():
        assert torch.equal(t.load(), got.modules_to_save[k].load())
    back2 = tmp_path / "back2"
    code, _, err = invoke("convert", f, back2, "--to", "peft", "--base", base)
    assert code == 0, err


def test_written_keys_and_shapes(tmp_path):
    f = tmp_path / "r.safetensors"
    convert(ADAPTERS / "roberta-cls", f, to="scratch")
    sd = load_file(f)
    src = loratool.read_adapter(ADAPTERS / "roberta-cls")
    m = src.modules["roberta.encoder.layer.0.attention.self.query"]
    A = sd["roberta.encoder.layer.0.attention.self.lora_query_matrix_A"]
    B = sd["roberta.encoder.layer.0.attention.self.lora_query_matrix_B"]
    assert A.shape == (m.rank, m.in_features) and B.shape == (m.out_features, m.rank)
    assert torch.allclose(B.double() @ A.double(), m.delta(dtype=torch.float64), rtol=1e-6, atol=1e-7)  # scale baked in
    assert "classifier.out_proj.weight" in sd


def test_generic_lora_linear_style(tmp_path):
    torch.manual_seed(0)
    sd = {
        "model.layers.0.self_attn.q_proj.lora_matrix_A": torch.randn(4, 64),
        "model.layers.0.self_attn.q_proj.lora_matrix_B": torch.randn(64, 4),
        "lm_head.bias_extra": torch.randn(3),
    }
    f = tmp_path / "g.safetensors"
    save_file(sd, f)
    ad = loratool.read_adapter(f, scale=0.5)
    m = ad.modules["model.layers.0.self_attn.q_proj"]
    assert torch.allclose(m.delta(), 0.5 * sd["model.layers.0.self_attn.q_proj.lora_matrix_B"] @ sd["model.layers.0.self_attn.q_proj.lora_matrix_A"])
    out = tmp_path / "again.safetensors"
    convert(ad, out, to="scratch")
    assert "model.layers.0.self_attn.q_proj.lora_matrix_A" in load_file(out)  # the same key style comes back


@pytest.mark.parametrize("name,needle", [("llama-dora", "DoRA"), ("qwen2-bias", "bias"), ("llama-embedding", "embedding")])
def test_refusals(name, needle, tmp_path):
    out = tmp_path / "x.safetensors"
    code, _, err = invoke("convert", ADAPTERS / name, out, "--to", "scratch")
    assert code == 2
    assert needle in assert_one_line_error(err)
    assert not list(tmp_path.iterdir())


@pytest.mark.realworld
def test_detection(tmp_path):
    assert detect_format(COLA) == "scratch"
    assert detect_format(ADAPTERS / "llama-lora" / "adapter_model.safetensors") == "peft"
    lit = tmp_path / "lit.pth"
    torch.save({"transformer.h.0.attn.attn.lora_A": torch.zeros(2, 4), "transformer.h.0.attn.attn.lora_B": torch.zeros(4, 2)}, lit)
    from loratool.formats import scratch

    assert not scratch.detect(lit)
    assert not scratch.detect(REALWORLD / "mlx-qwen25-05b-wyek1n" / "adapters.safetensors")
    assert not scratch.detect(ADAPTERS / "llama-lora")
    code, _, err = invoke("inspect", COLA.parent)  # three checkpoints: which one is ambiguous
    assert code == 2
    assert_one_line_error(err)
