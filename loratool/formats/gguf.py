"""llama.cpp LoRA adapters in GGUF, written and read with the ``gguf`` package.

As convert_lora_to_gguf.py makes them (one file):

    general.architecture   the llama.cpp architecture of the base (llama, qwen2, ...)
    general.type           "adapter"
    adapter.type           "lora"
    adapter.lora.alpha     one float for the whole file: llama.cpp scales each pair by alpha / r
                           (by 1 when alpha is 0)
    <blk.N.attn_q>.weight.lora_a   numpy (r, in)    = A          (ggml ne: in, r)
    <blk.N.attn_q>.weight.lora_b   numpy (out, r)   = B          (ggml ne: r, out)
    token_embd.weight.lora_a       numpy (vocab, r) = A^T        (token embeddings only)
    token_embd.weight.lora_b       numpy (dim, r)   = B
    blk.N.ffn_gate_exps.weight.lora_a  numpy (E, r, in) = A_e stacked   (fused MoE experts)
    blk.N.ffn_gate_exps.weight.lora_b  numpy (E, I, r)  = B_e[:I]       gate_up_proj: gate and up share A_e
    blk.N.ffn_up_exps.weight.lora_b    numpy (E, I, r)  = B_e[I:]       down_proj: ffn_down_exps

Tensor names come from gguf's TensorNameMap for the architecture. For architectures whose
HF converter permutes q/k (``LlamaModel.permute``: llama, mistral, granite...) the rows of B
of every q_proj/k_proj are permuted the same way; A is never touched. loratool also writes
``<arch>.attention.head_count``/``head_count_kv`` and ``<arch>.block_count`` so that its own
files can be read back without a base; files from llama.cpp's converter lack them and need
``--base`` when q/k must be un-permuted. Per-module scales differing from alpha / r are baked
into B. DoRA, a LoRA bias and modules_to_save have no GGUF form and are refused.

Expert LoRA: llama.cpp applies 3-D pairs per selected expert (build_lora_mm_id, scale alpha / r);
its convert_lora_to_gguf.py makes them by stacking the per-expert PEFT pairs, and loratool writes
the same tensors from PEFT's fused layout (A_e = A[e*r:(e+1)*r], B_e = B[:, e::E]) for the
architectures in ``names.GGUF_EXPERT_ARCHS``; reading groups them back into fused modules.
"""

from __future__ import annotations

import errno
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from loratool.adapter import Adapter, LoraModule, ModuleKind, refuse_saved_copies
from loratool.base import is_conv1d
from loratool.errors import FormatError, InputError, UnsupportedError
from loratool.formats import OPTIONS, refuse_lora_bias, refuse_modules_to_save
from loratool.io.leases import LEASES
from loratool.io.limits import size_limit
from loratool.io.store import LazyTensor
from loratool.names import (
    GGUF_EXPERT_ARCHS,
    GGUF_EXPERT_MODULE,
    GGUF_EXPERT_REFUSALS,
    GGUF_EXPERT_TENSORS,
    GGUFArch,
    gguf_arch_by_name,
    gguf_arch_for_config,
    gguf_expert_kinds,
    gguf_expert_names,
    gguf_tensor_kind,
    gguf_tensor_name,
    head_counts,
    hf_module_name,
    permute_qk_rows,
    qk_projection,
    unpermute_qk_rows,
)

NAME = "gguf"
OUTPUT_IS_FILE = True
MAGIC = b"GGUF"
OUTTYPES = OPTIONS["outtype"].choices  # declared in the registry


def detect(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


# -- reading --------------------------------------------------------------------------------


# a LoRA GGUF holds a handful of scalar keys and short strings; these bound what a header may claim
MAX_GGUF_ARRAY = 1 << 16  # elements of one metadata array (LORATOOL_MAX_GGUF_ARRAY raises it)
MAX_GGUF_STRING = 1 << 20  # bytes of one string
MAX_GGUF_DIMS = 8
# GGUF value types -> bytes (gguf-py's GGUFValueType numbering; 8 is a string, 9 an array)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Little-endian reads from the file's bytes that refuse to run past its end."""

    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise FormatError(self.path, f"GGUF header: {what} claims {n:,} bytes at offset {self.pos:,}, past the end of the {len(self.data):,}-byte file")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "little")

    def string(self, what: str) -> str:
        n = self.uint(8, what)
        if n > MAX_GGUF_STRING:
            raise FormatError(self.path, f"GGUF header: {what} is a {n:,}-byte string (limit {MAX_GGUF_STRING:,})")
        return bytes(self.take(n, what)).decode("utf-8", "replace")

    def value(self, vtype: int, what: str, *, nested: bool = False) -> None:
        if vtype in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[vtype], what)
        elif vtype == _STRING:
            self.string(what)
        elif vtype == _ARRAY and not nested:
            etype, count = self.uint(4, what), self.uint(8, what)
            limit = size_limit("MAX_GGUF_ARRAY", MAX_GGUF_ARRAY)
            if count > limit:
                raise FormatError(self.path, f"GGUF header: {what} is an array of {count:,} elements (limit {limit:,}; raise it with LORATOOL_MAX_GGUF_ARRAY)")
            if etype in _SCALAR_BYTES:
                self.take(count * _SCALAR_BYTES[etype], what)
            else:
                for _ in range(count):
                    self.value(etype, what, nested=True)
        else:
            raise FormatError(self.path, f"GGUF header: {what} has value type {vtype}, which GGUF does not define here")


def check_gguf_header(path: Path) -> None:
    """Walk a GGUF header with every count and length checked against the file size and the
    limits above, before gguf-py (which parses every field eagerly, allocating what a count
    claims) reads it. A LoRA GGUF needs only a handful of scalar keys.

    Raises:
        FormatError: naming the key or tensor whose count, length or type is out of bounds.
    """
    import mmap

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 24:
            raise FormatError(path, f"GGUF header: {size} bytes, too short for a GGUF file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            cur = _Cursor(memoryview(mm), Path(path))
            try:
                cur.take(4, "magic")
                cur.uint(4, "version")
                n_tensors, n_kv = cur.uint(8, "tensor count"), cur.uint(8, "key count")
                if n_kv * 13 > size or n_tensors * 29 > size:  # the smallest entry of each kind
                    raise FormatError(path, f"GGUF header: {n_kv:,} keys and {n_tensors:,} tensors cannot fit in {size:,} bytes")
                for i in range(n_kv):
                    key = f"key {cur.string(f'key #{i}')!r}"
                    cur.value(cur.uint(4, key), key)
                for i in range(n_tensors):
                    name = f"tensor {cur.string(f'tensor #{i}')!r}"
                    dims = cur.uint(4, name)
                    if dims > MAX_GGUF_DIMS:
                        raise FormatError(path, f"GGUF header: {name} has {dims:,} dimensions (limit {MAX_GGUF_DIMS})")
                    cur.take(8 * dims + 4 + 8, name)
            finally:
                cur.data.release()


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # a malformed field: treat as absent
        return None


def _to_torch(t) -> torch.Tensor:
    """A GGUF tensor's data in numpy (row-major) order, as torch, in its own float type."""
    import gguf

    qt = gguf.GGMLQuantizationType
    if t.tensor_type == qt.F32:
        return torch.from_numpy(np.array(t.data, dtype=np.float32))
    if t.tensor_type == qt.F16:
        return torch.from_numpy(np.array(t.data, dtype=np.float16))
    if t.tensor_type == qt.BF16:
        raw = np.array(t.data).view(np.int16)
        return torch.from_numpy(raw).view(torch.bfloat16)
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


_GGML_TO_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _base_name_map(base, arch: GGUFArch, n_blocks: int) -> dict[str, str]:
    """GGUF base name -> the base model's module name, for every 2-D weight of the base."""
    out: dict[str, str] = {}
    for key in base.keys():
        if not key.endswith(".weight") or len(base.store.shape(key)) != 2:
            continue
        module = key[: -len(".weight")]
        g = _gguf_name(module, arch, n_blocks)
        if g is not None:
            out.setdefault(g, module)
    return out


def _n_blocks(config: dict) -> int | None:
    cfg = dict(config.get("text_config") or {}, **config)
    for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if isinstance(cfg.get(k), int):
            return cfg[k]
    return None


def _open_reader(path: Path):
    """A ``gguf.GGUFReader`` on a header already checked to be bounded."""
    import gguf

    check_gguf_header(path)  # bounded: before gguf-py allocates what the header claims
    LEASES.watch(path)  # gguf-py maps the file: a truncation would be SIGBUS
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors on garbage
        raise FormatError(path, f"not a readable GGUF file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _adapter_fields(reader, path: Path) -> tuple[str, float]:
    """(general.architecture, adapter.lora.alpha) of a LoRA adapter GGUF (alpha 0 when absent)."""
    import gguf

    gtype = _field(reader, gguf.Keys.General.TYPE)
    if gtype is not None and gtype != gguf.GGUFType.ADAPTER:
        raise UnsupportedError(f"{path}: a GGUF {gtype}, not an adapter (general.type)")
    atype = _field(reader, gguf.Keys.Adapter.TYPE)
    if atype not in (None, "lora"):
        raise UnsupportedError(f"{path}: GGUF adapter type {atype!r} is not LoRA")
    arch_name = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch_name, str):
        raise FormatError(path, "no general.architecture")
    alpha = _field(reader, gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(alpha) if isinstance(alpha, (int, float)) else 0.0
    if not math.isfinite(alpha):
        raise FormatError(path, f"adapter.lora.alpha is {alpha}")
    return arch_name, alpha


def _read_geometry(reader, arch_name: str, base, path: Path) -> tuple[GGUFArch, int | None, int | None, int, dict[str, str] | None]:
    """(arch, n_head, n_kv, n_blocks, GGUF name -> base module name or None).

    From the base when given (which must be of the file's architecture), else from the
    head/block counts loratool writes into its own files (llama.cpp's converter does not).
    """
    import gguf

    if base is not None:
        try:
            arch = gguf_arch_for_config(base.config)
        except UnsupportedError:
            arch = gguf_arch_by_name(arch_name)
        if arch.name != arch_name:
            raise InputError(f"{path}: a GGUF for architecture {arch_name}, but the base {base.path} is {arch.name}")
        n_head, n_kv = head_counts(base.config) if arch.permute_qk else (None, None)
        n_blocks = _n_blocks(base.config) or 0
        # a config-only base (no weights) gives head counts but no names
        name_map = _base_name_map(base, arch, n_blocks) if len(base.store) else None
        return arch, n_head, n_kv, n_blocks, name_map
    arch = gguf_arch_by_name(arch_name)
    n_head = _field(reader, gguf.Keys.Attention.HEAD_COUNT.format(arch=arch_name))
    n_kv = _field(reader, gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch_name)) or n_head
    n_blocks = _field(reader, gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch_name)) or 0
    return arch, n_head, n_kv, n_blocks, None


def _tensor_pairs(reader, path: Path) -> dict[str, dict[str, object]]:
    """GGUF base tensor name -> {"a": lora_a tensor, "b": lora_b tensor}; any other tensor is refused."""
    pairs: dict[str, dict[str, object]] = {}
    for t in reader.tensors:
        name = t.name
        for suffix, part in ((".weight.lora_a", "a"), (".weight.lora_b", "b")):
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[part] = t
                break
        else:
            raise UnsupportedError(f"{path}: tensor {name} is not a LoRA pair member (full tensors in a GGUF adapter are not supported)")
    return pairs


def _numpy_shapes(path: Path, gname: str, ta, tb) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The 2-D numpy-order shapes of lora_a and lora_b (GGUF stores ggml order, reversed)."""
    sa = tuple(int(x) for x in reversed(list(ta.shape)))  # numpy order
    sb = tuple(int(x) for x in reversed(list(tb.shape)))
    if len(sa) != 2 or len(sb) != 2:
        raise UnsupportedError(f"{path}: {gname}: {len(sa)}-D LoRA tensors are not supported")
    return sa, sb


def _lazy_factors(path: Path, gname: str, ta, tb, sa: tuple, sb: tuple, embedding: bool) -> tuple[LazyTensor, LazyTensor]:
    """Lazy A (r, in) and B (out, r); a token embedding's lora_a is stored as A^T (vocab, r)."""
    if embedding:
        A_shape, B_shape = (sa[1], sa[0]), sb
    else:
        A_shape, B_shape = sa, sb
    if A_shape[0] != B_shape[1]:
        raise FormatError(path, f"{gname}: lora_a is {sa} but lora_b is {sb} (ranks differ)")
    if A_shape[0] == 0:
        raise FormatError(path, f"{gname}: rank 0")
    dtype_a = _GGML_TO_TORCH.get(ta.tensor_type.name, torch.float32)
    dtype_b = _GGML_TO_TORCH.get(tb.tensor_type.name, torch.float32)
    A = LazyTensor(A_shape, dtype_a, (lambda t=ta, e=embedding: _to_torch(t).T.contiguous() if e else _to_torch(t)))
    B = LazyTensor(B_shape, dtype_b, (lambda t=tb: _to_torch(t)))
    return A, B


def _module_kind(module: str, embedding: bool, base, arch: GGUFArch) -> ModuleKind:
    if embedding:
        return ModuleKind.EMBEDDING
    if base is not None:
        return base.module_kind(module, ModuleKind.LINEAR)
    return ModuleKind.CONV1D if is_conv1d(arch.name, module) else ModuleKind.LINEAR


def _read_module(
    path: Path, gname: str, p: dict[str, object], *, arch: GGUFArch, name_map: dict[str, str] | None, base,
    heads: tuple[int | None, int | None], alpha: float,
) -> tuple[LoraModule, bool]:
    """The LoraModule of one lora_a/lora_b pair, and whether its q/k rows stay permuted for want of head counts.

    llama.cpp's converter permutes the rows of q/k (``LlamaModel.permute``): B is un-permuted here.
    llama.cpp scales by alpha / r, or by 1 when alpha is 0.
    """
    if "a" not in p or "b" not in p:
        raise FormatError(path, f"{gname}: has lora_{'a' if 'a' in p else 'b'} without its pair")
    ta, tb = p["a"], p["b"]
    sa, sb = _numpy_shapes(path, gname, ta, tb)
    kind_info = gguf_tensor_kind(gname)
    tkind = kind_info[0] if kind_info else None
    module = name_map.get(gname) if name_map is not None else hf_module_name(gname, arch)
    if module is None:
        where = f"the base {base.path}" if base is not None else f"the {arch.name} naming (pass --base)"
        raise UnsupportedError(f"{path}: GGUF tensor {gname} has no module in {where}")
    embedding = tkind in ("TOKEN_EMBD", "POS_EMBD")
    A, B = _lazy_factors(path, gname, ta, tb, sa, sb, embedding)
    rank = A.shape[0]
    lacks_heads = False
    role = qk_projection(module) if arch.permute_qk else None
    if role is not None:
        n = heads[0] if role == "q" else heads[1]
        if not isinstance(n, int) or n <= 0:
            lacks_heads = True
        else:
            B = B.map(lambda t, h=n: unpermute_qk_rows(t, h))
    kind = _module_kind(module, embedding, base, arch)
    scale = alpha / rank if alpha else 1.0
    return LoraModule(module, kind, A, B, alpha=alpha if alpha else float(rank), scale=scale), lacks_heads


def _expert_part(gname: str) -> tuple[int, str, int] | None:
    """(block, fused parameter, part index) of a GGUF expert tensor name (``blk.3.ffn_up_exps``), else None."""
    kind = gguf_tensor_kind(gname)
    hit = gguf_expert_kinds().get(kind[0]) if kind is not None and kind[1] is not None else None
    return None if hit is None else (kind[1], hit[0], hit[1])


def _expert_shapes(path: Path, gname: str, p: dict[str, object]) -> tuple[int, int, int, int]:
    """(E, r, in, rows) of a 3-D expert pair: numpy lora_a (E, r, in), lora_b (E, rows, r)."""
    if "a" not in p or "b" not in p:
        raise FormatError(path, f"{gname}: has lora_{'a' if 'a' in p else 'b'} without its pair")
    sa = tuple(int(x) for x in reversed(list(p["a"].shape)))
    sb = tuple(int(x) for x in reversed(list(p["b"].shape)))
    if len(sa) != 3 or len(sb) != 3 or sa[0] != sb[0] or sa[1] != sb[2] or sa[1] == 0:
        raise FormatError(path, f"{gname}: expert lora_a {sa} and lora_b {sb} are not (E, r, in) and (E, out, r)")
    return sa[0], sa[1], sa[2], sb[1]


def _same_lora_a(ts: list) -> bool:
    """Whether expert pairs share one lora_a (gate and up from one gate_up_proj), byte for byte."""
    first = ts[0]
    return all(t.tensor_type == first.tensor_type and np.array_equal(np.asarray(t.data), np.asarray(first.data)) for t in ts[1:])


def _fused_b(b_ts: list, rows: int, ranks: list[int], scales: list[float], shared: bool, scale: float) -> torch.Tensor:
    """PEFT's rank-major B (out, R * E) from the parts' lora_b (E, rows, r_p), in row order; a missing
    part (None) holds zero rows; unshared parts sit block-diagonally, each rescaled to ``scale``."""
    if shared:
        B3 = torch.cat([_to_torch(tb) for tb in b_ts], dim=1)  # (E, out, r)
    else:
        E = next(int(tb.shape[-1]) for tb in b_ts if tb is not None)
        B3 = torch.zeros(E, rows * len(b_ts), sum(ranks), dtype=torch.float32)
        col = 0
        for i, (tb, r) in enumerate(zip(b_ts, ranks)):
            if tb is not None:
                B3[:, i * rows : (i + 1) * rows, col : col + r] = _to_torch(tb).float() * (scales[i] / scale)
                col += r
    return B3.permute(1, 2, 0).reshape(B3.shape[1], -1)  # (out, R, E) -> (out, R * E)


def _fused_module(path: Path, name: str, parts: list, alpha: float) -> LoraModule:
    """One fused experts module from its GGUF expert pairs (``parts``: (gname, pair) in row order,
    None where absent). Pairs sharing lora_a keep rank r; others stack to rank sum(r_p), exactly.
    llama.cpp scales each pair by alpha / r_p (1 when alpha is 0)."""
    shapes = [None if x is None else _expert_shapes(path, *x) for x in parts]
    (g0, _), (E, _, n_in, rows) = next((x, shp) for x, shp in zip(parts, shapes) if shp is not None)
    for x, shp in zip(parts, shapes):
        if shp is not None and (shp[0], shp[2], shp[3]) != (E, n_in, rows):
            raise FormatError(path, f"{x[0]}: expert pair (E, in, rows) {(shp[0], shp[2], shp[3])} differs from {g0}'s {(E, n_in, rows)}")
    ranks = [shp[1] if shp else 0 for shp in shapes]
    a_ts = [x[1]["a"] for x in parts if x is not None]
    b_ts = [x[1]["b"] if x is not None else None for x in parts]
    shared = None not in shapes and _same_lora_a(a_ts)
    R = ranks[0] if shared else sum(ranks)
    scale = alpha / R if alpha else 1.0
    scales = [alpha / r if alpha and r else 1.0 for r in ranks]
    dtype_a, dtype_b = ((_GGML_TO_TORCH.get(t.tensor_type.name, torch.float32) for t in (a_ts[0], b_ts[0])) if shared
                        else (torch.float32, torch.float32))

    def load_a() -> torch.Tensor:
        A3 = _to_torch(a_ts[0]) if shared else torch.cat([_to_torch(t).float() for t in a_ts], dim=1)  # (E, R, in)
        return A3.reshape(E * R, n_in)  # expert-major

    A = LazyTensor((E * R, n_in), dtype_a, load_a)
    B = LazyTensor((rows * len(parts), R * E), dtype_b, lambda: _fused_b(b_ts, rows, ranks, scales, shared, scale))
    return LoraModule(name, ModuleKind.EXPERTS, A, B, alpha=alpha if alpha else float(R), scale=scale, experts=E)


def _read_experts(path: Path, pairs: dict[str, dict[str, object]], alpha: float) -> dict[str, LoraModule]:
    """The fused experts modules (``GGUF_EXPERT_MODULE``) of a file's 3-D expert pairs."""
    groups: dict[tuple[int, str], dict[int, tuple]] = {}
    for gname, p in pairs.items():
        bid, param, i = _expert_part(gname)
        groups.setdefault((bid, param), {})[i] = (gname, p)
    out = {}
    for (bid, param), got in sorted(groups.items()):
        name = GGUF_EXPERT_MODULE.format(bid=bid, param=param)
        out[name] = _fused_module(path, name, [got.get(i) for i in range(len(GGUF_EXPERT_TENSORS[param]))], alpha)
    return out


def read(path: Path, *, base=None) -> Adapter:
    """Read a llama.cpp LoRA GGUF into canonical form (HF module names and row order).

    Args:
        path: the .gguf file.
        base: optional ``BaseModel``: module names as the base names them, head counts for
            un-permuting q/k when the file does not carry them.
    Raises:
        FormatError, UnsupportedError.
    """
    import gguf

    path = Path(path)
    reader = _open_reader(path)
    arch_name, alpha = _adapter_fields(reader, path)
    warnings: list[str] = []
    arch, n_head, n_kv, n_blocks, name_map = _read_geometry(reader, arch_name, base, path)

    pairs = _tensor_pairs(reader, path)
    experts = {g: p for g, p in pairs.items() if _expert_part(g) is not None}
    modules: dict[str, LoraModule] = _read_experts(path, experts, alpha)
    needs_heads = []
    for gname, p in pairs.items():
        if gname in experts:
            continue
        module, lacks_heads = _read_module(path, gname, p, arch=arch, name_map=name_map, base=base, heads=(n_head, n_kv), alpha=alpha)
        if lacks_heads:
            needs_heads.append(module.name)
        modules[module.name] = module
    if needs_heads:
        raise UnsupportedError(
            f"{path}: q/k rows are in llama.cpp's permuted order and the file names no head counts; "
            f"pass --base to restore them (e.g. {needs_heads[0]})"
        )
    if not modules:
        warnings.append(f"{path}: holds no LoRA tensors")
    return Adapter(
        format=NAME,
        modules=modules,
        base_model=_field(reader, gguf.Keys.General.BASE_MODEL_NAME.format(id=0)),
        target_modules=sorted(modules),
        path=path,
        files=[path],
        config={"general.architecture": arch_name, "adapter.lora.alpha": alpha},
        warnings=warnings,
        extras={"gguf_arch": arch.name, "gguf_heads": (n_head, n_kv), "gguf_blocks": n_blocks, "gguf_modules": sorted(modules)},
    )


# -- writing --------------------------------------------------------------------------------


def _gguf_name(module: str, arch: GGUFArch, n_blocks: int) -> str | None:
    for cand in (module, f"model.{module}", module.partition(".")[2]):
        if cand:
            g = gguf_tensor_name(cand, arch, n_blocks)
            if g is not None:
                return g
    return None


def check_writable(adapter: Adapter, base=None) -> None:
    """Refuse what a llama.cpp LoRA GGUF cannot hold (the architecture checks need ``base``, which
    ``write`` passes; the registry's check before OUT exists has none).

    Raises:
        UnsupportedError: DoRA magnitudes, a LoRA bias, saved base-layer copies, modules_to_save,
            fused expert parameters llama.cpp has no expert LoRA tensors for.
    """
    dora = [m.name for m in adapter if m.magnitude is not None]
    if dora:
        raise UnsupportedError(f"GGUF (llama.cpp) has no DoRA: the magnitude of {dora[0]} would be lost")
    refuse_lora_bias(adapter, "GGUF (llama.cpp)")
    refuse_saved_copies(adapter, "GGUF")
    refuse_modules_to_save(adapter, "GGUF")
    experts = [m for m in adapter if m.experts]
    if experts:
        _check_experts(experts, base)


def _check_experts(mods: list[LoraModule], base) -> None:
    """Refuse fused expert parameters llama.cpp cannot hold: an architecture without expert LoRA
    here, experts stored (E, in, out) (gpt-oss), a parameter without expert tensors."""
    _check_expert_arch(mods[0].name, base)
    for m in mods:
        if m.kind is ModuleKind.EXPERTS_T:
            raise UnsupportedError(f"{m.name}: GGUF (llama.cpp) cannot hold expert LoRA on experts stored (E, in, out): "
                                   f"{GGUF_EXPERT_REFUSALS['gpt_oss']}")
        if gguf_expert_names(m.name) is None:
            raise UnsupportedError(f"{m.name}: GGUF (llama.cpp) has no expert LoRA tensor for this fused parameter "
                                   "(only ...experts.gate_up_proj and ...experts.down_proj of a numbered layer); its delta would be lost")


def _check_expert_arch(name: str, base) -> None:
    """Refuse (naming the parameter ``name``) a base whose architecture has no GGUF expert LoRA."""
    if base is None:
        return
    config = base.config
    model_type = config.get("model_type") or (config.get("text_config") or {}).get("model_type")
    if model_type in GGUF_EXPERT_REFUSALS:
        raise UnsupportedError(f"{name}: GGUF (llama.cpp) cannot hold this expert LoRA: {GGUF_EXPERT_REFUSALS[model_type]}")
    try:
        arch = gguf_arch_for_config(config)
    except UnsupportedError:
        arch = None
    if arch is None or arch.name not in GGUF_EXPERT_ARCHS:
        what = arch.name if arch else (list(config.get("architectures") or []) or [model_type or "unknown"])[0]
        raise UnsupportedError(f"{name}: GGUF expert LoRA is written only for the llama.cpp architectures "
                               f"{', '.join(sorted(GGUF_EXPERT_ARCHS))} (llama = Mixtral), not {what}")


def _resolve_arch(adapter: Adapter, base) -> tuple[GGUFArch, tuple[int | None, int | None], int, dict]:
    if base is not None:
        arch = gguf_arch_for_config(base.config)
        try:
            heads = head_counts(base.config)
        except UnsupportedError:
            if arch.permute_qk:
                raise
            heads = (None, None)
        return arch, heads, _n_blocks(base.config) or 0, base.config
    if adapter.format == NAME and "gguf_arch" in adapter.extras:
        return gguf_arch_by_name(adapter.extras["gguf_arch"]), tuple(adapter.extras.get("gguf_heads", (None, None))), adapter.extras.get("gguf_blocks") or 0, {}
    raise InputError("writing GGUF needs --base (a base model folder or its config): the architecture and head counts come from it")


def _alpha_for(mods: list[LoraModule]) -> float:
    candidates = [m.scale * m.rank for m in mods if m.scale != 0]
    if not candidates:
        return float(mods[0].rank) if mods else 1.0
    return float(np.float32(Counter(candidates).most_common(1)[0][0]))


def _encode(t: torch.Tensor, outtype: str):
    """numpy data and GGML type for one tensor, falling back to F16 where Q8_0 cannot hold it."""
    import gguf

    qt = gguf.GGMLQuantizationType
    data = t.detach().to(torch.float32).contiguous().numpy() if t.dtype not in (torch.float16, torch.float32) else t.detach().contiguous().numpy()
    want = {"f32": qt.F32, "f16": qt.F16, "bf16": qt.BF16, "q8_0": qt.Q8_0}[outtype]
    try:
        return gguf.quants.quantize(data, want), want, False
    except gguf.QuantError:
        return gguf.quants.quantize(data, qt.F16), qt.F16, True


def _module_factors(m: LoraModule, gname: str, tkind: str, arch: GGUFArch, heads: tuple[int | None, int | None], alpha: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(A, B, rescaled) of one module as llama.cpp wants them.

    The scale differing from alpha / r is baked into B (``rescaled`` only when it differs by
    more than alpha's float32 rounding), q/k rows are permuted like the HF converter does, and
    a token embedding's A is stored transposed.
    """
    A, B = m.A.load(), m.B.load()
    if A.dtype != B.dtype:
        A, B = A.float(), B.float()
    rescaled = False
    llama_scale = alpha / m.rank if alpha else 1.0
    if not math.isclose(m.scale, llama_scale, rel_tol=1e-9, abs_tol=0.0):
        B = (B.double() * (m.scale / llama_scale)).to(B.dtype)
        if not math.isclose(m.scale, llama_scale, rel_tol=1e-6, abs_tol=0.0):
            rescaled = True  # below that, only alpha's float32 rounding
    role = qk_projection(m.name) if arch.permute_qk else None
    if role is not None:
        n_head, n_kv = heads
        n = n_head if role == "q" else n_kv
        if not n:
            raise InputError(f"GGUF ({arch.name}): head counts are needed to permute {m.name}; pass --base")
        B = permute_qk_rows(B, n)
    if m.kind is ModuleKind.EMBEDDING:
        if tkind != "TOKEN_EMBD":
            raise UnsupportedError(f"GGUF: embedding LoRA on {m.name} ({gname}) is not applied by llama.cpp; its delta would be lost")
        A = A.T
    return A, B, rescaled


def _expert_tensors(m: LoraModule, arch: GGUFArch, alpha: float, seen: dict[str, str]) -> tuple[list[tuple[str, torch.Tensor]], bool]:
    """The 3-D lora_a / lora_b of a fused experts module, as llama.cpp's converter stacks the
    per-expert pairs: for each GGUF expert tensor (gate_up_proj splits its rows into gate and up,
    both with expert e's A_e), lora_a (E, r, in) = A_e stacked, lora_b (E, rows, r) = B_e's rows
    stacked; and whether a scale differing from llama.cpp's alpha / r was baked into lora_b."""
    gnames = gguf_expert_names(m.name)
    if arch.name not in GGUF_EXPERT_ARCHS or gnames is None or m.out_features % len(gnames):
        why = f"llama.cpp has no expert LoRA for {arch.name}" if arch.name not in GGUF_EXPERT_ARCHS else "no llama.cpp expert tensor holds it"
        raise UnsupportedError(f"{m.name}: GGUF: {why} (lora_B {m.B.shape}); its delta would be lost")
    E, r = m.experts, m.rank
    A = m.A.load().reshape(E, r, m.in_features)  # A is expert-major: A_e = A[e*r:(e+1)*r]
    B = m.B.load().reshape(m.out_features, r, E).permute(2, 0, 1)  # B rank-major: B_e = B[:, e::E]; (E, out, r)
    if A.dtype != B.dtype:
        A, B = A.float(), B.float()
    llama_scale = alpha / r if alpha else 1.0
    if not math.isclose(m.scale, llama_scale, rel_tol=1e-9, abs_tol=0.0):
        B = (B.double() * (m.scale / llama_scale)).to(B.dtype)
    rescaled = not math.isclose(m.scale, llama_scale, rel_tol=1e-6, abs_tol=0.0)
    rows = m.out_features // len(gnames)
    out = []
    for i, gname in enumerate(gnames):
        if gname in seen:
            raise UnsupportedError(f"GGUF: modules {seen[gname]} and {m.name} both map to {gname}")
        seen[gname] = m.name
        out.append((f"{gname}.weight.lora_a", A.contiguous()))
        out.append((f"{gname}.weight.lora_b", B[:, i * rows : (i + 1) * rows].contiguous()))
    return out, rescaled


def _plan_tensors(
    mods: list[LoraModule], arch: GGUFArch, heads: tuple[int | None, int | None], n_blocks: int, alpha: float, tied: bool
) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """The (GGUF tensor name, tensor) list to write, and the modules whose scale was baked into lora_b."""
    planned: list[tuple[str, torch.Tensor]] = []
    rescaled: list[str] = []
    seen: dict[str, str] = {}
    for m in mods:
        if m.experts:
            tensors, was_rescaled = _expert_tensors(m, arch, alpha, seen)
            planned.extend(tensors)
            rescaled.extend([m.name] if was_rescaled else [])
            continue
        gname = _gguf_name(m.name, arch, n_blocks)
        if gname is None:
            raise UnsupportedError(f"GGUF ({arch.name}): module {m.name} has no llama.cpp tensor name; its delta would be lost")
        if gname in seen:
            raise UnsupportedError(f"GGUF: modules {seen[gname]} and {m.name} both map to {gname}")
        seen[gname] = m.name
        tkind = (gguf_tensor_kind(gname) or ("", None))[0]
        if tkind == "OUTPUT" and tied:
            raise UnsupportedError(f"GGUF: llama.cpp ties {m.name} to the token embedding in this base; its delta would be lost")
        A, B, was_rescaled = _module_factors(m, gname, tkind, arch, heads, alpha)
        if was_rescaled:
            rescaled.append(m.name)
        planned.append((f"{gname}.weight.lora_a", A))
        planned.append((f"{gname}.weight.lora_b", B))
    return planned, rescaled


def _write_file(
    target: Path, arch: GGUFArch, alpha: float, base_model, outtype: str, n_blocks: int,
    heads: tuple[int | None, int | None], planned: list[tuple[str, torch.Tensor]],
) -> list[str]:
    """Write the GGUF (metadata, then tensors); the names of tensors that fell back to F16."""
    import gguf

    n_head, n_kv = heads
    fallback: list[str] = []
    writer = gguf.GGUFWriter(str(target), arch.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(Path(str(base_model or "loratool adapter")).name or "loratool adapter")
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if n_blocks:
        writer.add_block_count(n_blocks)
    if n_head:
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv or n_head)
    for name, t in planned:
        data, qtype, fell_back = _encode(t, outtype)
        if fell_back:
            fallback.append(name)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    # numpy's tofile (used by GGUFWriter) loses write errors when the disk fills: check the size
    expected = writer.fout[0].tell() if writer.fout else None
    writer.close()
    if expected is not None and os.path.getsize(target) < expected:
        raise OSError(errno.ENOSPC, "the file came out short (disk full or file size limit reached)", str(target))
    return fallback


def write(adapter: Adapter, target: Path, *, base=None, outtype: str = "f32", report: dict | None = None) -> list[Path]:
    """Write a llama.cpp LoRA GGUF file.

    Args:
        adapter: the adapter (HF module names, HF row order).
        target: the file to write.
        base: a ``BaseModel`` (its config is enough): architecture, head counts, block count.
            Needed unless the adapter was read from a GGUF.
        outtype: f32, f16, bf16 or q8_0 (tensors Q8_0 cannot hold, such as lora_b with a rank
            that is not a multiple of 32, fall back to F16 as llama.cpp's converter does).
        report: a dict that receives ``baked`` and ``notes`` lists.
    Raises:
        UnsupportedError, InputError.
    """
    if outtype not in OUTTYPES:
        raise InputError(f"unknown GGUF outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")
    check_writable(adapter, base)
    arch, heads, n_blocks, config = _resolve_arch(adapter, base)
    mods = list(adapter)
    alpha = _alpha_for(mods)
    tied = bool(config.get("tie_word_embeddings", False))
    planned, rescaled = _plan_tensors(mods, arch, heads, n_blocks, alpha, tied)
    fallback = _write_file(target, arch, alpha, adapter.base_model, outtype, n_blocks, heads, planned)
    if report is not None:
        if rescaled:
            report.setdefault("baked", []).append(f"per-module scale baked into lora_b for {len(rescaled)} module(s) (GGUF holds one alpha, {alpha:g})")
        if fallback:
            report.setdefault("notes", []).append(f"{len(fallback)} tensor(s) stored as F16: {outtype.upper()} cannot hold their shape (as llama.cpp's converter does)")
    return [Path(target)]
