"""A bounded scan of a PyTorch pickle, before ``torch.load`` is allowed near it.

``torch.load(weights_only=True)`` refuses code, not resource use: it builds whatever nesting
the object stream describes, hands out memo references that a walk of the result multiplies
("billion laughs"), inflates compressed zip entries and maps storages at the sizes the pickle
claims. ``check_torch_pickle`` walks the object stream opcode by opcode (``pickletools.genops``
parses each opcode; our own loop keeps a stack of cheap stand-ins, never the objects) and
refuses, naming the file and what was too large:

- more opcodes, nesting, expanded objects (what a walk of the result would visit, counting each
  memo reference at its full size) or tensors than the limits below;
- a container changed after it was placed inside another one (only a self-reference does
  that), which would make a walk of the result loop forever;
- storages claiming more bytes than their zip entry (or, for a legacy file, the file) holds;
- tensors whose shape and strides reach past their storage, or that view more elements than
  it holds (a stride-0 "broadcast" view of a few bytes claiming gigabytes);
- zip archives with more entries than the limit (checked from the end-of-central-directory
  record, before ``zipfile`` reads the directory), compressed entries (``torch.save`` stores
  every entry; inflating is how a small file becomes gigabytes), or entries past the file's end.

Every limit is raised by an environment variable (``size_limit``; docs/guarantees.md).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from loratool.errors import FormatError
from loratool.io.limits import size_limit

if TYPE_CHECKING:  # the walk itself never needs torch
    import torch

# torch.load itself spends ~200 us per tensor in its pure-Python unpickler (20,000 tensors: ~4 s);
# the walk costs ~0.5-2 us per opcode, so it reaches any of these limits in 1-2 s
MAX_PICKLE_BYTES = 64 << 20  # the object stream (zip: data.pkl; torch.save writes ~130 bytes per tensor)
MAX_PICKLE_OPS = 2_000_000  # opcodes of one object stream (torch.save: ~30 per tensor)
MAX_PICKLE_DEPTH = 1_000  # nested containers (a state dict: 3-6)
MAX_PICKLE_OBJECTS = 4_000_000  # objects a walk of the loaded result visits (~10 per tensor)
MAX_PICKLE_TENSORS = 20_000  # pickled checkpoints hold hundreds per file (shards)
MAX_ZIP_ENTRIES = 2 * MAX_PICKLE_TENSORS + 64  # a storage per tensor at most, plus torch's bookkeeping entries

# bytes per element of the typed storage classes torch.save names (torch/storage.py)
_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "QInt8Storage": 1, "QUInt8Storage": 1,
    "QInt32Storage": 4, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1, "UInt16Storage": 2,
    "UInt32Storage": 4, "UInt64Storage": 8, "Float8_e4m3fnStorage": 1, "Float8_e5m2Storage": 1,
    "UntypedStorage": 1,
}
_REBUILD_TENSOR = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}


def _limit(name: str, default: int) -> int:
    return size_limit(name, default)


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass(eq=False)
class _Storage:
    key: str
    itemsize: int
    numel: int


class _Node:
    """A container's stand-in: its expanded size and depth, and a tuple's first items."""

    __slots__ = ("size", "depth", "items", "sealed")

    def __init__(self, size: int = 1, depth: int = 1, items: tuple = ()):
        self.size, self.depth, self.items = size, depth, items
        self.sealed = False  # placed inside another container: changing it now means a cycle


@dataclass
class PickleClaims:
    """What an object stream claims: its storages (by key) and tensor count."""

    storages: dict[str, _Storage] = field(default_factory=dict)
    tensors: int = 0


class _Walk:
    """The bounded walk of one object stream (see the module docstring)."""

    def __init__(self, path: Path, claims: PickleClaims):
        self.path, self.claims = path, claims
        self.max_ops = _limit("MAX_PICKLE_OPS", MAX_PICKLE_OPS)
        self.max_depth = _limit("MAX_PICKLE_DEPTH", MAX_PICKLE_DEPTH)
        self.max_objects = _limit("MAX_PICKLE_OBJECTS", MAX_PICKLE_OBJECTS)
        self.max_tensors = _limit("MAX_PICKLE_TENSORS", MAX_PICKLE_TENSORS)
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict = {}

    def refuse(self, what: str, env: str | None = None):
        raise FormatError(self.path, f"refused before loading: {what}" + (f" (raise the limit with LORATOOL_{env})" if env else ""))

    def run(self, stream) -> None:
        """Walk opcodes to STOP. Each opcode's argument is parsed by pickletools' own reader
        (lengths are read from ``stream``, which hands out no more than it holds); the common
        opcodes of torch.save's output are handled inline, the rest through ``_HANDLERS``."""
        read, stack, memo, marks = stream.read, self.stack, self.memo, self.marks
        for _ in range(self.max_ops):
            code = read(1)
            op = _CODE2OP.get(code)
            if op is None:
                self.refuse(f"its pickle is malformed (opcode {code!r})" if code else "its pickle ends before STOP")
            arg = op.arg.reader(stream) if op.arg is not None else None
            if code in _PUT:
                memo[len(memo) if arg is None else arg] = stack[-1] if stack else self.refuse("its pickle is malformed (empty stack)")
            elif code in _GET:
                stack.append(memo[arg] if arg in memo else self.refuse(f"its pickle is malformed (memo {arg} missing)"))
            elif code == b"(":
                marks.append(len(stack))
            elif code in _PUSH:
                stack.append(arg)
            elif code in _TUPLES:  # TUPLE1/2/3 take 1-3 items, TUPLE back to the MARK
                n = _TUPLES[code] or len(stack) - (marks.pop() if marks else self.refuse("its pickle is malformed (no MARK)"))
                items = stack[len(stack) - n:] if n else []
                del stack[len(stack) - n:]
                stack.append(self.node(items, tuple(items[:8])))
            elif code == b".":
                return
            else:
                self.step(op.name, arg)
        self.refuse(f"its pickle has more than {self.max_ops:,} opcodes", "MAX_PICKLE_OPS")

    # -- the stand-ins --
    def node(self, children, items=()) -> _Node:
        """A container of ``children``: checks depth and expanded size, seals the children."""
        size, depth = 1 + len(children), 1
        for c in children:
            if type(c) is _Node:
                c.sealed = True
                size += c.size - 1
                if c.depth >= depth:
                    depth = c.depth + 1
        if size > self.max_objects or depth > self.max_depth:
            self.bound(size, depth)
        return _Node(size, depth, tuple(items))

    def bound(self, size: int, depth: int) -> None:
        if depth > self.max_depth:
            self.refuse(f"its pickle nests containers more than {self.max_depth:,} deep", "MAX_PICKLE_DEPTH")
        if size > self.max_objects:
            self.refuse(f"its pickle expands to more than {self.max_objects:,} objects (memo references multiply)", "MAX_PICKLE_OBJECTS")

    def grow(self, target, children) -> None:
        """Add ``children`` to the container ``target`` (APPEND(S), SETITEM(S), BUILD...)."""
        if not isinstance(target, _Node):
            self.refuse("its pickle adds items to something that is not a container")
        extra = self.node(children)  # seals the children: ``target`` among them is a self-reference
        if target.sealed:
            self.refuse("its pickle changes a container after using it (a self-reference; a walk of it would never end)")
        target.size += extra.size - 1
        target.depth = max(target.depth, extra.depth)
        self.bound(target.size, target.depth)

    def pop_mark(self) -> list:
        if not self.marks:
            self.refuse("its pickle is malformed (no MARK)")
        at = self.marks.pop()
        items, self.stack[at:] = self.stack[at:], []
        return items

    def pop(self, n: int = 1) -> list:
        if len(self.stack) < n:
            self.refuse("its pickle is malformed (stack underflow)")
        items, self.stack[-n:] = self.stack[-n:], []
        return items

    def step(self, name: str, arg) -> None:
        handler = _HANDLERS.get(name)
        if handler is None:
            if name in _IGNORED:
                return
            if name in _LEAVES:
                self.stack.append(arg)
                return
            self.refuse(f"its pickle uses the opcode {name}, which a checkpoint never needs")
        handler(self, arg)

    # -- torch's meaning --
    def persistent(self, pid) -> object:
        """BINPERSID ('storage', <torch XStorage>, key, location, numel): one storage's claim."""
        items = pid.items if isinstance(pid, _Node) else ()
        if len(items) != 5 or items[0] != "storage" or not isinstance(items[1], _Global):
            return self.node([pid])
        cls, key, numel = items[1], str(items[2]), items[4]
        if not isinstance(numel, int) or numel < 0:
            self.refuse(f"storage {key!r} claims {numel!r} elements")
        storage = _Storage(key, _ITEMSIZE.get(cls.name, 1), numel)
        known = self.claims.storages.setdefault(key, storage)
        known.numel = max(known.numel, numel)
        return known

    def tensor(self, args) -> None:
        """_rebuild_tensor_v2(storage, offset, size, stride, ...): the view must lie in the storage."""
        self.claims.tensors += 1
        if self.claims.tensors > self.max_tensors:
            self.refuse(f"it holds more than {self.max_tensors:,} tensors", "MAX_PICKLE_TENSORS")
        items = args.items if isinstance(args, _Node) else ()
        if len(items) < 4 or not isinstance(items[0], _Storage):
            return
        storage, offset, size, stride = items[:4]
        shape = size.items if isinstance(size, _Node) else None
        steps = stride.items if isinstance(stride, _Node) else None
        if not isinstance(offset, int) or shape is None or steps is None:
            self.refuse(f"a tensor of storage {storage.key!r} has a malformed offset, shape or stride")
        check_view(self.path, storage, offset, shape, steps)


def check_view(path: Path, storage: _Storage, offset: int, shape: tuple, stride: tuple) -> None:
    """A tensor (offset, shape, stride) over ``storage`` reads only elements the storage holds, and
    no more elements than it holds (a stride-0 view of 4 bytes may claim gigabytes).

    Raises:
        FormatError: naming the storage and the sizes.
    """
    ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, *stride, offset))
    if not ints or len(shape) != len(stride):
        raise FormatError(path, f"refused before loading: a tensor of storage {storage.key!r} has shape {shape} and stride {stride}")
    numel = math.prod(shape)
    if numel == 0:
        return
    extent = offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1
    if extent > storage.numel or numel > storage.numel:
        raise FormatError(
            path, f"refused before loading: a tensor of shape {tuple(shape)} (stride {tuple(stride)}, offset {offset}) "
            f"needs {max(extent, numel):,} elements, its storage {storage.key!r} holds {storage.numel:,}"
        )


# opcodes that only push their argument (a leaf: ints, strings, bytes, floats, extension codes)
_LEAVES = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "UNICODE",
    "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT", "EXT1", "EXT2", "EXT4",
}
_IGNORED = {"PROTO", "FRAME", "STOP"}
_CODE2OP = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
_PUT = {b"q", b"r", b"p", b"\x94"}  # BINPUT, LONG_BINPUT, PUT, MEMOIZE
_GET = {b"h", b"j", b"g"}  # BINGET, LONG_BINGET, GET
_TUPLES = {b"\x85": 1, b"\x86": 2, b"\x87": 3, b"t": 0}
_PUSH = {c for c, op in _CODE2OP.items() if op.name in _LEAVES}


def _memo_put(w: _Walk, idx) -> None:
    if not w.stack:
        w.refuse("its pickle is malformed (memoizing an empty stack)")
    w.memo[len(w.memo) if idx is None else idx] = w.stack[-1]


def _memo_get(w: _Walk, idx) -> None:
    if idx not in w.memo:
        w.refuse(f"its pickle is malformed (memo {idx} missing)")
    w.stack.append(w.memo[idx])


def _reduce(w: _Walk, _arg) -> None:
    fn, args = w.pop(2)
    if isinstance(fn, _Global) and (fn.module, fn.name) in _REBUILD_TENSOR:
        w.tensor(args)
    w.stack.append(w.node([args]))


def _setitems(w: _Walk, _arg) -> None:
    items = w.pop_mark()
    w.grow(w.stack[-1] if w.stack else None, items)


def _newobj_ex(w: _Walk, _arg) -> None:
    _cls, args, kwargs = w.pop(3)
    w.stack.append(w.node([args, kwargs]))


_HANDLERS = {
    "NONE": lambda w, a: w.stack.append(None),
    "NEWTRUE": lambda w, a: w.stack.append(True),
    "NEWFALSE": lambda w, a: w.stack.append(False),
    "MARK": lambda w, a: w.marks.append(len(w.stack)),
    "POP": lambda w, a: w.pop(),
    "POP_MARK": lambda w, a: w.pop_mark(),
    "DUP": lambda w, a: w.stack.extend(w.pop() * 2),
    "EMPTY_LIST": lambda w, a: w.stack.append(_Node()),
    "EMPTY_DICT": lambda w, a: w.stack.append(_Node()),
    "EMPTY_SET": lambda w, a: w.stack.append(_Node()),
    "EMPTY_TUPLE": lambda w, a: w.stack.append(_Node()),
    "LIST": lambda w, a: w.stack.append(w.node(w.pop_mark())),
    "DICT": lambda w, a: w.stack.append(w.node(w.pop_mark())),
    "FROZENSET": lambda w, a: w.stack.append(w.node(w.pop_mark())),
    "APPEND": lambda w, a: w.grow(w.stack[-2] if len(w.stack) > 1 else None, w.pop()),
    "APPENDS": _setitems,
    "SETITEM": lambda w, a: w.grow(w.stack[-3] if len(w.stack) > 2 else None, w.pop(2)),
    "SETITEMS": _setitems,
    "ADDITEMS": _setitems,
    "BUILD": lambda w, a: w.grow(w.stack[-2] if len(w.stack) > 1 else None, w.pop()),
    "PUT": _memo_put, "BINPUT": _memo_put, "LONG_BINPUT": _memo_put,
    "MEMOIZE": lambda w, a: _memo_put(w, None),
    "GET": _memo_get, "BINGET": _memo_get, "LONG_BINGET": _memo_get,
    "GLOBAL": lambda w, a: w.stack.append(_Global(*str(a).split(" ", 1)) if " " in str(a) else _Global(str(a), "")),
    "STACK_GLOBAL": lambda w, a: w.stack.append(_Global(*map(str, w.pop(2)))),
    "REDUCE": _reduce,
    "NEWOBJ": lambda w, a: w.stack.append(w.node(w.pop(2)[1:])),
    "NEWOBJ_EX": _newobj_ex,
    "INST": lambda w, a: w.stack.append(w.node(w.pop_mark())),
    "OBJ": lambda w, a: w.stack.append(w.node(w.pop_mark())),
    "BINPERSID": lambda w, a: w.stack.append(w.persistent(w.pop()[0])),
    "PERSID": lambda w, a: w.stack.append(w.node([])),
}


def _zip_entry_count(path: Path, fh) -> int:
    """The entry count the end-of-central-directory record (or its zip64 twin) states, read
    before ``zipfile`` builds an object per directory entry."""
    end = zipfile._EndRecData(fh)  # the last 22 bytes + comment; follows the zip64 locator
    if end is None:
        raise FormatError(path, "not a loadable PyTorch checkpoint (no zip end-of-directory record)")
    return int(end[zipfile._ECD_ENTRIES_TOTAL])


def open_torch_zip(path: Path) -> zipfile.ZipFile:
    """``zipfile.ZipFile(path)`` once the directory's entry count is within ``MAX_ZIP_ENTRIES``.

    Raises:
        FormatError: too many entries; zipfile.BadZipFile, OSError as zipfile raises them.
    """
    limit = _limit("MAX_ZIP_ENTRIES", MAX_ZIP_ENTRIES)
    fh = open(path, "rb")
    try:
        count = _zip_entry_count(path, fh)
        if count > limit:
            raise FormatError(path, f"refused before loading: its zip directory lists {count:,} entries, more than {limit:,} (raise the limit with LORATOOL_MAX_ZIP_ENTRIES)")
        return zipfile.ZipFile(fh)
    except BaseException:
        fh.close()
        raise


def _check_zip_entries(path: Path, zf: zipfile.ZipFile, size: int) -> None:
    """Every entry stored as torch.save stores it (uncompressed), and inside the file."""
    for info in zf.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise FormatError(path, f"refused before loading: zip entry {info.filename!r} is compressed (torch.save never compresses; "
                              f"it would inflate to {info.file_size:,} bytes)")
        if info.header_offset + 30 + len(info.orig_filename) + info.compress_size > size or info.file_size != info.compress_size:
            raise FormatError(path, f"refused before loading: zip entry {info.filename!r} claims {info.file_size:,} bytes past the end of the {size:,}-byte file")


def _refuse_long_stream(path: Path, n: int) -> None:
    limit = _limit("MAX_PICKLE_BYTES", MAX_PICKLE_BYTES)
    if n > limit:
        raise FormatError(path, f"refused before loading: its pickle's object stream is {n:,} bytes or more, more than {limit:,} (raise the limit with LORATOOL_MAX_PICKLE_BYTES)")


def _walk(path: Path, stream, claims: PickleClaims) -> None:
    try:
        _Walk(path, claims).run(stream)
    except FormatError:
        raise
    except (ValueError, EOFError, UnicodeDecodeError, OverflowError, TypeError) as exc:  # pickletools' readers on malformed bytes
        if _limit("MAX_PICKLE_BYTES", MAX_PICKLE_BYTES) < len(stream.getbuffer()):
            _refuse_long_stream(path, len(stream.getbuffer()))
        raise FormatError(path, f"not a loadable PyTorch checkpoint (its pickle is malformed: {str(exc)[:120]})") from None


def _check_zip(path: Path, size: int) -> None:
    """The zip container: entries, data.pkl's claims, each storage against its ``data/<key>`` entry."""
    with open_torch_zip(path) as zf:
        _check_zip_entries(path, zf, size)
        pkl = [i for i in zf.infolist() if i.filename.endswith("data.pkl")]
        if not pkl:
            return  # not torch's layout: torch.load reports it
        claims = PickleClaims()
        _refuse_long_stream(path, pkl[0].file_size)
        _walk(path, io.BytesIO(zf.read(pkl[0])), claims)
        prefix = pkl[0].filename[: -len("data.pkl")]
        for key, storage in claims.storages.items():
            try:
                held = zf.getinfo(f"{prefix}data/{key}").file_size
            except KeyError:
                raise FormatError(path, f"refused before loading: storage {key!r} has no zip entry") from None
            if storage.numel * storage.itemsize > held:
                raise FormatError(path, f"refused before loading: storage {key!r} claims {storage.numel * storage.itemsize:,} bytes, its zip entry holds {held:,}")


def _check_legacy(path: Path, size: int) -> None:
    """The legacy layout: magic number, protocol, sys info and the object pickles, then the
    storages' raw bytes; together the storages cannot claim more than the file holds."""
    claims = PickleClaims()
    with open(path, "rb") as raw:
        stream = io.BytesIO(raw.read(_limit("MAX_PICKLE_BYTES", MAX_PICKLE_BYTES) + 1))
    for _ in range(4):
        _walk(path, stream, claims)
    _refuse_long_stream(path, stream.tell())
    claimed = sum(s.numel * s.itemsize for s in claims.storages.values())
    if claimed > size:
        raise FormatError(path, f"refused before loading: its storages claim {claimed:,} bytes, the file has {size:,}")


def check_torch_pickle(path: Path) -> None:
    """Refuse, before ``torch.load``, a pickle whose claims exceed the limits or its own file.

    Raises:
        FormatError: one line naming the file, what is too large and the variable raising the limit.
    """
    path = Path(path)
    size = os.stat(path).st_size
    with open(path, "rb") as fh:
        zipped = fh.read(2) == b"PK"
    if zipped:
        _check_zip(path, size)
    else:
        _check_legacy(path, size)


# -- where each pickled tensor's elements lie in a torch zip (for the value scan, io/bitscan.py) --

# torch.save's storage classes holding IEEE floats -> safetensors dtype codes (bitscan.FLOAT_BITS)
_FLOAT_CODES = {"FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64"}
_LOCAL_HEADER = b"PK\x03\x04"  # a zip local file header: 30 fixed bytes, then its name, then its extra field


@dataclass(frozen=True)
class _TensorRef:
    """What ``_rebuild_tensor_v2(storage, offset, shape, stride, ...)`` would build, as numbers."""

    storage: tuple  # (storage class name, key): what our persistent_load returns
    offset: int
    shape: tuple
    stride: tuple


class _Opaque:
    """Anything else a checkpoint's pickle builds: takes any arguments, items and state, and is
    never a tensor (``flatten_state_dict`` files it under extras, as it does the real object)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


def _stand_in(module: str, name: str):
    """What a GLOBAL of the pickle becomes: numbers for tensors and storages, pass-throughs for
    torch's wrappers (Parameter, tensor subclasses), ``_Opaque`` for everything else. Nothing is
    imported or called from the file: this is find_class."""
    if (module, name) in _REBUILD_TENSOR:
        return lambda storage, offset, shape, stride, *_: _TensorRef(storage, offset, tuple(shape), tuple(stride))
    if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        return lambda data, *_: data  # nn.Parameter(data): the same storage, offset, shape, stride
    if module == "torch._tensor" and name == "_rebuild_from_type_v2":
        return lambda func, _type, args, _state: func(*args)  # a tensor subclass: the same tensor
    if (module, name) == ("collections", "OrderedDict"):
        return dict  # what a state_dict is; flatten_state_dict walks dicts
    if module == "torch" and name.endswith("Storage"):
        return name
    return _Opaque


class _StandInUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _stand_in(str(module), str(name))

    def persistent_load(self, pid):
        # torch.save: ('storage', <torch XStorage>, key, location, numel)
        return (pid[1], str(pid[2])) if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" else None


def _dense(shape: tuple, stride: tuple) -> bool:
    """The view's elements are exactly ``numel`` consecutive storage elements from its offset:
    row-major, or any permutation of it (a transposed factor); then one byte range holds it."""
    expected = 1
    for step, n in sorted((s, n) for n, s in zip(shape, stride) if n != 1):
        if step != expected:
            return False
        expected *= n
    return True


def _data_offset(fh, info: zipfile.ZipInfo) -> int | None:
    """Where an entry's bytes begin: after its local header's 30 bytes, name and extra field
    (read from the local header itself: torch pads the extra field there to align storages,
    and it may differ from the central directory's copy)."""
    fh.seek(info.header_offset)
    head = fh.read(30)
    if len(head) < 30 or head[:4] != _LOCAL_HEADER:
        return None
    name_len, extra_len = int.from_bytes(head[26:28], "little"), int.from_bytes(head[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


def _ref_span(path: Path, ref: _TensorRef, entry: tuple[zipfile.ZipInfo, int], big_endian: bool):
    """(Span, shape) of one tensor whose dense view lies inside its storage's zip entry, else None."""
    from loratool.io.bitscan import Span

    info, data = entry
    code = _FLOAT_CODES.get(ref.storage[0])
    ints = all(type(v) is int and v >= 0 for v in (ref.offset, *ref.shape, *ref.stride))
    if code is None or not ints or len(ref.shape) != len(ref.stride) or not _dense(ref.shape, ref.stride):
        return None
    itemsize = _ITEMSIZE[ref.storage[0]]
    begin = data + ref.offset * itemsize
    end = begin + math.prod(ref.shape) * itemsize
    if end > data + info.file_size:
        return None
    return Span(path, begin, end, code, big_endian), ref.shape


def tensor_spans(path: Path) -> dict[str, tuple]:
    """{name: (bitscan.Span, shape)} of a torch zip's float tensors whose elements are one byte
    range of the file, named as ``flatten_state_dict`` names them; {} for a legacy pickle.

    Layout (torch/csrc/jit/serialization, torch.save): ``<archive>/data.pkl`` holds the object
    stream, a storage with key K is the entry ``<archive>/data/K`` (stored, never compressed:
    ``_check_zip_entries`` refuses others), ``<archive>/byteorder`` says "little" or "big" (absent
    in old files: native). The object stream is replayed with stand-ins (``_stand_in``), after
    ``check_torch_pickle`` bounded it. Anything unexpected gives no span: the caller then scans
    the loaded tensor instead, so this is a shortcut, never a second opinion.
    """
    try:
        with open_torch_zip(path) as zf, open(path, "rb") as fh:
            pkl = next((i for i in zf.infolist() if i.filename.endswith("data.pkl")), None)
            if pkl is None:
                return {}
            prefix = pkl.filename[: -len("data.pkl")]
            names = set(zf.namelist())
            order = zf.read(f"{prefix}byteorder").decode().strip() if f"{prefix}byteorder" in names else sys.byteorder
            root = _StandInUnpickler(io.BytesIO(zf.read(pkl))).load()
            refs = flatten_state_dict(root, is_tensor=lambda v: isinstance(v, _TensorRef))[0]
            entries: dict[str, tuple] = {}
            spans = {}
            for name, ref in refs.items():
                key = f"{prefix}data/{ref.storage[1]}" if isinstance(ref.storage, tuple) else None
                if key not in entries and key in names:
                    info = zf.getinfo(key)
                    entries[key] = (info, _data_offset(fh, info))
                entry = entries.get(key)
                span = _ref_span(path, ref, entry, order == "big") if entry and entry[1] is not None else None
                if span is not None:
                    spans[name] = span
            return spans
    except Exception:  # noqa: BLE001 - a shortcut: any surprise means "scan the loaded tensor"
        return {}


def flatten_state_dict(obj: object, prefix: str = "", is_tensor: Callable[[object], bool] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Split a loaded checkpoint into tensors (flattened, dotted names) and other entries.

    ``is_tensor`` (default: a ``torch.Tensor``) lets ``tensor_spans`` name its
    stand-ins exactly as the loaded tensors are named."""
    if is_tensor is None:
        import torch

        is_tensor = lambda v: isinstance(v, torch.Tensor)  # noqa: E731
    tensors: dict[str, torch.Tensor] = {}
    extras: dict[str, object] = {}
    if is_tensor(obj):
        tensors[prefix or "tensor"] = obj
        return tensors, extras
    if not isinstance(obj, dict):
        extras[prefix or "value"] = obj
        return tensors, extras
    for k, v in obj.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if is_tensor(v):
            tensors[name] = v
        elif isinstance(v, dict):
            t, e = flatten_state_dict(v, name, is_tensor)
            tensors.update(t)
            extras.update(e)
        else:
            extras[name] = v
    return tensors, extras
