"""Hostile PyTorch pickles and hostile counts: refused before torch.load (or any per-tensor
work) with one line naming the file and what was too large; inputs untouched.

The files are built by hand here (opcodes and zip entries), small on disk: a storage of
gigabytes is a sparse file or a claim that its zip entry does not back.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zipfile

import pytest
from conftest import ADAPTERS, assert_one_line_error, invoke, run_cli


def _u(s: str) -> bytes:  # BINUNICODE
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(n: int) -> bytes:  # BININT, or LONG1 with 8 bytes
    return b"J" + struct.pack("<i", n) if -(2**31) <= n < 2**31 else b"\x8a\x08" + struct.pack("<q", n)


def _tuple(items) -> bytes:  # MARK ... TUPLE
    return b"(" + b"".join(items) + b"t"


def _tensor(name, key, numel, shape, stride, offset=0) -> bytes:
    """name, then _rebuild_tensor_v2((storage pid), offset, shape, stride, False, OrderedDict()) as torch.save writes it."""
    pid = _tuple([_u("storage"), b"ctorch\nFloatStorage\n", _u(key), _u("cpu"), _int(numel)]) + b"Q"
    args = _tuple([pid, _int(offset), _tuple(map(_int, shape)), _tuple(map(_int, stride)), b"\x89", b"ccollections\nOrderedDict\n)R"])
    return _u(name) + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R"


def _state_dict(*entries) -> bytes:
    return b"\x80\x02}(" + b"".join(entries) + b"u."


def _pair(a_numel=64, a_shape=(8, 8), a_stride=(8, 1), a_offset=0) -> bytes:
    return _state_dict(_tensor("x.lora_matrix_A", "0", a_numel, a_shape, a_stride, a_offset), _tensor("x.lora_matrix_B", "1", 64, (8, 8), (8, 1)))


def _zip(path, pkl: bytes, records: dict, deflate=()) -> None:
    """A torch zip: archive/data.pkl, byteorder, data/<key> (bytes, or an int: that many zero bytes), version."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl, zipfile.ZIP_DEFLATED if "data.pkl" in deflate else zipfile.ZIP_STORED)
        zf.writestr("archive/byteorder", b"little")
        for key, data in records.items():
            raw = bytes(data) if isinstance(data, int) else data
            zf.writestr(f"archive/data/{key}", raw, zipfile.ZIP_DEFLATED if key in deflate else zipfile.ZIP_STORED)
        zf.writestr("archive/version", b"3\n")


_OK = {"0": 256, "1": 256}
N = 20_000  # deeper than every depth limit, small on disk


def _cases():
    yield "nested dicts", ("zip", b"\x80\x02" + (b"}" + _u("a")) * N + b"}" + b"s" * N + b".", {}), "deep"
    yield "nested lists", ("zip", b"\x80\x02" + b"]" * N + b"a" * (N - 1) + b".", {}), "deep"
    yield "nested tuples", ("zip", b"\x80\x02" + b"(" * N + b"t" * N + b".", {}), "deep"
    yield "nested lists, legacy file", ("raw", b"\x80\x02" + b"]" * N + b"a" * (N - 1) + b".", None), "deep"
    laughs = b"\x80\x02}q\x00(" + _u("a") + b"K\x01u"  # memo 0 = {'a': 1}; each level: ten references to the last
    for lvl in range(1, 30):
        laughs += b"}(" + b"".join(_u(str(j)) + b"h" + bytes([lvl - 1]) for j in range(10)) + b"uq" + bytes([lvl])
    yield "billion laughs (dicts)", ("zip", laughs + b".", {}), "objects"
    lists = b"\x80\x02]q\x00K\x01a" + b"".join(b"](" + (b"h" + bytes([i])) * 10 + b"eq" + bytes([i + 1]) for i in range(29))
    yield "billion laughs (lists)", ("zip", lists + b".", {}), "objects"
    yield "a list holding itself", ("zip", b"\x80\x02]q\x00h\x00a.", {}), "self-reference"
    yield "a compressed storage", ("zip", _pair(a_numel=1 << 18, a_shape=(8, 1 << 15), a_stride=(1 << 15, 1)), {"0": 1 << 20, "1": 256}, {"0"}), "compressed"
    yield "a compressed data.pkl", ("zip", _pair(), _OK, {"data.pkl"}), "compressed"
    yield "a storage beyond its entry", ("zip", _pair(a_numel=1 << 40), _OK), "zip entry holds"
    yield "a storage without an entry", ("zip", _pair(), {"1": 256}), "no zip entry"
    yield "a stride-0 view of gigabytes", ("zip", _pair(a_numel=1, a_shape=(8, 1 << 27), a_stride=(0, 0)), {"0": 4, "1": 256}), "holds 1"
    yield "a view past its storage", ("zip", _pair(a_offset=1 << 40), _OK), "storage '0'"
    yield "a negative stride", ("zip", _pair(a_stride=(-8, 1)), _OK), "stride"
    yield "a legacy storage beyond the file", ("raw", _legacy(1 << 38), None), "the file has"


def _legacy(numel: int) -> bytes:
    """The legacy layout: magic number, protocol, sys info, then the state dict's pickle."""
    head = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19." + b"\x80\x02M\xe9\x03." + b"\x80\x02}q\x00."
    return head + _state_dict(_tensor("x.lora_matrix_A", "k", numel, (8, 8), (8, 1)))


def _write(tmp_path, spec):
    kind, pkl, records, *deflate = spec
    path = tmp_path / "a.pt"
    if kind == "zip":
        _zip(path, pkl, records, *deflate)
    else:
        path.write_bytes(pkl)
    return path


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_hostile_pickles_are_refused_before_loading(case, tmp_path):
    _name, spec, word = case
    path = _write(tmp_path, spec)
    before = _digest(path)
    code, _, err = invoke("inspect", path, "--from", "scratch")
    assert code == 2, err
    line = assert_one_line_error(err)
    assert str(path) in line and word in line, line
    assert _digest(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


@pytest.mark.parametrize("env, spec, word", [
    ("LORATOOL_MAX_PICKLE_OPS", ("zip", b"\x80\x02]q\x00(" + b"K\x01" * 5000 + b"e.", {}), "opcodes"),
    ("LORATOOL_MAX_PICKLE_TENSORS", ("zip", _pair(), _OK), "tensors"),
    ("LORATOOL_MAX_ZIP_ENTRIES", ("zip", _pair(), _OK), "entries"),
])
def test_pickle_count_limits_name_their_variable(env, spec, word, tmp_path, monkeypatch):
    monkeypatch.setenv(env, "1")
    code, _, err = invoke("inspect", _write(tmp_path, spec), "--from", "scratch")
    assert code == 2
    line = assert_one_line_error(err)
    assert word in line and env in line, line


def test_raising_a_limit_lets_a_file_through(tmp_path, monkeypatch):
    path = _write(tmp_path, ("zip", _pair(), _OK))
    monkeypatch.setenv("LORATOOL_MAX_PICKLE_DEPTH", "2")
    code, _, err = invoke("inspect", path, "--from", "scratch")
    assert code == 2 and "LORATOOL_MAX_PICKLE_DEPTH" in err
    monkeypatch.setenv("LORATOOL_MAX_PICKLE_DEPTH", "100")
    code, out, err = invoke("inspect", path, "--from", "scratch")
    assert code == 0, err


def test_a_real_checkpoint_passes_the_scan(tmp_path):
    """What torch.save writes (shared storages, views at offsets) passes and reads back exactly."""
    import torch

    from loratool.io.store import load_pickle

    base = torch.arange(96, dtype=torch.float32)
    sd = {"a": base[:48].view(6, 8), "b": base[48:].view(8, 6), "t": base[:48].view(8, 6).t(), "h": torch.ones(3, dtype=torch.float16)}
    torch.save(sd, tmp_path / "c.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("c.pt", "legacy.pt"):
        got = load_pickle(tmp_path / name)
        assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_a_large_sparse_pickled_factor_is_scanned_in_blocks(tmp_path):
    """A 64 MiB lora_A (a sparse file) is a correct inspect, not a whole-tensor float copy."""
    numel = 16 << 20
    path = tmp_path / "a.pt"
    _zip(path, _state_dict(_tensor("x.lora_matrix_A", "0", numel, (8, numel // 8), (numel // 8, 1)), _tensor("x.lora_matrix_B", "1", 64, (8, 8), (8, 1))),
         {"0": numel * 4, "1": 256})
    code, out, err = invoke("inspect", path, "--from", "scratch", "--json")
    assert code == 0, err
    assert json.loads(out)["modules"][0]["in_features"] == numel // 8


def test_sniffing_a_large_object_stream_is_bounded(tmp_path):
    """An 8 MB data.pkl that names a LitGPT-like module over and over: detection reads 1 MiB."""
    path = tmp_path / "a.pth"
    _zip(path, b"\x80\x02X" + struct.pack("<I", 8 << 20) + b"transformer.h.0.mlp." * ((8 << 20) // 20) + b".", {})
    res = run_cli("inspect", path, timeout=60)
    assert res.returncode == 2
    assert_one_line_error(res.stderr)


def test_tensor_counts_are_refused_before_the_work(tmp_path, monkeypatch):
    """A safetensors file claiming more tensors than LORATOOL_MAX_TENSORS (counted in the raw
    header) and a modules_to_save list longer than it are refused naming the count."""
    folder = tmp_path / "ad"
    shutil.copytree(ADAPTERS / "llama-lora", folder)
    monkeypatch.setenv("LORATOOL_MAX_TENSORS", "20")
    code, _, err = invoke("inspect", folder)
    assert code == 2 and "28 tensors" in assert_one_line_error(err) and "LORATOOL_MAX_TENSORS" in err
    monkeypatch.setenv("LORATOOL_MAX_TENSORS", "100")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["modules_to_save"] = [f"head{i}" for i in range(101)]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = invoke("inspect", folder)
    assert code == 2 and "101 modules_to_save names" in assert_one_line_error(err)
