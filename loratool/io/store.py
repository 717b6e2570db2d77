"""Lazy, read-only access to the tensors of a checkpoint, one tensor at a time.

A ``TensorStore`` covers one safetensors file, a sharded set described by a
``*.safetensors.index.json``, or a pickled ``.bin``/``.pth`` (loaded with
``torch.load(weights_only=True)`` only). Safetensors headers are parsed and checked
here before any tensor is read, so a hostile header never leads to a huge allocation.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Callable,
    Iterable,
    Iterator,
    Protocol,
    runtime_checkable,
)

from loratool.errors import FormatError
from loratool.io.bitscan import BitScanner, Span, still_there
from loratool.io.leases import LEASES
from loratool.io.limits import size_limit
from loratool.io.pickle_scan import (
    check_torch_pickle,
    flatten_state_dict,
    open_torch_zip,
    tensor_spans,
)

if TYPE_CHECKING:  # a safetensors header is read without torch (a plain `inspect` never loads it)
    import torch

# safetensors dtype codes -> (torch dtype name, bytes per element); the subset torch can hold
SAFETENSORS_CODES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
}
_TORCH_TABLES: dict[str, dict] = {}
def _torch_tables() -> dict[str, dict]:
    """{code: torch dtype} and {torch dtype: code}, built when torch is first needed."""
    if not _TORCH_TABLES:
        import torch

        codes = {code: getattr(torch, name) for code, (name, _) in SAFETENSORS_CODES.items() if hasattr(torch, name)}
        _TORCH_TABLES["to_torch"] = codes
        _TORCH_TABLES["to_code"] = {v: k for k, v in codes.items()}
    return _TORCH_TABLES


def torch_dtype(code: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype code (imports torch)."""
    return _torch_tables()["to_torch"][code]


def __getattr__(name: str):
    # SAFETENSORS_DTYPES (code -> torch dtype) and TORCH_TO_SAFETENSORS, built on first use
    if name == "SAFETENSORS_DTYPES":
        return _torch_tables()["to_torch"]
    if name == "TORCH_TO_SAFETENSORS":
        return _torch_tables()["to_code"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype) -> str:
    """``"float32"`` for a torch dtype or a safetensors code, without importing torch for a code."""
    if isinstance(dtype, str):
        return SAFETENSORS_CODES[dtype][0]
    return str(dtype).replace("torch.", "")


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


class LazyTensor:
    """A tensor known by shape and dtype, read only when ``load()`` is called.

    ``map`` composes a transform (transpose, permutation, slice) without reading.
    """

    __slots__ = ("shape", "_dtype", "_loader", "source")

    def __init__(self, shape: Iterable[int], dtype, loader: Callable[[], "torch.Tensor"], source: "tuple[TensorStore, str] | None" = None):
        self.shape = tuple(int(s) for s in shape)
        self._dtype = dtype  # a torch dtype, or a safetensors code (resolved when asked: no torch until then)
        self._loader = loader
        self.source = source  # (store, name) when this is a stored tensor as it is (no transform)

    @property
    def dtype(self) -> "torch.dtype":
        return torch_dtype(self._dtype) if isinstance(self._dtype, str) else self._dtype

    @property
    def dtype_name(self) -> str:
        """``"float32"``..., without importing torch for a stored tensor."""
        return dtype_name(self._dtype)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "LazyTensor":
        """Wrap a tensor already in memory."""
        return cls(tensor.shape, tensor.dtype, lambda: tensor)

    def load(self) -> torch.Tensor:
        tensor = self._loader()
        if tuple(tensor.shape) != self.shape:
            raise FormatError("tensor", f"expected shape {self.shape}, read {tuple(tensor.shape)}")
        return tensor

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], shape=None, dtype=None) -> "LazyTensor":
        """A new lazy tensor that applies ``fn`` after loading this one."""
        return LazyTensor(self.shape if shape is None else shape, dtype or self._dtype, lambda: fn(self.load()))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        size = SAFETENSORS_CODES[self._dtype][1] if isinstance(self._dtype, str) else self._dtype.itemsize
        return self.numel * size

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype_name})"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype, shape, and for safetensors its byte range."""

    name: str
    path: Path
    held_dtype: "torch.dtype | None"  # a tensor already in memory (pickles); None: from dtype_code
    shape: tuple[int, ...]
    dtype_code: str | None = None  # the safetensors dtype string
    begin: int | None = None  # absolute byte offsets in the file (safetensors only)
    end: int | None = None

    @property
    def dtype(self) -> "torch.dtype":
        return self.held_dtype if self.held_dtype is not None else torch_dtype(self.dtype_code)

    @property
    def lazy_dtype(self):
        """What a ``LazyTensor`` of this entry carries: the torch dtype, or the code (no torch yet)."""
        return self.held_dtype if self.held_dtype is not None else self.dtype_code

    @property
    def is_floating_point(self) -> bool:
        """A floating dtype (F64, F32, F16, BF16, the F8 kinds), without importing torch for a code."""
        if self.held_dtype is not None:
            return self.held_dtype.is_floating_point
        return str(self.dtype_code).startswith(("F", "BF"))


def read_safetensors_header(path: Path) -> tuple[list[TensorEntry], dict[str, str], int]:
    """Parse and validate a safetensors header.

    Returns:
        (entries in file order, the ``__metadata__`` dict, the size of the header block).
    Raises:
        FormatError: the header is truncated, oversized, inconsistent or names unknown dtypes.
    """
    path = Path(path)
    refuse_special_file(path)
    LEASES.watch(path)  # inside a command: another process writing it from here on stops the command
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise FormatError(path, "not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise FormatError(path, f"not a safetensors file (header claims {n} bytes, file has {size})")
            raw = fh.read(n)
    except IsADirectoryError:
        raise FormatError(path, "is a directory, expected a safetensors file") from None
    except PermissionError:
        raise FormatError(path, "permission denied") from None
    refuse_tensor_count(path, raw.count(b'"data_offsets"'))  # each entry has one; a name cannot hold it unescaped
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise FormatError(path, "not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(path, "not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise FormatError(path, "safetensors __metadata__ is not an object")
    data_start = 8 + n
    data_len = size - data_start
    entries: list[TensorEntry] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise FormatError(path, f"tensor {name!r}: header entry is not an object")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if code not in SAFETENSORS_CODES:
            raise FormatError(path, f"tensor {name!r}: unsupported dtype {code!r}")
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise FormatError(path, f"tensor {name!r}: malformed shape or data_offsets")
        begin, end = offsets
        expected = math.prod(shape) * SAFETENSORS_CODES[code][1]
        if not (0 <= begin <= end <= data_len) or end - begin != expected:
            raise FormatError(
                path, f"tensor {name!r}: data_offsets {offsets} do not fit shape {shape} {code} in a {data_len}-byte data section"
            )
        entries.append(TensorEntry(name, path, None, tuple(shape), code, data_start + begin, data_start + end))
    ordered = sorted(entries, key=lambda e: (e.begin, e.end))
    cursor = data_start
    for e in ordered:
        if e.begin < cursor and e.end > e.begin:
            raise FormatError(path, f"tensor {e.name!r}: data overlaps another tensor")
        cursor = max(cursor, e.end)
    return entries, {str(k): str(v) for k, v in metadata.items()}, data_start


@runtime_checkable
class TensorReader(Protocol):
    """What every reader of checkpoint tensors offers the engine: ``TensorStore`` (the files as
    stored) and the decoding views over it (``quantized.QuantizedView``: a bitsandbytes base seen
    in float; ``qalora.DequantizedCheckpoint``: a GPTQ checkpoint seen in float)."""

    def keys(self) -> list[str]: ...

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> "torch.dtype": ...

    def get(self, name: str) -> "torch.Tensor": ...


def entries_in_file_order(store: "TensorStore | TensorReader") -> list[TensorEntry]:
    """Every entry of a store (or a view with ``files`` and ``entries``), file by file and by
    offset within a file: the order of sequential reads."""
    order = {p: i for i, p in enumerate(store.files)}
    return sorted(store.entries(), key=lambda e: (order.get(e.path, 0), e.begin or 0, e.name))


class TensorStore:
    """Read-only view of the tensors of one checkpoint (one or more files).

    Safetensors tensors are read one at a time with ``safe_open``; a pickle is loaded once
    (memory-mapped where the zip format allows it) with ``weights_only=True``.
    """

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self._entries: dict[str, TensorEntry] = {}
        self._pickles: dict[Path, dict] = {}
        self._handles: dict[Path, object] = {}
        self._scanner = BitScanner()  # value_summary's maps, one per file
        self._spans: dict[Path, dict] = {}  # a torch zip's {name: (Span, shape)}, found when first scanned
        self._sizes: dict[Path, int] = {}  # a pickle's size when loaded
        self.metadata: dict[str, str] = {}
        self.extras: dict[str, object] = {}  # non-tensor entries found in pickles
        for f in self.files:
            if is_safetensors_file(f):
                entries, meta, _ = read_safetensors_header(f)
                self.metadata.update(meta)
                for e in entries:
                    self._add(e)
            else:
                self._load_pickle(f)

    def _add(self, entry: TensorEntry) -> None:
        if entry.name in self._entries:
            raise FormatError(entry.path, f"tensor {entry.name!r} appears in more than one file")
        self._entries[entry.name] = entry

    def _load_pickle(self, path: Path) -> None:
        size = os.stat(path).st_size  # before loading: what torch.load maps
        obj = load_pickle(path)
        self._sizes[path] = size
        tensors, extras = flatten_state_dict(obj)
        self.extras.update(extras)
        self._pickles[path] = tensors
        for name, t in tensors.items():
            self._add(TensorEntry(name, path, t.dtype, tuple(t.shape)))

    # -- queries that never read tensor data --
    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(name) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name].dtype

    def entries(self) -> Iterator[TensorEntry]:
        return iter(self._entries.values())
    @property
    def is_safetensors(self) -> bool:
        return not self._pickles

    # -- data --
    def value_summary(self, name: str, *, chunk: int = 1 << 20) -> tuple[bool, bool] | None:
        """(all finite, all zero) of a stored float tensor, read from its bits with numpy (no torch),
        ``chunk`` elements at a time, each block's pages dropped after use (``io/bitscan.py``);
        None for a non-float dtype, or a pickled tensor that is not one byte range of a torch zip."""
        span = self._span(self._entries[name])
        return None if span is None else self._scanner.summary(span, f"tensor {name!r}", chunk)

    def _span(self, e: TensorEntry) -> Span | None:
        """Where a tensor's elements lie: a safetensors entry's offsets, or a pickled tensor's range
        of its storage's zip entry when the replayed pickle agrees with the loaded tensor."""
        if e.begin is not None:
            return Span(e.path, e.begin, e.end, e.dtype_code)
        if e.path not in self._pickles:
            return None
        spans = self._spans.get(e.path)
        if spans is None:
            spans = self._spans[e.path] = tensor_spans(e.path)
        span, shape = spans.get(e.name, (None, None))
        if span is None or shape != e.shape or SAFETENSORS_CODES[span.code][0] != dtype_name(e.dtype):
            # the caller reads the loaded tensor, which torch.load may have mapped: touching it
            # past the end of a file truncated since is SIGBUS (a size check first, as bitscan does)
            still_there(e.path, self._sizes.get(e.path, 0), f"tensor {e.name!r}")
            return None
        return span

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory."""
        e = self._entries[name]
        if e.path in self._pickles:
            return self._pickles[e.path][name]
        handle = self._handles.get(e.path)
        if handle is None:
            try:
                handle = _safe_open(e.path)
            except Exception as exc:  # safetensors raises its own error types
                raise FormatError(e.path, f"cannot open safetensors file: {exc}") from None
            self._handles[e.path] = handle
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise FormatError(e.path, f"cannot read tensor {name!r}: {exc}") from None

    def lazy(self, name: str) -> LazyTensor:
        e = self._entries[name]
        return LazyTensor(e.shape, e.lazy_dtype, lambda: self.get(name), source=(self, name))

    def close(self) -> None:
        self._handles.clear()
        self._scanner.close()
        self._spans.clear()
        self._pickles.clear()

    def __enter__(self) -> "TensorStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _safe_open(path: Path):
    """``safetensors.safe_open`` on ``path``, also when its name is not valid UTF-8.

    safetensors takes only UTF-8 path strings; a name with other bytes (which Python keeps as
    surrogate escapes) is opened here and handed over as ``/proc/self/fd/N``, which names the
    same file. safetensors opens its own descriptor from it, so ours is closed at once.
    """
    from safetensors import safe_open

    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        fd = os.open(path, os.O_RDONLY)
        try:
            return safe_open(f"/proc/self/fd/{fd}", framework="pt", device="cpu")
        finally:
            os.close(fd)
    return safe_open(text, framework="pt", device="cpu")


def is_safetensors_file(path: Path) -> bool:
    """By name (``.safetensors``), else by content: an 8-byte length then a JSON object."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") <= MAX_HEADER_BYTES


def is_torch_pickle(path: Path) -> bool:
    """By content, whatever the file is called: what ``torch.save`` writes.

    The zip container (an entry ``<archive>/data.pkl``) or a legacy pickle, which starts with the
    PROTO opcode (0x80) and a protocol number 2-5.
    """
    import zipfile

    path = Path(path)
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head[:2] == b"PK":
            with open_torch_zip(path) as zf:
                return any(n.endswith("/data.pkl") or n == "data.pkl" for n in zf.namelist())
        return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    except FormatError:
        return True  # a torch zip with too many entries: loading it says so
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def load_pickle(path: Path) -> object:
    """Load a PyTorch pickle with ``weights_only=True`` (never executes code from the file), once
    ``pickle_scan.check_torch_pickle`` has bounded what it claims (weights_only bounds no resource)."""
    path = Path(path)
    import pickle
    import zipfile

    refuse_special_file(path)
    LEASES.watch(path)
    try:
        check_torch_pickle(path)  # depth, objects, tensors, storages and zip entries bounded first
        import torch

        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            # mmap works only for the zip format; legacy pickles load without it.
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except FormatError:
        raise
    except IsADirectoryError:
        raise FormatError(path, "is a directory, expected a PyTorch checkpoint") from None
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling failed"
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise FormatError(path, "refused: the pickle needs code beyond plain tensors (loaded with weights_only=True)") from None
        raise FormatError(path, f"not a loadable PyTorch checkpoint ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, OSError, AttributeError, TypeError, IndexError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(path, f"not a loadable PyTorch checkpoint ({msg[:200]})") from None


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a transformers-style folder, sharded or not.

    Prefers safetensors (index first) over pickles, as transformers does.
    Raises:
        FormatError: no weights, or an index naming missing shards.
    """
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise FormatError(index, "has no weight_map")
            shards = []
            for shard in weight_map.values():
                if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                    raise FormatError(index, f"bad shard name {shard!r}")
                if shard not in shards:
                    shards.append(shard)
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FormatError(index, f"names shard {missing[0]} which is missing")
            return [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise FormatError(folder, "no model weights (model.safetensors, an index json, or pytorch_model.bin)")


# the largest JSON file (a config, an index) read before parsing; raised by LORATOOL_MAX_JSON_BYTES
MAX_JSON_BYTES = 64 << 20


# tensors in one file (or names in one list of a config): sharded bases hold a few thousand per
# file, the largest real adapters (every expert of a 256-expert MoE) ~90,000; raised by LORATOOL_MAX_TENSORS
MAX_TENSORS = 100_000


def refuse_tensor_count(path: Path, count: int, what: str = "tensors") -> None:
    """Refuse a file claiming more than ``MAX_TENSORS`` tensors (or names), before any per-tensor
    work: reading, matching and planning cost ~0.1 ms each, so 1.2 million would take minutes.

    Raises:
        FormatError: naming the count, the limit and how to raise it.
    """
    limit = size_limit("MAX_TENSORS", MAX_TENSORS)
    if count > limit:
        raise FormatError(path, f"holds {count:,} {what}, more than {limit:,} (raise the limit with LORATOOL_MAX_TENSORS)")


def refuse_oversized_config(path: Path) -> None:
    """Refuse, unread, a config file (JSON, YAML) larger than ``MAX_JSON_BYTES``: one of hundreds
    of MB would take GBs to parse.

    Raises:
        FormatError: naming the size, the limit and how to raise it.
    """
    limit = size_limit("MAX_JSON_BYTES", MAX_JSON_BYTES)
    size = Path(path).stat().st_size
    if size > limit:
        raise FormatError(path, f"{size:,} bytes, more than a config may hold (limit {limit:,}; raise it with LORATOOL_MAX_JSON_BYTES)")


def read_json(path: Path) -> object:
    """Read a JSON file, with a one-line FormatError for any problem (``refuse_oversized_config`` first)."""
    path = Path(path)
    refuse_special_file(path)
    try:
        refuse_oversized_config(path)
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise FormatError(path, "file not found") from None
    except IsADirectoryError:
        raise FormatError(path, "is a directory, expected a JSON file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(path, f"malformed JSON ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise FormatError(path, "malformed JSON (nested too deeply)") from None
    except OSError as exc:
        raise FormatError(path, exc.strerror or str(exc)) from None


def refuse_special_file(path: Path) -> None:
    """Refuse a pipe, socket or device where a file is expected (opening a FIFO would block).

    Raises:
        FormatError: ``path`` exists and is neither a regular file nor a folder.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the caller's open() reports it
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise FormatError(path, "is not a regular file (a pipe, socket or device); refusing to read it")


def open_store(path: Path) -> TensorStore:
    """A TensorStore over a weights file or a transformers-style folder."""
    path = Path(path)
    if path.is_dir():
        return TensorStore(checkpoint_files(path))
    if not path.exists():
        raise FormatError(path, "file not found")
    return TensorStore([path])


def file_size(path: Path) -> int:
    return os.stat(path).st_size
