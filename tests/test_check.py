"""check --target ENGINE [--fix OUT]: every rule triggered and not, fixed adapters pass check and
load in PEFT (and mlx-lm) with the reported error, bad input is one line with exit 2."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _oracle import load_base_model, peft_model
from _surgery_helpers import peft_view
from conftest import ADAPTERS, BASES, assert_one_line_error, invoke

import loratool
from loratool.adapter import ModuleKind
from loratool.base import BaseModel
from loratool.errors import UnsupportedError
from loratool.io.store import LazyTensor
from loratool.serving.check import check_adapter
from loratool.serving.fix import fix_adapter, write_fixed
from loratool.serving.rules import ENGINES
from loratool.surgery import rerank

LLAMA = BASES / "llama"
IDS = [[1, 5, 77, 200, 3, 9, 255, 128]]


def _read(name):
    return loratool.read_adapter(ADAPTERS / name)


def _base(path=LLAMA):
    return BaseModel.open(path)


def _base_with(tmp_path, name, **config):
    """A copy of the tiny Llama whose config.json says something else (architecture, tied head)."""
    dest = tmp_path / name
    shutil.copytree(LLAMA, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(config)
    (dest / "config.json").write_text(json.dumps(cfg))
    return BaseModel.open(dest)


def _with_head(ad):
    """The adapter plus a LoRA on lm_head (256 x 64)."""
    torch.manual_seed(3)
    m = next(iter(ad))
    head = replace(m.with_factors(torch.randn(4, 64), torch.randn(256, 4) * 0.1, alpha=8.0, scale=2.0), name="lm_head", kind=ModuleKind.LINEAR)
    return ad.replace_modules({**ad.modules, "lm_head": head})


def _prefixed(ad, prefix="module."):
    return ad.replace_modules({prefix + n: replace(m, name=prefix + n) for n, m in ad.modules.items()})


def _rules(report):
    return {p["rule"] for p in report["problems"]}


# --------------------------------------------------------------------------- every rule, triggered and not

CASES = {
    # rule: (engine, triggering adapter, compatible adapter, base) -- adapters are callables of tmp_path
    "format": ("mlx-lm", lambda t: _read("llama-lora"), lambda t: replace(_read("llama-lora"), format="mlx"), None),
    "dora": ("vllm", lambda t: _read("llama-dora"), lambda t: _read("llama-lora"), "llama"),
    "modules_to_save": ("vllm", lambda t: replace(_read("llama-lora"), modules_to_save={"lm_head.weight": LazyTensor.of(torch.zeros(256, 64))}),
                        lambda t: _read("roberta-cls"), None),
    "saved_copy": ("mlx-lm", lambda t: _read("llama-embedding"), lambda t: _read("llama-lora"), "llama"),
    "rank": ("vllm", lambda t: _read("llama-lora"), lambda t: rerank(_read("llama-lora"), rank=1)[0], "llama"),
    "module": ("vllm", lambda t: _read("llama-embedding"), lambda t: _read("llama-lora"), "qwen-named"),
    "lora_bias": ("vllm", lambda t: _read("qwen2-bias"), lambda t: _read("qwen2-lora"), None),
    "bias": ("vllm", lambda t: replace(_read("llama-lora"), config={"bias": "all"}), lambda t: _read("llama-lora"), None),
    "init": ("vllm", lambda t: replace(_read("llama-lora"), config={"init_lora_weights": "pissa"}),
             lambda t: replace(_read("llama-lora"), config={"init_lora_weights": "gaussian"}), None),
    "feature": ("vllm", lambda t: replace(_read("llama-lora"), config={"use_qalora": True}), lambda t: _read("llama-lora"), None),
    "rslora": ("sglang", lambda t: _read("llama-rslora"), lambda t: _read("llama-lora"), "llama"),
    "alpha_pattern": ("llama.cpp", lambda t: _read("llama-patterns"), lambda t: _read("llama-lora"), "llama"),
    "rank_pattern": ("sglang", lambda t: _read("llama-patterns"), lambda t: _read("llama-lora"), "llama"),
    "tied_head": ("llama.cpp", lambda t: _with_head(_read("llama-lora")), lambda t: _read("llama-lora"), "tied"),
    "prefix": ("vllm", lambda t: _prefixed(_read("llama-lora")), lambda t: _read("llama-lora"), None),
}
MAX_RANK = {"rank": 1}


def _case_base(kind, tmp_path):
    if kind == "llama":
        return _base()
    if kind == "qwen-named":
        return _base_with(tmp_path, "qwen-named", architectures=["Qwen2ForCausalLM"])
    if kind == "tied":
        return _base_with(tmp_path, "tied", tie_word_embeddings=True)
    return None


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_triggered_and_not(rule, tmp_path):
    engine, bad, good, base_kind = CASES[rule]
    base = _case_base(base_kind, tmp_path)
    found = check_adapter(bad(tmp_path), target=engine, base=base, max_rank=MAX_RANK.get(rule))
    assert rule in _rules(found) and not found["compatible"]
    p = next(p for p in found["problems"] if p["rule"] == rule)
    assert p["source"].startswith(ENGINES[engine].version) and p["fix"] and p["why"]
    fine = check_adapter(good(tmp_path), target=engine, base=base, max_rank=MAX_RANK.get(rule))
    assert rule not in _rules(fine)


def test_every_rule_of_every_engine_is_covered():
    tested = set(CASES) | {"dtype"}
    for engine in ENGINES.values():
        assert set(engine.rules) <= tested, engine.name
        for rule in engine.rules.values():
            assert rule.source and rule.why and rule.effect in ("rejected", "ignored", "wrong", "note")


def test_dtype_is_a_note_not_a_problem():
    report = check_adapter(_read("llama-fp16"), target="vllm")
    assert report["compatible"] and any("float16" in n for n in report["notes"])


def test_saved_copy_without_base_and_differing_copy(tmp_path):
    ad = _read("llama-embedding")
    assert "saved_copy" in _rules(check_adapter(replace(ad, base_model=None), target="vllm"))
    assert check_adapter(ad, target="vllm", base=_base())["compatible"]  # identical: a note
    name = next(iter(ad.saved_copies))
    changed = replace(ad, modules_to_save={name: LazyTensor.of(ad.modules_to_save[name].load() + 1)})
    report = check_adapter(changed, target="vllm", base=_base())
    assert not next(p for p in report["problems"] if p["rule"] == "saved_copy")["fixable"]
    with pytest.raises(UnsupportedError, match="merge"):
        fix_adapter(changed, target="vllm", base=_base())


# --------------------------------------------------------------------------- --fix: passes check, exact costs


FIXABLE = [
    ("llama-dora", "vllm", "llama", {}),
    ("llama-dora", "llama.cpp", "llama", {"rank": 2}),
    ("llama-lora", "vllm", "llama", {"max_rank": 1}),
    ("llama-patterns", "sglang", "llama", {"max_rank": 4}),
    ("llama-rslora", "llama.cpp", "llama", {}),
    ("llama-embedding", "mlx-lm", "llama", {}),
    ("llama-lora", "mlx-lm", "llama", {}),
]


@pytest.mark.parametrize("name,engine,base,opts", FIXABLE, ids=[f"{a}-{b}" for a, b, _, _ in FIXABLE])
def test_fix_output_passes_check(name, engine, base, opts, tmp_path):
    report = write_fixed(_read(name), tmp_path / "out", target=engine, base=_base(BASES / base), **opts)
    assert report["check"]["compatible"], report["check"]["problems"]
    fmt = ENGINES[engine].writes
    assert loratool.formats.detect_format(tmp_path / "out") == fmt


def test_prefixed_adapter_renamed(tmp_path):
    ad = _prefixed(_read("llama-lora"), "_orig_mod.")
    fixed, report = fix_adapter(ad, target="vllm")
    assert set(fixed.modules) == set(_read("llama-lora").modules)
    assert all(c["relative_error"] == 0.0 for c in report["changes"])


def _peft_modules(base, folder):
    loaded, _, _ = peft_view(base, folder)
    return loaded


def test_truncation_error_equals_independent_svd(tmp_path):
    src = ADAPTERS / "llama-lora"
    code, out, err = invoke("check", src, "--target", "vllm", "--max-rank", 1, "--fix", tmp_path / "out", "--json")
    assert code == 0, err
    rows = {c["module"]: c for c in json.loads(out)["changes"]}
    ref = _peft_modules("llama", src)
    got = _peft_modules("llama", tmp_path / "out")
    for mod, r in ref.items():
        S = torch.linalg.svdvals(r["delta"])
        expected = float((S[1:] ** 2).sum().sqrt() / S.norm())
        assert rows[mod]["relative_error"] == pytest.approx(expected, rel=1e-5)
        actual = float((got[mod]["delta"] - r["delta"]).norm() / r["delta"].norm())
        assert actual == pytest.approx(expected, rel=1e-4)


def _dora_effective(folder):
    """PEFT's own DoRA delta per module: merged weight minus base weight, (out, in) float64."""
    pm = peft_model("llama", folder)
    base = load_base_model("llama")
    merged = pm.merge_and_unload()
    mods = dict(merged.named_modules())
    return {n: (mods[n].weight.detach().double() - m.weight.detach().double())
            for n, m in base.named_modules() if n in mods and hasattr(m, "weight") and n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))}


def _logits(folder, *, disable=False):
    pm = peft_model("llama", folder).eval()
    with torch.no_grad():
        if disable:
            with pm.disable_adapter():
                return pm(torch.tensor(IDS)).logits.double()
        return pm(torch.tensor(IDS)).logits.double()


def test_dora_fix_error_equals_truncation_of_peft_effective_delta_and_logits(tmp_path):
    src = ADAPTERS / "llama-dora"
    code, out, err = invoke("check", src, "--target", "vllm", "--base", LLAMA, "--fix", tmp_path / "out", "--rank", 2, "--json")
    assert code == 0, err
    report = json.loads(out)
    rows = {c["module"]: c for c in report["changes"]}
    effective = _dora_effective(src)
    got = _peft_modules("llama", tmp_path / "out")
    for mod, D in effective.items():
        S = torch.linalg.svdvals(D)
        expected = float((S[2:] ** 2).sum().sqrt() / S.norm())
        assert rows[mod]["relative_error"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
        assert got[mod]["r"] == 2
        assert float((got[mod]["delta"] - D).norm() / D.norm()) == pytest.approx(expected, rel=1e-3, abs=1e-6)
    want, fixed, plain = _logits(src), _logits(tmp_path / "out"), _logits(src, disable=True)
    effect = float((want - plain).abs().max())
    assert effect > 1e-3  # the adapter matters
    assert float((fixed - want).abs().max()) <= max(report["max_relative_error"] * effect * 2, 1e-5)


def _relative(got, want, plain):
    """||got - want||_F / ||want - plain||_F on log-probabilities (float64)."""
    got, want, plain = (torch.log_softmax(t, -1) for t in (got, want, plain))
    return float((got - want).norm() / (want - plain).norm())


@pytest.mark.parametrize("name,engine,opts", [("llama-dora", "vllm", {"rank": 2}), ("llama-lora", "vllm", {"max_rank": 1}),
                                              ("llama-rslora", "sglang", {"max_rank": 2})])
def test_output_error_is_peft_log_probabilities(name, engine, opts, tmp_path):
    """The reported output error is PEFT's own: log-probabilities of BASE + fixed against BASE + original,
    relative to the original's effect, on the same token ids."""
    report = write_fixed(_read(name), tmp_path / "out", target=engine, base=_base(), input_ids=IDS, **opts)
    cost = report["output_error"]
    assert cost["on"] == "log-probabilities" and cost["tokens"] == len(IDS[0])
    want, fixed, plain = _logits(ADAPTERS / name), _logits(tmp_path / "out"), _logits(ADAPTERS / name, disable=True)
    assert cost["relative"] == pytest.approx(_relative(fixed, want, plain), rel=1e-4)
    lp = torch.log_softmax(fixed, -1) - torch.log_softmax(want, -1)
    assert cost["max_abs"] == pytest.approx(float(lp.abs().max()), rel=1e-4)


def test_output_error_needs_base_and_can_be_skipped(tmp_path):
    code, out, err = invoke("check", ADAPTERS / "llama-lora", "--target", "vllm", "--max-rank", 1, "--fix", tmp_path / "a")
    assert code == 0 and "measured with --base" in out and "on the outputs" not in out
    code, out, err = invoke("check", ADAPTERS / "llama-lora", "--target", "vllm", "--max-rank", 1, "--base", LLAMA,
                            "--fix", tmp_path / "b", "--json")
    report = json.loads(out)
    assert code == 0 and 0 < report["output_error"]["relative"] and report["output_error"]["tokens"] == 128
    code, out, err = invoke("check", ADAPTERS / "llama-lora", "--target", "vllm", "--max-rank", 1, "--base", LLAMA,
                            "--fix", tmp_path / "c", "--no-outputs", "--json")
    assert code == 0 and json.loads(out)["output_error"] is None
    code, out, err = invoke("check", ADAPTERS / "llama-lora", "--target", "vllm", "--no-outputs")
    assert code == 2 and "--fix" in assert_one_line_error(err)


def test_output_error_of_an_architecture_transformers_cannot_build_is_a_note(tmp_path):
    base = _base_with(tmp_path, "odd", architectures=["NoSuchForCausalLM"], model_type="no-such-model")
    report = write_fixed(_read("llama-lora"), tmp_path / "out", target="vllm", base=base, max_rank=1)
    assert report["output_error"] is None and "not measured" in report["notes"][0]
    assert report["check"]["compatible"]


def test_lossless_fixes_keep_peft_logits(tmp_path):
    code, _, err = invoke("check", ADAPTERS / "llama-patterns", "--target", "sglang", "--fix", tmp_path / "out")
    assert code == 0, err
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert not cfg["rank_pattern"] and not cfg["alpha_pattern"] and not cfg["use_rslora"]
    assert torch.allclose(_logits(tmp_path / "out"), _logits(ADAPTERS / "llama-patterns"), atol=1e-5)


# --------------------------------------------------------------------------- the CLI: exit codes, one line, atomic OUT


def test_cli_exit_codes_and_lines(tmp_path):
    code, out, err = invoke("check", ADAPTERS / "llama-lora", "--target", "vllm")
    assert code == 0 and "compatible with vLLM" in out
    code, out, err = invoke("check", ADAPTERS / "llama-dora", "--target", "vllm")
    assert code == 1 and "DoRA" in assert_one_line_error(err)
    problems = [line for line in out.splitlines() if not line.startswith("note:")]
    assert len(problems) == 1 and "fix:" in problems[0] and "peft_helper.py" in problems[0]
    code, out, _ = invoke("check", ADAPTERS / "llama-dora", "--target", "vllm", "--json")
    assert code == 1 and json.loads(out)["problems"][0]["rule"] == "dora"


@pytest.mark.parametrize("args,needle", [
    (["--target", "tgi"], "tgi"),
    (["--target", "vllm", "--max-rank", "7"], "max-lora-rank"),
    (["--target", "mlx-lm", "--max-rank", "8"], "no rank limit"),
    (["--target", "vllm", "--rank", "2"], "--fix"),
    (["--target", "vllm", "--fix", "OUT"], "base"),  # DoRA needs the base
])
def test_bad_input_one_line_exit_2(args, needle, tmp_path):
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    code, _, err = invoke("check", ADAPTERS / "llama-dora", *args)
    assert code == 2 and needle in assert_one_line_error(err)
    assert not (tmp_path / "o").exists()


def test_missing_adapter_exit_2(tmp_path):
    code, _, err = invoke("check", tmp_path / "nothing", "--target", "vllm")
    assert code == 2 and "nothing" in assert_one_line_error(err)


def test_refused_fix_writes_nothing_and_out_is_atomic(tmp_path):
    out = tmp_path / "out"
    code, _, err = invoke("check", ADAPTERS / "qwen2-bias", "--target", "vllm", "--fix", out)
    assert code == 2 and "loratool merge" in assert_one_line_error(err)
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep").write_text("x")
    code, _, err = invoke("check", ADAPTERS / "llama-lora", "--target", "mlx-lm", "--fix", out)
    assert code == 2 and (out / "keep").read_text() == "x"
    code, _, err = invoke("check", ADAPTERS / "llama-lora", "--target", "mlx-lm", "--fix", out, "--force")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not (out / "keep").exists()


# --------------------------------------------------------------------------- the real consumer: mlx-lm


@pytest.mark.parametrize("name", ["llama-lora", "llama-dora", "llama-patterns"])
def test_mlx_lm_loads_fixed_adapter_within_reported_error(name, tmp_path):
    try:
        import mlx.core as mx
        from mlx_lm.tuner.utils import load_adapters
        from mlx_lm.utils import load_model
    except ImportError:
        pytest.skip("mlx-lm is not installed (pip install mlx mlx-cpu mlx-lm)")
    import numpy as np

    report = write_fixed(_read(name), tmp_path / "mlx", target="mlx-lm", base=_base(), input_ids=IDS)
    model, _ = load_model(Path(LLAMA))
    model = load_adapters(model, str(tmp_path / "mlx"))
    got = torch.from_numpy(np.array(model(mx.array(IDS)).astype(mx.float32))).double()
    want, plain = _logits(ADAPTERS / name), _logits(ADAPTERS / name, disable=True)
    assert float((want - plain).abs().max()) > 1e-3  # the adapter matters
    # mlx-lm serves the adapter written (float32 rounding), which is the reported output error from PEFT's
    reported = report["output_error"]["relative"] if report["output_error"] else 0.0
    assert _relative(got, want, plain) <= reported + 1e-4
