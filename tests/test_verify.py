"""verify: merges made by PEFT itself pass; planted faults are caught and the module named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ADAPTER_BASE, ADAPTERS, BASES, assert_one_line_error, invoke
from realworld import PEFT_REALWORLD, REALWORLD
from safetensors.torch import load_file, save_file

import loratool
from loratool.cli.reports import format_weights_report
from loratool.verify import verify_outputs, verify_weights

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared machine: torch's thread pool only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- helpers


def auto_class(folder: Path):
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    arch = (AutoConfig.from_pretrained(folder).architectures or [""])[0]
    if "SequenceClassification" in arch:
        return AutoModelForSequenceClassification
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return AutoModelForCausalLM
    return AutoModel


def peft_merge(base: Path, adapter: Path, out: Path, dtype=torch.float32) -> Path:
    """The oracle: PeftModel.from_pretrained(base) -> merge_and_unload() -> save_pretrained()."""
    from peft import PeftModel

    model = auto_class(base).from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)
    return out


def to_peft(adapter_path: Path, base: Path, out: Path, **read_options) -> Path:
    """A non-PEFT adapter converted to a PEFT folder (for PEFT to merge it)."""
    import dataclasses

    from loratool.base import BaseModel, bind_adapter

    binding = bind_adapter(loratool.read_adapter(adapter_path, **read_options), BaseModel.open(base))
    ad, mapping = binding.adapter, binding.keys
    # PEFT targets the base's own module names (the scratch file says model.encoder...)
    renamed = {mapping[n].removesuffix(".weight"): dataclasses.replace(m, name=mapping[n].removesuffix(".weight")) for n, m in ad.modules.items()}
    loratool.write_adapter(ad.replace_modules(renamed, extras={}), out, format="peft")
    return out


def edit_merged(src: Path, dst: Path, fn) -> Path:
    """Copy a merged folder and change its (single-file) weights with fn(state_dict)."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})
    return dst


def failed_names(report) -> set[str]:
    return {m["name"] for m in report["modules"] if m["passed"] is False}


@pytest.fixture(scope="session")
def merged(tmp_path_factory):
    """PEFT merges of the fixtures, built once: merged(adapter, dtype) -> folder."""
    root = tmp_path_factory.mktemp("verify-merged")
    cache: dict[tuple[str, str], Path] = {}

    def get(adapter: str, dtype: str = "float32") -> Path:
        key = (adapter, dtype)
        if key not in cache:
            cache[key] = peft_merge(BASES / ADAPTER_BASE[adapter], ADAPTERS / adapter, root / f"{adapter}-{dtype}", DTYPES[dtype])
        return cache[key]

    return get


# ----------------------------------------------------------------------------- correct merges pass


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("adapter", sorted(ADAPTER_BASE))
def test_peft_merges_of_fixtures_pass(merged, adapter, dtype):
    report = verify_weights(BASES / ADAPTER_BASE[adapter], ADAPTERS / adapter, merged(adapter, dtype))
    assert report["passed"], format_weights_report(report)
    assert not report["failures"] and not report["missing"] and not report["extra"]
    u = report["untouched"]
    assert u["identical"] + u["cast"] == u["checked"] and not u["differ"]
    ad = loratool.read_adapter(ADAPTERS / adapter)
    names = {m["name"] for m in report["modules"] if m["kind"] in ("lora", "dora")}
    assert names == set(ad.modules)
    # a modules_to_save tensor of an adapted module (PEFT's saved base_layer.weight) is its starting weight
    assert {m["name"] for m in report["modules"] if m["kind"] == "modules_to_save"} == {
        n for n in ad.modules_to_save if n.removesuffix(".weight") not in ad.modules
    }
    assert sum(m["kind"] == "lora_bias" for m in report["modules"]) == sum(m.bias is not None for m in ad)
    for m in report["modules"]:
        assert m["status"] == "ok" and m["residual"] <= m["bound"]
        if m["kind"] in ("lora", "dora") and m["bound"] < 1:
            # what rounding leaves of the delta, measured along the delta itself
            assert m["applied_fraction"] == pytest.approx(1, abs=m["bound"])


@pytest.mark.parametrize("adapter", ["llama-lora", "llama-dora", "gpt2-lora", "qwen2-bias", "roberta-cls", "llama-embedding", "llama-sharded-lora"])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_loratool_merges_pass(tmp_path, adapter, dtype):
    from loratool.merge import merge_model

    out = tmp_path / "merged"
    merge_model(BASES / ADAPTER_BASE[adapter], ADAPTERS / adapter, out, dtype=dtype, device="cpu")
    report = verify_weights(BASES / ADAPTER_BASE[adapter], ADAPTERS / adapter, out)
    assert report["passed"], format_weights_report(report)


@pytest.mark.realworld
@pytest.mark.slow
@pytest.mark.parametrize("name", PEFT_REALWORLD + ["mlx-qwen25-05b-wyek1n", "montinger-roberta-scratch"])
def test_realworld_merges_pass(realworld_bases, tmp_path, name):
    base = realworld_bases(name)
    adapter = REALWORLD / name
    if name == "montinger-roberta-scratch":
        adapter = adapter / "model_sst2.pth"
    if name not in PEFT_REALWORLD:
        peft_dir = to_peft(adapter, base, tmp_path / "peft")
    else:
        peft_dir = adapter
    # the two biggest bases are merged in bfloat16: real deltas against a half-precision store
    dtype = torch.bfloat16 if name.startswith(("qwen", "mlx-qwen", "opt")) else torch.float32
    out = peft_merge(base, peft_dir, tmp_path / "merged", dtype)
    report = verify_weights(base, adapter, out)
    assert report["passed"], format_weights_report(report)
    assert report["summary"]["modules"] >= len(loratool.read_adapter(adapter))


# ----------------------------------------------------------------------------- planted faults


def _fault_report(tmp_path, merged, adapter, dtype, fn, **kw):
    src = merged(adapter, dtype)
    base = ADAPTER_BASE[adapter]
    bsd = load_file(BASES / base / "model.safetensors")
    bad = edit_merged(src, tmp_path / "bad", lambda sd: fn(sd, bsd))
    return verify_weights(BASES / base, ADAPTERS / adapter, bad, **kw)


def _delta(sd, bsd, key):
    return sd[key].float() - bsd[key].float()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fault_block_of_rows_missing_its_delta(tmp_path, merged, dtype):
    key = "model.layers.1.mlp.down_proj.weight"

    def plant(sd, bsd):
        sd[key][8:16] = bsd[key][8:16].to(sd[key].dtype)

    report = _fault_report(tmp_path, merged, "llama-lora", dtype, plant)
    assert not report["passed"]
    assert failed_names(report) == {"model.layers.1.mlp.down_proj"}
    worst = report["modules"][0]
    assert worst["name"] == "model.layers.1.mlp.down_proj" and "rows 8-15" in worst["hint"]
    assert report["failures"][0].startswith("model.layers.1.mlp.down_proj: residual ")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fault_wrong_scale(tmp_path, dtype):
    """An rsLoRA adapter merged with alpha/r instead of alpha/sqrt(r)."""
    wrong = tmp_path / "wrong-adapter"
    shutil.copytree(ADAPTERS / "llama-rslora", wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["use_rslora"] = False
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    out = peft_merge(BASES / "llama", wrong, tmp_path / "merged", DTYPES[dtype])
    report = verify_weights(BASES / "llama", ADAPTERS / "llama-rslora", out)
    assert not report["passed"]
    assert failed_names(report) == set(loratool.read_adapter(ADAPTERS / "llama-rslora").modules)
    for m in report["modules"]:
        assert m["applied_fraction"] == pytest.approx(0.5, abs=0.02)  # r = 4: (alpha/r) / (alpha/sqrt(r))
        assert "sqrt(r)" in m["hint"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fault_transposed_delta(tmp_path, merged, dtype):
    key = "model.layers.0.self_attn.o_proj.weight"

    def plant(sd, bsd):
        sd[key] = (bsd[key].float() + _delta(sd, bsd, key).T).to(sd[key].dtype)

    report = _fault_report(tmp_path, merged, "llama-lora", dtype, plant)
    assert failed_names(report) == {"model.layers.0.self_attn.o_proj"}
    assert report["modules"][0]["hint"] == "delta transposed"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fault_delta_applied_twice(tmp_path, merged, dtype):
    key = "transformer.h.1.mlp.c_fc.weight"  # GPT-2 Conv1D: weight stored (in, out)

    def plant(sd, bsd):
        sd[key] = (bsd[key].float() + 2 * _delta(sd, bsd, key)).to(sd[key].dtype)

    report = _fault_report(tmp_path, merged, "gpt2-lora", dtype, plant)
    assert failed_names(report) == {"transformer.h.1.mlp.c_fc"}
    worst = report["modules"][0]
    assert worst["applied_fraction"] == pytest.approx(2, abs=0.02) and "applied twice" in worst["hint"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fault_delta_of_another_module(tmp_path, merged, dtype):
    key, other = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"

    def plant(sd, bsd):
        sd[key] = (bsd[key].float() + _delta(sd, bsd, other)).to(sd[key].dtype)

    report = _fault_report(tmp_path, merged, "llama-lora", dtype, plant)
    assert failed_names(report) == {"model.layers.0.self_attn.q_proj"}
    assert report["modules"][0]["residual"] > 0.5


def test_fault_dora_merged_as_plain_lora(tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(ADAPTERS / "llama-dora", plain)
    cfg = json.loads((plain / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (plain / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(plain / "adapter_model.safetensors")
    save_file({k: v for k, v in sd.items() if "magnitude" not in k}, plain / "adapter_model.safetensors")
    out = peft_merge(BASES / "llama", plain, tmp_path / "merged")
    report = verify_weights(BASES / "llama", ADAPTERS / "llama-dora", out)
    assert failed_names(report) == set(loratool.read_adapter(ADAPTERS / "llama-dora").modules)
    assert all(m["kind"] == "dora" for m in report["modules"])


def test_fault_lora_bias_not_merged(tmp_path, merged):
    key = "model.layers.0.self_attn.k_proj.bias"

    def plant(sd, bsd):
        sd[key] = bsd[key].clone()

    report = _fault_report(tmp_path, merged, "qwen2-bias", "float32", plant)
    bad = [m for m in report["modules"] if m["passed"] is False]
    assert [(m["name"], m["kind"]) for m in bad] == [("model.layers.0.self_attn.k_proj", "lora_bias")]


def test_fault_modules_to_save_not_applied(tmp_path, merged):
    def plant(sd, bsd):
        sd["classifier.dense.weight"] = bsd["classifier.dense.weight"].clone()

    report = _fault_report(tmp_path, merged, "roberta-cls", "float32", plant)
    bad = [m for m in report["modules"] if m["passed"] is False]
    assert [m["name"] for m in bad] == ["classifier.dense.weight"]
    assert "base tensor was kept" in bad[0]["hint"]


def test_fault_untouched_tensor_changed_missing_and_extra(tmp_path, merged):
    def plant(sd, bsd):
        sd["model.norm.weight"] = sd["model.norm.weight"] * 1.01
        del sd["model.layers.1.input_layernorm.weight"]
        sd["model.layers.1.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)

    report = _fault_report(tmp_path, merged, "llama-lora", "float32", plant)
    assert not report["passed"]
    assert not failed_names(report)  # every adapted module is fine
    assert [d["tensor"] for d in report["untouched"]["differ"]] == ["model.norm.weight"]
    assert report["missing"] == ["model.layers.1.input_layernorm.weight"]
    assert report["extra"] == ["model.layers.1.self_attn.q_proj.lora_A.weight"]
    text = "\n".join(report["failures"])
    for name in ("model.norm.weight", "model.layers.1.input_layernorm.weight", "q_proj.lora_A.weight"):
        assert name in text


def test_fault_missing_adapted_tensor(tmp_path, merged):
    report = _fault_report(tmp_path, merged, "llama-rslora", "float32", lambda sd, bsd: sd.pop("model.layers.0.self_attn.v_proj.weight"))
    assert report["modules"][0]["name"] == "model.layers.0.self_attn.v_proj"
    assert report["modules"][0]["status"] == "missing"
    assert "model.layers.0.self_attn.v_proj: missing from the merged model" in report["failures"]


def test_tolerance_overrides_the_bound(merged):
    folder = merged("llama-lora", "bfloat16")
    assert not verify_weights(BASES / "llama", ADAPTERS / "llama-lora", folder, tolerance=0.0)["passed"]
    loose = verify_weights(BASES / "llama", ADAPTERS / "llama-rslora", merged("llama-rslora", "float32"), tolerance=0.6)
    assert loose["passed"] and loose["tolerance"] == 0.6


# ----------------------------------------------------------------------------- the CLI


def test_cli_pass_table_and_json(merged):
    folder = merged("llama-lora", "float32")
    code, out, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", folder)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("verify weights: PASS  (14 checked, 0 failed")
    assert lines[1].split()[:4] == ["module", "kind", "dtype", "residual"]
    code, out, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", folder, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["passed"] is True and report["summary"]["modules"] == 14
    keys = {"name", "tensor", "kind", "dtype", "residual", "bound", "passed", "status", "applied_fraction"}
    assert keys <= set(report["modules"][0])


def test_cli_failure_exit_1_names_the_module(tmp_path, merged):
    key = "model.layers.1.mlp.down_proj.weight"
    bsd = load_file(BASES / "llama" / "model.safetensors")

    def plant(sd):
        sd[key] = bsd[key] + 2 * (sd[key] - bsd[key])

    bad = edit_merged(merged("llama-lora", "float32"), tmp_path / "bad", plant)
    code, out, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", bad)
    assert code == 1
    assert "model.layers.1.mlp.down_proj: residual 1 of the delta" in out
    line = assert_one_line_error(err)
    assert "model.layers.1.mlp.down_proj" in line
    # worst first in the table, and in the JSON
    assert out.splitlines()[2].startswith("model.layers.1.mlp.down_proj")
    code, out, _ = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", bad, "--json")
    assert code == 1 and json.loads(out)["modules"][0]["name"] == "model.layers.1.mlp.down_proj"


def test_cli_bad_input_exit_2(tmp_path, merged):
    folder = merged("llama-lora", "float32")
    code, _, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", tmp_path / "nope")
    assert code == 2 and "nope" in assert_one_line_error(err)
    code, _, err = invoke("verify", BASES / "gpt2", ADAPTERS / "llama-lora", folder)
    assert code == 2 and "not in the base model" in assert_one_line_error(err)
    no_config = tmp_path / "no-config"
    shutil.copytree(folder, no_config)
    (no_config / "config.json").unlink()
    code, _, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", no_config)
    assert code == 2 and "config.json" in assert_one_line_error(err)
    code, _, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", folder, "--samples", "3")
    assert code == 2 and "--outputs" in assert_one_line_error(err)
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", truncated)
    assert code == 2 and "model.safetensors" in assert_one_line_error(err)


# ----------------------------------------------------------------------------- quantized MERGED


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, merged):
    """llama-rslora merged by PEFT, then quantized by transformers + bitsandbytes on the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("verify-quantized")
    out = {}
    configs = {
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
        "int8": BitsAndBytesConfig(load_in_8bit=True),
    }
    for name, cfg in configs.items():
        for src_name, src in (("merged", merged("llama-rslora", "float32")), ("base", BASES / "llama")):
            model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, device_map="cpu")
            model.save_pretrained(root / f"{src_name}-{name}")
            out[(src_name, name)] = root / f"{src_name}-{name}"
    return out


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantized_merged_reports_retention(quantized, scheme):
    report = verify_weights(BASES / "llama", ADAPTERS / "llama-rslora", quantized[("merged", scheme)])
    assert report["passed"] and report["quantized"]
    mods = report["modules"]
    assert len(mods) == 4 and all(m["status"] == "quantized" and m["passed"] is None for m in mods)
    for m in mods:
        assert m["retention"] == pytest.approx(m["expected_retention"], abs=1e-6)
        assert 0.8 < m["retention"] < 1.1
    # the linear layers the adapter leaves alone are quantized too: they match Q(base) exactly
    assert report["untouched"]["quantized"] == 10 and not report["untouched"]["differ"]
    assert report["summary"]["min_retention"] > 0.8


def test_quantized_without_the_delta_is_flagged_with_tolerance(quantized):
    folder = quantized[("base", "nf4")]
    report = verify_weights(BASES / "llama", ADAPTERS / "llama-rslora", folder)
    assert report["passed"]  # reported, not judged
    assert all(abs(m["retention"]) < 0.05 for m in report["modules"])
    code, out, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-rslora", folder, "--tolerance", "0.1")
    assert code == 1 and "a correct merge keeps" in out


# ----------------------------------------------------------------------------- output level


@pytest.mark.parametrize("adapter,dtype", [("llama-lora", "float32"), ("llama-lora", "bfloat16"), ("roberta-cls", "float16"), ("llama-dora", "bfloat16")])
def test_outputs_of_correct_merges_pass(merged, adapter, dtype):
    report = verify_outputs(BASES / ADAPTER_BASE[adapter], ADAPTERS / adapter, merged(adapter, dtype))
    assert report["passed"], report
    assert report["task"] == ("seqcls" if adapter == "roberta-cls" else "causal")
    assert report["relative_diff"] <= report["allowed_relative_diff"]
    assert report["top1_agreement"] > 0.9 and report["kl_divergence"] < 1e-3
    for key in ("max_abs_diff", "mean_abs_diff", "floor_float32", "floor_merged_dtype"):
        assert report[key] is not None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_outputs_catch_wrong_scale(tmp_path, dtype):
    wrong = tmp_path / "wrong-adapter"
    shutil.copytree(ADAPTERS / "llama-rslora", wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["use_rslora"] = False
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    out = peft_merge(BASES / "llama", wrong, tmp_path / "merged", DTYPES[dtype])
    report = verify_outputs(BASES / "llama", ADAPTERS / "llama-rslora", out)
    assert not report["passed"]
    assert report["relative_diff"] > 10 * report["allowed_relative_diff"]
    code, text, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-rslora", out, "--outputs", "--json")
    assert code == 1
    both = json.loads(text)
    assert both["passed"] is False and both["outputs"]["passed"] is False and both["summary"]["failed"] == 4


def test_outputs_of_a_bare_encoder(tmp_path):
    """An AutoModel (no head): last_hidden_state is compared, no KL or top-1."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base = tmp_path / "encoder"
    AutoModel.from_pretrained(BASES / "roberta").save_pretrained(base)
    torch.manual_seed(0)
    pm = get_peft_model(AutoModel.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    out = peft_merge(base, tmp_path / "adapter", tmp_path / "merged")
    report = verify_outputs(base, tmp_path / "adapter", out)
    assert report["task"] == "base" and report["passed"]
    assert report["kl_divergence"] is None and report["top1_agreement"] is None
    assert verify_weights(base, tmp_path / "adapter", out)["passed"]


def test_outputs_with_prompts_through_the_tokenizer(tmp_path, merged):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tmp_path / "llama-tok"
    shutil.copytree(BASES / "llama", base)
    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat", "on", "mat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(base)
    code, out, err = invoke("verify", base, ADAPTERS / "llama-lora", merged("llama-lora", "float32"), "--outputs",
                            "--prompt", "the cat sat on the mat", "--prompt", "the mat", "--json")
    assert code == 0, err
    rep = json.loads(out)["outputs"]
    assert rep["inputs"] == "prompts" and rep["samples"] == 2 and rep["tokens"] == 8
    code, _, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", merged("llama-lora", "float32"), "--outputs", "--prompt", "hi")
    assert code == 2 and "tokenizer" in assert_one_line_error(err)


# ----------------------------------------------------------------------------- streaming


@pytest.mark.realworld
@pytest.mark.slow
def test_weight_check_memory_stays_bounded(realworld_bases, tmp_path):
    """Peak anonymous memory of `verify` on a GPT-2 (500 MB per model) stays far below one model."""
    import subprocess
    import sys
    import time

    def peak_anon(args) -> int:
        proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        peak = 0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as fh:
                    for line in fh:
                        if line.startswith("RssAnon:"):
                            peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.005)
        assert proc.returncode == 0, proc.stderr.read().decode()
        return peak

    base = realworld_bases("gpt2-tigrinya")
    out = peft_merge(base, REALWORLD / "gpt2-tigrinya", tmp_path / "merged")
    size = (out / "model.safetensors").stat().st_size
    idle = peak_anon(["-c", "import loratool.cli, loratool.verify, torch, safetensors.torch"])
    used = peak_anon(["-m", "loratool", "verify", str(base), str(REALWORLD / "gpt2-tigrinya"), str(out), "--quiet"])
    assert used - idle < 0.5 * size, (used - idle, size)


def test_outputs_with_an_adapter_in_another_format(tmp_path, merged):
    """A scratch adapter is converted to PEFT for the unmerged run."""
    scratch = tmp_path / "lora.safetensors"
    loratool.write_adapter(loratool.read_adapter(ADAPTERS / "llama-rslora"), scratch, format="scratch")
    report = verify_outputs(BASES / "llama", scratch, merged("llama-rslora", "float32"))
    assert report["passed"] and report["relative_diff"] < 1e-5
    assert verify_weights(BASES / "llama", scratch, merged("llama-rslora", "float32"))["passed"]


# ----------------------------------------------------------------------------- merge --verify




def test_merge_verify_passes(tmp_path):
    code, out, err = invoke("merge", BASES / "llama", ADAPTERS / "llama-dora", tmp_path / "m1", "--verify")
    assert code == 0, err
    assert "verify weights: PASS" in out
    code, out, err = invoke("merge", BASES / "qwen2", ADAPTERS / "qwen2-bias", tmp_path / "m2", "--verify", "outputs", "--dtype", "bfloat16", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["verify"]["passed"] and rep["verify"]["outputs"]["passed"] and rep["verify"]["summary"]["modules"] == 12


def test_merge_verify_failure_names_the_output(tmp_path, monkeypatch):
    import loratool.verify as lv

    original = lv.verify_weights
    # with a zero tolerance, bfloat16 rounding is a failure
    monkeypatch.setattr(lv, "verify_weights", lambda *a, **k: original(*a, **dict(k, tolerance=0.0)))
    out_dir = tmp_path / "m"
    code, out, err = invoke("merge", BASES / "llama", ADAPTERS / "llama-lora", out_dir, "--verify", "--dtype", "bfloat16")
    assert code == 1
    line = assert_one_line_error(err)
    assert "suspect merged model" in line and str(out_dir) in line
    assert out_dir.is_dir()  # left in place for inspection


def test_merge_verify_with_quantized_output(tmp_path):
    code, out, err = invoke("merge", BASES / "llama", ADAPTERS / "llama-rslora", tmp_path / "q", "--quantize", "int8", "--verify", "--json")
    assert code == 0, err
    rep = json.loads(out)["verify"]
    assert rep["quantized"] and all(m["status"] == "quantized" for m in rep["modules"])
    assert all(m["retention"] == pytest.approx(m["expected_retention"], abs=0.05) for m in rep["modules"])
