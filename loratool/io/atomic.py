"""Atomic outputs: build OUT in a temporary sibling, fsync it, rename it into place.

A crash, kill or full disk leaves at most a hidden ``.NAME.loratool-tmp-PID-XXXX`` sibling,
never a half-written OUT; the next run removes siblings whose process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from loratool.errors import InputError, OutputExistsError

_TMP_TAG = ".loratool-tmp-"
_OLD_TAG = ".loratool-old-"

_kill_steps = 0


def crash_point() -> None:
    """Testing hook for crash-safety tests; does nothing unless ``LORATOOL_TEST_KILL_AFTER`` is set.

    Called at each step of writing an output (tmp created, each tensor started, file fsynced,
    before and after the rename). With ``LORATOOL_TEST_KILL_AFTER=N`` the process sends itself
    ``LORATOOL_TEST_KILL_SIGNAL`` (``KILL`` by default, or ``INT``) at the N-th step.
    """
    spec = os.environ.get("LORATOOL_TEST_KILL_AFTER")
    if not spec:
        return
    global _kill_steps
    _kill_steps += 1
    if spec.isdigit() and _kill_steps == int(spec):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("LORATOOL_TEST_KILL_SIGNAL", "KILL")))


def check_output_path(out: Path, *, force: bool, inputs: Iterable[Path] = ()) -> Path:
    """Refuse an OUT that exists (without force) or that is, or lies inside, an input.

    Returns:
        The absolute OUT path.
    Raises:
        OutputExistsError, InputError.
    """
    out = Path(out).absolute()
    resolved_out = Path(os.path.realpath(out))  # no error on a symlink loop, unlike Path.resolve
    for src in _with_link_targets(inputs):
        src = Path(src)
        if not src.exists():
            continue
        src_res = Path(os.path.realpath(src))
        src_dir = src_res if src_res.is_dir() else src_res.parent
        if resolved_out == src_res or (src_res.is_dir() and _is_within(resolved_out, src_dir)):
            raise InputError(f"{out}: OUT must not be an input or lie inside an input folder ({src})")
        if _is_within(src_res, resolved_out):
            raise InputError(f"{out}: OUT contains the input {src}; replacing it would destroy the input")
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"{out}: already exists (use --force to replace it)")
    if not out.parent.exists():
        raise InputError(f"{out}: parent folder {out.parent} does not exist")
    return out


def _with_link_targets(inputs: Iterable[Path]) -> list[Path]:
    """The inputs, plus the targets of symlinks directly inside input folders (a Hub cache
    snapshot links to blobs elsewhere; replacing that folder would destroy the input)."""
    found: list[Path] = []
    for src in inputs:
        if src is None:
            continue
        src = Path(src)
        found.append(src)
        if src.is_dir():
            with contextlib.suppress(OSError):
                found.extend(Path(os.path.realpath(p)) for p in src.iterdir() if p.is_symlink())
    return found


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_siblings(out: Path) -> None:
    """Remove temporary siblings of OUT left by runs that were killed."""
    parent = out.parent
    if not parent.is_dir():
        return
    for tag in (_TMP_TAG, _OLD_TAG):
        for p in parent.glob(f".{out.name}{tag}*"):
            try:
                pid = int(p.name[len(f".{out.name}{tag}"):].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                _remove(p)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _sibling(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under root (and root itself)."""
    if root.is_file():
        _fsync_path(root)
        return
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_dir(Path(dirpath))


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(p: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit(tmp: Path, out: Path, force: bool) -> None:
    fsync_tree(tmp)
    crash_point()
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"{out}: was created by another run meanwhile; this run's result is discarded")
        old = _sibling(out, _OLD_TAG)
        os.rename(out, old)
        os.rename(tmp, out)
        _remove(old)
    else:
        try:
            if tmp.is_dir():
                os.rename(tmp, out)
            else:
                # link() fails if OUT appeared meanwhile, where rename() would replace it
                os.link(tmp, out)
                tmp.unlink()
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise OutputExistsError(f"{out}: was created by another run meanwhile; this run's result is discarded") from None
            raise
    crash_point()
    _fsync_dir(out.parent)


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, force: bool = False, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it becomes OUT, on any error it is removed.

    Raises:
        OutputExistsError: OUT exists and not ``force``.
        InputError: OUT is or lies inside an input.
    """
    out = check_output_path(out, force=force, inputs=inputs)
    clean_stale_siblings(out)
    tmp = _sibling(out, _TMP_TAG)
    tmp.mkdir()
    try:
        crash_point()
        yield tmp
        _commit(tmp, out, force)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_output_file(out: Path, *, force: bool = False, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Like ``atomic_output_dir`` for a single output file."""
    out = check_output_path(out, force=force, inputs=inputs)
    clean_stale_siblings(out)
    tmp = _sibling(out, _TMP_TAG)
    try:
        crash_point()
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"{out}: nothing was written")
        _commit(tmp, out, force)
    except BaseException:
        _remove(tmp)
        raise
