"""(all finite, all zero) of a stored float tensor, from its bits, in blocks: no torch, no copy.

One mechanism for every layout that keeps a tensor as one contiguous byte range of a file: a
safetensors tensor (its ``data_offsets``) and a pickled tensor of a torch zip (a range of its
storage's zip entry, which torch.save stores uncompressed: ``pickle_scan.tensor_spans``). Each
file is mapped once; each block is viewed with numpy, reduced, and its pages are dropped from
this process with MADV_DONTNEED (the page cache keeps them; the mapping is read-only, so nothing
is lost), so a 1.5 GB tensor costs one block of memory, not 1.5 GB of resident pages.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from loratool.errors import FormatError

# IEEE layouts of the float codes: (unsigned view, exponent bits, magnitude bits). With
# m = bits & magnitude: m == 0 is +0 or -0, and m >= exponent exactly when the exponent field is
# all ones (inf or NaN), since the exponent field is m's top bits: one AND and one max per block.
FLOAT_BITS = {
    "F64": ("u8", 0x7FF0000000000000, 0x7FFFFFFFFFFFFFFF),
    "F32": ("u4", 0x7F800000, 0x7FFFFFFF),
    "F16": ("u2", 0x7C00, 0x7FFF),
    "BF16": ("u2", 0x7F80, 0x7FFF),
}


@dataclass(frozen=True)
class Span:
    """A tensor's elements as one byte range [begin, end) of ``path``, in ``code`` (safetensors'
    dtype codes), little-endian unless ``big_endian`` (a torch zip's ``byteorder`` record)."""

    path: Path
    begin: int
    end: int
    code: str
    big_endian: bool = False


def still_there(path: Path, end: int, what: str) -> None:
    """Refuse to view bytes a file no longer has: touching a mapping past the end of a file that
    another process truncated is SIGBUS, which CPython cannot turn into an error (docs/guarantees.md).

    Raises:
        FormatError: naming the file, its size now and what ``what`` needs.
    """
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise FormatError(path, f"cannot be read any more ({exc.strerror or exc})") from None
    if size < end:
        raise FormatError(path, f"was truncated while being read: {size:,} bytes now, {what} needs {end:,}")


class BitScanner:
    """``summary(span)`` for the spans of any number of files, each mapped once (a map per
    tensor costs ~0.1 ms: 100,000 tensors would take 10 s)."""

    def __init__(self):
        self._maps: dict[Path, mmap.mmap] = {}

    def summary(self, span: Span, what: str, chunk: int = 1 << 20) -> tuple[bool, bool] | None:
        """(all finite, all zero), ``chunk`` elements at a time; None for a non-float code."""
        layout = FLOAT_BITS.get(span.code)
        if layout is None:
            return None
        if span.end <= span.begin:
            return True, True
        import numpy as np

        view, exponent, magnitude = layout
        dtype = np.dtype((">" if span.big_endian else "<") + view)
        scratch = np.empty(chunk, dtype=view)  # one block's masked bits, reused
        step = chunk * dtype.itemsize
        zero = True
        for start in range(span.begin, span.end, step):
            stop = min(start + step, span.end)
            still_there(span.path, stop, what)  # before the block's page faults, not after
            mm = self._map(span.path)
            if stop > len(mm):  # the file was shorter when mapped: it changed under us
                raise FormatError(span.path, f"changed while being read: {what} needs {stop:,} bytes, it had {len(mm):,}")
            block = np.frombuffer(mm, dtype=dtype, count=(stop - start) // dtype.itemsize, offset=start)
            top = int(np.bitwise_and(block, magnitude, out=scratch[: block.size]).max())
            del block  # the view pins the map (mmap.close would raise BufferError)
            _drop(mm, start, stop)
            if top >= exponent:
                return False, False  # inf or NaN: not finite, and not zero either
            zero = zero and top == 0
        return True, zero

    def _map(self, path: Path) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            with open(path, "rb") as fh:
                mm = self._maps[path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return mm

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        for mm in maps.values():
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the GC closes the map
                pass


def _drop(mm: mmap.mmap, start: int, stop: int) -> None:
    """Drop [start, stop) from this process's resident pages (MADV_DONTNEED, from the page
    holding ``start``: madvise takes page-aligned addresses); a later touch refaults from the
    page cache."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    first = start - start % mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_DONTNEED, first, stop - first)
    except (OSError, ValueError):
        pass
