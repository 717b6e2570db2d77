"""Fuzz: mutated fixtures through inspect, merge, convert, verify and rerank.

Every case builds one hostile or broken input from the smallest fixtures (the llama-rslora
adapter, the llama base, a clean merge of the two, and that adapter converted to GGUF, MLX and
LitGPT) and runs one command on it in-process (click's CliRunner) under a time limit.
Invariants, for every case:

- exit 0 or 2 (verify may also exit 1), never a traceback;
- on failure exactly one stderr line, starting ``error:``, and never ``internal error`` or
  ``out of memory``; on success no ``error:`` line and OUT exists;
- no ``.NAME.loratool-tmp-*`` / ``-old-*`` sibling left, the inputs byte for byte unchanged;
- the cases tagged ``huge`` (headers and configs claiming terabytes) run in real forked
  subprocesses under RLIMIT_AS (a few GB above the interpreter's own mappings) and must not
  grow the resident set by more than ``PEAK_LIMIT``.

A malicious pickle (one that would create a file) is among the inputs of every command; the
file must never appear.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import ADAPTERS, BASES, invoke

A_SRC = ADAPTERS / "llama-rslora"
B_SRC = BASES / "llama"
ST = "adapter_model.safetensors"
CFG = "adapter_config.json"
MST = "model.safetensors"
CASE_TIME_LIMIT = 90  # seconds; a healthy case takes well under one on a loaded machine
PEAK_LIMIT = 300 << 20  # bytes of resident-set growth allowed to a run on these tiny inputs
AS_EXTRA = 1 << 30  # address space allowed beyond the interpreter's own mappings
MARKER = "loratool-fuzz-pwned"  # the file a malicious pickle would create (in the case folder)

COMMANDS = ("inspect", "merge", "convert", "verify", "rerank")
BASE_COMMANDS = ("inspect", "merge", "convert", "verify")  # rerank never reads a base
CONVERT_TARGETS = ("peft", "mlx", "gguf", "litgpt", "scratch", "lit-llama")
RERANK_RULES = (("--rank", "2"), ("--energy", "0.9"), ("--sv-ratio", "10"), ("--fro-error", "0.5"), ("--rank", "1000"))


# ----------------------------------------------------------------------------- file trees

DIR, FIFO = object(), object()  # tree values besides bytes: a folder, a named pipe


@dataclass
class Link:
    target: str  # relative to the tree's folder, or absolute


Tree = dict  # relative path -> bytes | DIR | FIFO | Link


def read_tree(folder: Path) -> Tree:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def write_tree(tree: Tree, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for rel, value in tree.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if value is DIR:
            p.mkdir(exist_ok=True)
        elif value is FIFO:
            os.mkfifo(p)
        elif isinstance(value, Link):
            os.symlink(value.target, p)
        else:
            p.write_bytes(value)


def tree_digest(folder: Path) -> dict[str, str]:
    """What a folder holds (names, kinds, content hashes); FIFOs are never opened."""
    out = {}
    if not folder.exists() and not folder.is_symlink():
        return out
    if folder.is_file():
        return {".": hashlib.sha256(folder.read_bytes()).hexdigest()}
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir" if p.is_dir() else "special"
    return out


def leftovers(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        found += [os.path.join(root, n) for n in dirs + files if ".loratool-tmp-" in n or ".loratool-old-" in n]
    return found


# ----------------------------------------------------------------------------- safetensors surgery


def st_split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def st_join(header, body: bytes, *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + body


def st_tensors(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def header_edit(fn: Callable[[dict, list[str], bytes], object], file: str = ST):
    """A mutation editing the parsed header of ``file`` (fn may return a new body)."""

    def apply(tree: Tree) -> None:
        header, body = st_split(tree[file])
        new_body = fn(header, st_tensors(header), body)
        tree[file] = st_join(header, new_body if isinstance(new_body, bytes) else body)

    return apply


def raw_header(fn: Callable[[bytes], bytes], file: str = ST):
    """A mutation replacing the header text of ``file`` (the length prefix follows it)."""

    def apply(tree: Tree) -> None:
        n = struct.unpack("<Q", tree[file][:8])[0]
        text, body = tree[file][8 : 8 + n], tree[file][8 + n :]
        new = fn(text)
        tree[file] = struct.pack("<Q", len(new)) + new + body

    return apply


def bytes_edit(fn: Callable[[bytes], bytes], file: str = ST):
    def apply(tree: Tree) -> None:
        tree[file] = fn(tree[file])

    return apply


def tensors_edit(fn: Callable[[dict], None], file: str = ST):
    """A mutation rewriting ``file`` as a valid safetensors file from an edited state dict."""

    def apply(tree: Tree) -> None:
        from safetensors.torch import load, save

        sd = dict(load(tree[file]))
        fn(sd)
        tree[file] = save({k: v.clone().contiguous() for k, v in sd.items()})

    return apply


def config_edit(patch: dict | Callable[[dict], None], file: str = CFG):
    def apply(tree: Tree) -> None:
        cfg = json.loads(tree[file])
        if callable(patch):
            patch(cfg)
        else:
            cfg.update(patch)
        tree[file] = json.dumps(cfg).encode()

    return apply


def config_text(text: bytes | str, file: str = CFG):
    def apply(tree: Tree) -> None:
        tree[file] = text.encode() if isinstance(text, str) else text

    return apply


def set_entry(file: str, value):
    def apply(tree: Tree) -> None:
        if value is None:
            tree.pop(file, None)
        else:
            tree[file] = value

    return apply


def chain(*fns):
    def apply(tree: Tree) -> None:
        for f in fns:
            f(tree)

    return apply


# ----------------------------------------------------------------------------- hostile pickles


class _Evil:
    """Unpickling this runs ``touch MARKER`` in the current folder."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def evil_pickle() -> bytes:
    return pickle.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Evil()})


def torch_bytes(obj, *, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def legacy_huge_claim(numel: int) -> bytes:
    """A legacy torch pickle whose storage claims ``numel`` floats while holding 16."""
    data = torch_bytes({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 4)}, legacy=True)
    old = b"K\x10N"  # BININT1 16, then the persistent id's NONE
    assert data.count(old) == 1
    return data.replace(old, b"\x8a\x08" + numel.to_bytes(8, "little") + b"N")


def st_to_torch(tree: Tree, *, legacy: bool = False) -> None:
    from safetensors.torch import load

    sd = load(tree.pop(ST))
    tree["adapter_model.bin"] = torch_bytes(dict(sd), legacy=legacy)


# ----------------------------------------------------------------------------- mutations


@dataclass
class Mutation:
    name: str
    target: str  # "adapter", "base", "gguf", "mlx", "litgpt"
    apply: Callable[[Tree], None]
    huge: bool = False  # claims far more memory than the input holds: run under RLIMIT_AS
    arg: str | None = None  # the path handed to the command, relative to the tree (default: the folder)
    commands: tuple[str, ...] = COMMANDS


def _flip_bytes(seed: int, lo: int, hi_fn, count: int):
    def fn(data: bytes) -> bytes:
        rnd = random.Random(seed)
        b = bytearray(data)
        hi = hi_fn(b)
        for _ in range(count):
            b[rnd.randrange(lo, hi)] = rnd.randrange(256)
        return bytes(b)

    return fn


def _header_end(b) -> int:
    return 8 + struct.unpack("<Q", bytes(b[:8]))[0]


def _cut(n):
    return lambda d: d[: n(d) if callable(n) else n]


def header_mutations(target: str, file: str) -> list[Mutation]:
    """Hostile safetensors headers, for the adapter's weights or the base's."""
    M: list[Mutation] = []

    def add(name, fn, **kw):
        M.append(Mutation(f"{target}-st-{name}", target, fn, **kw))

    def on(i, key, value):
        def f(h, names, body):
            if value is KeyError:
                h[names[i]].pop(key, None)
            else:
                h[names[i]][key] = value(h[names[i]], len(body)) if callable(value) else value
        return header_edit(f, file)

    first, last = 0, -1
    offsets = lambda fn: (lambda e, n: fn(e["data_offsets"], n))  # noqa: E731
    for i, tag in ((first, "first"), (last, "last")):
        add(f"begin+1-{tag}", on(i, "data_offsets", offsets(lambda o, n: [o[0] + 1, o[1]])))
        add(f"end+1-{tag}", on(i, "data_offsets", offsets(lambda o, n: [o[0], o[1] + 1])))
        add(f"end-1-{tag}", on(i, "data_offsets", offsets(lambda o, n: [o[0], o[1] - 1])))
        add(f"swapped-{tag}", on(i, "data_offsets", offsets(lambda o, n: [o[1], o[0]])))
        add(f"past-end-{tag}", on(i, "data_offsets", offsets(lambda o, n: [n - (o[1] - o[0]) + 8, n + 8])))
        add(f"negative-{tag}", on(i, "data_offsets", offsets(lambda o, n: [o[0] - 8, o[1] - 8])))
    add("end-2^63", on(first, "data_offsets", offsets(lambda o, n: [o[0], 2**63 - 1])))
    add("end-2^64", on(first, "data_offsets", offsets(lambda o, n: [o[0], 2**64 + 5])))
    add("offsets-one", on(first, "data_offsets", [0]))
    add("offsets-three", on(first, "data_offsets", [0, 16, 32]))
    add("offsets-string", on(first, "data_offsets", "0-1024"))
    add("offsets-null", on(first, "data_offsets", None))
    add("offsets-float", on(first, "data_offsets", offsets(lambda o, n: [float(o[0]), float(o[1])])))
    add("offsets-bool", on(first, "data_offsets", [False, True]))
    add("offsets-missing", on(first, "data_offsets", KeyError))

    def overlap_same(h, names, body):
        h[names[1]]["data_offsets"] = list(h[names[0]]["data_offsets"])
        h[names[1]]["shape"] = list(h[names[0]]["shape"])
        h[names[1]]["dtype"] = h[names[0]]["dtype"]

    add("overlap-same", header_edit(overlap_same, file))

    def overlap_half(h, names, body):
        e = h[names[1]]
        b, en = e["data_offsets"]
        half = (en - b) // 2
        e["data_offsets"] = [b - half, en - half]

    add("overlap-half", header_edit(overlap_half, file))

    def all_at_zero(h, names, body):
        for k in names:
            b, e = h[k]["data_offsets"]
            h[k]["data_offsets"] = [0, e - b]

    add("overlap-all-at-zero", header_edit(all_at_zero, file))

    # headers claiming terabytes
    add("len-2^40", bytes_edit(lambda d: struct.pack("<Q", 1 << 40) + d[8:], file), huge=True)
    add("len-2^64-1", bytes_edit(lambda d: b"\xff" * 8 + d[8:], file), huge=True)
    add("len-file+1", bytes_edit(lambda d: struct.pack("<Q", len(d) - 8 + 1) + d[8:], file))
    add("len-file", bytes_edit(lambda d: struct.pack("<Q", len(d)) + d[8:], file))
    add("len-zero", bytes_edit(lambda d: struct.pack("<Q", 0) + d[8:], file))
    add("len-short", bytes_edit(lambda d: struct.pack("<Q", 7) + d[8:], file))
    add("shape-terabytes", on(first, "shape", [1 << 20, 1 << 20]), huge=True)
    add("shape-terabytes-consistent", chain(on(first, "shape", [1 << 20, 1 << 20]),
                                            on(first, "data_offsets", offsets(lambda o, n: [o[0], o[0] + 4 * (1 << 40)]))), huge=True)
    add("shape-2^62-zero", chain(on(first, "shape", [0, 1 << 62]), on(first, "data_offsets", offsets(lambda o, n: [o[0], o[0]]))), huge=True)
    add("shape-2^62-squared", on(first, "shape", [1 << 62, 1 << 62]), huge=True)
    add("shape-many-dims", on(first, "shape", [1 << 16] * 8), huge=True)

    # dtypes
    for code in ("F4", "Q4_K", "", "f32", "I32", "U32", "I64", "F64", "F16", "BOOL", "U8", "F8_E4M3"):
        add(f"dtype-{code or 'empty'}", on(first, "dtype", code))
    add("dtype-null", on(first, "dtype", None))
    add("dtype-number", on(first, "dtype", 5))
    add("dtype-U8-reshaped", chain(on(first, "dtype", "U8"), on(first, "shape", lambda e, n: [e["shape"][0] * 4, e["shape"][1]])))
    add("dtype-F16-reshaped", chain(on(first, "dtype", "F16"), on(first, "shape", lambda e, n: [e["shape"][0] * 2, e["shape"][1]])))
    def all_int(h, names, body):
        for k in names:
            h[k]["dtype"] = "I32"

    add("dtype-I32-all", header_edit(all_int, file))

    # shapes
    add("shape-transposed", on(first, "shape", lambda e, n: list(reversed(e["shape"]))))
    add("shape-flat", on(first, "shape", lambda e, n: [math.prod(e["shape"])]))
    add("shape-3d", on(first, "shape", lambda e, n: e["shape"] + [1]))
    add("shape-scalar", on(first, "shape", []))
    add("shape-negative", on(first, "shape", lambda e, n: [-s for s in e["shape"]]))
    add("shape-float", on(first, "shape", lambda e, n: [float(s) for s in e["shape"]]))
    add("shape-string", on(first, "shape", lambda e, n: [str(s) for s in e["shape"]]))
    add("shape-bool", on(first, "shape", [True, True]))
    add("shape-nested", on(first, "shape", [[4], [64]]))
    add("shape-null", on(first, "shape", None))

    # names
    def rename(i, new):
        def f(h, names, body):
            h[new if isinstance(new, str) else new(names[i])] = h.pop(names[i])
        return header_edit(f, file)

    add("name-empty", rename(first, ""))
    add("name-long", rename(first, "x" * 20000))
    add("name-traversal", rename(first, "../../../../etc/passwd"))
    add("name-unicode", rename(first, lambda k: k.replace("layers", "lаyers")))
    add("name-dots", rename(first, lambda k: ".." + k + ".."))
    add("name-nul", rename(first, lambda k: k + "\x00"))

    def dup_key(text: bytes) -> bytes:
        h = json.loads(text)
        names = st_tensors(h)
        e = dict(h[names[1]])
        body = json.dumps(h)[:-1]
        return (body + ", " + json.dumps(names[0]) + ": " + json.dumps(e) + "}").encode()

    add("duplicate-name", raw_header(dup_key, file))
    add("entry-not-object", header_edit(lambda h, n, b: h.__setitem__(n[0], 5), file))
    add("entry-list", header_edit(lambda h, n, b: h.__setitem__(n[0], []), file))
    add("entry-empty", header_edit(lambda h, n, b: h.__setitem__(n[0], {}), file))
    add("drop-first-entry", header_edit(lambda h, n, b: h.pop(n[0]), file))
    def drop_all(h, names, body):
        for k in names:
            h.pop(k)
        return b""

    add("drop-all-entries", header_edit(drop_all, file))

    # metadata and the JSON itself
    for tag, value in (("list", []), ("string", "x"), ("number", 5), ("nested", {"a": {"b": [1]}}),
                       ("non-string", {"format": 5}), ("big", {"k": "v" * 200_000})):
        add(f"metadata-{tag}", header_edit(lambda h, n, b, v=value: h.__setitem__("__metadata__", v), file))
    for tag, text in (("array", b"[]"), ("string", b'"x"'), ("null", b"null"), ("number", b"5"), ("not-json", b"{not json"),
                      ("latin1", '{"é": 1}'.encode("latin-1")), ("nan", b'{"x": NaN}'), ("deep", b"[" * 100_000 + b"]" * 100_000),
                      ("deep-object", b'{"a":' * 50_000 + b"1" + b"}" * 50_000), ("nul-padded", None), ("bom", None)):
        if tag == "nul-padded":
            add(f"header-{tag}", raw_header(lambda t: t.rstrip() + b"\x00" * 8, file))
        elif tag == "bom":
            add(f"header-{tag}", raw_header(lambda t: b"\xef\xbb\xbf" + t, file))
        else:
            add(f"header-{tag}", raw_header(lambda t, x=text: x, file))

    # truncated, extended, empty, flipped
    for tag, n in (("0", 0), ("1", 1), ("7", 7), ("8", 8), ("9", 9), ("mid-header", lambda d: _header_end(d) // 2),
                   ("header-1", lambda d: _header_end(d) - 1), ("header", _header_end), ("header+1", lambda d: _header_end(d) + 1),
                   ("mid-data", lambda d: (_header_end(d) + len(d)) // 2), ("last-byte", lambda d: len(d) - 1)):
        add(f"truncate-{tag}", bytes_edit(_cut(n), file))
    add("append-zeros", bytes_edit(lambda d: d + b"\0" * 8, file))
    add("append-garbage", bytes_edit(lambda d: d + bytes(range(256)) * 4, file))
    for seed in range(12):
        add(f"flip-header-{seed}", bytes_edit(_flip_bytes(seed, 8, _header_end, 1 + seed % 3), file))
    for seed in range(3):
        add(f"flip-data-{seed}", bytes_edit(_flip_bytes(100 + seed, 200, len, 16), file))

    # data values
    def fill(value):
        def f(h, names, body):
            e = h[names[0]]
            if e["dtype"] != "F32":
                return None
            b, en = e["data_offsets"]
            return body[:b] + struct.pack("<f", value) * ((en - b) // 4) + body[en:]
        return header_edit(f, file)

    add("data-nan", fill(float("nan")))
    add("data-inf", fill(float("inf")))
    add("data-huge", fill(3e38))
    add("data-zero", fill(0.0))
    return M


def adapter_mutations() -> list[Mutation]:
    M = header_mutations("adapter", ST)

    def add(name, fn, **kw):
        M.append(Mutation(f"adapter-{name}", "adapter", fn, **kw))

    # valid files, wrong contents
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    v = "base_model.model.model.layers.0.self_attn.v_proj"

    def t(fn):
        return tensors_edit(fn)

    add("rank-mismatch", t(lambda sd: sd.__setitem__(f"{q}.lora_A.weight", sd[f"{q}.lora_A.weight"][:3])))
    add("in-features-mismatch", t(lambda sd: sd.__setitem__(f"{q}.lora_A.weight", sd[f"{q}.lora_A.weight"][:, :32].clone())))
    add("out-features-mismatch", t(lambda sd: sd.__setitem__(f"{q}.lora_B.weight", torch.cat([sd[f"{q}.lora_B.weight"]] * 2))))
    add("rank-zero", t(lambda sd: sd.update({f"{q}.lora_A.weight": torch.zeros(0, 64), f"{q}.lora_B.weight": torch.zeros(64, 0)})))
    add("rank-zero-config-zero", chain(t(lambda sd: sd.update({f"{q}.lora_A.weight": torch.zeros(0, 64), f"{q}.lora_B.weight": torch.zeros(64, 0)})),
                                        config_edit({"rank_pattern": {"q_proj": 0}})))
    add("rank-64", chain(t(lambda sd: sd.update({f"{q}.lora_A.weight": torch.randn(64, 64), f"{q}.lora_B.weight": torch.randn(64, 64)})),
                         config_edit({"rank_pattern": {"model.layers.0.self_attn.q_proj": 64}})))
    add("rank-above-dims", chain(t(lambda sd: sd.update({f"{q}.lora_A.weight": torch.randn(100, 64), f"{q}.lora_B.weight": torch.randn(64, 100)})),
                                 config_edit({"rank_pattern": {"model.layers.0.self_attn.q_proj": 100}})))
    for dt in (torch.int32, torch.int8, torch.bool, torch.uint8, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        add(f"factors-{str(dt)[6:]}", t(lambda sd, dt=dt: sd.update({k: x.to(dt) for k, x in sd.items()})))
    add("factors-mixed-dtypes", t(lambda sd: sd.update({f"{q}.lora_A.weight": sd[f"{q}.lora_A.weight"].half(),
                                                          f"{q}.lora_B.weight": sd[f"{q}.lora_B.weight"].bfloat16()})))
    add("factor-nan", t(lambda sd: sd[f"{q}.lora_A.weight"].__setitem__((0, 0), float("nan"))))
    add("factor-inf", t(lambda sd: sd[f"{q}.lora_B.weight"].__setitem__((0, 0), float("inf"))))
    add("factor-overflow", t(lambda sd: sd.update({k: x * 1e30 for k, x in sd.items()})))
    add("module-absent-from-base", t(lambda sd: sd.update({k.replace("layers.0", "layers.7"): x for k, x in list(sd.items())})))
    add("module-on-norm", t(lambda sd: sd.update({f"base_model.model.model.norm.lora_A.weight": torch.randn(4, 64),
                                                     f"base_model.model.model.norm.lora_B.weight": torch.randn(64, 4)})))
    add("module-on-embedding-as-linear", t(lambda sd: sd.update({"base_model.model.model.embed_tokens.lora_A.weight": torch.randn(4, 64),
                                                                    "base_model.model.model.embed_tokens.lora_B.weight": torch.randn(256, 4)})))
    add("embedding-parts-on-linear", t(lambda sd: sd.update({f"{q}.lora_embedding_A": sd.pop(f"{q}.lora_A.weight"),
                                                               f"{q}.lora_embedding_B": sd.pop(f"{q}.lora_B.weight")})))
    add("missing-lora-B", t(lambda sd: sd.pop(f"{q}.lora_B.weight")))
    add("missing-lora-A", t(lambda sd: sd.pop(f"{v}.lora_A.weight")))
    add("bias-wrong-shape", t(lambda sd: sd.__setitem__(f"{q}.lora_B.bias", torch.randn(5))))
    add("bias-2d", t(lambda sd: sd.__setitem__(f"{q}.lora_B.bias", torch.randn(64, 4))))
    add("bias-right-shape", t(lambda sd: sd.__setitem__(f"{q}.lora_B.bias", torch.randn(64))))
    add("bias-on-lora-A", t(lambda sd: sd.__setitem__(f"{q}.lora_A.bias", torch.randn(4))))
    add("magnitude-wrong-length", t(lambda sd: sd.__setitem__(f"{q}.lora_magnitude_vector", torch.rand(7))))
    add("magnitude-right-length", t(lambda sd: sd.__setitem__(f"{q}.lora_magnitude_vector", torch.rand(64) + 0.5)))
    add("magnitude-zero", t(lambda sd: sd.__setitem__(f"{q}.lora_magnitude_vector", torch.zeros(64))))
    add("magnitude-2d", t(lambda sd: sd.__setitem__(f"{q}.lora_magnitude_vector", torch.rand(64, 2))))
    add("to-save-wrong-shape", t(lambda sd: sd.__setitem__("base_model.model.lm_head.modules_to_save.weight", torch.randn(3, 3))))
    add("to-save-right-shape", t(lambda sd: sd.__setitem__("base_model.model.lm_head.modules_to_save.weight", torch.randn(256, 64))))
    add("to-save-absent", t(lambda sd: sd.__setitem__("base_model.model.classifier.modules_to_save.weight", torch.randn(2, 64))))
    add("to-save-int", t(lambda sd: sd.__setitem__("base_model.model.lm_head.modules_to_save.weight", torch.ones(256, 64, dtype=torch.int32))))
    add("stray-lora-E", t(lambda sd: sd.__setitem__(f"{q}.lora_E", torch.randn(4, 1))))
    add("adalora-without-E", config_edit({"peft_type": "ADALORA"}))
    add("adapter-named-keys", t(lambda sd: sd.update({k.replace(".weight", ".default.weight"): sd.pop(k) for k in list(sd)})))
    add("no-tensors", t(lambda sd: sd.clear()))
    add("factors-1d-3d", t(lambda sd: sd.update({f"{q}.lora_A.weight": torch.randn(256), f"{q}.lora_B.weight": torch.randn(64, 4, 1)})))
    add("factors-scalar", t(lambda sd: sd.update({f"{q}.lora_A.weight": torch.tensor(1.0), f"{q}.lora_B.weight": torch.tensor(2.0)})))

    # adapter_config.json
    for key, values in {
        "r": ["8", 8.5, 4.0, True, None, [], {}, 0, -1, -4, 10**12, 2**63, 10**400, 1e308, float("nan"), float("inf")],
        "lora_alpha": ["8", None, float("nan"), float("inf"), -8, 0, 1e308, 10**400, [1], True],
        "use_rslora": ["yes", 1, None, []],
        "use_dora": [True, "true"],
        "target_modules": [5, None, [], "q_proj", "(", [1, 2], [None], {"a": 1}],
        "rank_pattern": [{"q_proj": "x"}, {"(": 4}, {"q_proj": -1}, {"q_proj": [True, False]}, {"q_proj": 10**400}, [], {"q_proj": 0}],
        "alpha_pattern": [{"q_proj": "x"}, {"[": 4}, {"q_proj": float("nan")}, [], {"q_proj": 10**400}],
        "peft_type": ["IA3", 5, None, "lora", "ADALORA"],
        "task_type": [5, "FOO", []],
        "base_model_name_or_path": [5, None, "../../../../etc", "x" * 10000, ["a"]],
        "modules_to_save": [["lm_head"], "lm_head", [5]],
        "fan_in_fan_out": [True, "x"],
        "layers_to_transform": ["a", [0], -1, 5, [None]],
        "layers_pattern": [5, ["layers"], "("],
        "lora_bias": [True],
        "enable_lora": [[True, False, True]],
        "auto_mapping": [5],
    }.items():
        for i, value in enumerate(values):
            add(f"config-{key}-{i}", config_edit({key: value}), huge=(value in (10**12, 2**63, 10**400, 1e308) and key == "r"))
    add("config-missing-r", config_edit(lambda c: c.pop("r")))
    add("config-missing-alpha", config_edit(lambda c: c.pop("lora_alpha")))
    add("config-missing-peft-type", config_edit(lambda c: c.pop("peft_type")))
    for tag, text in (("list", "[]"), ("string", '"x"'), ("number", "5"), ("null", "null"), ("empty-object", "{}"), ("empty", ""),
                      ("not-json", "{not json"), ("truncated", None), ("deep", "[" * 100_000 + "]" * 100_000),
                      ("binary", bytes(range(256))), ("bom", None), ("utf16", None), ("nan-literal", '{"r": NaN, "lora_alpha": 8}')):
        if tag == "truncated":
            add(f"config-text-{tag}", lambda tr: tr.__setitem__(CFG, tr[CFG][: len(tr[CFG]) // 2]))
        elif tag == "bom":
            add(f"config-text-{tag}", lambda tr: tr.__setitem__(CFG, b"\xef\xbb\xbf" + tr[CFG]))
        elif tag == "utf16":
            add(f"config-text-{tag}", lambda tr: tr.__setitem__(CFG, tr[CFG].decode().encode("utf-16")))
        else:
            add(f"config-text-{tag}", config_text(text))

    # structure: missing, folders, pipes, links where files are expected
    add("no-weights", set_entry(ST, None))
    add("no-config", set_entry(CFG, None))
    add("empty-folder", chain(set_entry(ST, None), set_entry(CFG, None)))
    add("weights-is-folder", set_entry(ST, DIR))
    add("config-is-folder", set_entry(CFG, DIR))
    add("weights-is-fifo", set_entry(ST, FIFO))
    add("config-is-fifo", set_entry(CFG, FIFO))
    add("weights-dangling-link", set_entry(ST, Link("does-not-exist")))
    add("weights-link-loop", set_entry(ST, Link(ST)))
    add("config-link-to-folder", set_entry(CFG, Link(".")))
    add("weights-empty", set_entry(ST, b""))
    add("config-empty", set_entry(CFG, b""))
    add("arg-is-weights-file", lambda tr: None, arg=ST)
    add("arg-is-config-file", lambda tr: None, arg=CFG)
    add("arg-is-fifo", lambda tr: tr.__setitem__("pipe", FIFO), arg="pipe")
    add("arg-is-text-file", lambda tr: tr.__setitem__("weights.txt", b"hello"), arg="weights.txt")
    add("arg-is-empty-safetensors", lambda tr: tr.__setitem__("x.safetensors", b""), arg="x.safetensors")
    add("arg-is-garbage-gguf", lambda tr: tr.__setitem__("x.gguf", b"GGUF" + bytes(range(256))), arg="x.gguf")
    add("arg-is-garbage-bin", lambda tr: tr.__setitem__("x.bin", bytes(range(256)) * 3), arg="x.bin")
    add("arg-is-missing", lambda tr: None, arg="nope/nope")
    add("arg-is-dir-link-loop", lambda tr: tr.__setitem__("loop", Link("loop")), arg="loop")
    add("sub-adapters-only", lambda tr: tr.update({f"one/{k}": tr.pop(k) for k in list(tr)}))

    # pickles
    add("pickle-malicious", chain(set_entry(ST, None), set_entry("adapter_model.bin", evil_pickle())))
    add("pickle-malicious-beside", set_entry("adapter_model.bin", evil_pickle()))
    add("pickle-malicious-as-arg", lambda tr: tr.__setitem__("evil.pt", evil_pickle()), arg="evil.pt")
    add("pickle-torch-zip", lambda tr: st_to_torch(tr))
    add("pickle-torch-legacy", lambda tr: st_to_torch(tr, legacy=True))
    add("pickle-legacy-terabytes", chain(set_entry(ST, None), lambda tr: tr.__setitem__("adapter_model.bin", legacy_huge_claim(1 << 40))), huge=True)
    add("pickle-legacy-gigabyte", chain(set_entry(ST, None), lambda tr: tr.__setitem__("adapter_model.bin", legacy_huge_claim(1 << 28))), huge=True)
    add("pickle-random", chain(set_entry(ST, None), set_entry("adapter_model.bin", bytes(range(256)) * 8)))
    add("pickle-truncated-zip", chain(lambda tr: st_to_torch(tr), lambda tr: tr.__setitem__("adapter_model.bin", tr["adapter_model.bin"][:300])))
    add("pickle-list", chain(set_entry(ST, None), set_entry("adapter_model.bin", torch_bytes([torch.zeros(2), 1, "x"]))))
    add("pickle-strings", chain(set_entry(ST, None), set_entry("adapter_model.bin", torch_bytes({"a.lora_A.weight": "x", "a.lora_B.weight": 5}))))
    add("pickle-plain", chain(set_entry(ST, None), set_entry("adapter_model.bin", pickle.dumps({"a": 1}))))
    add("pickle-empty", chain(set_entry(ST, None), set_entry("adapter_model.bin", b"")))
    add("pickle-bytes8-huge", chain(set_entry(ST, None), set_entry("adapter_model.bin", b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"ab.")), huge=True)
    return M


def base_mutations() -> list[Mutation]:
    M = [m for m in header_mutations("base", MST) if not m.name.startswith("base-st-flip-data")]
    for m in M:
        m.commands = BASE_COMMANDS

    def add(name, fn, **kw):
        M.append(Mutation(f"base-{name}", "base", fn, commands=BASE_COMMANDS, **kw))

    for tag, text in (("list", "[]"), ("number", "5"), ("empty-object", "{}"), ("not-json", "{"), ("deep", "[" * 100_000 + "]" * 100_000)):
        add(f"config-text-{tag}", config_text(text, "config.json"))
    for key, value in (("model_type", 5), ("model_type", "gpt2"), ("tie_word_embeddings", "no"), ("architectures", 5),
                       ("architectures", [5]), ("torch_dtype", "int8"), ("vocab_size", -1), ("num_attention_heads", 0),
                       ("hidden_size", "x"), ("num_hidden_layers", 10**400)):
        add(f"config-{key}-{value!s:.10}", config_edit({key: value}, "config.json"))
    add("no-config", set_entry("config.json", None))
    add("config-is-folder", set_entry("config.json", DIR))
    add("config-is-fifo", set_entry("config.json", FIFO))
    add("no-weights", set_entry(MST, None))
    add("weights-is-folder", set_entry(MST, DIR))
    add("weights-is-fifo", set_entry(MST, FIFO))
    add("weights-empty", set_entry(MST, b""))
    add("generation-config-broken", set_entry("generation_config.json", b"{"))
    add("generation-config-folder", set_entry("generation_config.json", DIR))
    vq = "model.layers.0.self_attn.v_proj.weight"
    add("tensor-transposed", tensors_edit(lambda sd: sd.__setitem__(vq, sd[vq].T.contiguous()), MST))
    add("tensor-int", tensors_edit(lambda sd: sd.__setitem__(vq, sd[vq].to(torch.int32)), MST))
    add("tensor-bool", tensors_edit(lambda sd: sd.__setitem__(vq, sd[vq] > 0), MST))
    add("tensor-half", tensors_edit(lambda sd: sd.__setitem__(vq, sd[vq].half()), MST))
    add("tensor-nan", tensors_edit(lambda sd: sd[vq].__setitem__((0, 0), float("nan")), MST))
    add("tensor-missing", tensors_edit(lambda sd: sd.pop(vq), MST))
    add("tensor-3d", tensors_edit(lambda sd: sd.__setitem__(vq, sd[vq].reshape(32, 8, 8)), MST))
    add("tensor-extra", tensors_edit(lambda sd: sd.__setitem__("model.layers.0.self_attn.v_proj.lora_A.weight", torch.zeros(2, 2)), MST))
    add("no-tensors", tensors_edit(lambda sd: sd.clear(), MST))

    def index(weight_map):
        return lambda tr: tr.__setitem__("model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}).encode())

    add("index-list", index([]))
    add("index-empty", index({}))
    add("index-traversal", index({vq: "../model.safetensors"}))
    add("index-missing-shard", index({vq: "model-00002.safetensors"}))
    add("index-shard-number", index({vq: 5}))
    add("index-shard-folder", chain(index({vq: "shard.safetensors"}), set_entry("shard.safetensors", DIR)))
    add("index-not-json", set_entry("model.safetensors.index.json", b"{"))
    add("index-partial", index({vq: MST}))
    add("index-shard-fifo", chain(index({vq: "shard.safetensors"}), set_entry("shard.safetensors", FIFO)))
    add("pickle-malicious", chain(set_entry(MST, None), set_entry("pytorch_model.bin", evil_pickle())))
    add("pickle-legacy-terabytes", chain(set_entry(MST, None), set_entry("pytorch_model.bin", legacy_huge_claim(1 << 40))), huge=True)
    return M


def converted_mutations(target: str, main_file: str) -> list[Mutation]:
    """Mutations of the adapter as converted to another format (its main weights file)."""
    M: list[Mutation] = []

    def add(name, fn, **kw):
        M.append(Mutation(f"{target}-{name}", target, fn, commands=("inspect", "merge", "convert", "rerank"), **kw))

    for tag, n in (("0", 0), ("4", 4), ("16", 16), ("half", lambda d: len(d) // 2), ("last-byte", lambda d: len(d) - 1)):
        add(f"truncate-{tag}", bytes_edit(_cut(n), main_file))
    for seed in range(10):
        add(f"flip-{seed}", bytes_edit(_flip_bytes(seed, 0, lambda b: min(len(b), 512), 1 + seed % 3), main_file))
    add("append-garbage", bytes_edit(lambda d: d + bytes(range(256)), main_file))
    add("empty", set_entry(main_file, b""))
    add("is-folder", set_entry(main_file, DIR))
    if target == "gguf":
        # GGUF: magic, version u32, tensor count u64, kv count u64
        for tag, off, value in (("tensor-count-huge", 8, 1 << 62), ("kv-count-huge", 16, 1 << 62), ("version-99", 4, 99)):
            size = 4 if tag.startswith("version") else 8
            add(tag, bytes_edit(lambda d, o=off, v=value, s=size: d[:o] + v.to_bytes(s, "little") + d[o + s:], main_file),
                huge=tag.endswith("huge"))
    elif main_file.endswith(".safetensors"):
        add("len-2^40", bytes_edit(lambda d: struct.pack("<Q", 1 << 40) + d[8:], main_file), huge=True)
        add("shape-terabytes", header_edit(lambda h, n, b: h[n[0]].__setitem__("shape", [1 << 20, 1 << 20]), main_file), huge=True)
        add("dtype-I32", header_edit(lambda h, n, b: h[n[0]].__setitem__("dtype", "I32"), main_file))
        add("shape-transposed", header_edit(lambda h, n, b: h[n[0]].__setitem__("shape", list(reversed(h[n[0]]["shape"]))), main_file))
    sides = {"mlx": ("adapter_config.json",), "litgpt": ("hyperparameters.yaml", "model_config.yaml")}.get(target, ())
    for side in sides:
        add(f"{side}-garbage", set_entry(side, b"\x00{[: not valid"))
        add(f"{side}-folder", set_entry(side, DIR))
    return M


# ----------------------------------------------------------------------------- clean inputs


def _fast_root() -> Path:
    """A folder on tmpfs when there is one (no fsync cost), else the system temp folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="loratool-fuzz-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="loratool-fuzz-"))


class Env:
    """Clean inputs built once: the fixtures, a clean merge, the adapter in other formats."""

    def __init__(self, root: Path):
        self.root = root
        self.clean = root / "clean"
        # the fixtures' own folder names: the adapter's base_model_name_or_path matches BASE
        self.adapter = self.clean / A_SRC.name
        self.base = self.clean / B_SRC.name
        shutil.copytree(A_SRC, self.adapter)
        shutil.copytree(B_SRC, self.base)
        self.merged = self.clean / "merged"
        self.converted: dict[str, Path] = {}
        from loratool.cli import main

        missing = sorted(set(COMMANDS) - set(main.commands))
        assert not missing, f"commands the fuzz suite covers are missing: {missing}"
        code, out, err = invoke("merge", self.base, self.adapter, self.merged)
        assert code == 0, err
        for fmt, ext in (("gguf", ".gguf"), ("mlx", ""), ("litgpt", "")):
            dst = self.clean / f"as-{fmt}{ext}"
            code, out, err = invoke("convert", self.adapter, dst, "--to", fmt, "--base", self.base)
            assert code == 0, err
            self.converted[fmt] = dst
        self.digests = {p: tree_digest(p) for p in self.clean.iterdir()}


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    mutation: Mutation
    command: str
    variant: int = 0

    @property
    def id(self) -> str:
        return f"{self.command}:{self.mutation.name}"


def all_mutations() -> list[Mutation]:
    muts = adapter_mutations() + base_mutations()
    muts += converted_mutations("gguf", "")
    muts += converted_mutations("mlx", "adapters.safetensors")
    muts += converted_mutations("litgpt", "lit_model.pth.lora")
    names = [m.name for m in muts]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    return muts


MUTATIONS = all_mutations()


# Every mutation runs through inspect and, in turn, half of the other commands (about 3 minutes
# on 2 cores); LORATOOL_FUZZ_FULL=1 runs every mutation through every command.
FULL = os.environ.get("LORATOOL_FUZZ_FULL", "") not in ("", "0")


# the other commands that read an adapter and write OUT, each on every third adapter mutation
EXTRA_COMMANDS = ("unmerge", "rescale", "combine")


def all_cases() -> list[Case]:
    cases = []
    for i, m in enumerate(MUTATIONS):
        others = [c for c in m.commands if c != "inspect"]
        for j, cmd in enumerate(m.commands):
            if FULL or cmd == "inspect" or (i + others.index(cmd)) % 2 == 0:
                cases.append(Case(m, cmd, i))
        if m.target == "adapter":
            for k, cmd in enumerate(EXTRA_COMMANDS):
                if FULL or i % len(EXTRA_COMMANDS) == k:
                    cases.append(Case(m, cmd, i))
    return cases


CASES = all_cases()
IN_PROCESS = [c for c in CASES if not c.mutation.huge]
IN_FORK = [c for c in CASES if c.mutation.huge]


@pytest.fixture(scope="module")
def env():
    root = _fast_root()
    try:
        e = Env(root)
        yield e
        for p, digest in e.digests.items():
            assert tree_digest(p) == digest, f"the clean input {p} was modified"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _materialize(case: Case, env: Env, folder: Path) -> tuple[Path, Path]:
    """Write the mutated input into folder; returns (the path to hand over, the input folder)."""
    m = case.mutation
    if m.target in ("adapter", "base"):
        src = env.adapter if m.target == "adapter" else env.base
        tree = read_tree(src)
        m.apply(tree)
        dst = folder / src.name
        write_tree(tree, dst)
        return (dst / m.arg if m.arg else dst), dst
    conv = env.converted[m.target]
    dst = folder / conv.name
    if conv.is_file():
        dst.mkdir()
        tree = {"": conv.read_bytes()}
        m.apply(tree)
        payload = tree.get("")
        target = dst / conv.name
        if payload is DIR:
            target.mkdir()
        elif payload is not None:
            target.write_bytes(payload)
        return target, dst
    tree = read_tree(conv)
    m.apply(tree)
    write_tree(tree, dst)
    return dst, dst


def _args(case: Case, env: Env, arg: Path, out: Path) -> list | None:
    """The command line of a case, or None when the command does not apply to this input."""
    m, cmd = case.mutation, case.command
    on_base = m.target == "base"
    adapter = env.adapter if on_base else arg
    base = arg if on_base else env.base
    if cmd == "inspect":
        return ["inspect", adapter, "--base", base] if on_base or case.variant % 2 else ["inspect", adapter]
    if cmd == "merge":
        return ["merge", base, adapter, out]
    if cmd == "convert":
        to = CONVERT_TARGETS[case.variant % len(CONVERT_TARGETS)]
        if not on_base and to == m.target:
            to = "peft"
        return ["convert", adapter, out, "--to", to, "--base", base]
    if cmd == "rerank":
        return ["rerank", adapter, out, *RERANK_RULES[case.variant % len(RERANK_RULES)]]
    if cmd == "unmerge":
        return ["unmerge", env.merged, adapter, out]
    if cmd == "rescale":
        return ["rescale", adapter, out, *(["--alpha", "16"], ["--rslora"], ["--no-rslora", "--split", "balanced"])[case.variant % 3]]
    if cmd == "combine":
        return ["combine", adapter, env.adapter, out, *([], ["--method", "svd", "--rank", "2"])[case.variant % 2]]
    if cmd == "verify":
        # a broken base is handed over as the merged model on odd cases and as the base on even ones
        merged = env.merged
        if on_base and case.variant % 2:
            base, merged = env.base, arg
        return ["verify", base, adapter, merged]
    raise AssertionError(cmd)


class _Hang(BaseException):
    """Raised by the alarm of a case that ran past its time limit (not an Exception: nothing may catch it)."""


def _alarm(signum, frame):
    raise _Hang()


def check_result(case: Case, code: int, stdout: str, stderr: str, out: Path, folder: Path, before: dict, input_dir: Path) -> None:
    where = f"[{case.id}] exit {code}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-3000:]}"
    allowed = {0, 1, 2} if case.command == "verify" else {0, 2}
    assert code in allowed, where
    assert "Traceback" not in stderr and "Traceback" not in stdout, where
    lines = [l for l in stderr.splitlines() if l.strip()]
    if code != 0:
        # exactly one line: warnings held during the run are folded into it
        assert len(lines) == 1, f"expected exactly one error line\n{where}"
        assert lines[0].startswith("error: "), where
        assert "internal error" not in lines[0], where
        assert "out of memory" not in lines[0], where
        assert not out.exists(), f"a failed run left OUT\n{where}"
    else:
        assert not any(l.startswith("error:") for l in lines), where
        if case.command in ("merge", "convert", "rerank", *EXTRA_COMMANDS) and code == 0:
            assert out.exists(), where
    assert not leftovers(folder), f"temporary siblings left: {leftovers(folder)}\n{where}"
    assert tree_digest(input_dir) == before, f"the input was modified\n{where}"
    assert not list(folder.rglob(MARKER)) and not (Path.cwd() / MARKER).exists(), f"a pickle ran code\n{where}"


def _run_case(case: Case, env: Env, folder: Path):
    arg, input_dir = _materialize(case, env, folder)
    out = folder / ("out.gguf" if case.command == "convert" and "gguf" in str(_peek_target(case)) else "out")
    args = _args(case, env, arg, out)
    before = tree_digest(input_dir)
    return arg, input_dir, out, args, before


def _peek_target(case: Case) -> str:
    to = CONVERT_TARGETS[case.variant % len(CONVERT_TARGETS)]
    return "peft" if case.mutation.target == to else to


@pytest.mark.parametrize("case", IN_PROCESS, ids=[c.id for c in IN_PROCESS])
def test_fuzz_case(case: Case, env: Env):
    folder = Path(tempfile.mkdtemp(dir=env.root))
    cwd = os.getcwd()
    try:
        os.chdir(folder)  # a pickle that ran code would touch MARKER here
        arg, input_dir, out, args, before = _run_case(case, env, folder)
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(CASE_TIME_LIMIT)
        t0 = time.perf_counter()
        try:
            code, stdout, stderr = invoke(*args)
        except _Hang:
            pytest.fail(f"[{case.id}] ran past {CASE_TIME_LIMIT} s (a hang)")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        TIMES.append((time.perf_counter() - t0, case.id))
        check_result(case, code, stdout, stderr, out, folder, before, input_dir)
    finally:
        os.chdir(cwd)
        shutil.rmtree(folder, ignore_errors=True)


TIMES: list[tuple[float, str]] = []


@pytest.fixture(scope="module")
def runner():
    from _fork_helpers import ForkRunner

    with ForkRunner() as r:
        yield r


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the memory cases use fork, /proc and RLIMIT_AS")
@pytest.mark.parametrize("case", IN_FORK, ids=[c.id for c in IN_FORK])
def test_fuzz_huge_claims(case: Case, env: Env, runner):
    """Inputs claiming terabytes, in a real subprocess under RLIMIT_AS: they fail (or pass) without allocating."""
    folder = Path(tempfile.mkdtemp(dir=env.root))
    try:
        arg, input_dir, out, args, before = _run_case(case, env, folder)
        res = runner.run(args, workdir=folder, env={"PWD": str(folder)}, as_extra=AS_EXTRA, timeout=CASE_TIME_LIMIT)
        assert not res.timed_out, f"[{case.id}] ran past {CASE_TIME_LIMIT} s"
        code = res.returncode
        assert code >= 0, f"[{case.id}] died of signal {-code}: {res.stderr[-2000:]}"
        check_result(case, code, res.stdout, res.stderr, out, folder, before, input_dir)
        assert res.peak_growth < PEAK_LIMIT, f"[{case.id}] grew the resident set by {res.peak_growth >> 20} MiB"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_case_count_and_commands(env: Env):
    """At least 500 generated cases, and every command of the issue is exercised."""
    assert len(CASES) >= 500, len(CASES)
    for cmd in COMMANDS:
        n = sum(1 for c in CASES if c.command == cmd)
        assert n >= 50, (cmd, n)


def test_malicious_pickle_never_runs_in_a_subprocess(env: Env, tmp_path):
    """The pickle payload through every command, as a user runs them (python -m loratool)."""
    from conftest import run_cli

    adapter = tmp_path / "evil"
    tree = read_tree(env.adapter)
    tree.pop(ST)
    tree["adapter_model.bin"] = evil_pickle()
    write_tree(tree, adapter)
    proc = run_cli("inspect", adapter, env={"PWD": str(tmp_path)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "weights_only" in proc.stderr or "refused" in proc.stderr, proc.stderr
    assert not list(tmp_path.rglob(MARKER)) and not (Path.cwd() / MARKER).exists()
