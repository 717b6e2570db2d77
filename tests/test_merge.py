"""`loratool merge` against PEFT's merge_and_unload: every fixture, every real adapter, bad inputs, kills."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from _merge_helpers import (
    assert_close_rounding,
    edit_adapter,
    fixture,
    load_dir,
    load_model,
    logits,
    peft_logits,
    peft_merged,
    siblings,
    ulp,
)
from conftest import ADAPTER_BASE, ADAPTERS, BASES, assert_one_line_error, invoke
from realworld import PEFT_REALWORLD, REALWORLD

import loratool
from loratool.merge import merge_model, resolve_device

IDS = torch.tensor([[1, 5, 9, 33, 100, 7, 250, 3], [4, 4, 8, 15, 16, 23, 42, 0]])


def _touched(report: dict) -> set[str]:
    names = {m["tensor"] for m in report["modules"]} | {m["tensor"] for m in report["modules_to_save"]}
    adapter = loratool.read_adapter(report["adapter"])
    base = loratool.BaseModel.open(report["base"])
    for m in adapter:
        if m.bias is not None:
            names.add(base.tensor_name(f"{m.name}.bias"))
    return names


# ----------------------------------------------------------------------------- fixtures vs PEFT


@pytest.mark.parametrize("name", sorted(ADAPTER_BASE))
def test_merge_matches_peft(name, tmp_path):
    base, adapter = fixture(name)
    out = tmp_path / "out"
    code, stdout, err = invoke("merge", base, adapter, out, "--report", tmp_path / "report.json")
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    ours = load_dir(out)
    theirs = load_dir(peft_merged(base, adapter, tmp_path / "peft"))
    assert set(ours) == set(theirs)
    base_sd = load_dir(base)
    touched = _touched(report)
    assert touched
    for key, t in ours.items():
        if key in touched:
            assert_close_rounding(t, theirs[key], key)
        else:  # untouched: bit-exact copies of the base
            assert t.dtype == base_sd[key].dtype and torch.equal(t.view(-1).view(torch.uint8), base_sd[key].view(-1).view(torch.uint8)), key
    # layout: the base's shard files, an index only where the base has one, side files copied
    weight_files = sorted(p.name for p in base.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == weight_files
    if (base / "model.safetensors.index.json").exists():
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(ours)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
        from safetensors import safe_open

        for key, shard in index["weight_map"].items():
            with safe_open(out / shard, "pt") as fh:
                assert key in fh.keys()
    for side in ("config.json", "generation_config.json"):
        if (base / side).exists():
            assert (out / side).read_bytes() == (base / side).read_bytes()
    # the merged model's logits are the unmerged PeftModel's
    ref = peft_logits(base, adapter, IDS)
    got = logits(out, IDS)
    if any(t.dtype in (torch.float16, torch.bfloat16) for t in ours.values()):
        assert torch.allclose(got, ref, atol=0.05 * float(ref.abs().max()))
    else:
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), float((got - ref).abs().max())
    assert "merged" in stdout


def test_report_norms_and_timings(tmp_path):
    base, adapter = fixture("llama-lora")
    rep = merge_model(base, adapter, tmp_path / "out", report_path=tmp_path / "r.json", device="cpu")
    assert json.loads((tmp_path / "r.json").read_text())["modules"] == rep["modules"]
    ours, base_sd = load_dir(tmp_path / "out"), load_dir(base)
    assert len(rep["modules"]) == 14
    for m in rep["modules"]:
        dw = ours[m["tensor"]].double() - base_sd[m["tensor"]].double()
        assert m["delta_norm"] == pytest.approx(float(dw.norm()), rel=1e-4)
        assert m["weight_norm"] == pytest.approx(float(base_sd[m["tensor"]].double().norm()), rel=1e-5)
        assert m["relative_delta"] == pytest.approx(m["delta_norm"] / m["weight_norm"])
        assert m["seconds"] >= 0 and m["rank"] == 8 and m["kind"] == "linear"
    assert {"plan_s", "check_s", "stream_s", "commit_s", "total_s"} <= set(rep["timings"])
    assert rep["tensors"]["merged"] == 14 and rep["tensors"]["copied"] == len(base_sd) - 14
    assert rep["bytes_written"] == sum(t.numel() * t.element_size() for t in ours.values())


def test_dora_report_uses_effective_delta(tmp_path):
    base, adapter = fixture("llama-dora")
    rep = merge_model(base, adapter, tmp_path / "out", device="cpu")
    ours, base_sd = load_dir(tmp_path / "out"), load_dir(base)
    for m in rep["modules"]:
        assert m["dora"]
        dw = ours[m["tensor"]].double() - base_sd[m["tensor"]].double()
        assert m["delta_norm"] == pytest.approx(float(dw.norm()), rel=1e-4)


def test_dtype_option(tmp_path):
    base, adapter = fixture("llama-lora")
    code, _, err = invoke("merge", base, adapter, tmp_path / "out", "--dtype", "bfloat16")
    assert code == 0, err
    ours, base_sd = load_dir(tmp_path / "out"), load_dir(base)
    from peft import PeftModel

    ref = PeftModel.from_pretrained(load_model(base), str(adapter)).merge_and_unload().state_dict()
    for key, t in ours.items():
        assert t.dtype == torch.bfloat16, key
        assert_close_rounding(t, ref[key].to(torch.bfloat16), key)
        if "proj" not in key:
            assert torch.equal(t, base_sd[key].to(torch.bfloat16))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert load_model(tmp_path / "out").dtype == torch.bfloat16


def test_half_precision_base_within_one_ulp(tmp_path):
    # the bf16 sharded base: PEFT adds the float32 delta into bf16 weights; we round once too
    base, adapter = fixture("llama-sharded-lora")
    rep = merge_model(base, adapter, tmp_path / "out", device="cpu")
    ours, base_sd = load_dir(tmp_path / "out"), load_dir(base)
    ad = loratool.read_adapter(adapter)
    for m in rep["modules"]:
        exact = base_sd[m["tensor"]].float() + ad.modules[m["name"]].delta()
        diff = (ours[m["tensor"]].float() - exact).abs()
        assert (diff <= 0.5 * ulp(exact, torch.bfloat16) * 1.0001).all(), m["name"]


def test_pytorch_bin_bases(tmp_path):
    base, adapter = fixture("llama-lora")
    reference = load_dir(merge_model(base, adapter, tmp_path / "ref", device="cpu")["out"])
    sd = load_dir(base)
    single = tmp_path / "bin"
    single.mkdir()
    shutil.copy(base / "config.json", single)
    torch.save(sd, single / "pytorch_model.bin")
    sharded = tmp_path / "binsharded"
    sharded.mkdir()
    shutil.copy(base / "config.json", sharded)
    keys = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    weight_map = {}
    for fname, ks in halves.items():
        torch.save({k: sd[k] for k in ks}, sharded / fname)
        weight_map.update({k: fname for k in ks})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    for src, files in ((single, ["model.safetensors"]), (sharded, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])):
        out = tmp_path / f"out-{src.name}"
        code, _, err = invoke("merge", src, adapter, out)
        assert code == 0, err
        assert sorted(p.name for p in out.glob("*.safetensors")) == files
        got = load_dir(out)
        assert set(got) == set(reference)
        for k in got:
            assert torch.equal(got[k], reference[k]), k
        if src is sharded:
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert index["weight_map"] == {k: v.replace("pytorch_model", "model").replace(".bin", ".safetensors") for k, v in weight_map.items()}
        load_model(out)


# ----------------------------------------------------------------------------- tied embeddings


def _tied_adapter(tmp_path: Path, targets: list[str], base: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    pm = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    out = tmp_path / ("ad-" + "-".join(targets))
    pm.save_pretrained(out)
    return out


@pytest.mark.parametrize("targets", [["lm_head"], ["embed_tokens"], ["embed_tokens", "lm_head", "q_proj"]])
def test_tied_embeddings_like_peft(tmp_path, targets):
    base = BASES / "qwen2"  # tie_word_embeddings=True, no lm_head.weight in the checkpoint
    adapter = _tied_adapter(tmp_path, targets, base)
    out = tmp_path / "out"
    code, _, err = invoke("merge", base, adapter, out)
    assert code == 0, err
    ours = load_dir(out)
    theirs = load_dir(peft_merged(base, adapter, tmp_path / "peft"))
    assert set(ours) == set(theirs) and "lm_head.weight" not in ours
    for k in ours:
        assert_close_rounding(ours[k], theirs[k], k)
    # merging into the shared tensor changes both the input embedding and the output head, so
    # the merged model is PEFT's merged model, not the unmerged PeftModel (see docs/merge.md)
    ref = logits(tmp_path / "peft", IDS)
    assert torch.allclose(logits(out, IDS), ref, atol=1e-4, rtol=1e-4)
    if "lm_head" in targets:
        assert "ties it to model.embed_tokens.weight" in err


def test_tied_embeddings_stored_twice(tmp_path):
    # a tied checkpoint that also stores lm_head.weight: both copies get the same update
    base = tmp_path / "qwen2-both"
    shutil.copytree(BASES / "qwen2", base)
    from safetensors.torch import save_file

    sd = load_dir(base)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    adapter = _tied_adapter(tmp_path, ["embed_tokens"], BASES / "qwen2")
    code, _, err = invoke("merge", base, adapter, tmp_path / "out")
    assert code == 0, err
    ours = load_dir(tmp_path / "out")
    assert torch.equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])
    theirs = load_dir(peft_merged(BASES / "qwen2", adapter, tmp_path / "peft"))
    assert_close_rounding(ours["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"], "embed")


# ----------------------------------------------------------------------------- modules_to_save


def test_modules_to_save_absent_from_base_is_added(tmp_path):
    base = tmp_path / "distilbert-headless"
    shutil.copytree(BASES / "distilbert", base)
    from safetensors.torch import save_file

    sd = {k: v for k, v in load_dir(base).items() if not k.startswith("classifier.")}
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    adapter = ADAPTERS / "distilbert-cls"
    code, _, err = invoke("merge", base, adapter, tmp_path / "out")
    assert code == 0, err
    assert "classifier.weight: modules_to_save tensor is not in the base; it is added" in err
    ours = load_dir(tmp_path / "out")
    ad = loratool.read_adapter(adapter)
    for name in ("classifier.weight", "classifier.bias", "pre_classifier.weight"):
        assert torch.equal(ours[name], ad.modules_to_save[name].load().float())
    theirs = load_dir(peft_merged(BASES / "distilbert", adapter, tmp_path / "peft"))
    for k in theirs:
        assert_close_rounding(ours[k], theirs[k], k)


# ----------------------------------------------------------------------------- API: hooks, progress, device


class _ScaleHook:
    """Declares an extra float32 tensor next to every merged weight; records finalize."""

    def __init__(self):
        self.seen = []
        self.finalized = None

    def specs(self, name, dtype, shape, touched):
        if not touched:
            return None
        return [(name, dtype, shape), (name + "_absmax", torch.float32, (1,))]

    def __call__(self, name, tensor, touched):
        self.seen.append(name)
        return {name: tensor, name + "_absmax": tensor.float().abs().max().reshape(1)}

    def finalize(self, folder, report):
        self.finalized = sorted(p.name for p in Path(folder).iterdir())


def test_tensor_hook_and_progress(tmp_path):
    base, adapter = fixture("llama-sharded-lora")
    hook = _ScaleHook()
    calls = []
    rep = merge_model(base, adapter, tmp_path / "out", device="cpu", tensor_hook=hook, progress=lambda n, label=None: calls.append(n))
    assert len(hook.seen) == 14
    assert "model.safetensors.index.json" in hook.finalized
    ours = load_dir(tmp_path / "out")
    plain = load_dir(merge_model(base, adapter, tmp_path / "plain", device="cpu")["out"])
    for name in hook.seen:
        assert torch.equal(ours[name], plain[name])
        assert float(ours[name + "_absmax"]) == float(plain[name].float().abs().max())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours)
    assert sum(calls) == rep["bytes_written"]


def test_plain_callable_hook_sees_every_tensor(tmp_path):
    base, adapter = fixture("llama-lora")
    seen = {}

    def hook(name, tensor):
        seen[name] = tensor.dtype
        return tensor * 0 if name == "model.norm.weight" else None

    rep = merge_model(base, adapter, tmp_path / "out", device="cpu", tensor_hook=hook)
    assert len(seen) == rep["tensors"]["total"]
    ours = load_dir(tmp_path / "out")
    assert not ours["model.norm.weight"].any()
    plain = load_dir(merge_model(base, adapter, tmp_path / "plain", device="cpu")["out"])
    assert all(torch.equal(ours[k], plain[k]) for k in ours if k != "model.norm.weight")


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_device_cuda_without_cuda(tmp_path):
    base, adapter = fixture("llama-lora")
    code, _, err = invoke("merge", base, adapter, tmp_path / "out", "--device", "cuda")
    assert code == 2
    assert "CUDA is not available" in assert_one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_device_cpu_equals_auto(tmp_path):
    base, adapter = fixture("gpt2-lora")
    a = load_dir(merge_model(base, adapter, tmp_path / "a", device="cpu")["out"])
    b = load_dir(merge_model(base, adapter, tmp_path / "b", device="auto")["out"])
    for k in a:
        assert_close_rounding(a[k], b[k], k)


@pytest.mark.parametrize("name", ["llama-lora", "llama-bf16", "llama-fp16", "gpt2-lora", "qwen2-bias", "llama-multi", "llama-sharded-lora"])
def test_staged_accelerator_path_on_the_cpu(monkeypatch, tmp_path, name):
    # --device cuda/mps stage whole row blocks on the device and bring them back; no GPU here, so that
    # code path runs with the CPU as the "device" and must give what the CPU path gives, and unmerge
    # must report the same rounding bound
    import loratool.engine.stream as engine

    base, adapter = fixture(name)
    ref = merge_model(base, adapter, tmp_path / "cpu", device="cpu", report_path=tmp_path / "cpu.json")
    back_ref = merge_model(tmp_path / "cpu", adapter, tmp_path / "cpu-back", device="cpu", sign=-1, report_path=tmp_path / "cpu-back.json")
    monkeypatch.setattr(engine._Producer, "staged", property(lambda self: True))
    monkeypatch.setattr(engine, "BLOCK_ELEMS", 1000)  # several blocks per tensor
    got = merge_model(base, adapter, tmp_path / "staged", device="cpu", report_path=tmp_path / "staged.json")
    back = merge_model(tmp_path / "cpu", adapter, tmp_path / "staged-back", device="cpu", sign=-1, report_path=tmp_path / "staged-back.json")
    for x, y in (("cpu", "staged"), ("cpu-back", "staged-back")):
        a, b = load_dir(tmp_path / x), load_dir(tmp_path / y)
        assert a.keys() == b.keys()
        for k in a:
            if a[k].dtype == torch.float32:
                # other matmul shapes sum the r products in another order: float32 rounding of the
                # delta's terms (|B| |A| up to ~1 in these fixtures), not of the result
                torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6, msg=k)
            else:
                assert_close_rounding(b[k], a[k], k)
    for r, g in ((ref, got), (back_ref, back)):
        assert [m["name"] for m in r["modules"]] == [m["name"] for m in g["modules"]]
        for x, y in zip(r["modules"], g["modules"]):
            assert y["delta_norm"] == pytest.approx(x["delta_norm"], rel=1e-6)
            assert y["weight_norm"] == pytest.approx(x["weight_norm"], rel=1e-5)
            if "rounding_bound" in x:
                assert y["rounding_bound"] == pytest.approx(x["rounding_bound"], rel=1e-6)


def test_blocked_math_equals_whole_tensor(monkeypatch, tmp_path):
    # tiny row blocks: the streamed result equals the whole-tensor reference functions
    import loratool.engine.stream as engine
    from loratool.engine.delta import dense_delta, dora_merged

    monkeypatch.setattr(engine, "BLOCK_ELEMS", 200)
    for name in ("gpt2-lora", "llama-dora", "llama-embedding"):
        base, adapter = fixture(name)
        rep = merge_model(base, adapter, tmp_path / name, device="cpu")
        ours, base_sd = load_dir(tmp_path / name), load_dir(base)
        ad = loratool.read_adapter(adapter)
        bm = loratool.BaseModel.open(base)
        ad = loratool.base.bind_adapter(ad, bm).adapter
        for m in rep["modules"]:
            mod = ad.modules[m["name"]]
            w = ad.modules_to_save.get(m["tensor"])
            w = w.load() if w is not None else base_sd[m["tensor"]]
            exact = dora_merged(w, mod) if mod.magnitude is not None else w.float() + dense_delta(mod, layout="stored")
            ref = exact.to(w.dtype)  # float32 math, rounded once
            assert_close_rounding(ours[m["tensor"]], ref, m["name"])


# ----------------------------------------------------------------------------- refusals


def _refused(tmp_path, *args, expect: str, out_name="out"):
    out = tmp_path / out_name
    code, _, err = invoke("merge", *args[:2], out, *args[2:])
    assert code == 2, err
    line = assert_one_line_error(err)
    assert expect in line, line
    assert not out.exists()
    assert not siblings(out)
    return line


def test_refuses_module_missing_in_base(tmp_path):
    line = _refused(tmp_path, BASES / "llama", ADAPTERS / "gpt2-lora", expect="not in the base model")
    assert "transformer.h." in line


def test_refuses_shape_mismatch(tmp_path):
    bad = edit_adapter(ADAPTERS / "llama-lora", tmp_path / "bad", tensors={"layers.0.self_attn.q_proj.lora_B": lambda t: torch.zeros(48, t.shape[1])})
    line = _refused(tmp_path, BASES / "llama", bad, expect="shape mismatch")
    assert "model.layers.0.self_attn.q_proj" in line and "(48, 64)" in line and "(64, 64)" in line


@pytest.mark.parametrize("what", ["lora_B", "modules_to_save"])
def test_refuses_nan_inf(tmp_path, what):
    if what == "lora_B":
        bad = edit_adapter(ADAPTERS / "llama-lora", tmp_path / "bad", tensors={"layers.1.mlp.up_proj.lora_B": lambda t: t.index_fill(0, torch.tensor([3]), float("nan"))})
        base = BASES / "llama"
    else:
        bad = edit_adapter(ADAPTERS / "roberta-cls", tmp_path / "bad", tensors={"classifier.out_proj.weight": lambda t: t.fill_(float("inf"))})
        base = BASES / "roberta"
    _refused(tmp_path, base, bad, expect="NaN or Inf")


def test_refuses_lora_bias_without_base_bias(tmp_path):
    # qwen2-bias on the Llama base: same shapes, but Llama's q/k/v have no bias
    _refused(tmp_path, BASES / "llama", ADAPTERS / "qwen2-bias", expect="lora_bias needs a bias")


def test_out_exists_and_force(tmp_path):
    base, adapter = fixture("llama-lora")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = invoke("merge", base, adapter, out)
    assert code == 2 and "already exists" in assert_one_line_error(err)
    assert (out / "old.txt").exists()
    code, _, err = invoke("merge", base, adapter, out, "--force")
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()


def test_refuses_out_inside_inputs(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASES / "llama", base)
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTERS / "llama-lora", adapter)
    for out in (base / "merged", adapter / "merged"):
        code, _, err = invoke("merge", base, adapter, out)
        assert code == 2 and "must not be an input" in assert_one_line_error(err)
        assert not out.exists()


def test_base_name_mismatch_warns_and_strict_refuses(tmp_path):
    bad = edit_adapter(ADAPTERS / "llama-lora", tmp_path / "other", config={"base_model_name_or_path": "someorg/Mistral-7B-v0.1"})
    code, _, err = invoke("merge", BASES / "llama", bad, tmp_path / "out")
    assert code == 0
    assert "warning:" in err and "Mistral-7B-v0.1" in err
    _refused(tmp_path, BASES / "llama", bad, "--strict", expect="refused (--strict)", out_name="out2")
    # the fixtures name their own base folder: no warning
    code, _, err = invoke("merge", BASES / "llama", ADAPTERS / "llama-lora", tmp_path / "out3", "--strict")
    assert code == 0 and "warning" not in err


def test_failure_is_one_line_with_the_held_warning_folded_in(tmp_path):
    # the warning (trained on another model) explains the refusal (shape mismatch): both on one line
    bad = edit_adapter(
        ADAPTERS / "llama-lora", tmp_path / "other",
        tensors={"q_proj.lora_A": lambda t: torch.cat([t, t], dim=1)},
        config={"base_model_name_or_path": "someorg/Mistral-7B-v0.1"},
    )
    code, _, err = invoke("merge", BASES / "llama", bad, tmp_path / "out")
    line = assert_one_line_error(err)
    assert code == 2 and line.startswith("error: ") and "q_proj" in line and "[warning: " in line and "Mistral-7B-v0.1" in line
    assert not (tmp_path / "out").exists()
    # with --quiet the warning is not shown at all
    code, _, err = invoke("merge", BASES / "llama", bad, tmp_path / "out", "--quiet")
    assert code == 2 and "warning" not in assert_one_line_error(err)


def test_help_has_example():
    code, out, _ = invoke("merge", "--help")
    assert code == 0 and "Example:" in out and "--dtype" in out and "--device" in out


# ----------------------------------------------------------------------------- SIGKILL


def _big_base(folder: Path, layers: int = 48, dim: int = 1024) -> tuple[Path, Path]:
    """A Llama-named base of ~200 MB float32 and a LoRA on every q_proj (slow enough to kill)."""
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    g = torch.Generator().manual_seed(0)
    sd = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(dim, dim, generator=g) for i in range(layers)}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    adapter = folder.parent / "big-adapter"
    adapter.mkdir()
    ad = {}
    for i in range(layers):
        ad[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"] = torch.randn(8, dim, generator=g)
        ad[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"] = torch.randn(dim, 8, generator=g)
    save_file(ad, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "base_model_name_or_path": "big"}))
    return folder, adapter


@pytest.mark.slow
def test_sigkill_leaves_no_partial_out(tmp_path):
    base, adapter = _big_base(tmp_path / "big")
    out = tmp_path / "merged"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-m", "loratool", "merge", str(base), str(adapter), str(out), "--device", "cpu"], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    killed_mid_way = False
    while time.time() < deadline and proc.poll() is None:
        tmp = siblings(out)
        if tmp and any(p.stat().st_size > 1 << 20 for p in tmp[0].glob("*.safetensors")):
            proc.send_signal(signal.SIGKILL)
            killed_mid_way = True
            break
        time.sleep(0.005)
    proc.wait()
    if killed_mid_way:
        assert not out.exists(), "a killed merge left an OUT behind"
        assert siblings(out), "expected the temporary sibling to remain after SIGKILL"
    else:  # finished before we could kill it: then OUT must be complete
        assert proc.returncode == 0
    # a later run cleans the stale sibling and produces a complete OUT
    code, _, err = invoke("merge", base, adapter, out, "--force")
    assert code == 0, err
    assert not siblings(out)
    got = load_dir(out)
    assert len(got) == 48


# ----------------------------------------------------------------------------- real adapters

_SAME_BASE = {"gpt2-stathopoan": "gpt2-anirudh", "gpt2-begreat-bin": "gpt2-tigrinya", "distilbert-imdb-tashu": "distilbert-sidkris-bin"}


def _peft_layer_oracle(name: str, base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge of each adapted layer, without loading the whole model.

    The model is built on the meta device, wrapped by PeftModel (PEFT resolves ranks, alphas,
    fan_in_fan_out), given real storage, loaded with the adapter by PEFT's own state-dict
    loader; then only the adapted layers get their real base weights and ``merge()``.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    from peft.utils.other import ModulesToSaveWrapper
    from realworld import build_model

    bm = loratool.BaseModel.open(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op": the weights are loaded below
        pm = PeftModel.from_pretrained(build_model(name, device="meta"), str(adapter))
    pm = pm.to_empty(device="cpu")
    set_peft_model_state_dict(pm, load_peft_weights(str(adapter)))
    out: dict[str, torch.Tensor] = {}
    for mname, mod in pm.named_modules():
        short = mname[len("base_model.model."):]
        if isinstance(mod, LoraLayer):
            key = bm.weight_name(short)
            mod.base_layer.weight.data.copy_(bm.store.get(key))
            mod.merge()
            out[key] = mod.base_layer.weight.detach().clone()
        elif isinstance(mod, ModulesToSaveWrapper):
            for pname, p in mod.modules_to_save["default"].named_parameters():
                out[bm.tensor_name(f"{short}.{pname}")] = p.detach().clone()
    return out


@pytest.mark.realworld
@pytest.mark.slow
@pytest.mark.parametrize("name", PEFT_REALWORLD)
def test_realworld_merge_matches_peft(name, realworld_bases, tmp_path):
    from safetensors import safe_open

    base = realworld_bases(_SAME_BASE.get(name, name))
    adapter = REALWORLD / name
    rep = merge_model(base, adapter, tmp_path / "out", device="cpu")
    ref = _peft_layer_oracle(name, base, adapter)
    touched = {m["tensor"] for m in rep["modules"]} | {m["tensor"] for m in rep["modules_to_save"]}
    assert rep["modules"] and touched == set(ref), name
    ours_keys = set()
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for key in fh.keys():
                ours_keys.add(key)
                if key in touched:
                    assert_close_rounding(fh.get_tensor(key), ref[key], f"{name}:{key}")
    base_keys = set(loratool.BaseModel.open(base).keys())
    assert ours_keys == base_keys
    assert rep["tensors"]["copied"] == len(base_keys) - len(touched)


@pytest.mark.realworld
@pytest.mark.slow
def test_realworld_mlx_adapter_merges_by_its_own_formula(realworld_bases, tmp_path):
    # an MLX-LM adapter (not PEFT): W' = W + scale * lora_b.T @ lora_a.T, read straight from its file
    from safetensors import safe_open

    base = realworld_bases("qwen25-05b-muzammel")  # the same Qwen2.5-0.5B shape
    adapter = REALWORLD / "mlx-qwen25-05b-wyek1n"
    rep = merge_model(base, adapter, tmp_path / "out", device="cpu")
    assert len(rep["modules"]) == 8
    bm = loratool.BaseModel.open(base)
    ours = load_dir(tmp_path / "out")
    with safe_open(adapter / "adapters.safetensors", "pt") as fh:
        for m in rep["modules"]:
            a, b = fh.get_tensor(m["name"] + ".lora_a"), fh.get_tensor(m["name"] + ".lora_b")
            expected = bm.store.get(m["tensor"]) + 10.0 * (b.T @ a.T)
            assert_close_rounding(ours[m["tensor"]], expected, m["name"])
