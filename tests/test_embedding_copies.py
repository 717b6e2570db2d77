"""Saved base-layer copies (PEFT ``save_embedding_layers``) through convert: dropped when
identical to the base, refused when they differ or no base can vouch for them, kept for PEFT."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _convert_helpers import assert_same_peft, peft_deltas
from _oracle import load_base_model
from conftest import ADAPTERS, BASES, assert_one_line_error, invoke

import loratool
from loratool.base import BaseModel
from loratool.conversion import convert
from loratool.errors import UnsupportedError

LLAMA = BASES / "llama"
WEIGHTS = "adapter_model.safetensors"
EMBED_COPY = "base_model.model.model.embed_tokens.base_layer.weight"
HEAD_COPY = "base_model.model.lm_head.base_layer.weight"
# target format -> (OUT name, the adapter it takes: LitGPT has no embedding LoRA)
TARGETS = {"mlx": ("mlx", "heads"), "gguf": ("a.gguf", "heads"), "litgpt": ("litgpt", "head")}
SPECS = {
    "heads": ["q_proj", "v_proj", "embed_tokens", "lm_head"],
    "head": ["q_proj", "v_proj", "lm_head"],
}


def _save_peft(out: Path, targets, *, seed: int, vocab: int | None = None) -> Path:
    """A PEFT adapter on the tiny Llama, saved with save_embedding_layers=True (B not zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_base_model("llama")
    if vocab is not None:
        model.resize_token_embeddings(vocab)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=list(targets)))
    peft_model.save_pretrained(out, save_embedding_layers=True)
    (out / "README.md").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """name -> adapter folder: "heads", "head" (targeted embeddings), "resized" (vocabulary 288),
    "untargeted" (attention only; the embedding layers saved whole)."""
    root = tmp_path_factory.mktemp("copies")
    out = {name: _save_peft(root / name, targets, seed=i) for i, (name, targets) in enumerate(SPECS.items())}
    out["resized"] = _save_peft(root / "resized", SPECS["heads"], seed=7, vocab=288)
    out["untargeted"] = _save_peft(root / "untargeted", ["q_proj", "v_proj"], seed=8)
    return out


def _edited(src: Path, dest: Path, *, tensors=None, config=None) -> Path:
    """A copy of the adapter folder ``src`` with some tensors / config fields replaced."""
    shutil.copytree(src, dest)
    if tensors:
        sd = load_file(dest / WEIGHTS)
        sd.update(tensors)
        save_file(sd, dest / WEIGHTS, metadata={"format": "pt"})
    if config:
        cfg = json.loads((dest / "adapter_config.json").read_text())
        cfg.update(config)
        (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


def _base_tensor(key: str) -> torch.Tensor:
    return BaseModel.open(LLAMA).store.get(key)


def _largest_difference(message: str) -> float:
    match = re.search(r"largest absolute difference ([0-9.e+-]+)", message)
    assert match, message
    return float(match.group(1))


# ---- the canonical model ----


def test_reader_tells_saved_copies_from_trained_tensors(made):
    ad = loratool.read_adapter(made["heads"])
    assert ad.base_layer_copies == {"lm_head.weight", "model.embed_tokens.weight"}
    assert set(ad.saved_copies) == set(ad.modules_to_save) and not ad.trained_to_save
    assert torch.equal(ad.saved_copies["lm_head.weight"].load(), load_file(made["heads"] / WEIGHTS)[HEAD_COPY])
    untargeted = loratool.read_adapter(made["untargeted"])
    assert untargeted.base_layer_copies == {"lm_head.weight", "model.embed_tokens.weight"}
    cls = loratool.read_adapter(ADAPTERS / "roberta-cls")
    assert not cls.saved_copies and set(cls.trained_to_save) == set(cls.modules_to_save) != set()


def test_converting_does_not_change_the_adapter_read(made, tmp_path):
    ad = loratool.read_adapter(made["heads"])
    before = (dict(ad.modules_to_save), ad.base_layer_copies, list(ad.warnings))
    report = convert(ad, tmp_path / "m", to="mlx", base=LLAMA)
    assert len(report["warnings"]) == 2
    assert (dict(ad.modules_to_save), ad.base_layer_copies, list(ad.warnings)) == before


def test_writer_refuses_copies_nobody_checked(made, tmp_path):
    ad = loratool.read_adapter(made["heads"])
    with pytest.raises(UnsupportedError, match=r"lm_head\.weight .*saved copy of a base layer.*--base"):
        loratool.write_adapter(ad, tmp_path / "m", format="mlx")


# ---- identical copies are dropped ----


@pytest.mark.parametrize("to", list(TARGETS))
def test_identical_copy_dropped_with_a_note(to, made, tmp_path):
    name, adapter = TARGETS[to]
    out = tmp_path / name
    code, stdout, err = invoke("convert", made[adapter], out, "--to", to, "--base", LLAMA, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    copies = ["lm_head.weight", "model.embed_tokens.weight"] if adapter == "heads" else ["lm_head.weight"]
    assert report["modules_to_save"] == [] and report["saved_copies"] == []
    notes = [w for w in report["warnings"] if "dropped the adapter's saved copy" in w]
    assert [n.split(":")[0] for n in notes] == copies
    assert all("bit-identical" in n and str(LLAMA) in n for n in notes)

    source = loratool.read_adapter(made[adapter])
    back = loratool.read_adapter(out, base=BaseModel.open(LLAMA))
    assert not back.modules_to_save
    nonzero = {n: m for n, m in back.modules.items() if m.B.load().any()}
    assert set(nonzero) == set(source.modules)
    for n, m in source.modules.items():
        got = back.modules[n]
        assert got.kind is m.kind and got.scale == m.scale, n
        assert torch.equal(got.A.load(), m.A.load()), n
        assert torch.equal(got.B.load(), m.B.load()), n


def test_cli_prints_the_note_as_a_warning(made, tmp_path):
    code, stdout, err = invoke("convert", made["head"], tmp_path / "m", "--to", "mlx", "--base", LLAMA)
    assert code == 0, err
    assert "converted" in stdout
    line = next(l for l in err.splitlines() if "lm_head.weight" in l)
    assert "dropped" in line and "(256, 64)" in line and "bit-identical" in line


def test_untargeted_embedding_layers_are_copies_too(made, tmp_path):
    report = convert(made["untargeted"], tmp_path / "g.gguf", to="gguf", base=LLAMA)
    assert sorted(w.split(":")[0] for w in report["warnings"]) == ["lm_head.weight", "model.embed_tokens.weight"]
    peft_out = tmp_path / "peft"
    convert(made["untargeted"], peft_out, to="peft")
    config = json.loads((peft_out / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None  # a copy is not declared as a trained module
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= set(load_file(peft_out / WEIGHTS))


# ---- copies that differ, or that no base can vouch for, are refused ----


@pytest.mark.parametrize("to", list(TARGETS))
def test_altered_copy_refused(to, made, tmp_path):
    name, adapter = TARGETS[to]
    key, tensor = (EMBED_COPY, "model.embed_tokens.weight") if adapter == "heads" else (HEAD_COPY, "lm_head.weight")
    changed = load_file(made[adapter] / WEIGHTS)[key].clone()
    changed[3, 5] += 0.25
    src = _edited(made[adapter], tmp_path / "in", tensors={key: changed})
    expected = float((changed.double() - _base_tensor(tensor).double()).abs().max())
    out = tmp_path / name
    code, _, err = invoke("convert", src, out, "--to", to, "--base", LLAMA)
    assert code == 2
    line = assert_one_line_error(err)
    assert line.count("(256, 64)") == 2 and f"{tensor}:" in line and "loratool merge" in line, line
    assert _largest_difference(line) == pytest.approx(expected, rel=1e-6) and expected == pytest.approx(0.25, rel=1e-5)
    assert not out.exists()


def test_resized_vocabulary_refused(made, tmp_path):
    copy = load_file(made["resized"] / WEIGHTS)[HEAD_COPY]
    assert tuple(copy.shape) == (288, 64)
    expected = float((copy[:256].double() - _base_tensor("lm_head.weight").double()).abs().max())
    code, _, err = invoke("convert", made["resized"], tmp_path / "m", "--to", "mlx", "--base", LLAMA)
    assert code == 2
    line = assert_one_line_error(err)
    assert line.startswith("error: lm_head.weight:"), line  # the first copy, before any shape check of the LoRA
    assert "(288, 64)" in line and "(256, 64)" in line and "over the common (256, 64)" in line and "loratool merge" in line
    assert _largest_difference(line) == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("to", list(TARGETS))
def test_without_a_base_the_refusal_asks_for_one(to, made, tmp_path, empty_hub_cache):
    name, adapter = TARGETS[to]
    src = _edited(made[adapter], tmp_path / "in", config={"base_model_name_or_path": "nobody/tiny-llama"})
    code, _, err = invoke("convert", src, tmp_path / name, "--to", to)
    assert code == 2
    line = assert_one_line_error(err)
    assert "lm_head.weight" in line and "(256, 64)" in line and "pass --base" in line and "nobody/tiny-llama" in line, line


def test_the_adapters_own_base_from_the_hub_cache(made, tmp_path, empty_hub_cache):
    sha = "0123456789abcdef0123456789abcdef01234567"
    storage = empty_hub_cache / "models--nobody--tiny-llama"
    shutil.copytree(LLAMA, storage / "snapshots" / sha)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(sha)
    src = _edited(made["head"], tmp_path / "in", config={"base_model_name_or_path": "nobody/tiny-llama"})
    report = convert(src, tmp_path / "m", to="mlx")
    assert len(report["warnings"]) == 1 and str(storage / "snapshots" / sha) in report["warnings"][0]


def test_the_adapters_own_local_base(made, tmp_path):
    report = convert(made["heads"], tmp_path / "m", to="mlx")  # base_model_name_or_path is the fixture folder
    assert len(report["warnings"]) == 2 and all(str(LLAMA) in w for w in report["warnings"])


# ---- PEFT holds the copy ----


def test_peft_keeps_the_copies(made, tmp_path):
    out = tmp_path / "peft"
    code, stdout, err = invoke("convert", made["heads"], out, "--to", "peft", "--base", LLAMA, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["saved_copies"] == ["lm_head.weight", "model.embed_tokens.weight"] and report["modules_to_save"] == []
    src, got = load_file(made["heads"] / WEIGHTS), load_file(out / WEIGHTS)
    for key in (EMBED_COPY, HEAD_COPY):
        assert torch.equal(src[key], got[key])
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] is None
    assert_same_peft(peft_deltas("llama", made["heads"]), peft_deltas("llama", out))


# ---- the real consumer ----


def test_mlx_lm_loads_the_converted_adapter(made, tmp_path):
    try:
        import mlx.core as mx
        from mlx_lm.tuner.utils import load_adapters
        from mlx_lm.utils import load_model
    except ImportError:
        pytest.skip("mlx-lm is not installed (pip install mlx mlx-cpu mlx-lm)")
    import numpy as np
    from peft import PeftModel

    out = tmp_path / "mlx"
    convert(made["heads"], out, to="mlx", base=LLAMA)
    model, _ = load_model(LLAMA)
    model = load_adapters(model, str(out))
    ids = [[1, 5, 77, 200, 3, 9, 255, 128]]
    got = torch.from_numpy(np.array(model(mx.array(ids)).astype(mx.float32)))

    peft_model = PeftModel.from_pretrained(load_base_model("llama"), str(made["heads"])).eval()
    with torch.no_grad():
        want = peft_model(torch.tensor(ids)).logits
        with peft_model.disable_adapter():
            plain = peft_model(torch.tensor(ids)).logits
    assert (want - plain).abs().max() > 0.1  # the adapter matters
    assert (got - want).abs().max() < 1e-4
