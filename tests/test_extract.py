"""extract: a LoRA adapter from FINETUNED - BASE, checked on models merged by PEFT itself."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from _surgery_helpers import load_base_model, peft_view
from conftest import ADAPTERS, BASES, assert_one_line_error, invoke
from _numeric import rel_diff

import loratool
from loratool.ops.lowrank import dense_svd


def _merged(adapter_name, base_name, folder, *, tweak=None):
    """FINETUNED = PEFT's merge_and_unload of a fixture adapter, saved with transformers."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_model(base_name), ADAPTERS / adapter_name).merge_and_unload()
    if tweak is not None:
        tweak(model)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_ft(tmp_path_factory):
    return _merged("llama-lora", "llama", tmp_path_factory.mktemp("ft") / "llama")


def test_extract_recovers_exact_low_rank_difference(llama_ft, tmp_path):
    code, out, err = invoke("extract", BASES / "llama", llama_ft, tmp_path / "out", "--rank", 8, "--json")
    assert code == 0, err
    report = json.loads(out)
    src = loratool.read_adapter(ADAPTERS / "llama-lora")
    loaded, _, pm = peft_view("llama", tmp_path / "out")
    assert set(loaded) == set(src.modules)
    base_sd = load_base_model("llama").state_dict()
    for mod, m in src.modules.items():
        true = m.delta(dtype=torch.float64)
        assert loaded[mod]["r"] == 8
        # FINETUNED holds fp32(W + dW): dW is known to fp32 rounding of W, no better
        slack = 2 * torch.finfo(torch.float32).eps * float(base_sd[f"{mod}.weight"].double().norm())
        assert float((loaded[mod]["delta"] - true).norm()) <= slack + 1e-7 * float(true.norm()), mod
    rows = {r["name"]: r for r in report["modules"]}
    assert all(r["method"] == "exact" and r["relative_error"] < 1e-5 for r in rows.values())
    assert report["unchanged_tensors"] > 0 and report["other_changed"] == []
    # the merged adapter reproduces FINETUNED's weights
    merged = pm.merge_and_unload().state_dict()
    from safetensors.torch import load_file

    ft = load_file(llama_ft / "model.safetensors")
    for k, v in ft.items():
        assert torch.allclose(merged[k], v, atol=1e-6), k


def test_extract_energy_and_modules(llama_ft, tmp_path):
    code, out, err = invoke("extract", BASES / "llama", llama_ft, tmp_path / "out", "--energy", "0.999999",
                            "--modules", "q_proj,v_proj", "--modules", "down_proj", "--json")
    assert code == 0, err
    report = json.loads(out)
    names = {r["name"] for r in report["modules"]}
    assert names and all(n.rsplit(".", 1)[1] in ("q_proj", "v_proj", "down_proj") for n in names)
    assert all(r["rank"] <= 8 and r["kept_energy"] >= 0.999999 for r in report["modules"])
    # the other changed linear modules are reported, not silently dropped
    kinds = {o["tensor"].rsplit(".", 2)[1]: o["kind"] for o in report["other_changed"]}
    assert set(kinds) == {"k_proj", "o_proj", "gate_proj", "up_proj"} and set(kinds.values()) == {"unselected linear"}
    loaded, _, _ = peft_view("llama", tmp_path / "out")
    assert set(loaded) == names
    # deselected linear modules are not stored whole by --modules-to-save
    code, out, err = invoke("extract", BASES / "llama", llama_ft, tmp_path / "b", "--rank", 2, "--modules", "q_proj",
                            "--modules-to-save", "--json")
    assert code == 0, err
    assert json.loads(out)["modules_to_save"] == []


def test_extract_gpt2_conv1d(tmp_path):
    ft = _merged("gpt2-lora", "gpt2", tmp_path / "ft")
    code, out, err = invoke("extract", BASES / "gpt2", ft, tmp_path / "out", "--rank", 8, "--alpha", 16)
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["lora_alpha"] == 16
    src = loratool.read_adapter(ADAPTERS / "gpt2-lora")
    loaded, _, _ = peft_view("gpt2", tmp_path / "out")
    assert set(loaded) == set(src.modules)
    for mod, m in src.modules.items():
        assert rel_diff(loaded[mod]["delta"], m.delta(dtype=torch.float64)) < 1e-4, mod


def test_extract_reports_heads_norms_and_keeps_them_on_request(tmp_path):
    def tweak(model):
        with torch.no_grad():
            model.model.norm.weight.add_(0.5)
            model.model.embed_tokens.weight[3].add_(1.0)

    ft = _merged("llama-rslora", "llama", tmp_path / "ft", tweak=tweak)
    code, out, err = invoke("extract", BASES / "llama", ft, tmp_path / "a", "--rank", 4)
    assert code == 0, err
    assert "model.norm.weight (norm" in out and "model.embed_tokens.weight (embedding" in out
    assert "not represented" in err
    code, out, err = invoke("extract", BASES / "llama", ft, tmp_path / "b", "--rank", 4, "--modules-to-save", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["modules_to_save"] == ["model.embed_tokens.weight", "model.norm.weight"]
    loaded, to_save, pm = peft_view("llama", tmp_path / "b")
    assert set(to_save) == {"model.embed_tokens", "model.norm"}
    from safetensors.torch import load_file

    ft_sd = load_file(ft / "model.safetensors")
    assert torch.equal(to_save["model.norm"]["weight"], ft_sd["model.norm.weight"])
    assert torch.equal(to_save["model.embed_tokens"]["weight"], ft_sd["model.embed_tokens.weight"])
    src = loratool.read_adapter(ADAPTERS / "llama-rslora")
    assert set(loaded) == set(src.modules)
    for mod, m in src.modules.items():
        assert rel_diff(loaded[mod]["delta"], m.delta(dtype=torch.float64)) < 1e-4


def test_extract_classifier_head_reported(tmp_path):
    ft = _merged("roberta-cls", "roberta", tmp_path / "ft")
    code, out, err = invoke("extract", BASES / "roberta", ft, tmp_path / "out", "--rank", 8, "--json")
    assert code == 0, err
    report = json.loads(out)
    heads = {o["tensor"] for o in report["other_changed"] if o["kind"] == "head"}
    assert "classifier.out_proj.weight" in heads
    loaded, _, _ = peft_view("roberta", tmp_path / "out")
    src = loratool.read_adapter(ADAPTERS / "roberta-cls")
    assert set(loaded) == set(src.modules)
    # without the head PEFT's SEQ_CLS would demand it: no task type
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["task_type"] is None
    code, out, err = invoke("extract", BASES / "roberta", ft, tmp_path / "b", "--rank", 8, "--modules-to-save", "--json")
    assert code == 0, err
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and all(m.startswith("classifier") for m in config["modules_to_save"])
    from safetensors.torch import load_file

    ft_sd = load_file(ft / "model.safetensors")
    loaded, to_save, _ = peft_view("roberta", tmp_path / "b")
    assert set(loaded) == set(src.modules)
    for k, v in to_save["classifier"].items():
        assert torch.equal(v, ft_sd[f"classifier.{k}"]), k


def test_randomized_svd_near_optimal():
    torch.manual_seed(0)
    m, n, r = 600, 500, 12
    D = torch.randn(m, r) @ torch.randn(r, n) + 1e-3 * torch.randn(m, n)
    exact = dense_svd(D, rank=r, exact=True)
    approx = dense_svd(D, rank=r, exact=False, niter=4)
    assert approx.rank < min(m, n)  # really the randomized path
    best = exact.relative_error(r)
    recon = (approx.U[:, :r] * approx.S[:r]) @ approx.Vh[:r]
    got = float((D.double() - recon).norm() / D.double().norm())
    assert got <= best * 1.01 + 1e-7
    # energy mode grows the sketch until the energy is captured
    e = dense_svd(D, energy=0.999, exact=False)
    assert float((e.S ** 2).sum()) >= 0.999 * e.total


def test_extract_unchanged_model_and_bad_arguments(tmp_path):
    shutil.copytree(BASES / "llama", tmp_path / "same")
    code, _, err = invoke("extract", BASES / "llama", tmp_path / "same", tmp_path / "out", "--rank", 4)
    assert code == 2 and "nothing to extract" in assert_one_line_error(err)
    for args in (["--rank", "0"], ["--energy", "0"], ["--energy", "1.2"], [], ["--rank", "2", "--energy", "0.5"],
                 ["--rank", "2", "--niter", "-1"]):
        code, out, err = invoke("extract", BASES / "llama", tmp_path / "same", tmp_path / "out", *args)
        assert code == 2, (args, out, err)
        assert_one_line_error(err)
    code, _, err = invoke("extract", BASES / "llama", BASES / "gpt2", tmp_path / "out", "--rank", 2)
    assert code == 2 and "gpt2" in assert_one_line_error(err)
    assert not (tmp_path / "out").exists()
