"""Bad input to inspect: exit 2, one line naming the file and the reason, never a traceback."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from conftest import ADAPTERS, BASES, ROOT, assert_one_line_error, invoke, run_cli


def _copy(tmp_path, name="llama-rslora"):
    dst = tmp_path / name
    shutil.copytree(ADAPTERS / name, dst)
    return dst


def _inspect_fails(path, *extra, expect=None):
    code, out, err = invoke("inspect", path, *extra)
    assert code == 2, (out, err)
    line = assert_one_line_error(err)
    if expect:
        assert expect in line, line
    return line


def test_missing_adapter(tmp_path):
    _inspect_fails(tmp_path / "nope", expect="nope")


def test_missing_weights(tmp_path):
    dst = _copy(tmp_path)
    (dst / "adapter_model.safetensors").unlink()
    _inspect_fails(dst, expect="no adapter weights")


def test_missing_config(tmp_path):
    dst = _copy(tmp_path)
    (dst / "adapter_config.json").unlink()
    _inspect_fails(dst, expect="unknown adapter format")


@pytest.mark.parametrize("cut", [0, 4, 20, 200, -8])
def test_truncated_safetensors(tmp_path, cut):
    dst = _copy(tmp_path)
    f = dst / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    line = _inspect_fails(dst)
    assert "adapter_model.safetensors" in line


def test_garbage_safetensors(tmp_path):
    dst = _copy(tmp_path)
    (dst / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    _inspect_fails(dst, expect="adapter_model.safetensors")


def test_huge_header_claim(tmp_path):
    dst = _copy(tmp_path)
    f = dst / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = (1 << 40).to_bytes(8, "little")
    f.write_bytes(bytes(data))
    _inspect_fails(dst, expect="header claims")


def test_malformed_json(tmp_path):
    dst = _copy(tmp_path)
    (dst / "adapter_config.json").write_text("{not json")
    _inspect_fails(dst, expect="malformed JSON")


@pytest.mark.parametrize(
    "patch,expect",
    [({"r": "eight"}, "rank"), ({"lora_alpha": [1]}, "lora_alpha"), ({"rank_pattern": [1]}, "rank_pattern"),
     ({"target_modules": 5}, "target_modules"), ({"r": 0}, "rank"), ({"r": -3}, "rank")],
)
def test_config_wrong_types(tmp_path, patch, expect):
    dst = _copy(tmp_path)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(patch)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    _inspect_fails(dst, expect=expect)


def test_config_is_a_directory(tmp_path):
    dst = _copy(tmp_path)
    (dst / "adapter_config.json").unlink()
    (dst / "adapter_config.json").mkdir()
    _inspect_fails(dst)


def test_unknown_format(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    _inspect_fails(f, expect="unknown adapter format")


def test_base_not_a_model(tmp_path):
    _inspect_fails(ADAPTERS / "llama-rslora", "--base", tmp_path, expect="config.json")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_never_runs(tmp_path):
    dst = _copy(tmp_path)
    (dst / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(dst / "adapter_model.bin", "wb") as fh:
        pickle.dump({"x": _Evil(marker)}, fh)
    _inspect_fails(dst, expect="adapter_model.bin")
    assert not marker.exists()
    # also through a real subprocess, as a user would run it
    proc = run_cli("inspect", dst)
    assert proc.returncode == 2 and not marker.exists()
    assert "Traceback" not in proc.stderr


def test_subprocess_one_line_and_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and "loratool" in proc.stdout
    proc = run_cli("inspect", "/definitely/not/here")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr)


def test_unknown_option_is_one_line():
    code, out, err = invoke("inspect", ADAPTERS / "llama-rslora", "--bogus")
    assert code == 2
    assert_one_line_error(err)


def test_every_command_has_help_with_example():
    from loratool.cli import main

    for name in main.commands:
        code, out, err = invoke(name, "--help")
        assert code == 0, name
        assert "Example" in out, f"{name} --help lacks an example"


# ----------------------------------------------------------------------------- options a format does not take


@pytest.mark.parametrize("extra, option", [(["--alpha", "5"], "alpha"), (["--scale", "2"], "scale"), (["--legacy-qkv", "scattered"], "legacy_qkv")])
def test_reading_option_the_format_does_not_take_is_refused(extra, option):
    # a PEFT adapter stores lora_alpha and its scaling rule: an override would silently vanish
    line = _inspect_fails(ADAPTERS / "llama-lora", *extra, expect=f"the option {option} ")
    assert "peft adapters" in line


def test_options_are_checked_in_the_library_too(tmp_path):
    import loratool
    from loratool.errors import InputError

    with pytest.raises(InputError, match="the option alpha .* peft adapters"):
        loratool.read_adapter(ADAPTERS / "llama-lora", alpha=5)
    ad = loratool.read_adapter(ADAPTERS / "llama-lora", alpha=None, base=None)  # None means "not given"
    with pytest.raises(InputError, match="the option outtype .* writing peft adapters"):
        loratool.write_adapter(ad, tmp_path / "out", format="peft", outtype="f16")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="the option container .* --to mlx"):
        loratool.convert(ad, tmp_path / "out", to="mlx", container="pt")
    with pytest.raises(InputError, match="apply when SRC is a path"):
        loratool.convert(ad, tmp_path / "out", to="peft", alpha=5)
    assert not (tmp_path / "out").exists()


def test_help_runs_without_torch(tmp_path):
    """`--help` of the group and of every command never imports torch (it makes help take seconds)."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None  # import torch raises ImportError\n")
    from loratool.cli import COMMAND_MODULES

    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    for args in (["--help"], *([c, "--help"] for c in COMMAND_MODULES), ["--version"]):
        res = run_cli(*args, env=env)
        assert res.returncode == 0, (args, res.stderr)
        assert "Usage" in res.stdout or "version" in res.stdout


@pytest.mark.parametrize("name,base", [("llama-lora", None), ("llama-dora", None), ("gpt2-lora", None), ("llama-embedding", None),
                                       ("qwen2-bias", None), ("roberta-cls", None), ("llama-bf16", None),
                                       ("llama-lora", "llama"), ("gpt2-lora", "gpt2"), ("qwen2-bias", "qwen2")])
def test_plain_inspect_runs_without_torch(name, base, tmp_path):
    """`inspect ADAPTER` (also with --base: binding reads shapes and dtype codes) reads headers and bits only:
    the same report with torch not importable."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None  # import torch raises ImportError\n")
    extra = ["--base", BASES / base] if base else []
    res = run_cli("inspect", ADAPTERS / name, *extra, "--json", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert res.returncode == 0, res.stderr
    code, out, err = invoke("inspect", ADAPTERS / name, *extra, "--json")
    assert json.loads(res.stdout) == json.loads(out)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_value_summary_reads_the_bits_right(dtype, tmp_path):
    """The torch-free scan finds NaN, +-Inf and all-zero tensors (-0 included) in every float dtype."""
    from safetensors.torch import save_file

    from loratool.io.store import TensorStore

    dt = getattr(torch, dtype)
    cases = {
        "ok": torch.tensor([1.0, -2.0, 0.0]), "nan": torch.tensor([1.0, float("nan")]), "inf": torch.tensor([float("-inf"), 0.0]),
        "zeros": torch.tensor([0.0, -0.0, 0.0]), "tiny": torch.tensor([0.0, 1e-30 if dtype != "float16" else 1e-7]),
    }
    save_file({k: v.to(dt) for k, v in cases.items()}, tmp_path / "t.safetensors")
    store = TensorStore([tmp_path / "t.safetensors"])
    for k, v in cases.items():
        v = v.to(dt)
        expected = (bool(torch.isfinite(v.float()).all()), not bool(v.any()))
        assert store.value_summary(k) == expected, (k, dtype)
        assert store.value_summary(k, chunk=1) == expected


@pytest.mark.parametrize("extra", [
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.zz.weight",  # a second lora_A for q_proj
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",  # PEFT's in-memory name of the same B
])
def test_two_tensors_claiming_one_role_are_refused(extra, tmp_path):
    """Silently picking one of them would merge (and verify!) a different delta than PEFT's."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "a"
    shutil.copytree(ADAPTERS / "llama-lora", folder)
    sd = load_file(folder / "adapter_model.safetensors")
    twin = extra.replace(".zz", "").replace(".default", "")
    sd[extra] = sd[twin] * 2
    save_file(sd, folder / "adapter_model.safetensors")
    for args in (("inspect", folder), ("merge", BASES / "llama", folder, tmp_path / "out")):
        code, _, err = invoke(*args)
        assert code == 2
        line = assert_one_line_error(err)
        assert twin in line and extra in line and "both claim" in line
    assert not (tmp_path / "out").exists()


def _scaled_adapter(tmp_path, factor: float):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / f"a{factor:g}"
    shutil.copytree(ADAPTERS / "llama-lora", folder)
    sd = load_file(folder / "adapter_model.safetensors")
    save_file({k: v * factor for k, v in sd.items()}, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize("command", ["merge", "unmerge"])
def test_a_delta_that_overflows_float32_is_refused(command, tmp_path):
    adapter = _scaled_adapter(tmp_path, 1e20)  # B @ A ~ 1e40: beyond float32
    code, _, err = invoke(command, BASES / "llama", adapter, tmp_path / "out")
    assert code == 2
    line = assert_one_line_error(err)
    assert "NaN or Inf" in line and "model.layers." in line
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".loratool-" in p.name]


def test_a_result_beyond_float16_is_refused_with_the_way_out(tmp_path):
    adapter = _scaled_adapter(tmp_path, 3000.0)  # deltas of ~1e5-1e6: fine in float32, beyond float16 (65504)
    code, _, err = invoke("merge", BASES / "llama", adapter, tmp_path / "out", "--dtype", "float16")
    assert code == 2
    line = assert_one_line_error(err)
    assert "float16" in line and "65504" in line.replace(",", "") and "--dtype float32 or bfloat16" in line
    assert not (tmp_path / "out").exists()
    code, _, err = invoke("merge", BASES / "llama", adapter, tmp_path / "out", "--dtype", "bfloat16")
    assert code == 0, err


def test_a_reader_that_went_away_is_not_a_failed_check(tmp_path):
    """`loratool verify ... --json | true`: the check passed, so the exit code says so, with no error line."""
    import subprocess
    import sys

    merged = tmp_path / "m"
    code, _, err = invoke("merge", BASES / "llama", ADAPTERS / "llama-lora", merged)
    assert code == 0, err
    for args in (["verify", BASES / "llama", ADAPTERS / "llama-lora", merged, "--json"], ["inspect", ADAPTERS / "llama-lora"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before anything is written
        proc = subprocess.run([sys.executable, "-m", "loratool", *map(str, args)], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
        os.close(write_end)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.strip() == "", proc.stderr


def test_json_configs_are_capped_before_parsing(tmp_path, monkeypatch):
    folder = tmp_path / "a"
    shutil.copytree(ADAPTERS / "llama-lora", folder)
    monkeypatch.setenv("LORATOOL_MAX_JSON_BYTES", "100")
    code, _, err = invoke("inspect", folder)
    assert code == 2
    line = assert_one_line_error(err)
    assert "adapter_config.json" in line and "limit 100" in line and "LORATOOL_MAX_JSON_BYTES" in line
    monkeypatch.setenv("LORATOOL_MAX_JSON_BYTES", str(1 << 20))
    assert invoke("inspect", folder)[0] == 0


@pytest.mark.parametrize("field, value", [
    ("rank_pattern", {"(x|xx)+$": 2}),
    ("alpha_pattern", {"(a|aa)+$": 4}),
])
def test_a_backtracking_pattern_is_refused_in_time(field, value, tmp_path):
    import time

    folder = tmp_path / "a"
    shutil.copytree(ADAPTERS / "llama-lora", folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    # module names long enough to make the patterns explode
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "adapter_model.safetensors")
    long = "x" * 40 if "x" in next(iter(value)) else "a" * 40
    sd = {k.replace("self_attn.q_proj", f"self_attn.{long}_q"): v for k, v in sd.items()}
    save_file(sd, folder / "adapter_model.safetensors")
    t0 = time.perf_counter()
    code, _, err = invoke("inspect", folder)
    assert time.perf_counter() - t0 < 10
    assert code == 2
    line = assert_one_line_error(err)
    assert field in line and "catastrophic backtracking" in line and "LORATOOL_REGEX_SECONDS" in line


def test_patterns_keep_re_semantics():
    from loratool.formats.peft import pattern_key, target_matches

    assert target_matches(r".*\.(q|v)_proj", "model.layers.0.self_attn.q_proj")
    assert not target_matches(r"(q|v)_proj", "model.layers.0.self_attn.q_proj")  # a full match, as PEFT does
    assert pattern_key(["q_proj", "layers.1.self_attn.v_proj"], "model.layers.1.self_attn.v_proj") == "layers.1.self_attn.v_proj"
    assert pattern_key(["[unclosed"], "model.x") is None  # a pattern that does not compile is skipped


def test_a_base_with_a_huge_number_of_prefixes_is_linear(tmp_path):
    """150,000 distinct top-level module prefixes (hostile or not): name lookups stay O(1), so
    inspect --base finishes (the prefix scan was quadratic). Such a file is beyond the default
    tensor-count limit (refused, tests/test_hostile_pickles.py); raised here to time the lookups."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(BASES / "llama", base)
    sd = load_file(base / "model.safetensors")
    sd.update({f"x{i}.weight": torch.zeros(1) for i in range(150_000)})
    save_file(sd, base / "model.safetensors")
    res = run_cli("inspect", ADAPTERS / "llama-lora", "--base", base, "--json", timeout=120, env={"LORATOOL_MAX_TENSORS": "200000"})
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["modules"]) == 14


def _gguf_bytes(kvs: list[bytes], n_kv: int | None = None, n_tensors: int = 0) -> bytes:
    import struct

    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs) if n_kv is None else n_kv)
    return head + b"".join(kvs)


def _gguf_key(name: str, body: bytes) -> bytes:
    import struct

    raw = name.encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _gguf_cases():
    import struct

    arch = "general.architecture"
    yield "array count past the end", _gguf_bytes([_gguf_key(arch, struct.pack("<IIQ", 9, 10, 60_000))]), "past the end"
    yield "a huge array count", _gguf_bytes([_gguf_key(arch, struct.pack("<IIQ", 9, 0, 1 << 40))]), "general.architecture"
    yield "a 4-million-byte array where a string belongs", _gguf_bytes([_gguf_key(arch, struct.pack("<IIQ", 9, 0, 4_000_000) + bytes(4_000_000))]), "limit"
    strings = b"".join(struct.pack("<Q", 1) + b"x" for _ in range(200_000))
    yield "a 200,000-string array", _gguf_bytes([_gguf_key("tokenizer.ggml.tokens", struct.pack("<IIQ", 9, 8, 200_000) + strings)]), "limit"
    yield "a key count the file cannot hold", _gguf_bytes([], n_kv=1 << 50), "cannot fit"
    yield "a string longer than the file", _gguf_bytes([_gguf_key(arch, struct.pack("<IQ", 8, 1 << 33))]), "string"
    yield "an unknown value type", _gguf_bytes([_gguf_key(arch, struct.pack("<I", 77))]), "value type"


@pytest.mark.parametrize("case", list(_gguf_cases()), ids=lambda c: c[0])
def test_hostile_gguf_headers_are_refused_before_parsing(case, tmp_path):
    name, data, word = case
    path = tmp_path / "a.gguf"
    path.write_bytes(data)
    res = run_cli("inspect", path, timeout=60)
    assert res.returncode == 2, res.stderr
    line = assert_one_line_error(res.stderr)
    assert "GGUF header" in line and word in line, line


@pytest.mark.parametrize("fmt", ["peft", "scratch", "lit-llama", "litgpt", "gguf", "mlx"])
def test_a_fifo_is_refused_even_when_the_format_is_named(fmt, tmp_path):
    fifo = tmp_path / "adapter.pth"
    os.mkfifo(fifo)
    res = run_cli("inspect", fifo, "--from", fmt, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "FIFO" in assert_one_line_error(res.stderr) or "pipe" in res.stderr


@pytest.mark.parametrize("payload", [
    b"lora_" + b"a_" * 500_000,  # a scratch-like key run that never reaches matrix_A
    b"transformer.h.0.mlp." + b"a" * 1_000_000,  # a LitGPT-like name that never reaches .lora_A
])
def test_content_sniffing_is_linear_on_hostile_bytes(payload, tmp_path):
    """Detection regexes have bounded repetitions and read at most 1 MiB (this used to hang)."""
    path = tmp_path / "x.pth"
    path.write_bytes(b"\x80\x02" + payload)
    res = run_cli("inspect", path, timeout=60)
    assert res.returncode == 2, res.stderr
    assert_one_line_error(res.stderr)


@pytest.mark.parametrize("key, value", [
    ("num_hidden_layers", 10_000_000), ("num_hidden_layers", 2**31), ("num_hidden_layers", 1e400),
    ("num_attention_heads", 0), ("hidden_size", -64), ("vocab_size", "32000"), ("num_hidden_layers", True),
])
def test_model_config_sizes_are_checked_before_anything_is_built(key, value, tmp_path):
    """A config-only base for GGUF (and any base) states sizes loratool builds from: refused first."""
    base = tmp_path / "base"
    base.mkdir()
    cfg = json.loads((BASES / "llama" / "config.json").read_text())
    cfg[key] = value
    text = json.dumps(cfg).replace("Infinity", "1e400")  # json writes inf as Infinity; 1e400 parses as inf
    (base / "config.json").write_text(text)
    code, _, err = invoke("convert", ADAPTERS / "llama-lora", tmp_path / "a.gguf", "--to", "gguf", "--base", base)
    assert code == 2
    line = assert_one_line_error(err)
    assert key in line and "whole number" in line
    assert not (tmp_path / "a.gguf").exists()


def test_verify_output_sample_counts_are_bounded():
    code, _, err = invoke("verify", BASES / "llama", ADAPTERS / "llama-lora", BASES / "llama", "--outputs", "--samples", "1000000")
    assert code == 2 and "4096" in assert_one_line_error(err)


@pytest.mark.parametrize("text, word", [
    ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested"),
    ("a: &x [1, 2]\nb: [*x, *x, *x]\n", "aliases"),
])
def test_litgpt_yaml_is_bounded(text, word, tmp_path):
    folder = tmp_path / "lit"
    code, _, err = invoke("convert", ADAPTERS / "llama-lora", folder, "--to", "litgpt", "--base", BASES / "llama")
    assert code == 0, err
    (folder / "hyperparameters.yaml").write_text(text)
    code, _, err = invoke("inspect", folder, "--base", BASES / "llama")
    assert code == 2
    line = assert_one_line_error(err)
    assert word in line and "hyperparameters.yaml" in line
