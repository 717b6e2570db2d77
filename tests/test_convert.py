"""`loratool convert`: detection, every pair of formats, round trips, refusals, output safety."""

from __future__ import annotations

import json

import pytest
import torch

from _convert_helpers import assert_same_peft, peft_deltas, without_modules_to_save
from conftest import ADAPTERS, BASES, ROOT, assert_one_line_error, invoke, run_cli
from _numeric import rel_diff

import loratool
from loratool.conversion import compare, convert
from loratool.errors import OutputExistsError, UnsupportedError
from loratool.formats import detect_format

# target format -> OUT name
TARGETS = {"peft": "peft", "scratch": "a.safetensors", "mlx": "mlx", "gguf": "a.gguf"}


def test_help_has_example():
    code, out, _ = invoke("convert", "--help")
    assert code == 0
    assert "Example" in out and "--to" in out and "--outtype" in out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """llama-patterns (ranks 2/4/8, four scales) in each of this helper's formats."""
    root = tmp_path_factory.mktemp("sources")
    out = {"peft": ADAPTERS / "llama-patterns"}
    for fmt, name in TARGETS.items():
        if fmt == "peft":
            continue
        out[fmt] = root / name
        convert(ADAPTERS / "llama-patterns", out[fmt], to=fmt, base=BASES / "llama")
    return out


@pytest.mark.parametrize("src", list(TARGETS))
@pytest.mark.parametrize("dst", list(TARGETS))
def test_every_pair_keeps_every_delta(src, dst, sources, tmp_path):
    out = tmp_path / TARGETS[dst]
    code, stdout, err = invoke("convert", sources[src], out, "--to", dst, "--base", BASES / "llama", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert (report["from"], report["to"], report["verified"]) == (src, dst, True)
    assert detect_format(out) == dst
    reference = loratool.read_adapter(ADAPTERS / "llama-patterns")
    got = loratool.read_adapter(out, base=loratool.BaseModel.open(BASES / "llama"))
    assert set(got.modules) == set(reference.modules)
    for name, m in reference.modules.items():
        assert rel_diff(got.modules[name].delta(dtype=torch.float64), m.delta(dtype=torch.float64)) < 1e-6, name


def test_chain_through_every_format_against_peft(tmp_path):
    steps = [("mlx", "mlx"), ("gguf", "a.gguf"), ("scratch", "a.pth"), ("gguf", "b.gguf"), ("mlx", "mlx2"), ("peft", "peft")]
    src = ADAPTERS / "llama-lora"
    for fmt, name in steps:
        out = tmp_path / name
        code, _, err = invoke("convert", src, out, "--to", fmt, "--base", BASES / "llama")
        assert code == 0, f"{fmt}: {err}"
        src = out
    assert_same_peft(peft_deltas("llama", ADAPTERS / "llama-lora"), peft_deltas("llama", src))


def test_explicit_from_and_alpha(tmp_path):
    f = tmp_path / "s.pth"
    convert(ADAPTERS / "llama-lora", f, to="scratch")
    out = tmp_path / "peft"
    code, _, err = invoke("convert", f, out, "--from", "scratch", "--to", "peft", "--alpha", "16")
    assert code == 0, err
    # the file holds scale 1 (baked); --alpha 16 at rank 8 doubles every delta on purpose
    ref = loratool.read_adapter(ADAPTERS / "llama-lora")
    got = loratool.read_adapter(out)
    for name, m in ref.modules.items():
        assert rel_diff(got.modules[name].delta(dtype=torch.float64), 2 * m.delta(dtype=torch.float64)) < 1e-6


def test_output_safety(tmp_path):
    out = tmp_path / "m"
    code, _, err = invoke("convert", ADAPTERS / "llama-lora", out, "--to", "mlx")
    assert code == 0, err
    code, _, err = invoke("convert", ADAPTERS / "llama-lora", out, "--to", "mlx")
    assert code == 2
    assert "exists" in assert_one_line_error(err)
    code, _, err = invoke("convert", ADAPTERS / "llama-lora", out, "--to", "mlx", "--force")
    assert code == 0, err
    with pytest.raises(OutputExistsError):
        convert(ADAPTERS / "llama-lora", out, to="mlx")
    inside = out / "x.gguf"
    code, _, err = invoke("convert", out, inside, "--to", "gguf", "--base", BASES / "llama")
    assert code == 2
    assert_one_line_error(err)
    code, _, err = invoke("convert", ADAPTERS / "llama-lora", tmp_path / "y", "--to", "mlx", "--outtype", "f16")
    assert code == 2
    assert "--outtype" in assert_one_line_error(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_refusal_leaves_nothing_behind(tmp_path):
    for to, name in (("gguf", "a.gguf"), ("mlx", "m"), ("scratch", "s.pth")):
        code, _, err = invoke("convert", ADAPTERS / "llama-dora", tmp_path / name, "--to", to, "--base", BASES / "llama")
        if to == "mlx":  # MLX holds DoRA (fine_tune_type dora)
            assert code == 0, err
            continue
        assert code == 2
        assert "DoRA" in assert_one_line_error(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_check_catches_a_lossy_writer(tmp_path, monkeypatch):
    from loratool.formats import mlx

    real_write = mlx.write

    def lossy(adapter, folder, **kw):
        first = next(iter(adapter.modules))
        return real_write(adapter.replace_modules({k: v for k, v in adapter.modules.items() if k != first}), folder, **kw)

    monkeypatch.setattr(mlx, "write", lossy)
    with pytest.raises(UnsupportedError, match="missing"):
        convert(ADAPTERS / "llama-lora", tmp_path / "m", to="mlx")
    assert not list(tmp_path.iterdir())


def test_compare_detects_changed_delta():
    a = loratool.read_adapter(ADAPTERS / "llama-lora")
    b = loratool.read_adapter(ADAPTERS / "llama-lora")
    name = next(iter(b.modules))
    m = b.modules[name]
    b.modules[name] = m.with_factors(m.A.load(), m.B.load() * 1.001)
    with pytest.raises(UnsupportedError, match="differs"):
        compare(a, b)


def test_modules_to_save_through_scratch_only(tmp_path):
    f = tmp_path / "r.pth"
    report = convert(ADAPTERS / "roberta-cls", f, to="scratch")
    assert report["modules_to_save"]
    back = tmp_path / "back"
    convert(f, back, to="peft")
    assert_same_peft(peft_deltas("roberta", ADAPTERS / "roberta-cls"), peft_deltas("roberta", back))
    for to, name in (("mlx", "m"), ("gguf", "g.gguf")):
        with pytest.raises(UnsupportedError, match="modules_to_save"):
            convert(f, tmp_path / name, to=to, base=BASES / "roberta")


@pytest.mark.parametrize("fmt", ["mlx", "gguf", "scratch"])
def test_merge_accepts_every_format(fmt, tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "in").mkdir()  # merge treats a file adapter's folder as an input
    src = tmp_path / "in" / TARGETS[fmt]
    convert(ADAPTERS / "llama-lora", src, to=fmt, base=BASES / "llama")
    ref, got = tmp_path / "ref", tmp_path / "got"
    code, _, err = invoke("merge", BASES / "llama", ADAPTERS / "llama-lora", ref)
    assert code == 0, err
    code, _, err = invoke("merge", BASES / "llama", src, got)
    assert code == 0, err
    a, b = load_file(ref / "model.safetensors"), load_file(got / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def test_embedding_and_conv1d_through_every_format(tmp_path):
    ad = without_modules_to_save("llama-embedding")
    for fmt in ("mlx", "gguf"):
        out = tmp_path / TARGETS[fmt]
        convert(ad, out, to=fmt, base=BASES / "llama")
        back = loratool.read_adapter(out)
        for name, m in ad.modules.items():
            assert back.modules[name].kind is m.kind
            assert rel_diff(back.modules[name].delta(dtype=torch.float64), m.delta(dtype=torch.float64)) < 1e-6
    g = tmp_path / "g.gguf"
    convert(ADAPTERS / "gpt2-lora", g, to="gguf", base=BASES / "gpt2")
    assert {m.kind.value for m in loratool.read_adapter(g)} == {"conv1d"}


def test_registry_declares_what_each_reader_and_writer_takes():
    """FORMATS (read by the CLI without importing a format) matches the readers' and writers' signatures."""
    import inspect as pyinspect

    from loratool.formats import FORMATS, OPTIONS, get_format

    for name, spec in FORMATS.items():
        mod = get_format(name)
        for fn, declared in ((mod.read, spec.read_options), (mod.write, spec.write_options)):
            takes = {p for p in pyinspect.signature(fn).parameters if p in OPTIONS}
            assert takes == set(declared), (name, fn.__name__, takes, declared)
        assert bool(getattr(mod, "OUTPUT_IS_FILE", False)) in (True, False)
        if not spec.holds_full_tensors:
            assert hasattr(mod, "check_writable"), name


def test_cli_imports_nothing_from_inside_a_format():
    cli = ROOT / "loratool" / "cli"
    for f in cli.glob("*.py"):
        text = f.read_text()
        assert "loratool.formats." not in text, f"{f.name} imports from inside a format"


@pytest.mark.parametrize("to, adapter, base, what", [
    ("gguf", "llama-dora", "llama", "DoRA"), ("mlx", "qwen2-bias", "qwen2", "bias"),
    ("litgpt", "llama-dora", "llama", "DoRA"), ("scratch", "qwen2-bias", "qwen2", "bias"),
])
def test_what_a_format_cannot_hold_is_refused_before_out_is_opened(to, adapter, base, what, tmp_path):
    """The refusal comes before the temporary sibling exists: a run told to die at the first
    write step (LORATOOL_TEST_KILL_AFTER=1) exits 2 with the refusal instead of being killed."""
    out = tmp_path / ("out.gguf" if to == "gguf" else "out")
    res = run_cli("convert", ADAPTERS / adapter, out, "--to", to, "--base", BASES / base, env={"LORATOOL_TEST_KILL_AFTER": "1"})
    assert res.returncode == 2, res.stderr
    assert what in assert_one_line_error(res.stderr)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".loratool-" in p.name]


def test_peft_to_peft_keeps_a_lora_on_a_tied_head(tmp_path):
    """A LoRA on lm_head of a base that ties it to the embedding (and stores no lm_head): PEFT loads it,
    so convert --to peft --base keeps it (it was refused as 'not in the base')."""
    from peft import LoraConfig, get_peft_model

    from _oracle import load_base_model, peft_deltas

    torch.manual_seed(0)
    model = load_base_model("qwen2")
    assert model.config.tie_word_embeddings
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"], init_lora_weights=False)).save_pretrained(tmp_path / "a")
    code, out, err = invoke("convert", tmp_path / "a", tmp_path / "b", "--to", "peft", "--base", BASES / "qwen2")
    assert code == 0, err
    ref, got = peft_deltas("qwen2", tmp_path / "a"), peft_deltas("qwen2", tmp_path / "b")
    assert sorted(ref) == sorted(got) and "lm_head" in got
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
