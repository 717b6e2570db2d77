"""Streaming safetensors writing: the header first, then each tensor as it is computed.

The safetensors library can only save a whole dict at once; merging a model must not hold
the model, so the header (names, dtypes, shapes: all known before any data) is written up
front and tensors follow one at a time, in header order. Untouched tensors can be copied
byte for byte from their source file with ``copy_raw``.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Iterable, Mapping

import torch

from loratool.errors import FormatError, InputError
from loratool.io.atomic import crash_point
from loratool.io.store import TORCH_TO_SAFETENSORS, TensorEntry

_ALIGN = 8  # tensor data starts 8-byte aligned, like the reference writer


class SafetensorsStreamWriter:
    """Write a safetensors file whose tensor list is declared up front.

    Use as a context manager; each declared tensor is written once, in declaration order, by
    ``write``, ``copy_raw``, or ``begin`` + ``part``... + ``end`` (row blocks). Leaving the block
    early raises and leaves the file incomplete, which is why it is meant to be written inside
    an atomic output folder. ``fsync=False`` leaves syncing to the caller (e.g. in the background).
    """

    def __init__(
        self,
        path: Path,
        specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
        *,
        fsync: bool = True,
    ):
        self.path = Path(path)
        self.fsync = fsync
        self._open: tuple[str, int] | None = None  # (name, bytes still expected) between begin and end
        self.specs = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._sizes: list[int] = []
        for name, dtype, shape in self.specs:
            if dtype not in TORCH_TO_SAFETENSORS:
                raise InputError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._sizes.append(nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * ((-len(raw)) % _ALIGN)
        self._header = len(raw).to_bytes(8, "little") + raw
        self.total_bytes = offset
        self._next = 0
        self._fh = None

    def __enter__(self) -> "SafetensorsStreamWriter":
        self._fh = open(self.path, "wb")
        self._fh.write(self._header)
        return self

    def _expect(self, name: str) -> int:
        crash_point()
        if self._next >= len(self.specs) or self.specs[self._next][0] != name:
            expected = self.specs[self._next][0] if self._next < len(self.specs) else "nothing"
            raise RuntimeError(f"safetensors writer: got {name!r}, expected {expected!r}")
        return self._next

    @property
    def remaining(self) -> int:
        """How many declared tensors are still to be written."""
        return len(self.specs) - self._next

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the data of the next declared tensor."""
        i = self._expect(name)
        _, dtype, shape = self.specs[i]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"safetensors writer: {name} is {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}")
        self._open = (name, self._sizes[i])
        self.part(tensor)
        self.end(name)

    def begin(self, name: str) -> None:
        """Start the next declared tensor, to be written in parts."""
        i = self._expect(name)
        self._open = (name, self._sizes[i])

    def part(self, tensor: torch.Tensor) -> None:
        """Append the bytes of the next rows of the tensor begun last."""
        name, left = self._open
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        n = t.numel() * t.element_size()
        if n > left:
            raise RuntimeError(f"safetensors writer: {name} got more bytes than declared")
        if n:
            self._fh.write(memoryview(t.view(torch.uint8).numpy()))
        self._open = (name, left - n)

    def end(self, name: str) -> None:
        """Finish the tensor begun last; all its declared bytes must have been written."""
        if self._open is None or self._open[0] != name or self._open[1] != 0:
            raise RuntimeError(f"safetensors writer: {name} is incomplete")
        self._open = None
        self._next += 1

    def copy_raw(self, name: str, source: TensorEntry) -> None:
        """Append the next declared tensor by copying its bytes from a safetensors source."""
        i = self._expect(name)
        if source.begin is None or source.end - source.begin != self._sizes[i]:
            raise RuntimeError(f"safetensors writer: raw copy of {name} has the wrong size")
        self._fh.flush()
        with open(source.path, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            if size < source.end:  # another process truncated it since its header was read
                raise FormatError(source.path, f"was truncated while being read: {size:,} bytes now, tensor {name!r} needs {source.end:,}")
            copy_range(src.fileno(), self._fh.fileno(), source.begin, source.end - source.begin)
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self._next != len(self.specs):
                    raise RuntimeError(f"safetensors writer: {len(self.specs) - self._next} declared tensors were not written")
                self._fh.flush()
                if self.fsync:
                    os.fsync(self._fh.fileno())
                    crash_point()
        finally:
            self._fh.close()


class BackgroundSync:
    """Gets files onto the disk from a helper thread while the caller goes on writing.

    ``wrote(path, n)`` after each write: every ``every`` bytes the file being written is flushed
    early (fdatasync), so the disk works while the caller computes instead of receiving the
    whole output at the end. ``finished(path)`` queues the full fsync of a completed file.
    ``close()`` waits for everything queued; ``errors`` then holds the failed final syncs
    (an early flush that fails is only a lost head start: the final fsync reports it).
    """

    def __init__(self, *, every: int = 128 << 20):
        self.every = every
        self.errors: list[OSError] = []
        self._unflushed = 0
        self._cv = threading.Condition()
        self._finals: list[Path] = []
        self._early: Path | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="loratool-sync", daemon=True)
        self._thread.start()

    def wrote(self, path: Path, nbytes: int) -> None:
        self._unflushed += nbytes
        if self._unflushed >= self.every:
            self._unflushed = 0
            with self._cv:
                self._early = path  # a request still waiting is simply replaced
                self._cv.notify()

    def finished(self, path: Path) -> None:
        self._unflushed = 0
        with self._cv:
            if self._early == path:
                self._early = None
            self._finals.append(path)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._finals or self._early or self._closing):
                    self._cv.wait()
                if self._finals:
                    path, final = self._finals.pop(0), True
                elif self._early is not None:
                    path, final, self._early = self._early, False, None
                else:
                    return
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd) if final else getattr(os, "fdatasync", os.fsync)(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                if final:
                    self.errors.append(exc)


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes from ``src_fd`` at ``offset`` to the current end of ``dst_fd``."""
    dst_pos = os.lseek(dst_fd, 0, os.SEEK_CUR)
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < count:
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(count - done, 1 << 30), offset + done, dst_pos + done)
            except OSError as exc:
                if exc.errno == 28:  # ENOSPC is real, everything else falls back
                    raise
                use_cfr = False
                n = 0
        if not use_cfr:
            chunk = os.pread(src_fd, min(count - done, 16 << 20), offset + done)
            if not chunk:
                raise OSError(f"unexpected end of file while copying {count} bytes")
            n = os.pwrite(dst_fd, chunk, dst_pos + done)
        if n == 0:
            raise OSError(f"unexpected end of file while copying {count} bytes")
        done += n
    os.lseek(dst_fd, dst_pos + count, os.SEEK_SET)


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a small dict of tensors (an adapter) with the streaming writer, fsynced."""
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsStreamWriter(path, specs, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)


# ---------------------------------------------------------------------------------------------
# model folders


INDEX_NAME = "model.safetensors.index.json"


def output_shard_names(files: list[Path]) -> dict[Path, str]:
    """The safetensors file each checkpoint file of a base becomes in an output model.

    ``*.safetensors`` keep their names; ``pytorch_model*.bin`` become ``model*.safetensors``;
    any other name becomes ``model.safetensors`` (one file) or ``model-0000i-of-0000n.safetensors``,
    the names transformers looks for.
    """
    names: dict[Path, str] = {}
    n = len(files)
    for i, f in enumerate(files):
        if f.name.endswith(".safetensors"):
            names[f] = f.name
        elif f.name.startswith("pytorch_model"):
            names[f] = f.name.rsplit(".", 1)[0].replace("pytorch_model", "model", 1) + ".safetensors"
        else:
            names[f] = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    return names


class ModelWriter:
    """The one writer of model folders: shards, the index, config.json and side files.

    Every model-writing command (merge, unmerge, quantized merges, QA-LoRA) fills its temporary
    output folder (``io.atomic``) through it. Shards are declared and streamed with
    ``SafetensorsStreamWriter``; the writer keeps the weight map and totals for the index.
    With ``background_sync`` each shard is flushed from a helper thread as it grows and fsynced
    there once complete (``BackgroundSync``), instead of inline when it closes.
    """

    def __init__(self, folder: Path, *, background_sync: bool = False):
        self.folder = Path(folder)
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.total_params = 0
        self.files: list[str] = []
        self.sync = BackgroundSync() if background_sync else None

    def shard(self, filename: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None = None) -> "_Shard":
        """A context manager writing one shard (a ``SafetensorsStreamWriter``, with ``wrote(n)`` for progress)."""
        for name, dtype, shape in specs:
            self.weight_map[name] = filename
            self.total_bytes += math.prod(shape) * dtype.itemsize
            self.total_params += math.prod(shape)
        return _Shard(self, filename, specs, metadata)

    def wrote(self, filename: str, nbytes: int) -> None:
        """Bytes just written to shard ``filename`` (what the background flush goes by)."""
        if self.sync is not None:
            self.sync.wrote(self.folder / filename, nbytes)

    def write_index(self, metadata: Mapping | None = None) -> None:
        """``model.safetensors.index.json``: ``metadata`` (the base's, if any) with this output's totals."""
        meta = dict(metadata or {})
        meta["total_size"] = self.total_bytes
        if "total_parameters" in meta:
            meta["total_parameters"] = self.total_params
        index = {"metadata": meta, "weight_map": dict(sorted(self.weight_map.items()))}
        self.write_json(INDEX_NAME, index, sort_keys=False)

    def write_json(self, name: str, obj: object, *, sort_keys: bool = True) -> None:
        """A JSON side file (config.json with its patch, quantize_config.json...)."""
        (self.folder / name).write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")
        self.files.append(name)

    def copy_side_files(self, source: Path, names: Iterable[str]) -> None:
        """Copy files of the base folder as they are (``base.side_files`` says which are safe)."""
        import shutil

        for name in names:
            shutil.copyfile(Path(source) / name, self.folder / name)
            self.files.append(name)

    def close(self) -> None:
        """Wait for the background syncs; raise the first that failed."""
        if self.sync is not None:
            self.sync.close()
            if self.sync.errors:
                raise self.sync.errors[0]


class _Shard:
    def __init__(self, owner: ModelWriter, filename: str, specs, metadata):
        self.owner, self.filename = owner, filename
        self.path = owner.folder / filename
        self.stream = SafetensorsStreamWriter(self.path, specs, metadata, fsync=owner.sync is None)

    def __enter__(self) -> SafetensorsStreamWriter:
        return self.stream.__enter__()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stream.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.owner.files.append(self.filename)
            if self.owner.sync is not None:
                self.owner.sync.finished(self.path)



def trim_padded(folder: Path, padded: Mapping[str, int]) -> int:
    """Rewrite the shards holding tensors declared larger than they turned out (a bitsandbytes
    quant-state blob, whose exact JSON length is known only after quantizing), exact length.

    Returns:
        The number of bytes removed; the index's total_size is corrected.
    """
    from loratool.io.store import read_safetensors_header

    saved = 0
    for shard in sorted(Path(folder).glob("*.safetensors")):
        entries, meta, _ = read_safetensors_header(shard)
        if not any(e.name in padded for e in entries):
            continue
        specs = [(e.name, e.dtype, (padded[e.name],) if e.name in padded else e.shape) for e in entries]
        tmp = shard.with_name(f".{shard.name}.trim")
        with open(shard, "rb") as src, SafetensorsStreamWriter(tmp, specs, meta) as w:
            for e in entries:
                if e.name in padded:
                    src.seek(e.begin)
                    w.write(e.name, torch.frombuffer(bytearray(src.read(padded[e.name])), dtype=torch.uint8))
                    saved += (e.end - e.begin) - padded[e.name]
                else:
                    w.copy_raw(e.name, e)
        os.replace(tmp, shard)
    index = Path(folder) / INDEX_NAME
    if saved and index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        meta = data.get("metadata") or {}
        if isinstance(meta.get("total_size"), int):
            meta["total_size"] -= saved
        index.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return saved


def save_torch_pickle(obj: object, path: Path) -> None:
    """``torch.save`` (the .pth / .bin outputs), with a full disk reported as one.

    torch's zip writer turns a short write into a RuntimeError ("unexpected pos N vs M", "file
    write failed") instead of the OSError the file system gave; on a file system with no space
    left that becomes ENOSPC again, so the error line says what happened.
    """
    import errno

    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        text = str(exc)
        if "unexpected pos" not in text and "write failed" not in text:
            raise
        import resource

        st = os.statvfs(Path(path).parent)
        if st.f_bavail * st.f_frsize < (1 << 20):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:  # a file size limit stopped it
            raise OSError(errno.EFBIG, "File too large", str(path)) from None
        raise OSError(errno.EIO, f"short write ({text.splitlines()[0][:200]})", str(path)) from None
