"""merge / verify / combine with several adapters at once: linear, TIES, DARE, magnitude pruning.

The oracles: PEFT's ``merge_utils`` applied to PEFT's own dense deltas (``get_delta_weight``) for
ties and magnitude_prune; the DARE formula with the mask loratool drew; the weighted sum of PEFT's
deltas (and one merge after another) for linear; PEFT's ``add_weighted_adapter`` for the svd variants.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch
from _merge_helpers import load_dir
from _oracle import peft_deltas
from conftest import ADAPTERS, BASES, ROOT, assert_one_line_error, invoke, run_cli

import loratool
from loratool.engine.combine import CombinedTerm, CombineSpec, combined_delta, dare_mask
from loratool.merge import merge_model

# different ranks, alphas, rsLoRA, partly overlapping target sets
LLAMA = ["llama-lora", "llama-rslora", "llama-layers"]
WEIGHTS = [0.6, 0.3, 0.5]


def _weight_key(module: str) -> str:
    return f"{module}.weight"


def _peft_task_vectors(base: str, adapters: list[str]) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """weight name -> [(adapter index, PEFT's delta in the stored layout)], float32."""
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for i, a in enumerate(adapters):
        for name, d in peft_deltas(base, ADAPTERS / a if not str(a).startswith("/") else a).items():
            out.setdefault(_weight_key(name), []).append((i, d))
    return out


def _merge(tmp_path, adapters, base="llama", name="out", **spec):
    paths = [ADAPTERS / a if isinstance(a, str) else a for a in adapters]
    masks: dict = {}
    combine = CombineSpec.checked(len(paths), **spec)
    rep = merge_model(BASES / base, paths, tmp_path / name, combine=combine, force=True,
                      mask_hook=lambda t, i, m: masks.__setitem__((t, i), m.clone()))
    return load_dir(tmp_path / name), rep, masks


def _check_merged(merged, base_tensors, expected, *, tol=2e-6):
    """merged = base + expected delta, rounded once (float32 base: to float32 rounding)."""
    for key, d in expected.items():
        ref = base_tensors[key].float() + d
        err = float((merged[key].float() - ref).abs().max())
        assert err <= tol * max(1.0, float(ref.abs().max())), (key, err)
    for key in set(base_tensors) - set(expected):
        assert torch.equal(merged[key], base_tensors[key]), key


@pytest.mark.parametrize("method, sign_rule", [("ties", "total"), ("ties", "frequency"), ("magnitude_prune", "total")])
def test_ties_and_magnitude_prune_equal_peft_merge_utils(method, sign_rule, tmp_path):
    from peft.utils import merge_utils

    merged, rep, _ = _merge(tmp_path, LLAMA, method=method, weights=WEIGHTS, density=0.4, majority_sign=sign_rule)
    base = load_dir(BASES / "llama")
    expected = {}
    for key, parts in _peft_task_vectors("llama", LLAMA).items():
        deltas = [d for _, d in parts]
        w = torch.tensor([WEIGHTS[i] for i, _ in parts])
        if method == "ties":
            expected[key] = merge_utils.ties(deltas, w, 0.4, sign_rule)
        else:
            expected[key] = merge_utils.magnitude_prune(deltas, w, 0.4)
    _check_merged(merged, base, expected)
    assert rep["combination"]["method"] == method and len(rep["combined"]) == len(expected)
    for row in rep["combined"]:
        assert all(abs(k - 0.4) < 0.01 for k in row["kept_fraction"])
        if method == "ties":
            assert 0.0 <= row["outvoted"] < 0.5


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_formula_with_the_mask_drawn(method, tmp_path):
    from peft.utils import merge_utils

    merged, rep, masks = _merge(tmp_path, LLAMA, method=method, weights=WEIGHTS, density=0.3, seed=7)
    base = load_dir(BASES / "llama")
    expected = {}
    for key, parts in _peft_task_vectors("llama", LLAMA).items():
        pruned = torch.stack([d * masks[(key, i)] / 0.3 for i, d in parts])  # (n, out, in)
        w = torch.tensor([WEIGHTS[i] for i, _ in parts]).view(-1, 1, 1)
        if method == "dare_linear":
            expected[key] = (pruned * w).sum(0)
        else:
            expected[key] = merge_utils.disjoint_merge(pruned * w, merge_utils.calculate_majority_sign_mask(pruned, "total"))
    _check_merged(merged, base, expected)
    assert rep["combination"] == {"method": method, "weights": WEIGHTS, "density": 0.3, "seed": 7,
                                  **({"majority_sign": "total"} if method == "dare_ties" else {})}


def test_dare_same_seed_same_bytes_other_seed_differs(tmp_path):
    def digest(folder):
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        _merge(tmp_path, LLAMA, name=name, method="dare_ties", weights=WEIGHTS, density=0.5, seed=seed)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


@pytest.mark.parametrize("strip", [False, True])
def test_dare_draws_the_same_masks_in_merge_and_combine(strip, tmp_path):
    """One seed, one DARE: ``merge BASE A1 A2 --method dare_linear`` equals ``combine A1 A2 --method
    dare_linear --rank <full>`` merged, also into a base that stores the weights without the adapter's
    ``model.`` prefix (the masks are drawn for the module's name, not for the base's key)."""
    from safetensors.torch import load_file, save_file

    base = BASES / "llama"
    if strip:  # the same weights under other keys: layers.0.self_attn.q_proj.weight ...
        base = tmp_path / "bare"
        base.mkdir()
        for f in (BASES / "llama").iterdir():
            if f.suffix == ".safetensors":
                save_file({k.removeprefix("model."): v for k, v in load_file(f).items()}, base / f.name, metadata={"format": "pt"})
            elif f.is_file():
                (base / f.name).write_bytes(f.read_bytes())
    spec = {"method": "dare_linear", "weights": [0.6, 0.3], "density": 0.5, "seed": 7}
    merge_model(base, [ADAPTERS / a for a in LLAMA[:2]], tmp_path / "direct", combine=CombineSpec.checked(2, **spec), force=True)
    combined, _ = loratool.combine([loratool.read_adapter(ADAPTERS / a) for a in LLAMA[:2]], rank=64, **spec)
    loratool.write_adapter(combined, tmp_path / "combined")
    merge_model(base, tmp_path / "combined", tmp_path / "via", force=True)
    direct, via, plain = load_dir(tmp_path / "direct"), load_dir(tmp_path / "via"), load_dir(base)
    changed = [k for k in plain if not torch.equal(direct[k], plain[k])]
    assert len(changed) >= 14
    for k in changed:
        torch.testing.assert_close(via[k], direct[k], rtol=1e-5, atol=1e-6)


def test_dare_mask_is_independent_of_threads_and_device_of_computation():
    m1 = dare_mask("model.layers.0.self_attn.q_proj.weight", 1, (64, 48), 0.25, seed=11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        m2 = dare_mask("model.layers.0.self_attn.q_proj.weight", 1, (64, 48), 0.25, seed=11)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, dare_mask("model.layers.0.self_attn.q_proj.weight", 2, (64, 48), 0.25, seed=11))


def test_dare_kept_fraction_and_expectation_across_seeds():
    """Across seeds the kept fraction is within binomial error of the density, and the mean of the
    rescaled deltas tends to the linear sum (DARE's unbiasedness)."""
    ad = [loratool.read_adapter(ADAPTERS / a) for a in LLAMA[:2]]
    name = "model.layers.0.self_attn.q_proj"
    parts = tuple((i, a.modules[name]) for i, a in enumerate(ad))
    linear, _ = combined_delta(CombinedTerm("w", parts, CombineSpec.checked(2, weights=WEIGHTS[:2])))
    n, density, seeds = linear.numel(), 0.3, 200
    total = torch.zeros_like(linear)
    for seed in range(seeds):
        spec = CombineSpec.checked(2, method="dare_linear", weights=WEIGHTS[:2], density=density, seed=seed)
        d, st = combined_delta(CombinedTerm("w", parts, spec))
        for kept in st.kept_fraction:
            assert abs(kept - density) <= 5 * math.sqrt(density * (1 - density) / n)
        total += d
    mean = total / seeds
    # per entry, the mean of `seeds` draws has std sqrt((1-p)/p) * |x| / sqrt(seeds); over the tensor
    spread = math.sqrt((1 - density) / density / seeds)
    assert float(torch.linalg.vector_norm(mean - linear) / torch.linalg.vector_norm(linear)) < 3 * spread


def test_linear_equals_peft_weighted_sum_and_sequential_merges(tmp_path):
    merged, rep, _ = _merge(tmp_path, LLAMA, weights=[1.0, 1.0, 1.0])
    base = load_dir(BASES / "llama")
    expected = {k: sum(d for _, d in parts) for k, parts in _peft_task_vectors("llama", LLAMA).items()}
    _check_merged(merged, base, expected)
    # one after another: base + A1, then + A2, then + A3
    prev = BASES / "llama"
    for i, a in enumerate(LLAMA):
        merge_model(prev, ADAPTERS / a, tmp_path / f"seq{i}", force=True)
        prev = tmp_path / f"seq{i}"
    seq = load_dir(prev)
    for key in merged:
        assert torch.allclose(merged[key], seq[key], atol=2e-6, rtol=2e-6), key
    assert "weights" in rep["combination"] and rep["combination"]["method"] == "linear"


def _peft_adapter(tmp_path, base: str, name: str, seed: int, **config):
    """A PEFT adapter made by PEFT itself (init_lora_weights=False) on a fixture base."""
    from _oracle import load_base_model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(load_base_model(base), LoraConfig(init_lora_weights=False, **config))
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_gpt2_conv1d_and_embeddings(tmp_path):
    """Conv1D (stored (in, out)) and embedding LoRA, with ties: PEFT's deltas in the stored layout."""
    from peft.utils import merge_utils

    second = _peft_adapter(tmp_path, "gpt2", "gpt2-second", 5, r=3, lora_alpha=5, target_modules=["c_attn", "c_fc", "wte"],
                           fan_in_fan_out=True)
    adapters = [ADAPTERS / "gpt2-lora", second]
    merged, _, _ = _merge(tmp_path, adapters, base="gpt2", method="ties", weights=[0.8, 0.4], density=0.5)
    base = load_dir(BASES / "gpt2")
    expected = {}
    for key, parts in _peft_task_vectors("gpt2", [str(a) for a in adapters]).items():
        key = key if key in base else f"transformer.{key}" if f"transformer.{key}" in base else key.removeprefix("transformer.")
        expected[key] = merge_utils.ties([d for _, d in parts], torch.tensor([[0.8, 0.4][i] for i, _ in parts]), 0.5, "total")
    assert any(".wte." in k or k.endswith("wte.weight") for k in expected)
    _check_merged(merged, base, expected)


def test_verify_proves_a_combined_merge_and_catches_another_seed(tmp_path):
    args = ["--method", "dare_ties", "--density", "0.5", "--weights", "0.6,0.3,0.5", "--seed", "9"]
    code, out, err = invoke("merge", BASES / "llama", *(ADAPTERS / a for a in LLAMA), tmp_path / "m", *args, "--verify", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["verify"]["passed"] and rep["verify"]["summary"]["modules"] == len(rep["combined"])
    code, out, err = invoke("verify", BASES / "llama", tmp_path / "m", "--adapters", *(ADAPTERS / a for a in LLAMA), *args)
    assert code == 0, err
    wrong = [a if a != "9" else "10" for a in args]
    code, out, err = invoke("verify", BASES / "llama", tmp_path / "m", "--adapters", *(ADAPTERS / a for a in LLAMA), *wrong)
    assert code == 1
    assert "combined delta" in err


def test_merge_several_prints_a_table_and_report(tmp_path):
    code, out, err = invoke("merge", BASES / "llama", *(ADAPTERS / a for a in LLAMA[:2]), tmp_path / "m",
                            "--method", "ties", "--density", "0.5", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "ties of 2 adapters" in out and "outvoted" in out
    report = json.loads((tmp_path / "r.json").read_text())
    row = next(r for r in report["combined"] if r["adapters"] == [0, 1])
    assert {"delta_norms", "kept_fraction", "dropped_norms", "outvoted", "combined_norm", "weight_norm"} <= set(row)


@pytest.mark.parametrize(
    "adapters, args, needle",
    [
        (["llama-lora", "llama-rslora"], ["--weights", "1,2,3"], "3 weights for 2 adapters"),
        (["llama-lora", "llama-rslora"], ["--method", "ties"], "needs --density"),
        (["llama-lora", "llama-rslora"], ["--method", "ties", "--density", "0"], "(0, 1]"),
        (["llama-lora", "llama-rslora"], ["--method", "dare_linear", "--density", "1.5"], "(0, 1]"),
        (["llama-lora", "llama-rslora"], ["--method", "bogus"], "bogus"),
        (["llama-lora", "llama-dora"], [], "DoRA"),
        (["llama-lora", "llama-embedding"], ["--method", "ties", "--density", "0.5"], None),
    ],
)
def test_bad_input_exit_2_one_line_no_out(adapters, args, needle, tmp_path):
    code, out, err = invoke("merge", BASES / "llama", *(ADAPTERS / a for a in adapters), tmp_path / "m", *args)
    if needle is None:  # a valid combination (embedding + linear): accepted
        assert code == 0, err
        return
    assert code == 2, (out, err)
    assert_one_line_error(err)
    assert needle in err
    assert not (tmp_path / "m").exists()


def test_sparsifying_method_refuses_modules_to_save_and_says_why(tmp_path):
    second = _peft_adapter(tmp_path, "roberta", "roberta-second", 3, r=2, lora_alpha=4, target_modules=["query", "value"],
                           modules_to_save=["classifier"], task_type="SEQ_CLS")
    code, out, err = invoke("merge", BASES / "roberta", ADAPTERS / "roberta-cls", second, tmp_path / "m",
                            "--method", "ties", "--density", "0.5")
    assert code == 2
    assert_one_line_error(err)
    assert "modules_to_save" in err and "not a delta" in err
    assert not (tmp_path / "m").exists()


def test_different_bases_name_module_and_shapes(tmp_path):
    """An adapter made for a narrower Llama: refused before anything is written, naming the module and both shapes."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    small = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=128))
    get_peft_model(small, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(tmp_path / "small")
    code, out, err = invoke("merge", BASES / "llama", ADAPTERS / "llama-lora", tmp_path / "small", tmp_path / "m")
    assert code == 2
    line = assert_one_line_error(err)
    assert "adapters for different bases" in line and "q_proj" in line and "64x64" in line and "32x32" in line
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("method", ["ties", "dare_ties", "magnitude_prune"])
def test_combine_sparsified_is_the_optimal_truncation_of_the_combined_delta(method, tmp_path):
    code, out, err = invoke("combine", *(ADAPTERS / a for a in LLAMA), tmp_path / "c", "--method", method,
                            "--density", "0.4", "--rank", "3", "--weights", "0.6,0.3,0.5", "--seed", "2", "--json")
    assert code == 0, err
    report = json.loads(out)
    got = loratool.read_adapter(tmp_path / "c")
    ads = [loratool.read_adapter(ADAPTERS / a) for a in LLAMA]
    spec = CombineSpec.checked(3, method=method, weights=WEIGHTS, density=0.4, seed=2)
    for row in report["modules"]:
        name = row["name"]
        parts = tuple((i, a.modules[name]) for i, a in enumerate(ads) if name in a.modules)
        D, _ = combined_delta(CombinedTerm(f"{name}.weight", parts, spec), layout="out_in")
        U, S, Vh = torch.linalg.svd(D.double())
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        mine = got.modules[name].delta(dtype=torch.float64)
        assert float((mine - best).abs().max()) <= 1e-5 * float(best.abs().max()), name
        err_ref = float(torch.linalg.vector_norm(D.double() - best) / torch.linalg.vector_norm(D.double()))
        assert abs(row["relative_error"] - err_ref) < 1e-6
        assert got.modules[name].rank == 3


def test_combine_ties_svd_equals_peft_ties_svd(tmp_path):
    """PEFT's *_svd variants work on whole deltas: its ties_svd equals combine --method ties --rank R."""
    from _oracle import load_base_model
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    pm = PeftModel.from_pretrained(load_base_model("llama"), str(ADAPTERS / "llama-lora"), adapter_name="a")
    pm.load_adapter(str(ADAPTERS / "llama-layers"), adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.7, 0.4], "c", combination_type="ties_svd", svd_rank=4, density=0.5)
    code, out, err = invoke("combine", ADAPTERS / "llama-lora", ADAPTERS / "llama-layers", tmp_path / "c", "--method", "ties",
                            "--density", "0.5", "--rank", "4", "--weights", "0.7,0.4")
    assert code == 0, err
    mine = loratool.read_adapter(tmp_path / "c")
    checked = 0
    for full, layer in pm.named_modules():
        if not isinstance(layer, LoraLayer) or "c" not in layer.lora_A:
            continue
        name = full.removeprefix("base_model.model.")
        ref = layer.get_delta_weight("c").double()
        got = mine.modules[name].delta(dtype=torch.float64)
        assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max()), name
        checked += 1
    assert checked == len(mine.modules)


def test_combine_refuses_density_with_cat_and_unknown_method(tmp_path):
    code, _, err = invoke("combine", ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora", tmp_path / "c", "--density", "0.5")
    assert code == 2 and "--density applies to" in err
    assert not (tmp_path / "c").exists()


def test_merge_help_lists_methods_without_torch(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None  # import torch raises ImportError\n")
    proc = run_cli("merge", "--help", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert proc.returncode == 0, proc.stderr
    for m in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        assert m in proc.stdout
