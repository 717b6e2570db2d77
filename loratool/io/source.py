"""Tensor sources: zero-copy row blocks of checkpoint tensors, for every command that reads weights.

A safetensors tensor is a byte range of its file; ``TensorSource`` maps each file once
(read-only, shared with the page cache: file-backed memory, not anonymous) and hands out
views of row ranges, so reading a 26 GB model costs no copy and no memory of its own. Pickled
checkpoints (the legacy ``.bin`` path) have no byte ranges: their tensors come from
``TensorStore.get`` and are sliced. A view is read-only: callers must copy before writing.

A file another process truncates or rewrites while it is mapped: inside a command every store's
file is leased from its header on (``io.leases``, ``store.read_safetensors_header``); without a
lease, a ``stat`` before each block refuses a file that has shrunk.
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from pathlib import Path

import torch

from loratool.errors import FormatError
from loratool.io.store import TensorEntry, TensorStore


class TensorSource:
    """Row blocks and whole tensors of one ``TensorStore``, as views of memory-mapped files."""

    def __init__(self, store: TensorStore):
        self.store = store
        self._maps: dict[Path, mmap.mmap] = {}

    def rows(self, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
        """Rows [start:stop] of a tensor (the whole tensor for a 0-d one), read-only."""
        if entry.begin is None:  # a pickled tensor: already in memory
            t = self.store.get(entry.name)
            return t if t.dim() == 0 else t[start:stop]
        shape = entry.shape
        row_bytes = (math.prod(shape[1:]) if shape else 1) * entry.dtype.itemsize
        nrows = (stop - start) if shape else 1
        out_shape = (nrows, *shape[1:]) if shape else ()
        n = nrows * row_bytes
        if n == 0:
            return torch.empty(out_shape, dtype=entry.dtype)
        offset = entry.begin + start * row_bytes
        self._still_there(entry, offset + n)
        mm = self._map(entry.path)
        if offset % entry.dtype.itemsize:
            # safetensors aligns nothing: a tensor at an odd offset cannot be viewed as its dtype
            raw = torch.frombuffer(bytearray(mm[offset : offset + n]), dtype=torch.uint8)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "buffer is not writable": nothing writes to it
                raw = torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=offset)
        return raw.view(entry.dtype).reshape(out_shape)

    def _still_there(self, entry: TensorEntry, end: int) -> None:
        """Refuse to view bytes a file no longer has: reading a mapping past the end of a file that
        another process truncated kills the process with SIGBUS, which no handler can turn into an
        error safely. With a read lease (``io.leases``) the size seen here stays until the command
        ends; without one, one ``stat`` per block (microseconds) leaves a window as long as the block
        is in use.

        Raises:
            FormatError: naming the file, its size now and what the tensor needs.
        """
        try:
            size = os.stat(entry.path).st_size
        except OSError as exc:
            raise FormatError(entry.path, f"cannot be read any more ({exc.strerror or exc})") from None
        if size < end:
            raise FormatError(entry.path, f"was truncated while being read: {size:,} bytes now, tensor {entry.name!r} needs {end:,}")

    def tensor(self, name: str) -> torch.Tensor:
        """A whole tensor, read-only."""
        e = self.store.entry(name)
        return self.rows(e, 0, e.shape[0] if e.shape else 1)

    def release(self, entry: TensorEntry) -> None:
        """Drop a finished tensor's pages from this process's mapping (the page cache keeps them)."""
        mm = self._maps.get(entry.path)
        if mm is None or entry.begin is None or entry.end <= entry.begin or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = entry.begin - entry.begin % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, entry.end - start)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        for mm in maps.values():
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the GC closes the map
                pass

    def _map(self, path: Path) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            with open(path, "rb") as fh:
                # no MADV_SEQUENTIAL: it turns off the kernel's fault-around and costs ~15x the page faults
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = mm
        return mm
