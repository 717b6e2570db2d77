"""Mixture-of-experts LoRA on fused expert parameters (PEFT ``target_parameters``), PEFT as the oracle.

Tiny random Qwen3-MoE, Mixtral, OLMoE (saved one expert at a time, as transformers 5 saves them)
and gpt-oss (saved fused, (E, in, out)) built from configs; adapters made by PEFT with
``init_lora_weights=False``; plus a Qwen3-MoE checkpoint stored fused (E, out, in).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import assert_one_line_error, invoke

import loratool
from loratool.engine.delta import experts_delta
from loratool.errors import FormatError, ModuleMismatchError
from loratool.merge import merge_model
from loratool.verify.weights import verify_weights

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
CONFIGS = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(SMALL, intermediate_size=64, moe_intermediate_size=24, num_experts=4,
                                         num_experts_per_tok=2, head_dim=8)),
    "mixtral": ("MixtralConfig", dict(SMALL, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(SMALL, intermediate_size=40, num_experts=4, num_experts_per_tok=2, eos_token_id=1,
                                  pad_token_id=0)),
    "gpt_oss": ("GptOssConfig", dict(SMALL, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=8)),
}


def _model(arch: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cls, kwargs = CONFIGS[arch]
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs)).eval()


def _adapter(model, folder, *, seed: int = 1, r: int = 3, alpha: int = 6, targets=("q_proj",), params=EXPERTS):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), target_parameters=list(params), init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """arch -> (base folder, adapter folder)."""
    root = tmp_path_factory.mktemp("moe")
    made = {}
    for arch in CONFIGS:
        _model(arch).save_pretrained(root / f"{arch}-base")
        targets = ("q_proj", "gate") if arch == "qwen3_moe" else ("q_proj",)  # the router as an ordinary linear
        made[arch] = (root / f"{arch}-base", _adapter(_model(arch), root / f"{arch}-lora", targets=targets))
    # Qwen3-MoE stored fused (E, out, in), as the model holds it
    from safetensors.torch import save_file

    fused = root / "qwen3_fused-base"
    fused.mkdir()
    model = _model("qwen3_moe")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(root / "qwen3_moe-base" / "config.json", fused / "config.json")
    made["qwen3_fused"] = (fused, made["qwen3_moe"][1])
    return made


def _peft(base, adapter):
    import transformers
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def _stored(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe", "gpt_oss", "qwen3_fused"])
def test_merge_equals_peft_and_logits_equal_unmerged(arch, moe, tmp_path):
    base, adapter = moe[arch]
    rep = merge_model(base, adapter, tmp_path / "m", force=True)
    assert rep["tensors"]["merged"] > 0
    pm = _peft(base, adapter)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    merged_sd = pm.merge_and_unload().state_dict()
    got = _stored(tmp_path / "m")
    base_sd = _stored(base)
    if arch in ("gpt_oss", "qwen3_fused"):  # stored as the model holds them: compare tensor by tensor
        for k, t in got.items():
            assert torch.allclose(t, merged_sd[k], atol=1e-6, rtol=1e-6), k
    changed = [k for k in got if "experts" in k and not torch.equal(got[k], base_sd[k])]
    assert changed and len(changed) == len([k for k in base_sd if "experts" in k and base_sd[k].is_floating_point()
                                            and not k.endswith("_bias")]), "every expert tensor carries its delta"
    import transformers

    mm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        out = mm(input_ids=ids).logits
    assert float((out - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "qwen3_fused"])
def test_verify_unmerge_and_a_planted_fault(arch, moe, tmp_path):
    base, adapter = moe[arch]
    merge_model(base, adapter, tmp_path / "m", force=True)
    assert verify_weights(base, adapter, tmp_path / "m")["passed"]
    merge_model(tmp_path / "m", adapter, tmp_path / "u", force=True, sign=-1)
    for k, t in _stored(tmp_path / "u").items():
        assert torch.allclose(t, _stored(base)[k], atol=1e-6), k
    # one expert of layer 1 without its delta: the check fails, naming that tensor
    from safetensors.torch import save_file

    sd = _stored(tmp_path / "m")
    key = next(k for k in sd if "layers.1" in k and "experts" in k and ("down" in k or "w2" in k))
    sd[key] = _stored(base)[key].clone()
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()
    save_file(sd, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    idx = tmp_path / "m" / "model.safetensors.index.json"
    if idx.exists():
        idx.unlink()
    rep = verify_weights(base, adapter, tmp_path / "m")
    assert not rep["passed"]
    assert any("layers.1" in f and "down_proj" in f for f in rep["failures"])


def test_inspect_reports_experts(moe):
    base, adapter = moe["gpt_oss"]
    code, out, err = invoke("inspect", adapter, "--base", base, "--json")
    assert code == 0, err
    report = json.loads(out)
    experts = [m for m in report["modules"] if m.get("experts")]
    assert len(experts) == 4  # gate_up and down in two layers
    for m in experts:
        assert m["experts"] == 4 and m["rank"] == 3 and m["orientation"] == "(E, in, out)"
        assert m["params_per_expert"] * 4 == m["params"] == 3 * 4 * (m["in_features"] + m["out_features"])
    pm = _peft(base, adapter)
    trainable = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert report["lora_params"] == trainable
    assert report["percent_of_base"] > 0
    code, out, err = invoke("inspect", adapter)
    assert code == 0 and "fused experts" in out and "per expert" in out


def test_router_lora_is_an_ordinary_linear(moe):
    ad = loratool.read_adapter(moe["qwen3_moe"][1])
    router = ad.modules["model.layers.0.mlp.gate"]
    assert not router.experts and router.rank == 3
    assert ad.modules["model.layers.0.mlp.experts.gate_up_proj"].experts == 4


def test_rerank_per_expert_is_optimal_and_loads_in_peft(moe, tmp_path):
    base, adapter = moe["qwen3_moe"]
    code, out, err = invoke("rerank", adapter, tmp_path / "r", "--rank", "2", "--json")
    assert code == 0, err
    before, after = loratool.read_adapter(adapter), loratool.read_adapter(tmp_path / "r")
    for name, m in before.modules.items():
        if not m.experts:
            continue
        D, D2 = experts_delta(m).double(), experts_delta(after.modules[name]).double()
        for e in range(m.experts):
            U, S, Vh = torch.linalg.svd(D[e])
            best = (U[:, :2] * S[:2]) @ Vh[:2]
            assert float((D2[e] - best).abs().max()) <= 1e-6 * float(best.abs().max())
    pm = _peft(base, tmp_path / "r")
    for full, mod in pm.named_modules():
        if type(mod).__name__ == "ParamWrapper" and mod.num_experts > 1:
            name = full.removeprefix("base_model.model.").replace(".base_layer", "") + "." + mod.parameter_name
            ref = experts_delta(after.modules[name]).double()
            assert torch.allclose(mod.get_delta_weight("default").double(), ref, atol=1e-7), name


def test_combine_cat_per_expert_is_exact(moe, tmp_path):
    base, first = moe["qwen3_moe"]
    second = _adapter(_model("qwen3_moe"), tmp_path / "second", seed=7, r=2, alpha=3)
    code, out, err = invoke("combine", first, second, tmp_path / "c", "--weights", "0.5,0.7")
    assert code == 0, err
    a, b, c = (loratool.read_adapter(p) for p in (first, second, tmp_path / "c"))
    for name, m in c.modules.items():
        if m.experts:
            expected = 0.5 * experts_delta(a.modules[name]).double() + 0.7 * experts_delta(b.modules[name]).double()
            assert torch.allclose(experts_delta(m).double(), expected, atol=1e-6), name
            assert m.rank == 5


def test_merge_several_moe_adapters_with_ties(moe, tmp_path):
    base, first = moe["gpt_oss"]
    second = _adapter(_model("gpt_oss"), tmp_path / "second", seed=9, r=2, alpha=4)
    code, out, err = invoke("merge", base, first, second, tmp_path / "m", "--method", "ties", "--density", "0.5", "--verify")
    assert code == 0, err


def test_expert_count_mismatch_is_refused(moe, tmp_path):
    import transformers

    cls, kwargs = CONFIGS["qwen3_moe"]
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**dict(kwargs, num_experts=8))).save_pretrained(tmp_path / "b8")
    code, out, err = invoke("merge", tmp_path / "b8", moe["qwen3_moe"][1], tmp_path / "m")
    assert code == 2
    line = assert_one_line_error(err)
    assert "4 experts" in line and "8" in line and "gate_up_proj" in line
    assert not (tmp_path / "m").exists()


def test_orientation_matching_neither_layout_is_refused(moe, tmp_path):
    from safetensors.torch import load_file, save_file

    base, adapter = moe["gpt_oss"]
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    sd = load_file(bad / "model.safetensors")
    key = "model.layers.0.mlp.experts.down_proj"
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1, sd[key].shape[2])
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModuleMismatchError, match=r"neither \(E, out, in\)"):
        merge_model(bad, adapter, tmp_path / "m")


def test_rank_not_dividing_lora_a_is_refused(moe, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "bad"
    shutil.copytree(moe["qwen3_moe"][1], adapter)
    sd = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in sd if k.endswith("experts.lora_A.weight"))
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])  # E * r + 1 rows
    b = key.replace("lora_A", "lora_B")
    sd[b] = torch.zeros(sd[b].shape[0], sd[b].shape[1] + 1)
    save_file(sd, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FormatError, match="not a multiple of the rank"):
        loratool.read_adapter(adapter)
    code, out, err = invoke("inspect", adapter)
    assert code == 2 and "not a multiple of the rank" in assert_one_line_error(err)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_convert_to_per_expert_and_back_is_exact(arch, moe, tmp_path):
    base, adapter = moe[arch]
    code, out, err = invoke("convert", adapter, tmp_path / "per", "--to", "peft", "--experts", "per-expert", "--base", base)
    assert code == 0, err
    fused, per = loratool.read_adapter(adapter), loratool.read_adapter(tmp_path / "per")
    leaves = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    assert not any(m.experts for m in per.modules.values())
    name = "model.layers.1.mlp.experts.gate_up_proj"
    stored = name.replace(".mlp.", ".block_sparse_moe.") if arch == "mixtral" else name
    prefix = stored.rpartition(".")[0]
    D = experts_delta(fused.modules[name]).double()  # (E, 2I, H)
    half = D.shape[1] // 2
    for e in range(D.shape[0]):
        gate = per.modules[f"{prefix}.{e}.{leaves[0]}"].delta(dtype=torch.float64)
        up = per.modules[f"{prefix}.{e}.{leaves[1]}"].delta(dtype=torch.float64)
        assert torch.allclose(torch.cat([gate, up]), D[e], atol=1e-7)
        assert gate.shape[0] == half
    # and back: PEFT loads the fused result, with the original adapter's outputs
    code, out, err = invoke("convert", tmp_path / "per", tmp_path / "back", "--to", "peft", "--experts", "fused", "--base", base)
    assert code == 0, err
    back = loratool.read_adapter(tmp_path / "back")
    assert torch.allclose(experts_delta(back.modules[name]).double(), D, atol=1e-6)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = _peft(base, adapter)(input_ids=ids).logits
        got = _peft(base, tmp_path / "back")(input_ids=ids).logits
    assert float((got - ref).abs().max()) <= 1e-5


def test_formats_without_an_experts_layout_refuse_with_the_way_out(moe, tmp_path):
    base, adapter = moe["qwen3_moe"]
    code, out, err = invoke("convert", adapter, tmp_path / "x", "--to", "mlx", "--base", base)
    assert code == 2
    assert "--experts per-expert" in assert_one_line_error(err)
    assert not (tmp_path / "x").exists()


def test_rescale_keeps_every_expert_delta(moe, tmp_path):
    adapter = moe["qwen3_moe"][1]
    code, out, err = invoke("rescale", adapter, tmp_path / "r", "--alpha", "12")
    assert code == 0, err
    a, b = loratool.read_adapter(adapter), loratool.read_adapter(tmp_path / "r")
    for name, m in a.modules.items():
        assert b.modules[name].alpha == 12.0
        assert torch.allclose(b.modules[name].delta(dtype=torch.float64), m.delta(dtype=torch.float64), atol=1e-6), name
