"""verify --outputs, layer-streamed: its reference equals PEFT's own outputs, a fault in layer k is named as layer k."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _oracle import peft_model
from conftest import ADAPTER_BASE, ADAPTERS, BASES, assert_one_line_error, invoke
from safetensors.torch import load_file, save_file

from loratool.verify import verify_outputs
from loratool.verify.layered import unmerged_outputs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _peft_merge(adapter: str, out: Path, dtype=torch.float32) -> Path:
    pm = peft_model(ADAPTER_BASE[adapter], ADAPTERS / adapter)
    pm.merge_and_unload().to(dtype).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("layered-merged")
    cache: dict = {}

    def get(adapter: str, dtype: str = "float32") -> Path:
        if (adapter, dtype) not in cache:
            cache[(adapter, dtype)] = _peft_merge(adapter, root / f"{adapter}-{dtype}", getattr(torch, dtype))
        return cache[(adapter, dtype)]

    return get


# ----------------------------------------------------------------------------- the reference is PEFT's model


ARCHITECTURES = [
    "llama-lora",  # Llama, grouped-query attention
    "llama-sharded-lora",  # bf16 base in 3 shards
    "gpt2-lora",  # Conv1D (weights stored (in, out)), tied head
    "qwen2-lora",  # tied embeddings
    "qwen2-bias",  # lora_bias
    "roberta-cls",  # sequence classification, modules_to_save head
    "distilbert-cls",  # modules_to_save pre_classifier + classifier
    "llama-dora",  # DoRA
    "llama-embedding",  # LoRA on the token embedding
    "llama-rslora",
    "llama-adalora",
]


@pytest.mark.parametrize("adapter", ARCHITECTURES)
def test_unmerged_reference_equals_peft(adapter):
    """The layer-streamed unmerged side (adapter on the fly, no PEFT) is PeftModel's forward to float32 rounding."""
    inputs, ours = unmerged_outputs(BASES / ADAPTER_BASE[adapter], ADAPTERS / adapter)
    pm = peft_model(ADAPTER_BASE[adapter], ADAPTERS / adapter).eval()
    with torch.no_grad():
        res = [pm(**b) for b in inputs]
        theirs = torch.cat([r.logits.reshape(-1, r.logits.shape[-1]) for r in res])
        with pm.disable_adapter():
            plain = torch.cat([pm(**b).logits.reshape(-1, theirs.shape[-1]) for b in inputs])
    assert ours.shape == theirs.shape
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=64 * torch.finfo(torch.float32).eps * scale)
    # and the adapter does change the outputs, far beyond that
    assert float((plain - theirs).abs().max()) > 1e-3 * scale


# ----------------------------------------------------------------------------- correct merges pass, stage by stage


@pytest.mark.parametrize("adapter", ["llama-lora", "gpt2-lora", "qwen2-bias", "distilbert-cls", "llama-embedding", "llama-dora"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_correct_merges_pass_every_stage(merged, adapter, dtype):
    report = verify_outputs(BASES / ADAPTER_BASE[adapter], ADAPTERS / adapter, merged(adapter, dtype))
    assert report["passed"] and report["method"] == "layer-streamed", report
    stages = report["layers"]
    assert [s["stage"] for s in stages][0] == "embeddings" and stages[-1]["stage"] == "output"
    assert [s["layer"] for s in stages[1:-1]] == [0, 1]
    assert all(s["passed"] for s in stages) and report["first_divergent"] is None and report["first_divergent_layer"] is None
    assert stages[-1]["relative_diff"] == pytest.approx(report["relative_diff"], rel=1e-6)


def test_agrees_with_the_whole_model_check(merged):
    from loratool.verify.outputs import verify_outputs_whole

    folder = merged("llama-lora", "bfloat16")
    a = verify_outputs(BASES / "llama", ADAPTERS / "llama-lora", folder)
    b = verify_outputs_whole(BASES / "llama", ADAPTERS / "llama-lora", folder)
    for key in ("relative_diff", "floor_merged_dtype", "max_abs_diff", "kl_divergence", "top1_agreement"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key


# ----------------------------------------------------------------------------- planted faults are named


def _edit(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    fn(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layer", [0, 1])
def test_fault_in_layer_k_is_named(tmp_path, merged, dtype, layer):
    key = f"model.layers.{layer}.mlp.down_proj.weight"
    base = load_file(BASES / "llama" / "model.safetensors")

    def plant(sd):  # the delta of this one weight applied twice
        sd[key] = (2 * sd[key].float() - base[key].float()).to(sd[key].dtype)

    bad = _edit(merged("llama-lora", dtype), tmp_path / "bad", plant)
    report = verify_outputs(BASES / "llama", ADAPTERS / "llama-lora", bad)
    assert not report["passed"]
    assert report["first_divergent_layer"] == layer and report["first_divergent"] == f"model.layers.{layer}"
    before = [s for s in report["layers"] if s["stage"] == "embeddings" or (s["layer"] is not None and s["layer"] < layer)]
    assert all(s["passed"] for s in before)


def test_fault_in_a_conv1d_layer_is_named(tmp_path, merged):
    key = "transformer.h.1.attn.c_attn.weight"

    def plant(sd):
        sd[key][:, :8] = 0  # a block of output features lost

    bad = _edit(merged("gpt2-lora"), tmp_path / "bad", plant)
    report = verify_outputs(BASES / "gpt2", ADAPTERS / "gpt2-lora", bad)
    assert report["first_divergent_layer"] == 1 and report["first_divergent"] == "transformer.h.1"


def test_fault_in_the_embedding_and_the_head_are_named(tmp_path, merged):
    emb = _edit(merged("llama-embedding"), tmp_path / "emb", lambda sd: sd["model.embed_tokens.weight"].mul_(1.01))
    report = verify_outputs(BASES / "llama", ADAPTERS / "llama-embedding", emb)
    assert report["first_divergent"] == "embeddings" and report["first_divergent_layer"] is None
    base = load_file(BASES / "roberta" / "model.safetensors")
    head = _edit(merged("roberta-cls"), tmp_path / "head", lambda sd: sd.__setitem__("classifier.dense.weight", base["classifier.dense.weight"]))
    report = verify_outputs(BASES / "roberta", ADAPTERS / "roberta-cls", head)
    assert report["first_divergent"] == "output" and report["first_divergent_layer"] is None


def test_cli_names_the_layer(tmp_path, merged):
    key = "model.layers.1.self_attn.o_proj.weight"
    bad = _edit(merged("llama-lora"), tmp_path / "bad", lambda sd: sd[key].mul_(1.05))
    code, out, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", bad, "--outputs")
    assert code == 1
    assert "first diverging at model.layers.1" in out
    assert "first diverging at model.layers.1" in assert_one_line_error(err)
    code, out, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", bad, "--outputs", "--json")
    rep = json.loads(out)["outputs"]
    assert rep["first_divergent_layer"] == 1 and len(rep["layers"]) == 4


# ----------------------------------------------------------------------------- bad input


def test_architecture_transformers_cannot_build(tmp_path, merged):
    odd = tmp_path / "odd"
    shutil.copytree(BASES / "llama", odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["model_type"] = "no-such-architecture"
    (odd / "config.json").write_text(json.dumps(cfg))
    code, _, err = invoke("verify", odd, ADAPTERS / "llama-lora", merged("llama-lora"), "--outputs")
    assert code == 2
    line = assert_one_line_error(err)
    assert "cannot build this architecture" in line and str(odd) in line


def test_max_memory(merged):
    folder = merged("llama-lora")
    code, _, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", folder, "--outputs", "--max-memory", "64KiB")
    assert code == 2
    line = assert_one_line_error(err)
    assert "--max-memory 0 MiB is below" in line and "one layer (model.layers.0) is 0 MiB in float32" in line
    code, _, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", folder, "--outputs", "--max-memory", "1GiB")
    assert code == 0, err
    code, _, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", folder, "--max-memory", "1GiB")
    assert code == 2 and "--outputs" in assert_one_line_error(err)
    code, _, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", folder, "--outputs", "--max-memory", "lots")
    assert code == 2 and "not a size" in assert_one_line_error(err)


# ----------------------------------------------------------------------------- quantized MERGED


@pytest.fixture(scope="module")
def nf4(tmp_path_factory, merged):
    """llama-rslora merged by PEFT then quantized to NF4 by transformers; and the base quantized alone."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("layered-nf4")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    out = {}
    for name, src in (("merged", merged("llama-rslora")), ("base", BASES / "llama")):
        AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, device_map="cpu").save_pretrained(root / name)
        out[name] = root / name
    return out


def test_quantized_merged_retention_aware(nf4):
    good = verify_outputs(BASES / "llama", ADAPTERS / "llama-rslora", nf4["merged"])
    assert good["merged_dtype"] == "quantized" and good["passed"], good
    assert good["retention"] == pytest.approx(good["expected_retention"], abs=1e-6)
    assert good["floor_merged_dtype"] > 0  # what a correct quantized merge differs by
    lost = verify_outputs(BASES / "llama", ADAPTERS / "llama-rslora", nf4["base"])
    assert abs(lost["retention"]) < 0.1 and lost["expected_retention"] > 0.5
    assert not lost["passed"] and lost["first_divergent_layer"] == 0
