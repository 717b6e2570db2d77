"""Quantization-aware merging, checked against transformers + bitsandbytes + PEFT themselves.

The fixture bases have hidden 64 / intermediate 128, so bitsandbytes' CPU 4-bit kernels
(which need in_features that are multiples of 64) run on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ADAPTERS, BASES, assert_one_line_error, invoke, run_cli

import loratool
from loratool.base import BaseModel, bind_adapter
from loratool.errors import InputError, UnsupportedError
from loratool.engine.delta import dense_delta
from loratool.engine.codecs.bnb import (
    QuantSpec,
    dequantize_weight,
    fake_quantize,
    import_bitsandbytes,
    is_quantized_aux_key,
    measure_retention,
    quantize_weight,
    quantized_weight_keys,
    recorded_spec,
    relative_entries,
    resolve_spec,
    retention_of,
    serialized_suffixes,
)


import_bitsandbytes()  # before transformers imports it: no kernel download from the Hub
import bitsandbytes as bnb  # noqa: E402

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


# -- helpers ---------------------------------------------------------------------------------


def bnb_config(spec: QuantSpec):
    """The transformers BitsAndBytesConfig for a spec (what a user would write)."""
    from transformers import BitsAndBytesConfig

    if spec.is_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=spec.method, bnb_4bit_use_double_quant=spec.double_quant,
            bnb_4bit_compute_dtype=spec.compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(folder, spec: QuantSpec | None = None, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    arch = AutoConfig.from_pretrained(folder).architectures[0]
    cls = AutoModelForSequenceClassification if "SequenceClassification" in arch else AutoModelForCausalLM
    if spec is not None:
        kw.update(quantization_config=bnb_config(spec), device_map="cpu")
    return cls.from_pretrained(str(folder), **kw).eval()


def has_bf16_inference_kernel() -> bool:
    """Whether this machine's bitsandbytes serves 4-bit layers at inference through its bf16 CPU kernel."""
    probe = bnb.nn.Linear4bit(64, 64)
    return bool(getattr(probe, "support_avx512bf16_for_cpu", False))


def on_training_path(model):
    """``model`` with its 4-bit layers computing as in training: x @ dequantize_4bit(W).T in compute_dtype.

    bitsandbytes 0.49+ on a CPU with AVX512-BF16 serves a ``Linear4bit`` at inference (eval mode, no
    grad) through a repacked bf16 kernel: absmax rounded to bfloat16, activations cast to bfloat16,
    whatever the compute dtype. Training always multiplies with the dequantized weight, which is
    what an adapter was trained against and what ``--qlora`` merges into; tests of that contract
    compare with this path, and the inference kernel is bounded separately.
    """
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def transformers_quantized_state(folder, spec: QuantSpec, tmp: Path) -> tuple[dict, dict]:
    """(state dict, config.json) of transformers' own save of ``folder`` loaded with ``spec``."""
    model = load_model(folder, spec)
    out = tmp / f"tf-{spec.method}-{int(spec.double_quant)}"
    model.save_pretrained(out)
    sd = {}
    for f in sorted(out.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd, json.loads((out / "config.json").read_text())


def load_dtype(base: BaseModel) -> torch.dtype:
    return getattr(torch, base.config["dtype"])


def quantize_base_state(base: BaseModel, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Our quantization of a whole base, tensor by tensor, named as the base names them."""
    keys = quantized_weight_keys(base, spec)
    dt = load_dtype(base)
    out = {}
    for k in base.keys():
        w = base.store.get(k).to(dt)
        if k in keys:
            w = w.T if keys[k] == "conv1d" else w
            module = k.removesuffix(".weight")
            out.update({f"{module}.{s}": t for s, t in quantize_weight(w, spec).items()})
        else:
            out[k] = w
    return out


def strip_to(ours: dict, key: str) -> str:
    """transformers may save keys with the task model's prefix the base checkpoint lacks."""
    if key in ours:
        return key
    return key.split(".", 1)[1]


def scaled_adapter(name: str, ratio: float | None):
    """A fixture adapter, bound to its llama base; with ``ratio`` every delta is rescaled to
    ``ratio`` * ||W|| (the fixtures' deltas are ~4x the weights, far larger than real ones)."""
    base = BaseModel.open(BASES / "llama")
    binding = bind_adapter(loratool.read_adapter(ADAPTERS / name), base)
    ad, mapping = binding.adapter, binding.keys
    if ratio is not None:
        mods = {}
        for n, m in ad.modules.items():
            w = base.store.get(mapping[n]).float()
            factor = ratio * float(w.norm()) / float(dense_delta(m, layout="stored").norm())
            mods[n] = m.with_factors(m.A.load(), m.B.load() * factor)
        ad = ad.replace_modules(mods)
    return base, ad, mapping


# -- which modules -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "roberta", "distilbert"])
def test_quantized_modules_match_transformers(name):
    base = BaseModel.open(BASES / name)
    spec = QuantSpec("int8")
    model = load_model(BASES / name, spec)
    theirs = {base.tensor_name(f"{n}.weight") for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    ours = quantized_weight_keys(base, spec)
    assert set(ours) == theirs
    assert not any("embed" in k or "wte" in k or "norm" in k for k in ours)
    assert "lm_head.weight" not in ours


def test_skip_modules_replace_default_skips():
    base = BaseModel.open(BASES / "llama")
    spec = QuantSpec("nf4", skip_modules=("q_proj",))
    ours = quantized_weight_keys(base, spec)
    assert not any("q_proj" in k for k in ours)
    assert "lm_head.weight" in ours  # an explicit list replaces the default skips, as in transformers
    from transformers import BitsAndBytesConfig

    model = load_model(BASES / "llama", None, quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["q_proj"]), device_map="cpu")
    theirs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert set(ours) == theirs


def test_unknown_architecture_refused():
    base = BaseModel.open(BASES / "llama")
    base.config = dict(base.config, model_type="not-a-model", architectures=["NotAModel"])
    with pytest.raises(UnsupportedError):
        quantized_weight_keys(base, QuantSpec("nf4"))


# -- quantize / dequantize, bit for bit ----------------------------------------------------------


@pytest.mark.parametrize(
    "name,spec",
    [
        ("llama", QuantSpec("nf4")),
        ("llama", QuantSpec("fp4", double_quant=True, compute_dtype=torch.bfloat16)),
        ("llama", QuantSpec("int8")),
        ("llama-sharded", QuantSpec("nf4", double_quant=True)),  # bfloat16 base
        ("gpt2", QuantSpec("nf4")),  # Conv1D, quantized transposed
    ],
    ids=lambda v: v.describe() if isinstance(v, QuantSpec) else v,
)
def test_quantize_equals_transformers(name, spec, tmp_path):
    base = BaseModel.open(BASES / name)
    theirs, config = transformers_quantized_state(BASES / name, spec, tmp_path)
    ours = quantize_base_state(base, spec)
    assert {strip_to(ours, k) for k in theirs} == set(ours)
    for k, t in theirs.items():
        mine = ours[strip_to(ours, k)]
        assert mine.dtype == t.dtype and torch.equal(mine, t), k
    assert config["quantization_config"] == spec.to_config()
    # the suffixes we declare are the ones written
    module = next(iter(quantized_weight_keys(base, spec))).removesuffix(".weight")
    written = {k[len(module) + 1:] for k in ours if k.startswith(module + ".")} - {"bias"}
    assert written == set(serialized_suffixes(spec))


@pytest.mark.parametrize("spec", [QuantSpec("nf4", double_quant=True), QuantSpec("fp4"), QuantSpec("int8")], ids=QuantSpec.describe)
def test_dequantize_matches_bitsandbytes(spec, tmp_path):
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    theirs, _ = transformers_quantized_state(BASES / "llama", spec, tmp_path)
    model = load_model(BASES / "llama", spec)
    layer = model.model.layers[1].mlp.down_proj
    key = "model.layers.1.mlp.down_proj.weight"
    entries = relative_entries(key, {k: v for k, v in theirs.items() if k.startswith("model.layers.1.mlp.down_proj.")})
    ref = dequantize_bnb_weight(layer.weight, getattr(layer, "state", None))
    ours = dequantize_weight(entries)
    assert ours.dtype == ref.dtype and torch.equal(ours, ref)
    assert all(is_quantized_aux_key(f"model.layers.1.mlp.down_proj.{s}") for s in entries if s != "weight")


@pytest.mark.parametrize("spec", [QuantSpec("nf4"), QuantSpec("nf4", double_quant=True, compute_dtype=torch.bfloat16), QuantSpec("int8")], ids=QuantSpec.describe)
def test_fake_quantize_is_what_the_layer_multiplies_with(spec):
    model = on_training_path(load_model(BASES / "llama", spec))
    layer = model.model.layers[0].self_attn.o_proj
    w = BaseModel.open(BASES / "llama").store.get("model.layers.0.self_attn.o_proj.weight")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = layer(x)
    eff = fake_quantize(w, spec)
    ours = torch.nn.functional.linear(x.to(eff.dtype), eff).float()
    tol = 2e-2 if spec.compute_dtype == torch.bfloat16 else (5e-2 if not spec.is_4bit else 1e-5)
    assert torch.allclose(ours, ref.float(), atol=tol, rtol=tol)


def test_fake_quantize_against_the_bf16_inference_kernel():
    """Where bitsandbytes serves 4-bit layers with its bf16 CPU kernel, it multiplies the same 4-bit
    codes with absmax and activations rounded to bfloat16: equal to our weights to bf16 rounding."""
    if not has_bf16_inference_kernel():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes has no bf16 inference kernel here")
    spec = QuantSpec("nf4", compute_dtype=torch.float32)
    layer = load_model(BASES / "llama", spec).model.layers[0].self_attn.o_proj
    w = BaseModel.open(BASES / "llama").store.get("model.layers.0.self_attn.o_proj.weight")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        served = layer(x).float()
    assert layer.weight.quant_state.packing_format_for_cpu  # the kernel really ran
    eff = fake_quantize(w, spec)
    exact = torch.nn.functional.linear(x, eff)
    rel = (served - exact).norm() / exact.norm()
    assert 0 < rel < 2 * 2.0**-8  # a few bf16 roundings, not a different weight


# -- settings ------------------------------------------------------------------------------------


def test_spec_config_roundtrip():
    from transformers import BitsAndBytesConfig

    for spec in [QuantSpec("nf4", double_quant=True, compute_dtype=torch.bfloat16), QuantSpec("fp4"), QuantSpec("int8")]:
        cfg = spec.to_config()
        assert QuantSpec.from_config(cfg, source="flags") == spec
        assert bnb_config(spec).to_dict() == cfg
    legacy = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "torch.bfloat16", "quant_method": "bitsandbytes"}
    spec = QuantSpec.from_config(legacy)
    assert spec.method == "nf4" and spec.compute_dtype == torch.bfloat16 and not spec.double_quant
    assert BitsAndBytesConfig.from_dict(QuantSpec("nf4").to_config()).to_dict() == QuantSpec("nf4").to_config()
    with pytest.raises(UnsupportedError):
        QuantSpec.from_config({"quant_method": "gptq", "bits": 4})
    with pytest.raises(InputError):
        QuantSpec("nf3")
    with pytest.raises(InputError):
        QuantSpec("nf4", blocksize=100)


def test_recorded_settings_win_over_flags():
    recorded = recorded_spec(("adapter config", {}), ("base config.json", {"quantization_config": QuantSpec("nf4", double_quant=True).to_config()}))
    assert recorded.source == "base config.json" and recorded.double_quant
    spec, warnings = resolve_spec(QuantSpec("fp4"), recorded)
    assert spec is recorded and warnings and "fp4" in warnings[0]
    spec, warnings = resolve_spec(QuantSpec("nf4", double_quant=True), recorded)
    assert spec is recorded and not warnings
    assert resolve_spec(QuantSpec("fp4"), None) == (QuantSpec("fp4"), [])
    assert recorded_spec(("a", None), ("b", {"x": 1})) is None


# -- retention -------------------------------------------------------------------------------------


def test_retention_math():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d = torch.randn(64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.1
    full = retention_of(w, w + d, d)
    assert full.retained == pytest.approx(1.0) and full.rel_error == pytest.approx(0.0, abs=1e-12)
    assert full.delta_ratio == pytest.approx(float(d.norm() / w.norm()), rel=1e-6)
    none = retention_of(w, w.clone(), d)
    assert none.retained == 0.0 and none.rel_error == pytest.approx(1.0) and none.unchanged == 1.0
    half = retention_of(w, w + 0.5 * d, d)
    assert half.retained == pytest.approx(0.5) and half.rel_error == pytest.approx(0.5)
    cast = measure_retention(w.float(), d.float() * 1e-4, None, dtype=torch.bfloat16)
    # a delta below bf16 resolution: most entries do not move, the few that do move a whole step
    assert cast.unchanged > 0.9 and cast.rel_error > 1


def test_4bit_codes_unpack():
    from loratool.engine.codecs.bnb import quantize_4bit, unpack_4bit_codes

    w = BaseModel.open(BASES / "llama").store.get("model.layers.0.mlp.up_proj.weight")
    spec = QuantSpec("fp4")
    packed, state = quantize_4bit(w, spec)
    codes = unpack_4bit_codes(packed, state.shape).long()
    blocks = (state.code[codes].reshape(-1, spec.blocksize) * state.absmax.reshape(-1, 1)).reshape(w.shape)
    assert torch.equal(blocks, fake_quantize(w, spec))


@pytest.mark.parametrize("spec,ratio", [(QuantSpec("nf4"), 0.01), (QuantSpec("int8"), None)], ids=["nf4-1pct", "int8-fixture"])
def test_retention_matches_direct_computation(spec, ratio, tmp_path):
    """Quantize the base and the plain merge with transformers, dequantize with bitsandbytes,
    and compute <Q(W+dW) - Q(W), dW> / ||dW||^2 directly."""
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    base, ad, mapping = scaled_adapter("llama-lora", ratio)
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    sd = {k: base.store.get(k) for k in base.keys()}
    for n, k in mapping.items():
        sd[k] = sd[k] + dense_delta(ad.modules[n], layout="stored")
    save_file(sd, merged_dir / "model.safetensors", metadata={"format": "pt"})
    (merged_dir / "config.json").write_text((BASES / "llama" / "config.json").read_text())
    qbase = dict(load_model(BASES / "llama", spec).named_modules())
    qmerged = dict(load_model(merged_dir, spec).named_modules())
    for n, k in mapping.items():
        mod = k.removesuffix(".weight")
        b, m = qbase[mod], qmerged[mod]
        qb = dequantize_bnb_weight(b.weight, getattr(b, "state", None)).double()
        qm = dequantize_bnb_weight(m.weight, getattr(m, "state", None)).double()
        d = dense_delta(ad.modules[n], layout="stored").double()
        direct = float(((qm - qb) * d).sum() / (d * d).sum())
        ours = measure_retention(base.store.get(k), dense_delta(ad.modules[n], layout="stored"), spec, dtype=torch.float32)
        assert ours.retained == pytest.approx(direct, rel=1e-9, abs=1e-12), n
        assert ours.rel_error == pytest.approx(float((qm - qb - d).norm() / d.norm()), rel=1e-9)
        if ratio is None:
            assert ours.retained > 0.9 and ours.rel_error < 0.2  # the fixture deltas dwarf their weights
        elif spec.is_4bit:
            # a 1% delta survives on average, buried in rounding noise several times its size
            assert 0.7 < ours.retained < 1.3 and ours.rel_error > 2


# -- merge --qlora / --quantize, end to end ------------------------------------------------------

def merge(*args):
    code, out, err = invoke("merge", *map(str, args))
    assert code == 0, err
    return out, err


def state(folder: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


@pytest.fixture(scope="module")
def scaled_lora(tmp_path_factory):
    """llama-lora with every delta at 1% of its weight's norm (a realistic fine-tune)."""
    _, ad, _ = scaled_adapter("llama-lora", 0.01)
    folder = tmp_path_factory.mktemp("scaled") / "llama-lora-1pct"
    loratool.write_adapter(ad, folder)
    return folder


@pytest.mark.parametrize(
    "base,adapter,spec,extra",
    [
        ("llama", "llama-lora", QuantSpec("nf4"), ()),
        ("llama", "llama-lora", QuantSpec("nf4", double_quant=True), ()),
        ("llama", "llama-layers", QuantSpec("fp4"), ("--dtype", "bfloat16")),
        ("llama", "llama-lora", QuantSpec("int8"), ()),
        ("llama-sharded", "llama-sharded-lora", QuantSpec("nf4", double_quant=True), ()),  # bf16, 7 shards
        ("gpt2", "gpt2-lora", QuantSpec("nf4"), ()),  # Conv1D
    ],
    ids=lambda v: v.describe() if isinstance(v, QuantSpec) else "-".join(v) if isinstance(v, tuple) else v,
)
def test_quantized_merge_equals_transformers_quantizing_the_16bit_merge(base, adapter, spec, extra, tmp_path):
    plain, quant = tmp_path / "plain", tmp_path / "quant"
    merge(BASES / base, ADAPTERS / adapter, plain, *extra)
    flags = ["--quantize", spec.method] + (["--double-quant"] if spec.double_quant else [])
    merge(BASES / base, ADAPTERS / adapter, quant, *flags, *extra, "--report", tmp_path / "r.json")
    theirs, config = transformers_quantized_state(plain, spec, tmp_path)
    ours = state(quant)
    assert {strip_to(ours, k) for k in theirs} == set(ours)
    for k, t in theirs.items():
        mine = ours[strip_to(ours, k)]
        assert mine.dtype == t.dtype and torch.equal(mine, t), k
    ours_config = json.loads((quant / "config.json").read_text())
    assert ours_config["quantization_config"] == config["quantization_config"]
    index = quant / "model.safetensors.index.json"
    if index.exists():  # the index matches the (trimmed) shards
        data = json.loads(index.read_text())
        assert set(data["weight_map"]) == set(ours)
        assert data["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
    # transformers loads it as quantized layers, and computes what its own quantization computes
    model = load_model(quant)
    layer_cls = bnb.nn.Linear8bitLt if spec.method == "int8" else bnb.nn.Linear4bit
    assert sum(isinstance(m, layer_cls) for m in model.modules()) == len(quantized_weight_keys(BaseModel.open(BASES / base), spec))
    with torch.no_grad():
        assert torch.equal(model(X).logits, load_model(plain, spec)(X).logits)
    report = json.loads((tmp_path / "r.json").read_text())
    assert all("retention" in m for m in report["modules"])
    assert report["quantization"]["output"]["method"] == spec.method


@pytest.mark.parametrize("adapter", ["llama-lora", "llama-dora"])
def test_qlora_merge_reproduces_peft_on_the_4bit_base(adapter, tmp_path):
    """The --qlora merge has the logits of PEFT on the 4-bit base; a plain merge does not."""
    from peft import PeftModel

    spec = QuantSpec("nf4", double_quant=True, compute_dtype=torch.float32)
    qlora, plain = tmp_path / "qlora", tmp_path / "plain"
    out, _ = merge(BASES / "llama", ADAPTERS / adapter, qlora, "--qlora", "nf4", "--double-quant")
    assert "trained on" in out
    merge(BASES / "llama", ADAPTERS / adapter, plain)
    pm = PeftModel.from_pretrained(on_training_path(load_model(BASES / "llama", spec)), ADAPTERS / adapter).eval()
    with torch.no_grad():
        ref = pm(X).logits
        got = load_model(qlora)(X).logits
        naive = load_model(plain)(X).logits
    assert (got - ref).abs().max() < 1e-4
    assert (naive - ref).abs().max() > 100 * (got - ref).abs().max()
    config = json.loads((qlora / "config.json").read_text())
    assert "quantization_config" not in config
    # untouched non-linear tensors are byte copies of the base
    base_sd, ours = state(BASES / "llama"), state(qlora)
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(base_sd[k], ours[k])


def test_qlora_then_quantize_is_peft_merge_into_4bit_and_warns(scaled_lora, tmp_path):
    """--qlora nf4 --quantize nf4 = PEFT's merge_and_unload on the 4-bit model; a 1% delta keeps ~2%."""
    from peft import PeftModel

    spec = QuantSpec("nf4")
    out = tmp_path / "q"
    code, stdout, err = invoke("merge", BASES / "llama", scaled_lora, out, "--qlora", "nf4", "--quantize", "nf4", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "keep less than 50% of their delta" in err and "--quantize int8" in err
    pm = PeftModel.from_pretrained(load_model(BASES / "llama", spec), scaled_lora)
    theirs = pm.merge_and_unload().state_dict()
    ours = state(out)
    assert set(theirs) == set(ours)
    for k, t in theirs.items():
        assert ours[k].dtype == t.dtype and torch.equal(ours[k], t), k
    report = json.loads((tmp_path / "r.json").read_text())
    kept = [m["retention"]["retained"] for m in report["modules"]]
    assert max(kept) < 0.25 and all(m["retention"]["low"] for m in report["modules"])
    assert report["quantization"]["reference"]["method"] == "nf4"
    # retention figures are the direct computation
    base, ad, mapping = scaled_adapter("llama-lora", 0.01)
    for m in report["modules"]:
        k = mapping[m["name"]]
        eff = fake_quantize(base.store.get(k), spec).float()
        direct = measure_retention(eff, dense_delta(ad.modules[m["name"]], layout="stored"), spec, dtype=torch.float32)
        assert m["retention"]["retained"] == pytest.approx(direct.retained, rel=1e-6, abs=1e-9)
        assert m["retention"]["rel_error"] == pytest.approx(direct.rel_error, rel=1e-6)
    # int8 keeps it
    code, stdout, err = invoke("merge", BASES / "llama", scaled_lora, tmp_path / "q8", "--qlora", "nf4", "--quantize", "int8", "--json")
    assert code == 0 and "keep less than" not in err
    assert min(m["retention"]["retained"] for m in json.loads(stdout)["modules"]) > 0.5


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory):
    """The llama fixture saved by transformers in nf4 (double quant) and in int8."""
    root = tmp_path_factory.mktemp("prequantized")
    out = {}
    for spec in (QuantSpec("nf4", double_quant=True), QuantSpec("int8")):
        load_model(BASES / "llama", spec).save_pretrained(root / spec.method)
        out[spec.method] = root / spec.method
    return out


def test_prequantized_4bit_base_dequantizes_exactly(prequantized, tmp_path):
    a, b = tmp_path / "from-4bit", tmp_path / "qlora"
    merge(prequantized["nf4"], ADAPTERS / "llama-layers", a)
    merge(BASES / "llama", ADAPTERS / "llama-layers", b, "--qlora", "nf4", "--double-quant")
    sa, sb = state(a), state(b)
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert "quantization_config" not in json.loads((a / "config.json").read_text())
    # dequantized exactly as bitsandbytes does
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    layer = load_model(prequantized["nf4"]).model.layers[1].mlp.up_proj
    assert torch.equal(sa["model.layers.1.mlp.up_proj.weight"], dequantize_bnb_weight(layer.weight))


def test_prequantized_4bit_base_requantized_keeps_untouched_weights(prequantized, tmp_path):
    out = tmp_path / "q"
    merge(prequantized["nf4"], ADAPTERS / "llama-layers", out, "--quantize", "nf4", "--double-quant")
    src, ours = state(prequantized["nf4"]), state(out)
    assert set(src) == set(ours)
    adapted = {m.removesuffix(".weight") for m in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj")}
    for k in src:
        if not any(k.startswith(a + ".") for a in adapted):
            assert torch.equal(src[k], ours[k]), k  # copied as they were, not requantized
    model = load_model(out)
    assert isinstance(model.model.layers[1].self_attn.q_proj, bnb.nn.Linear4bit)


def test_prequantized_8bit_base(prequantized, tmp_path):
    out = tmp_path / "from-8bit"
    merge(prequantized["int8"], ADAPTERS / "llama-lora", out, "--report", tmp_path / "r.json")
    ours = state(out)
    raw = state(prequantized["int8"])
    ad = loratool.read_adapter(ADAPTERS / "llama-lora")
    k = "model.layers.0.self_attn.q_proj"
    deq = bnb.functional.int8_vectorwise_dequant(raw[f"{k}.weight"], raw[f"{k}.SCB"])
    assert torch.allclose(ours[f"{k}.weight"], deq + dense_delta(ad.modules[k], layout="stored"), atol=1e-6)
    assert not any(key.endswith((".SCB", ".weight_format")) for key in ours)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["quantization"]["base_quantized"]["method"] == "int8"


def test_settings_recorded_in_base_win_over_flags(prequantized, tmp_path):
    code, _, err = invoke("merge", prequantized["nf4"], ADAPTERS / "llama-layers", tmp_path / "o", "--qlora", "fp4")
    assert code == 0
    assert "records nf4" in err and "fp4" in err


def test_quantize_refusals(tmp_path):
    code, _, err = invoke("merge", BASES / "llama", ADAPTERS / "llama-lora", tmp_path / "o", "--qlora", "nf3")
    assert code == 2
    base = tmp_path / "weird"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "not-a-model", "architectures": ["NotAModel"]}))
    (base / "model.safetensors").write_bytes((BASES / "llama" / "model.safetensors").read_bytes())
    code, _, err = invoke("merge", base, ADAPTERS / "llama-lora", tmp_path / "o2", "--quantize", "nf4")
    assert code == 2 and "cannot tell which modules" in assert_one_line_error(err)
    assert not (tmp_path / "o2").exists()
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    config = json.loads((BASES / "llama" / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps(dict(config, quantization_config={"quant_method": "gptq", "bits": 4})))
    (gptq / "model.safetensors").write_bytes((BASES / "llama" / "model.safetensors").read_bytes())
    code, _, err = invoke("merge", gptq, ADAPTERS / "llama-lora", tmp_path / "o3", "--quantize", "nf4")
    assert code == 2 and "bitsandbytes only" in assert_one_line_error(err)


def test_quantized_merge_fetches_no_kernel_from_the_hub(tmp_path):
    """bitsandbytes' CPU back end asks `kernels` for a Hub download at import; loratool's never reaches it."""
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "get-kernel-called"
    # the real `kernels` package, with get_kernel (the Hub download) recording any call
    (site / "sitecustomize.py").write_text(
        "import kernels\n"
        "def get_kernel(*a, **k):\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    raise RuntimeError('a Hub download was attempted')\n"
        "kernels.get_kernel = get_kernel\n"
    )
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    for flags in (["--quantize", "nf4"], ["--qlora", "nf4"]):
        out = tmp_path / f"out{len(flags[0])}"
        result = run_cli("merge", BASES / "llama", ADAPTERS / "llama-lora", out, *flags, env=env)
        assert result.returncode == 0, result.stderr
        assert not marker.exists(), flags
        assert "kernel" not in result.stderr.lower(), result.stderr
    result = run_cli("verify", BASES / "llama", ADAPTERS / "llama-lora", out, "--json", env=env)
    assert result.returncode in (0, 1) and not marker.exists() and "kernel" not in result.stderr.lower()
