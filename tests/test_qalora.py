"""QA-LoRA merges into GPTQ checkpoints, checked against PEFT's own QA-LoRA forward.

PEFT's GPTQLoraLinear with the QA-LoRA variant runs around a pure-torch quantized linear
(tests/_qalora_helpers.py), so no GPTQ kernel is needed for the oracle.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from _qalora_helpers import (
    TorchQuantLinear,
    act_order_g_idx,
    make_gptq_folder,
    make_qalora_adapter,
    peft_qalora_layer,
)
from conftest import BASES, assert_one_line_error, invoke
from loratool.errors import FormatError, InputError, ModuleMismatchError, OutputExistsError, UnsupportedError
from loratool.engine.codecs import gptq as G
from loratool.ops import qalora as Q
from loratool.qalora import (
    DequantizedCheckpoint,
    is_gptq_checkpoint,
    merge_qalora,
    read_float_zeros,
    read_quant_config,
    verify_qalora_merge,
)

BITS = (2, 3, 4, 8)


def _layer(bits, fmt, *, in_f=128, out=64, group_size=16, act_order=False, sym=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, in_f, generator=gen) * 0.05
    g_idx = act_order_g_idx(in_f, group_size, seed) if act_order else None
    q = G.quantize_rtn(w, bits, group_size=group_size, sym=sym, g_idx=g_idx, zero_format=fmt)
    q["zeros"] = G.unpack_qzeros(q["qzeros"], bits, fmt)
    return q


def _factors(in_f, out, pool_size, r=4, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(r, in_f // pool_size, generator=gen, dtype=dtype) * 0.1
    B = torch.randn(out, r, generator=gen, dtype=dtype) * 0.1
    return A, B


def _x(in_f, dtype=torch.float64, seed=2):
    return torch.randn(3, 5, in_f, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- ops


@pytest.mark.parametrize("pooling", Q.POOLINGS)
def test_block_delta_equals_pooled_forward(pooling):
    in_f, out, lp = 128, 48, 32
    A, B = _factors(in_f, out, lp)
    x = _x(in_f)
    dW = Q.expand_blocks(Q.block_delta(A, B, 2.0, pooling=pooling, in_features=in_f, pool_size=lp), lp)
    expected_c = {"avg": 1 / lp, "sum": 1.0, "peft": (in_f / lp) / lp}[pooling]
    assert Q.pooling_factor(pooling, in_f, lp) == pytest.approx(expected_c, rel=1e-15)
    assert torch.allclose(dW, 2.0 * expected_c * (B @ A).repeat_interleave(lp, dim=1), rtol=0, atol=1e-15)
    y = Q.pooled_forward(x, A, B, 2.0, pooling=pooling, pool_size=lp)
    assert (x @ dW.T - y).abs().max() <= 1e-12


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fmt", ["v1", "v2"])
@pytest.mark.parametrize("lp", [16, 32])
def test_fold_matches_peft_qalora_forward(bits, fmt, lp):
    """x @ deq(merged) == PEFT's QA-LoRA layer over the base: float64 to 1e-12, float32 to 1e-5."""
    in_f, out, r, alpha = 128, 64, 4, 8
    q = _layer(bits, fmt, in_f=in_f, out=out, group_size=16, seed=bits)
    A, B = _factors(in_f, out, lp, r=r)
    scale = alpha / r
    blocks = Q.block_delta(A, B, scale, pooling="peft", in_features=in_f, pool_size=lp)
    assert Q.fold_obstacle(q["g_idx"], q["scales"].shape[0], lp, group_size=16) is None
    z_new = Q.fold_into_zeros(q["zeros"], q["scales"], blocks, q["g_idx"], lp)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        x = _x(in_f, dtype)
        base = TorchQuantLinear(q["qweight"], q["zeros"], q["scales"], q["g_idx"], bits)
        peft_layer = peft_qalora_layer(base, A.to(dtype), B.to(dtype), r=r, alpha=alpha, pool_size=lp, dtype=dtype)
        with torch.no_grad():
            y_peft = peft_layer(x)
            y_merged = TorchQuantLinear(q["qweight"], z_new.to(dtype), q["scales"], q["g_idx"], bits)(x)
        assert y_peft.dtype == dtype
        err = (y_peft - y_merged).abs().max().item()
        assert err <= tol, (dtype, err)
        # the adapter is not negligible: the merge changed the output
        assert (y_merged - base(x)).abs().max().item() > 1e3 * tol


@pytest.mark.parametrize("pooling", ["avg", "sum"])
def test_fold_matches_original_qalora_forward(pooling):
    """The original code's pooling (nn.AvgPool1d(Lp), or times Lp in the README's sum variant)."""
    in_f, out, lp = 128, 64, 32
    q = _layer(4, "v1", in_f=in_f, out=out, group_size=32)
    A, B = _factors(in_f, out, lp)
    blocks = Q.block_delta(A, B, 0.25, pooling=pooling, in_features=in_f, pool_size=lp)
    z_new = Q.fold_into_zeros(q["zeros"], q["scales"], blocks, q["g_idx"], lp)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        x = _x(in_f, dtype)
        pooled = torch.nn.functional.avg_pool1d(x.reshape(-1, 1, in_f), lp).reshape(*x.shape[:-1], in_f // lp)
        if pooling == "sum":
            pooled = pooled * lp
        adapter = pooled @ A.to(dtype).T @ B.to(dtype).T * 0.25
        base = TorchQuantLinear(q["qweight"], q["zeros"], q["scales"], q["g_idx"], 4)(x)
        merged = TorchQuantLinear(q["qweight"], z_new.to(dtype), q["scales"], q["g_idx"], 4)(x)
        assert (merged - (base + adapter)).abs().max().item() <= tol


def test_fold_obstacles():
    g = G.default_g_idx(128, 16)
    assert Q.fold_obstacle(g, 8, 16, group_size=16) is None
    assert Q.fold_obstacle(g, 8, 64, group_size=16) is None
    msg = Q.fold_obstacle(g, 8, 8, group_size=16)
    assert "Lp=8 is not a multiple of the quantization group size G=16" in msg
    msg = Q.fold_obstacle(act_order_g_idx(128, 16), 8, 16, group_size=16)
    assert "act-order" in msg and "permuted" in msg
    # one group for the whole row (group_size -1) folds only if Lp covers the row
    one = G.default_g_idx(128, -1)
    assert Q.fold_obstacle(one, 1, 128) is None
    assert "not a multiple" in Q.fold_obstacle(one, 1, 32, group_size=-1)
    with pytest.raises(ValueError, match="act-order"):
        Q.fold_into_zeros(torch.zeros(8, 4), torch.ones(8, 4), torch.zeros(4, 8), act_order_g_idx(128, 16), 16)


def test_fold_zero_scale_and_unused_groups():
    g = torch.tensor([0] * 16 + [2] * 16)  # group 1 is used by no input
    zeros = torch.full((3, 2), 8.0)
    scales = torch.ones(3, 2, dtype=torch.float64)
    blocks = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)  # (out=2, 2 blocks)
    z = Q.fold_into_zeros(zeros, scales, blocks, g, 16)
    assert z[:, 0].tolist() == [7.0, 8.0, 6.0] and z[:, 1].tolist() == [5.0, 8.0, 4.0]
    scales[2, 1] = 0
    with pytest.raises(ValueError, match="scale is 0"):
        Q.fold_into_zeros(zeros, scales, blocks, g, 16)


def test_round_zeros():
    z = torch.tensor([[0.4, 7.6, 16.7, -0.2]], dtype=torch.float64)
    zi, stats = Q.round_zeros(z, 1, 15)
    assert zi.tolist() == [[1, 8, 15, 1]]
    assert stats["max_zero_rounding"] == pytest.approx(0.4)
    assert stats["clamped"] == 3  # round(0.4)=0, 17 and -0 fall outside [1, 15]


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def gptq4(tmp_path_factory):
    return make_gptq_folder(tmp_path_factory.mktemp("gptq4") / "base", bits=4, group_size=16)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    return make_qalora_adapter(tmp_path_factory.mktemp("qalora-peft") / "adapter", convention="peft", pool_size=16)


def _read(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def _expected_weights(base_dir, adapter_dir, c_of):
    """deq(base) + c * (B @ A) expanded, by hand, for every adapted module (float64)."""
    base = DequantizedCheckpoint(base_dir)
    sd = _read(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    out = {}
    for k, A in sd.items():
        if not k.endswith("lora_A.weight"):
            continue
        module = k[len("base_model.model."):-len(".lora_A.weight")]
        B = sd[k.replace("lora_A", "lora_B")]
        W = base.get(f"{module}.weight", dtype=torch.float64)
        in_f = W.shape[1]
        lp = in_f // A.shape[1]
        out[module] = W + scale * c_of(in_f, lp) * (B.double() @ A.double()).repeat_interleave(lp, dim=1)
    return out


def _reference_model(base_dir, adapter_dir, pool_size):
    """The llama fixture with deq(base) weights and PEFT's QA-LoRA layers on the adapted modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(BASES / "llama")
    model = AutoModelForCausalLM.from_config(config).float().eval()
    deq = DequantizedCheckpoint(base_dir)
    model.load_state_dict({k: deq.get(k, dtype=torch.float32) for k in deq.keys()}, strict=True)
    sd = _read(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    for k, A in sd.items():
        if k.endswith("lora_A.weight"):
            module = k[len("base_model.model."):-len(".lora_A.weight")]
            parent, _, leaf = module.rpartition(".")
            lin = model.get_submodule(module)
            layer = peft_qalora_layer(lin, A.float(), sd[k.replace("lora_A", "lora_B")].float(), r=cfg["r"],
                                      alpha=cfg["lora_alpha"], pool_size=pool_size, dtype=torch.float32)
            setattr(model.get_submodule(parent), leaf, layer)
    return model


def test_merge_dense_matches_peft_model(gptq4, peft_adapter, tmp_path):
    """The dense output, loaded by transformers, gives PEFT's QA-LoRA model's logits."""
    from transformers import AutoModelForCausalLM

    report = merge_qalora(gptq4, peft_adapter, tmp_path / "dense32", dtype=torch.float32)
    assert report["to"] == "dense" and report["exact"] is True
    assert report["convention"]["pooling"] == "peft" and "use_qalora" in report["convention"]["source"]
    assert report["quantization"]["zero_format"] == "v1" and report["quantization"]["bits"] == 4
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _reference_model(gptq4, peft_adapter, 16)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "dense32", dtype=torch.float32)(ids).logits
    assert (ref - merged).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    cfg = json.loads((tmp_path / "dense32" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    with safe_open(str(tmp_path / "dense32" / "model.safetensors"), "pt") as fh:  # --dtype converts every float
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F32"}

    # the default dtype is the scales' (float16); exact up to float16 rounding
    merge_qalora(gptq4, peft_adapter, tmp_path / "dense16")
    sd = _read(tmp_path / "dense16")
    assert not any(k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for k in sd)
    expected = _expected_weights(gptq4, peft_adapter, lambda in_f, lp: (in_f / lp) / lp)
    for module, W in expected.items():
        got = sd[f"{module}.weight"]
        assert got.dtype == torch.float16
        assert (got.double() - W).abs().max().item() <= 2 ** -11 * W.abs().max().item()
    # unadapted quantized linears are dequantized too
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    AutoModelForCausalLM.from_pretrained(tmp_path / "dense16")


def test_merge_float_zeros_is_exact(gptq4, peft_adapter, tmp_path):
    for zdt, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        out = tmp_path / f"fz-{zdt}".replace("torch.", "")
        report = merge_qalora(gptq4, peft_adapter, out, to="float-zeros", zeros_dtype=zdt)
        assert report["exact"] is True and report["zeros_dtype"] == str(zdt).replace("torch.", "")
        check = verify_qalora_merge(gptq4, peft_adapter, out)
        assert check["max_abs_error"] <= tol * max(m["max_abs_weight"] for m in check["modules"])
        # independent expectation
        view = read_float_zeros(out)
        for module, W in _expected_weights(gptq4, peft_adapter, lambda in_f, lp: (in_f / lp) / lp).items():
            assert (view.get(f"{module}.weight", dtype=torch.float64) - W).abs().max().item() <= tol
    base_sd, sd = _read(gptq4), _read(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "loratool_float_zeros"
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert fh.metadata()["loratool_layout"] == "gptq-float-zeros/1"
    adapted = "model.layers.0.self_attn.q_proj"
    for leaf in ("qweight", "scales", "g_idx"):
        assert torch.equal(sd[f"{adapted}.{leaf}"], base_sd[f"{adapted}.{leaf}"])
    assert f"{adapted}.qzeros" not in sd and sd[f"{adapted}.zeros"].dtype == torch.float32
    untouched = "model.layers.0.self_attn.k_proj"
    assert torch.equal(sd[f"{untouched}.qzeros"], base_sd[f"{untouched}.qzeros"])
    assert torch.equal(sd["model.embed_tokens.weight"], base_sd["model.embed_tokens.weight"])
    # the reader presents the same tensor names as the dense output
    dense = tmp_path / "dense"
    merge_qalora(gptq4, peft_adapter, dense)
    assert sorted(view.keys()) == sorted(_read(dense))
    assert view.is_quantized(f"{adapted}.weight") and view.shape(f"{adapted}.weight") == (64, 64)
    with pytest.raises(FormatError, match="not a loratool float-zeros"):
        read_float_zeros(gptq4)
    assert is_gptq_checkpoint(out) and is_gptq_checkpoint(gptq4) and not is_gptq_checkpoint(BASES / "llama")


def test_float_zeros_output_through_peft_model(gptq4, peft_adapter, tmp_path):
    """A model built from the float-zeros reader gives PEFT's logits without any adapter."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "fz"
    merge_qalora(gptq4, peft_adapter, out, to="float-zeros")
    view = read_float_zeros(out)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(BASES / "llama")).float().eval()
    model.load_state_dict({k: view.get(k, dtype=torch.float32) for k in view.keys()}, strict=True)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _reference_model(gptq4, peft_adapter, 16)(ids).logits
        got = model(ids).logits
    assert (ref - got).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_merge_gptq_rounds_and_reports(gptq4, tmp_path):
    adapter = make_qalora_adapter(tmp_path / "small", pool_size=32, alpha=0.5)  # a small delta: nothing clamps
    out = tmp_path / "gptq"
    report = merge_qalora(gptq4, adapter, out, to="gptq", report_path=tmp_path / "report.json")
    assert report["exact"] is False
    assert json.loads((tmp_path / "report.json").read_text())["max_weight_error"] == report["max_weight_error"]
    assert any("no longer exact" in w for w in report["warnings"])
    base_sd, sd = _read(gptq4), _read(out)
    assert sorted(sd) == sorted(base_sd)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == json.loads((gptq4 / "config.json").read_text())["quantization_config"]
    check = verify_qalora_merge(gptq4, adapter, out)
    by_name = {m["name"]: m for m in check["modules"]}
    for m in report["modules"]:
        assert 0 < m["max_zero_rounding"] <= 0.5 and m["clamped"] == 0
        assert by_name[m["name"]]["max_abs_error"] == pytest.approx(m["max_weight_error"], rel=1e-9, abs=1e-12)
        prefix = m["tensor_prefix"]
        for leaf in ("qweight", "scales", "g_idx"):
            assert torch.equal(sd[f"{prefix}.{leaf}"], base_sd[f"{prefix}.{leaf}"])
        s_max = base_sd[f"{prefix}.scales"].double().max().item()
        assert m["max_weight_error"] <= s_max / 2 + 1e-12
        # the stored zeros are integers within the v1 range every reader agrees on
        z = G.unpack_qzeros(sd[f"{prefix}.qzeros"], 4, "v1")
        assert int(z.min()) >= 1 and int(z.max()) <= 15
    assert report["max_weight_error"] == max(m["max_weight_error"] for m in report["modules"])
    # the rounding really is a loss: the merge moved the zeros, but not by whole steps
    assert check["max_abs_error"] > 0


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_merge_every_bit_width_and_zero_format(bits, fmt, tmp_path):
    base = make_gptq_folder(tmp_path / "base", bits=bits, group_size=32, zero_format=fmt, sym=(bits == 4), targets=("q_proj", "down_proj"))
    assert read_quant_config(base).zero_format == fmt
    adapter = make_qalora_adapter(tmp_path / "ad", pool_size=32, targets=("q_proj", "down_proj"))
    merge_qalora(base, adapter, tmp_path / "fz", to="float-zeros", zeros_dtype=torch.float64)
    assert verify_qalora_merge(base, adapter, tmp_path / "fz")["max_abs_error"] <= 1e-12
    rep = merge_qalora(base, adapter, tmp_path / "gq", to="gptq")
    check = verify_qalora_merge(base, adapter, tmp_path / "gq")
    assert check["max_abs_error"] == pytest.approx(rep["max_weight_error"], rel=1e-9, abs=1e-12)
    lo, hi = G.safe_zero_range(bits, fmt)
    sd = _read(tmp_path / "gq")
    z = G.unpack_qzeros(sd["model.layers.1.mlp.down_proj.qzeros"], bits, fmt)
    assert lo <= int(z.min()) and int(z.max()) <= hi


@pytest.mark.parametrize("pooling,c_of", [
    (None, lambda in_f, lp: 1 / lp),  # original code, default: average
    ("avg", lambda in_f, lp: 1 / lp),
    ("sum", lambda in_f, lp: 1.0),
    ("peft", lambda in_f, lp: (in_f / lp) / lp),
])
def test_original_adapter_conventions(gptq4, tmp_path, pooling, c_of):
    adapter = make_qalora_adapter(tmp_path / "orig", convention="original", pool_size=32, alpha=2)
    report = merge_qalora(gptq4, adapter, tmp_path / "out", to="float-zeros", zeros_dtype=torch.float64, pooling=pooling)
    assert report["convention"]["pooling"] == (pooling or "avg")
    assert report["convention"]["pool_size"] == 32
    if pooling is None:
        assert any("no use_qalora" in w and "--pooling sum" in w for w in report["warnings"])
    else:
        assert report["convention"]["source"] == "--pooling option"
    view = read_float_zeros(tmp_path / "out")
    for module, W in _expected_weights(gptq4, adapter, c_of).items():
        assert (view.get(f"{module}.weight", dtype=torch.float64) - W).abs().max().item() <= 1e-12


def test_pooling_option_overrides_use_qalora_with_warning(gptq4, peft_adapter, tmp_path):
    report = merge_qalora(gptq4, peft_adapter, tmp_path / "out", pooling="avg", group_size=16)
    assert report["convention"]["pooling"] == "avg"
    assert any("use_qalora" in w and "--pooling avg" in w for w in report["warnings"])


# ----------------------------------------------------------------------------- refusals


def test_act_order_refused_for_low_bit_outputs(tmp_path):
    base = make_gptq_folder(tmp_path / "base", group_size=16, act_order=True)
    adapter = make_qalora_adapter(tmp_path / "ad", pool_size=16)
    for to in ("float-zeros", "gptq"):
        with pytest.raises(UnsupportedError, match="act-order") as exc:
            merge_qalora(base, adapter, tmp_path / to, to=to)
        assert "--to dense" in str(exc.value)
        assert not (tmp_path / to).exists()
    # dense does not fold anything: it merges exactly, and says why it could not stay low-bit
    report = merge_qalora(base, adapter, tmp_path / "dense", dtype=torch.float64)
    assert any("act-order" in w for w in report["warnings"])
    assert all(m["foldable"] is False for m in report["modules"])
    assert verify_qalora_merge(base, adapter, tmp_path / "dense")["max_abs_error"] <= 1e-12


def test_pool_size_not_multiple_of_group_size_refused(tmp_path):
    base = make_gptq_folder(tmp_path / "base", group_size=32)
    adapter = make_qalora_adapter(tmp_path / "ad", pool_size=16)
    with pytest.raises(UnsupportedError, match="Lp=16 is not a multiple of the quantization group size G=32"):
        merge_qalora(base, adapter, tmp_path / "out", to="gptq")


def test_input_refusals(gptq4, peft_adapter, tmp_path):
    dora = make_qalora_adapter(tmp_path / "dora", extra_config={"use_dora": True}, targets=("q_proj",),
                               extra_tensors={f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_magnitude_vector": torch.ones(64) for i in range(2)})
    with pytest.raises(UnsupportedError, match="DoRA"):
        merge_qalora(gptq4, dora, tmp_path / "o1")
    bias = make_qalora_adapter(tmp_path / "bias", extra_config={"lora_bias": True}, targets=("q_proj",),
                               extra_tensors={f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.bias": torch.ones(64) for i in range(2)})
    with pytest.raises(UnsupportedError, match="LoRA bias"):
        merge_qalora(gptq4, bias, tmp_path / "o2")
    with pytest.raises(ModuleMismatchError, match="pooling group size is 16, not --group-size 32"):
        merge_qalora(gptq4, peft_adapter, tmp_path / "o3", group_size=32)
    lying = make_qalora_adapter(tmp_path / "lying", pool_size=16, extra_config={"qalora_group_size": 32})
    with pytest.raises(FormatError, match="qalora_group_size is 32"):
        merge_qalora(gptq4, lying, tmp_path / "o4")
    with pytest.raises(FormatError, match="not a GPTQ checkpoint"):
        merge_qalora(BASES / "llama", peft_adapter, tmp_path / "o5")
    with pytest.raises(InputError, match="--to must be one of"):
        merge_qalora(gptq4, peft_adapter, tmp_path / "o6", to="awq")
    with pytest.raises(InputError, match="--pooling must be one of"):
        merge_qalora(gptq4, peft_adapter, tmp_path / "o7", pooling="max")
    merge_qalora(gptq4, peft_adapter, tmp_path / "fz", to="float-zeros")
    with pytest.raises(UnsupportedError, match="float-zeros checkpoint"):
        merge_qalora(tmp_path / "fz", peft_adapter, tmp_path / "o8")
    with pytest.raises(OutputExistsError):
        merge_qalora(gptq4, peft_adapter, tmp_path / "fz", to="float-zeros")
    merge_qalora(gptq4, peft_adapter, tmp_path / "fz", to="float-zeros", force=True)
    with pytest.raises(InputError, match="OUT must not be an input"):
        merge_qalora(gptq4, peft_adapter, gptq4 / "inside")
    other = make_gptq_folder(tmp_path / "awq", bits=4)
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "awq"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="not GPTQ"):
        merge_qalora(other, peft_adapter, tmp_path / "o9")
    cfg["quantization_config"].update(quant_method="gptq", checkpoint_format="marlin")
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="checkpoint_format 'marlin'"):
        merge_qalora(other, peft_adapter, tmp_path / "o10")


def test_adapter_for_another_model_refused(gptq4, tmp_path):
    adapter = make_qalora_adapter(tmp_path / "ad", pool_size=16, targets=("q_proj",))
    sd = _read(adapter)
    sd = {k: (t[:, :3].contiguous() if "lora_A" in k else t) for k, t in sd.items()}  # 3 columns do not divide 64 inputs
    from safetensors.torch import save_file

    save_file(sd, adapter / "adapter_model.safetensors")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.pop("qalora_group_size")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModuleMismatchError, match="does not divide the 64 inputs"):
        merge_qalora(gptq4, adapter, tmp_path / "out")


# ----------------------------------------------------------------------------- checkpoint variants


def test_autogptq_quantize_config_without_g_idx(tmp_path):
    base = make_gptq_folder(tmp_path / "base", config_in="quantize_config", write_g_idx=False, sym=True)
    qcfg = read_quant_config(base)
    assert qcfg.source == "quantize_config.json" and qcfg.zero_format == "v1"
    adapter = make_qalora_adapter(tmp_path / "ad", pool_size=16)
    merge_qalora(base, adapter, tmp_path / "fz", to="float-zeros", zeros_dtype=torch.float64)
    sd = _read(tmp_path / "fz")
    assert sd["model.layers.0.self_attn.q_proj.g_idx"].tolist() == (torch.arange(64) // 16).tolist()
    assert "model.layers.0.self_attn.k_proj.g_idx" not in sd  # untouched modules stay as they were
    assert verify_qalora_merge(base, adapter, tmp_path / "fz")["max_abs_error"] <= 1e-12
    merge_qalora(base, adapter, tmp_path / "gq", to="gptq")
    assert (tmp_path / "gq" / "quantize_config.json").is_file()
    assert not (tmp_path / "fz" / "quantize_config.json").exists()


def test_format_field_v2(tmp_path):
    base = make_gptq_folder(tmp_path / "base", zero_format="v2", format_key="format")
    assert read_quant_config(base).zero_format == "v2"


def test_bin_and_sharded_bases(tmp_path):
    adapter = make_qalora_adapter(tmp_path / "ad", pool_size=16)
    binb = make_gptq_folder(tmp_path / "bin", weights="bin")
    report = merge_qalora(binb, adapter, tmp_path / "o-bin", to="float-zeros", zeros_dtype=torch.float64)
    assert "model.safetensors" in report["files"]
    assert verify_qalora_merge(binb, adapter, tmp_path / "o-bin")["max_abs_error"] <= 1e-12
    sharded = make_gptq_folder(tmp_path / "sharded", weights="sharded")
    for to in ("dense", "gptq"):
        report = merge_qalora(sharded, adapter, tmp_path / f"o-{to}", to=to)
        index = json.loads((tmp_path / f"o-{to}" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
        assert sorted(index["weight_map"]) == sorted(_read(tmp_path / f"o-{to}"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "o-dense")


# ----------------------------------------------------------------------------- CLI


def test_cli_merge_qalora(gptq4, peft_adapter, tmp_path):
    code, out, err = invoke("merge", gptq4, peft_adapter, tmp_path / "gq", "--qalora", "--to", "gptq", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["to"] == "gptq" and report["convention"]["pooling"] == "peft"
    assert "no longer exact" in err
    code, out, err = invoke("merge", gptq4, peft_adapter, tmp_path / "dense", "--qalora", "--pooling", "peft", "--group-size", "16")
    assert code == 0, err
    assert "merged 6 QA-LoRA modules" in out and "exact" in out and "pooling peft Lp=16" in out
    assert (tmp_path / "dense" / "model.safetensors").is_file()


def test_cli_merge_qalora_refusals(tmp_path, gptq4, peft_adapter):
    act = make_gptq_folder(tmp_path / "act", act_order=True)
    code, _, err = invoke("merge", act, peft_adapter, tmp_path / "o1", "--qalora", "--to", "float-zeros")
    assert code == 2
    line = assert_one_line_error(err)
    assert "act-order" in line and "--to dense" in line
    coarse = make_gptq_folder(tmp_path / "g32", group_size=32)
    code, _, err = invoke("merge", coarse, peft_adapter, tmp_path / "o2", "--qalora", "--to", "gptq")
    assert code == 2 and "not a multiple of the quantization group size" in assert_one_line_error(err)
    code, _, err = invoke("merge", gptq4, peft_adapter, tmp_path / "o3", "--qalora", "--group-size", "32")
    assert code == 2 and "--group-size 32" in assert_one_line_error(err)
    code, _, err = invoke("merge", BASES / "llama", peft_adapter, tmp_path / "o4", "--qalora")
    assert code == 2 and "not a GPTQ checkpoint" in assert_one_line_error(err)
    code, _, err = invoke("merge", gptq4, peft_adapter, tmp_path / "o5", "--to", "gptq")
    assert code == 2 and "only with --qalora" in assert_one_line_error(err)
    dora = make_qalora_adapter(tmp_path / "dora", extra_config={"use_dora": True}, targets=("q_proj",),
                               extra_tensors={f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_magnitude_vector": torch.ones(64) for i in range(2)})
    code, _, err = invoke("merge", gptq4, dora, tmp_path / "o6", "--qalora")
    assert code == 2 and "DoRA" in assert_one_line_error(err)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))


def test_float_modules_and_modules_to_save(gptq4, tmp_path):
    """A pooled delta on a weight the base keeps in float, and a modules_to_save replacement."""
    gen = torch.Generator().manual_seed(5)
    extra = {
        "base_model.model.lm_head.lora_A.weight": torch.randn(4, 64 // 16, generator=gen),
        "base_model.model.lm_head.lora_B.weight": torch.randn(256, 4, generator=gen) * 0.1,
        "base_model.model.model.embed_tokens.modules_to_save.default.weight": torch.randn(256, 64, generator=gen),
    }
    adapter = make_qalora_adapter(tmp_path / "ad", pool_size=16, targets=("q_proj",), extra_tensors=extra)
    for to in ("dense", "float-zeros", "gptq"):
        report = merge_qalora(gptq4, adapter, tmp_path / to, to=to)
        sd = _read(tmp_path / to)
        head = [m for m in report["modules"] if m["name"] == "lm_head"][0]
        assert head["quantized"] is False and head["pool_size"] == 16
        base_head = _read(gptq4)["lm_head.weight"]
        expected = base_head.double() + 2.0 * (64 / 16 / 16) * (extra["base_model.model.lm_head.lora_B.weight"].double()
                                                            @ extra["base_model.model.lm_head.lora_A.weight"].double()).repeat_interleave(16, dim=1)
        assert sd["lm_head.weight"].dtype == torch.float16
        assert (sd["lm_head.weight"].double() - expected).abs().max().item() <= 2 ** -11 * expected.abs().max().item()
        assert torch.equal(sd["model.embed_tokens.weight"], extra["base_model.model.model.embed_tokens.modules_to_save.default.weight"].half())


@pytest.mark.parametrize("to", ["dense", "float-zeros"])
def test_cli_merge_qalora_verify_checks_the_outputs(gptq4, peft_adapter, tmp_path, to):
    """merge --qalora --verify runs the layer-streamed output check of OUT (its weights are codes)."""
    code, out, err = invoke("merge", gptq4, peft_adapter, tmp_path / "m", "--qalora", "--to", to, "--verify", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["verify"]["passed"] and report["verify"]["outputs"]["passed"]
