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
import zlib

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



def _zero_crc(n: int, block: int = 1 << 24) -> int:
    crc, zeros = 0, bytes(block)
    for i in range(0, n, block):
        crc = zlib.crc32(zeros[: min(block, n - i)], crc)
    return crc


def _sparse_zip(path, pkl: bytes, records: dict, byteorder: bytes | None = b"little", align: int = 64) -> None:
    """A torch zip as torch.save lays it out (entries stored, each storage's bytes aligned to
    ``align`` by padding the local header's extra field), where a record given as an int is that
    many zero bytes left as a hole: gigabytes that take no disk."""
    entries = [("archive/data.pkl", pkl), *([("archive/byteorder", byteorder)] if byteorder else []),
               *((f"archive/data/{k}", v) for k, v in records.items()), ("archive/version", b"3\n")]
    with open(path, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
        for name, data in entries:
            n = data if isinstance(data, int) else len(data)
            info = zipfile.ZipInfo(name)
            info.compress_type, info.file_size, info.compress_size = zipfile.ZIP_STORED, n, n
            info.CRC = _zero_crc(n) if isinstance(data, int) else zlib.crc32(data)
            info.header_offset = fh.tell()
            pad = -(info.header_offset + 30 + len(name) + 4) % align
            info.extra = struct.pack("<HH", 0x4246, pad) + bytes(pad)  # torch's "FB" padding field
            fh.write(info.FileHeader())
            fh.seek(n, 1) if isinstance(data, int) else fh.write(data)
            zf.filelist.append(info)
            zf.NameToInfo[name] = info
            zf.start_dir = fh.tell()

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


def _span_of(path, name):
    from loratool.io.store import TensorStore

    store = TensorStore([path])
    return store, store._span(store.entry(name))


def _poke(path, name: str, index: int, value: bytes) -> None:
    """Write ``value`` at element ``index`` of the storage entry ``name`` (inside a hole: the rest stays sparse)."""
    from loratool.io.pickle_scan import _data_offset, open_torch_zip

    with open_torch_zip(path) as zf, open(path, "r+b") as fh:
        start = _data_offset(fh, zf.getinfo(name))
        fh.seek(start + index * len(value))
        fh.write(value)


@pytest.mark.parametrize("where, value, warning", [
    (None, None, None),  # all zeros: a correct result, no warning about A
    (-1, struct.pack("<f", float("nan")), "NaN or Inf"),  # the very last element of 1 GiB
    (123_456_789, struct.pack("<f", float("-inf")), "NaN or Inf"),
    (0, struct.pack("<f", -0.0), None),  # -0 is zero, and finite
])
def test_a_gigabyte_pickled_factor_is_scanned_from_its_zip_entry(where, value, warning, tmp_path):
    """A 1 GiB float32 lora_A (a hole of a sparse file, stored as torch.save stores it): inspect
    scans its byte range of the zip entry in blocks and finds a bad value wherever it lies."""
    numel = 1 << 28
    path = tmp_path / "a.pt"
    pkl = _state_dict(_tensor("x.lora_matrix_A", "0", numel, (16, numel // 16), (numel // 16, 1)), _tensor("x.lora_matrix_B", "1", 128, (8, 16), (16, 1)))
    _sparse_zip(path, pkl, {"0": numel * 4, "1": struct.pack("<128f", *[0.5] * 128)})
    if where is not None:
        _poke(path, "archive/data/0", where % numel, value)
    store, span = _span_of(path, "x.lora_matrix_A")
    assert span is not None and span.end - span.begin == numel * 4
    code, out, err = invoke("inspect", path, "--from", "scratch", "--json")
    assert code == 0, err
    warnings = [w for w in json.loads(out)["warnings"] if "lora_A" in w]
    assert (warning in warnings[0]) if warning else not warnings, warnings


def test_the_scan_of_a_large_pickled_factor_keeps_memory_flat(tmp_path):
    """The peak resident set of scanning a 1 GiB pickled factor grows by a few blocks, not by the
    tensor (its pages are dropped block by block). Measured in a fresh interpreter."""
    numel = 1 << 28
    path = tmp_path / "a.pt"
    _sparse_zip(path, _state_dict(_tensor("a", "0", numel, (numel,), (1,))), {"0": numel * 4})
    code = (
        "import resource, sys; from loratool.io.store import TensorStore\n"
        f"s = TensorStore([{str(path)!r}]); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "assert s.value_summary('a') == (True, True)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) < 64 << 10, f"peak grew by {int(res.stdout) >> 10} MiB"


def _saved(tmp_path, tensors: dict, name="c.pt"):
    import torch

    torch.save(tensors, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_pickled_values_are_read_from_their_bits_in_every_float_dtype(dtype, tmp_path):
    """What torch.save writes (views at offsets of one storage, a transpose, a Parameter, a nested
    dict) is scanned from the zip entry, and agrees with torch on NaN, +-Inf, zeros and -0."""
    import torch

    dt = getattr(torch, dtype)
    shared = torch.tensor([0.0, -0.0, 1.0, float("nan"), 0.0, 0.0, float("inf"), 2.0], dtype=dt)
    sd = {"zeros": shared[:2], "ok": shared[1:3], "nan": shared[2:4], "inf": shared[5:7].view(2, 1),
          "t": torch.zeros(3, 5, dtype=dt).t(), "p": torch.nn.Parameter(torch.ones(4, dtype=dt)), "n": {"deep": shared[4:6]}}
    path = _saved(tmp_path, sd)
    from loratool.io.store import TensorStore

    store = TensorStore([path])
    for k in store.keys():
        t = store.get(k)
        expected = (bool(torch.isfinite(t.float()).all()), not bool(t.any()))
        assert store._span(store.entry(k)) is not None, k
        assert store.value_summary(k) == expected, (k, dtype)
        assert store.value_summary(k, chunk=1) == expected, (k, dtype)


def test_views_that_are_not_one_byte_range_fall_back_to_the_loaded_tensor(tmp_path):
    """A strided view (every other column), a legacy pickle and an integer tensor have no span;
    inspect's scan still answers from the loaded tensor."""
    import torch

    from loratool.inspect import _finite_and_zero

    base = torch.zeros(4, 8)
    base[:, 1::2] = float("nan")  # NaN only in the columns the view skips
    path = _saved(tmp_path, {"strided": base[:, ::2], "ints": torch.arange(4)})
    legacy = tmp_path / "legacy.pt"
    torch.save({"strided": base[:, ::2]}, legacy, _use_new_zipfile_serialization=False)
    for p in (path, legacy):
        store, span = _span_of(p, "strided")
        assert span is None and store.value_summary("strided") is None
        assert _finite_and_zero(store.lazy("strided")) == (True, True)
    assert _span_of(path, "ints")[1] is None


def test_a_big_endian_zip_is_read_in_its_byte_order(tmp_path):
    """A torch zip whose byteorder record says "big" (saved on a big-endian host): the scan reads
    each value in that order (a little-endian reading of 1.0 would be a tiny denormal, of NaN a
    finite number)."""
    pkl = _state_dict(_tensor("x.lora_matrix_A", "0", 64, (8, 8), (8, 1)), _tensor("x.lora_matrix_B", "1", 64, (8, 8), (8, 1)))
    path = tmp_path / "big.pt"
    _sparse_zip(path, pkl, {"0": struct.pack(">64f", *[1.0] * 63, float("nan")), "1": struct.pack(">64f", *[0.0] * 64)}, byteorder=b"big")
    store = _span_of(path, "x.lora_matrix_A")[0]
    assert store._span(store.entry("x.lora_matrix_A")).big_endian
    assert store.value_summary("x.lora_matrix_A") == (False, False)
    assert store.value_summary("x.lora_matrix_B") == (True, True)


def test_a_pickle_truncated_after_loading_is_one_line(tmp_path):
    """The zip shrinks after torch.load mapped it: the scan checks the size before each block
    and says so, instead of touching the mapping past the end (SIGBUS)."""
    numel = 1 << 24
    path = tmp_path / "a.pt"
    _sparse_zip(path, _state_dict(_tensor("a", "0", numel, (numel,), (1,))), {"0": numel * 4})
    from loratool.errors import FormatError
    from loratool.io.store import TensorStore

    store = TensorStore([path])
    with open(path, "r+b") as fh:
        fh.truncate(numel)  # a quarter of the storage is left
    with pytest.raises(FormatError, match="truncated while being read"):
        store.value_summary("a", chunk=1 << 16)
