"""Read leases on input files: another process's write or truncate stops the command, cleanly.

A mapped file another process truncates kills the reader with SIGBUS when it touches the lost pages,
and one that is rewritten in place changes under it. Inside ``guard_inputs`` (the CLI runs every
command in it) each input file gets a read lease (``fcntl(F_SETLEASE, F_RDLCK)``, Linux) from the
moment its header is read (``watch``: safetensors, pickles, GGUF; ``io.source`` maps only files
whose headers were read): the kernel then holds another process's ``open`` for writing or ``truncate`` of it
(up to ``/proc/sys/fs/lease-break-time``, 45 s by default) and signals this one (SIGIO), which stops
with one line naming the file while the file is still intact; the leases go when the command's
cleanup is done. Where no lease can be taken (another owner without CAP_LEASE, a network filesystem,
a file already open for writing) a ``stat`` before each block of ``io.source`` refuses a file that
has shrunk.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

from loratool.errors import FormatError


class _Leases:
    """Read leases on the input files while ``guard_inputs`` is active (see the module docstring)."""

    def __init__(self):
        self.active = False
        self.held: dict[int, Path] = {}  # fd -> file
        self.watched: dict[str, int] = {}  # real path -> an fd of our own holding its lease (``watch``)
        self.lock = threading.RLock()  # the SIGIO handler may run while the main thread holds it

    def take(self, fd: int, path: Path) -> None:
        import fcntl

        if not self.active or not hasattr(fcntl, "F_SETLEASE"):
            return
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError:  # not ours to lease, a network filesystem, open for writing elsewhere: the stat check stays
            return
        with self.lock:
            self.held[fd] = path

    def watch(self, path: Path) -> None:
        """Lease an input that a library reads or maps itself (safetensors' ``get_tensor``, ``torch.load``,
        gguf-py's memory map) through a descriptor of our own, held until the command ends."""
        if not self.active or ".loratool-tmp-" in str(path):  # this command's own output, still being written
            return
        real = os.path.realpath(path)
        with self.lock:
            if real in self.watched:
                return
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return
        self.take(fd, Path(path))
        with self.lock:
            if fd in self.held:
                self.watched[real] = fd
                return
        os.close(fd)

    def release_all(self) -> None:
        import fcntl

        with self.lock:
            held, self.held = self.held, {}
            watched, self.watched = self.watched, {}
        for fd in held:
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        for fd in watched.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def breaking(self) -> Path | None:
        """The file whose lease another process is breaking (its lease reads F_UNLCK, the target of the break)."""
        import fcntl

        with self.lock:
            held = dict(self.held)
        for fd, path in held.items():
            with contextlib.suppress(OSError):
                if fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK:
                    return path
        return None


LEASES = _Leases()


def _lease_broken(signum: int, _frame) -> None:
    path = LEASES.breaking()
    if path is None:  # a SIGIO that is not about our files
        return
    raise FormatError(path, "another process opened it for writing or truncated it while it was being read; "
                            "stopped before using changed data")


@contextlib.contextmanager
def guard_inputs():
    """Lease every input file mapped or read inside the block (main thread only; elsewhere the stat
    check alone)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGIO") or LEASES.active:
        yield
        return
    previous = signal.signal(signal.SIGIO, _lease_broken)
    LEASES.active = True
    try:
        yield
    finally:
        LEASES.active = False
        LEASES.release_all()  # readers are done: the engine joins its producer before unwinding
        signal.signal(signal.SIGIO, previous)


