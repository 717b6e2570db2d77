"""verify --outputs, layer-streamed, for several adapters merged together and for fused MoE expert LoRA.

Several adapters: the unmerged side applies their combined delta D of each weight (the merge's own
spec: DARE's masks come from the seed) as x D^T; with linear weights 1 it is PEFT with both adapters
active. Experts: the unmerged side holds each fused expert parameter as W + dW, which is PEFT's own
ParamWrapper forward; Qwen3-MoE checkpoints store one expert at a time, gpt-oss the fused (E, in, out).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _oracle import load_base_model
from conftest import ADAPTERS, BASES, assert_one_line_error, invoke
from safetensors.torch import load_file, save_file

from loratool.engine.combine import CombineSpec
from loratool.merge import merge_model
from loratool.verify import verify_outputs
from loratool.verify.layered import unmerged_outputs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _close(ours: torch.Tensor, theirs: torch.Tensor, plain: torch.Tensor) -> None:
    """Equal to float32 rounding, and the adapter's effect far beyond it."""
    assert ours.shape == theirs.shape
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=64 * torch.finfo(torch.float32).eps * scale)
    assert float((plain - theirs).abs().max()) > 1e-3 * scale


def _peft_outputs(pm, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(PEFT's outputs with its active adapters, the base's) on the inputs, (tokens, vocab)."""
    with torch.no_grad():
        ys = torch.cat([pm(**b).logits.reshape(-1, pm.config.vocab_size) for b in inputs])
        with pm.disable_adapter():
            plain = torch.cat([pm(**b).logits.reshape(-1, pm.config.vocab_size) for b in inputs])
    return ys, plain


def _edit(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    fn(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# ----------------------------------------------------------------------------- several adapters

LLAMA = [ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora", ADAPTERS / "llama-layers"]
SPECS = {
    "linear": {"weights": [0.6, 0.3, 0.5]},
    "ties": {"weights": [0.6, 0.3, 0.5], "density": 0.5},
    "dare_ties": {"weights": [0.6, 0.3, 0.5], "density": 0.5, "seed": 9},
}


def test_combined_reference_equals_peft_with_both_adapters_active():
    """linear, weights 1: the unmerged side is PEFT running both adapters at once."""
    from peft import PeftModel

    spec = CombineSpec.checked(2)
    inputs, ours = unmerged_outputs(BASES / "llama", LLAMA[:2], combine=spec)
    pm = PeftModel.from_pretrained(load_base_model("llama"), str(LLAMA[0]), adapter_name="a").eval()
    pm.load_adapter(str(LLAMA[1]), adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    theirs, plain = _peft_outputs(pm, inputs)
    _close(ours, theirs, plain)


@pytest.fixture(scope="module")
def gpt2_second(tmp_path_factory):
    """A second GPT-2 adapter: Conv1D layers and the token embedding."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    folder = tmp_path_factory.mktemp("gpt2-second") / "adapter"
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True, init_lora_weights=False)
    get_peft_model(load_base_model("gpt2"), cfg).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["gpt2", "qwen2"])
def test_combined_conv1d_embedding_and_lora_bias_equal_peft(case, gpt2_second, tmp_path):
    """Conv1D and embedding terms (x D^T, D[ids]) and lora_bias: PEFT with both adapters active; the merge passes."""
    from peft import PeftModel

    base, adapters = ("gpt2", [ADAPTERS / "gpt2-lora", gpt2_second]) if case == "gpt2" else ("qwen2", [ADAPTERS / "qwen2-bias", ADAPTERS / "qwen2-lora"])
    spec = CombineSpec.checked(2)
    inputs, ours = unmerged_outputs(BASES / base, adapters, combine=spec)
    pm = PeftModel.from_pretrained(load_base_model(base), str(adapters[0]), adapter_name="a").eval()
    pm.load_adapter(str(adapters[1]), adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    theirs, plain = _peft_outputs(pm, inputs)
    _close(ours, theirs, plain)
    merge_model(BASES / base, adapters, tmp_path / "m", combine=spec, dtype="bfloat16", force=True)
    assert verify_outputs(BASES / base, adapters, tmp_path / "m", combine=spec)["passed"]


@pytest.mark.parametrize("method", list(SPECS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_combined_merges_pass_every_stage(tmp_path, method, dtype):
    spec = CombineSpec.checked(3, method=method, **SPECS[method])
    merge_model(BASES / "llama", LLAMA, tmp_path / "m", combine=spec, dtype=dtype, force=True)
    report = verify_outputs(BASES / "llama", LLAMA, tmp_path / "m", combine=spec)
    assert report["passed"] and all(s["passed"] for s in report["layers"]), report
    assert report["combine"]["method"] == method and report["adapters"] == [str(a) for a in LLAMA]
    assert report["first_divergent"] is None


@pytest.fixture(scope="module")
def layer1_adapters(tmp_path_factory):
    """Two adapters that touch layer 1 only (PEFT's layers_to_transform)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("layer1")
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "v_proj", "down_proj"], layers_to_transform=[1], init_lora_weights=False)
    get_peft_model(load_base_model("llama"), cfg).save_pretrained(root / "second")
    return [ADAPTERS / "llama-layers", root / "second"]


@pytest.mark.parametrize("wrong", [{"seed": 10}, {"density": 0.6}])
def test_another_seed_or_density_fails_at_the_first_layer_touched(tmp_path, layer1_adapters, wrong):
    good = {"method": "dare_ties", "weights": [0.7, 0.4], "density": 0.5, "seed": 9}
    merge_model(BASES / "llama", layer1_adapters, tmp_path / "m", combine=CombineSpec.checked(2, **good), force=True)
    ok = verify_outputs(BASES / "llama", layer1_adapters, tmp_path / "m", combine=CombineSpec.checked(2, **good))
    assert ok["passed"], ok
    report = verify_outputs(BASES / "llama", layer1_adapters, tmp_path / "m", combine=CombineSpec.checked(2, **{**good, **wrong}))
    assert not report["passed"]
    assert report["first_divergent_layer"] == 1 and report["first_divergent"] == "model.layers.1"
    assert all(s["passed"] for s in report["layers"][:2])  # embeddings, layer 0: untouched


def test_cli_several_adapters_outputs(tmp_path):
    args = ["--method", "dare_ties", "--density", "0.5", "--weights", "0.6,0.3,0.5", "--seed", "9"]
    code, out, err = invoke("merge", BASES / "llama", *LLAMA, tmp_path / "m", *args, "--verify", "outputs", "--json")
    assert code == 0, err
    rep = json.loads(out)["verify"]
    assert rep["passed"] and rep["outputs"]["passed"] and rep["outputs"]["combine"]["seed"] == 9
    code, out, err = invoke("verify", BASES / "llama", tmp_path / "m", "--adapters", *LLAMA, *args, "--outputs")
    assert code == 0, err
    wrong = [a if a != "9" else "10" for a in args]
    code, out, err = invoke("verify", BASES / "llama", tmp_path / "m", "--adapters", *LLAMA, *wrong, "--outputs")
    assert code == 1
    assert "first diverging at model.layers.0" in assert_one_line_error(err)


# ----------------------------------------------------------------------------- MoE expert LoRA

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
MOE = {  # per-expert checkpoints (transformers 5 saves them one expert at a time), and gpt-oss's fused (E, in, out)
    "qwen3_moe": ("Qwen3MoeConfig", dict(SMALL, intermediate_size=64, moe_intermediate_size=24, num_experts=4,
                                         num_experts_per_tok=2, head_dim=8)),
    "mixtral": ("MixtralConfig", dict(SMALL, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", dict(SMALL, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=8)),
}


def _moe_model(arch: str):
    import transformers

    torch.manual_seed(0)
    cls, kwargs = MOE[arch]
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs)).eval()


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """arch -> (base folder, adapter folder): q_proj (and Qwen3-MoE's router) plus both fused expert parameters."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("moe")
    made = {}
    for arch in MOE:
        _moe_model(arch).save_pretrained(root / f"{arch}-base")
        targets = ["q_proj", "gate"] if arch == "qwen3_moe" else ["q_proj"]
        for seed, name in ((1, "lora"), (2, "second")):
            torch.manual_seed(seed)
            cfg = LoraConfig(r=seed + 2, lora_alpha=6, target_modules=targets, target_parameters=EXPERTS, init_lora_weights=False)
            get_peft_model(_moe_model(arch), cfg).save_pretrained(root / f"{arch}-{name}")
        made[arch] = (root / f"{arch}-base", root / f"{arch}-lora")
    return made


@pytest.mark.parametrize("arch", list(MOE))
def test_unmerged_experts_equal_peft(moe, arch):
    """Fused experts held as W + dW (assembled from per-expert tensors where stored so) are PeftModel's forward."""
    import transformers
    from peft import PeftModel

    base, adapter = moe[arch]
    inputs, ours = unmerged_outputs(base, adapter)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs, plain = _peft_outputs(PeftModel.from_pretrained(model, str(adapter)).eval(), inputs)
    _close(ours, theirs, plain)


@pytest.mark.parametrize("arch", list(MOE))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_then_verify_outputs_passes(moe, arch, dtype, tmp_path):
    base, adapter = moe[arch]
    code, _, err = invoke("merge", base, adapter, tmp_path / "m", "--dtype", dtype)
    assert code == 0, err
    code, out, err = invoke("verify", base, adapter, tmp_path / "m", "--outputs", "--json")
    assert code == 0, err
    rep = json.loads(out)["outputs"]
    assert rep["passed"] and all(s["passed"] for s in rep["layers"]) and len(rep["layers"]) == 4


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_fault_in_one_expert_of_layer_1_is_named(moe, arch, tmp_path):
    base, adapter = moe[arch]
    merge_model(base, adapter, tmp_path / "m", force=True)
    W = load_file(base / "model.safetensors")

    def plant(sd):  # expert 2's delta in layer 1's down_proj applied twice
        if arch == "gpt_oss":
            key = "model.layers.1.mlp.experts.down_proj"
            sd[key][2] = 2 * sd[key][2] - W[key][2]
        else:
            key = "model.layers.1.mlp.experts.2.down_proj.weight"
            sd[key] = 2 * sd[key] - W[key]

    bad = _edit(tmp_path / "m", tmp_path / "bad", plant)
    report = verify_outputs(base, adapter, bad)
    assert not report["passed"]
    assert report["first_divergent_layer"] == 1 and report["first_divergent"] == "model.layers.1"
    assert all(s["passed"] for s in report["layers"][:2])


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("method", ["linear", "dare_ties"])
def test_several_moe_adapters(moe, arch, method, tmp_path):
    """Two expert adapters combined: per-expert terms (Qwen3-MoE) or the fused term (gpt-oss), the same masks."""
    base, adapter = moe[arch]
    adapters = [adapter, adapter.with_name(f"{arch}-second")]
    spec = CombineSpec.checked(2, method=method, weights=[0.7, 0.5], **({"density": 0.5, "seed": 4} if method != "linear" else {}))
    merge_model(base, adapters, tmp_path / "m", combine=spec, force=True)
    report = verify_outputs(base, adapters, tmp_path / "m", combine=spec)
    assert report["passed"] and all(s["passed"] for s in report["layers"]), report
    if method != "linear":
        other = verify_outputs(base, adapters, tmp_path / "m", combine=CombineSpec.checked(2, method=method, weights=[0.7, 0.5], density=0.5, seed=5))
        assert not other["passed"] and other["first_divergent_layer"] == 0
