"""rerank: truncated SVD from the factors, checked against torch.linalg.svd of the full dW and PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from _surgery_helpers import assert_full_tensors_carried, full_svd_truncation, peft_view
from conftest import ADAPTER_BASE, ADAPTERS, assert_one_line_error, invoke
from _numeric import rel_diff
from realworld import REALWORLD, build_model

import loratool
from loratool.ops.lowrank import factored_svd, factors_from_svd, pad_factors
from loratool.surgery import rerank

RERANK_FIXTURES = ["llama-lora", "llama-patterns", "llama-rslora", "gpt2-lora", "llama-embedding", "qwen2-bias",
                   "roberta-cls", "llama-adalora", "llama-fp16"]


def _source_deltas(name):
    ad = loratool.read_adapter(ADAPTERS / name)
    return ad, {n: m.delta(dtype=torch.float64) for n, m in ad.modules.items()}


def test_factored_svd_equals_full_svd():
    torch.manual_seed(0)
    for out_f, in_f, r, scale in [(64, 48, 8, 2.0), (7, 90, 12, -0.5), (300, 5, 4, 1.0), (50, 60, 16, 0.0)]:
        B = torch.randn(out_f, r, dtype=torch.float64)
        A = torch.randn(r, in_f, dtype=torch.float64)
        svd = factored_svd(B, A, scale)
        D = scale * B @ A
        S_ref = torch.linalg.svdvals(D)[: svd.rank]
        assert torch.allclose(svd.S, S_ref, rtol=1e-10, atol=1e-10 * float(S_ref.max() if S_ref.numel() else 1))
        recon = (svd.U * svd.S) @ svd.Vh
        assert float((recon - D).norm()) <= 1e-10 * max(1.0, float(D.norm()))
        if scale == 0:
            continue
        for k in range(1, svd.rank + 1):
            A2, B2 = factors_from_svd(svd, k, -0.37, dtype=torch.float64)
            assert rel_diff(-0.37 * B2 @ A2, full_svd_truncation(D, k)) < 1e-10


def test_pad_factors_exact():
    A, B = torch.randn(3, 10), torch.randn(6, 3)
    A2, B2 = pad_factors(A, B, 7)
    assert A2.shape == (7, 10) and B2.shape == (6, 7)
    assert torch.equal(B2 @ A2, B @ A)


@pytest.mark.parametrize("name", RERANK_FIXTURES)
def test_rerank_rank_matches_full_svd_and_peft(name, tmp_path):
    R = 3
    ad, deltas = _source_deltas(name)
    code, out, err = invoke("rerank", ADAPTERS / name, tmp_path / "out", "--rank", R, "--json")
    assert code == 0, err
    report = json.loads(out)
    rows = {r["name"]: r for r in report["modules"]}
    loaded, to_save, pm = peft_view(ADAPTER_BASE[name], tmp_path / "out")
    assert set(loaded) == set(ad.modules)
    tol = 1e-6 if ad.dtype == torch.float32 else 5e-3  # fp16 factors are stored in fp16
    for mod, src in ad.modules.items():
        k = min(R, src.rank)
        assert loaded[mod]["r"] == k, mod
        expected = full_svd_truncation(deltas[mod], k)
        assert rel_diff(loaded[mod]["delta"], expected) < tol, mod
        # report: kept energy and relative error of the oracle
        S = torch.linalg.svdvals(deltas[mod])
        energy = float((S[:k] ** 2).sum() / (S ** 2).sum())
        assert rows[mod]["kept_energy"] == pytest.approx(energy, rel=1e-6, abs=1e-9)
        assert rows[mod]["relative_error"] == pytest.approx((1 - energy) ** 0.5, rel=1e-4, abs=1e-6)
        assert rows[mod]["action"] == ("unchanged" if src.rank <= R else "truncated")
        if src.bias is not None:  # PEFT adds scaling * lora_B.bias: the product is kept
            assert torch.allclose(loaded[mod]["bias_term"], src.bias.load().double() * src.scale, rtol=1e-6, atol=1e-7)
    assert_full_tensors_carried(ad, to_save, pm)



def test_rerank_unchanged_modules_say_so(tmp_path):
    code, out, err = invoke("rerank", ADAPTERS / "llama-patterns", tmp_path / "out", "--rank", 4)
    assert code == 0, err
    assert "already at or below rank 4 were kept as they are" in out
    assert "unchanged (already at or below the rank)" in out


def test_rerank_pad_is_exact(tmp_path):
    ad, deltas = _source_deltas("llama-patterns")
    code, out, err = invoke("rerank", ADAPTERS / "llama-patterns", tmp_path / "out", "--rank", 12, "--pad", "--json")
    assert code == 0, err
    assert {r["action"] for r in json.loads(out)["modules"]} == {"padded"}
    loaded, _, _ = peft_view("llama", tmp_path / "out")
    for mod in ad.modules:
        assert loaded[mod]["r"] == 12
        assert rel_diff(loaded[mod]["delta"], deltas[mod]) < 1e-6


def test_energy_picks_minimal_rank():
    ad, deltas = _source_deltas("llama-lora")
    spectra = {n: torch.linalg.svdvals(d) for n, d in deltas.items()}
    for energy in (0.2, 0.5, 0.75, 0.9, 0.99, 1.0):
        new, report = rerank(ad, energy=energy)
        for row in report["modules"]:
            S = spectra[row["name"]]
            frac = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
            minimal = int(torch.nonzero(frac >= energy - 1e-12)[0]) + 1
            assert row["rank"] == minimal, (energy, row["name"])
            assert row["kept_energy"] >= energy - 1e-9
            if minimal > 1:
                assert float(frac[minimal - 2]) < energy
            expected = full_svd_truncation(deltas[row["name"]], minimal)
            assert rel_diff(new.modules[row["name"]].delta(dtype=torch.float64), expected) < 1e-6


def test_sv_ratio_and_fro_error_rules():
    ad, deltas = _source_deltas("llama-lora")
    _, rep = rerank(ad, sv_ratio=1.5)
    for row in rep["modules"]:
        S = torch.linalg.svdvals(deltas[row["name"]])
        assert row["rank"] == int((S >= S[0] / 1.5).sum())
    _, rep = rerank(ad, fro_error=0.4)
    for row in rep["modules"]:
        S = torch.linalg.svdvals(deltas[row["name"]])
        errs = [float((S[k:] ** 2).sum() / (S ** 2).sum()) ** 0.5 for k in range(1, len(S) + 1)]
        minimal = next(k for k, e in enumerate(errs, start=1) if e <= 0.4)
        assert row["rank"] == minimal
        assert row["relative_error"] <= 0.4 + 1e-9
    _, rep = rerank(ad, energy=1.0, max_rank=5)
    assert max(r["rank"] for r in rep["modules"]) == 5


def test_rerank_plot_and_text(tmp_path):
    code, out, err = invoke("rerank", ADAPTERS / "llama-lora", tmp_path / "out", "--energy", "0.8", "--plot", tmp_path / "s.png")
    assert code == 0, err
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "kept energy" in out and "model.layers.0.self_attn.q_proj" in out


def test_rerank_refuses_dora(tmp_path):
    code, out, err = invoke("rerank", ADAPTERS / "llama-dora", tmp_path / "out", "--rank", 2)
    assert code == 2
    assert "DoRA" in assert_one_line_error(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [
    ["--rank", "0"], ["--rank", "-3"], ["--energy", "0"], ["--energy", "1.5"], ["--energy", "-0.1"],
    ["--sv-ratio", "0.5"], ["--fro-error", "1"], [], ["--rank", "2", "--energy", "0.5"], ["--energy", "0.5", "--pad"],
    ["--rank", "2", "--max-rank", "0"],
])
def test_rerank_bad_arguments_exit_2(args, tmp_path):
    code, out, err = invoke("rerank", ADAPTERS / "llama-lora", tmp_path / "out", *args)
    assert code == 2, (args, out, err)
    assert_one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_rerank_refuses_existing_out(tmp_path):
    (tmp_path / "out").mkdir()
    code, _, err = invoke("rerank", ADAPTERS / "llama-lora", tmp_path / "out", "--rank", 2)
    assert code == 2 and "exists" in assert_one_line_error(err)
    code, _, err = invoke("rerank", ADAPTERS / "llama-lora", tmp_path / "out", "--rank", 2, "--force")
    assert code == 0, err


@pytest.mark.slow
@pytest.mark.realworld
def test_rerank_real_adapter_loads_in_peft(tmp_path):
    """A real GPT-2 adapter (Conv1D, c_proj of two shapes): --energy output loads in PEFT as computed."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    ad = loratool.read_adapter(REALWORLD / "gpt2-tigrinya")
    code, out, err = invoke("rerank", REALWORLD / "gpt2-tigrinya", tmp_path / "out", "--energy", "0.8", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)["modules"]}
    written = loratool.read_adapter(tmp_path / "out")
    pm = PeftModel.from_pretrained(build_model("gpt2-tigrinya"), str(tmp_path / "out"))
    seen = 0
    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.r:
            short = name[len("base_model.model."):]
            delta = (mod.lora_B["default"].weight.double() @ mod.lora_A["default"].weight.double()) * mod.scaling["default"]
            assert mod.r["default"] == rows[short]["rank"]
            # what loratool computed (checked against the full SVD on the fixtures above)
            assert rel_diff(delta.detach(), written.modules[short].delta(dtype=torch.float64)) < 1e-12, short
            assert rows[short]["kept_energy"] >= 0.8
            seen += 1
    assert seen == len(ad.modules)
