"""Atomic outputs: build OUT in a temporary sibling, fsync it, rename it into place.

A crash, kill or full disk leaves at most a hidden ``.NAME.loratool-tmp-PID-XXXX`` sibling (and
its ``.lock``), never a half-written OUT; the next run removes siblings whose lock is free, i.e.
whose run has ended. OUT paths that would destroy something (an input, the current or home
folder, a device) are refused before any work (``check_output_path``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import stat
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

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


def check_output_path(out: Path | str, *, force: bool, inputs: Iterable[Path] = ()) -> Path:
    """Refuse an OUT that would destroy something: checked before any work, with or without force.

    Refused always: an empty name; the current folder, the home folder or an ancestor of either
    (``.``, ``..``, ``/``); an existing OUT that is neither a regular file nor a folder (a FIFO, a
    device); an OUT that is an input, contains one or lies inside an input folder, compared by
    resolved path and by (st_dev, st_ino), so an alias through a bind mount or a hard link is
    caught too. Refused without ``force``: an OUT that exists.

    Returns:
        The absolute OUT path.
    Raises:
        OutputExistsError, InputError.
    """
    if not os.fspath(out).strip():
        raise InputError("OUT is empty: name the folder or file to write")
    out = Path(out).absolute()
    _refuse_protected(out)
    _refuse_special_output(out)
    for src in _with_link_targets(inputs):
        _refuse_overlap(out, Path(src))
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"{out}: already exists (use --force to replace it)")
    if not out.parent.exists():
        raise InputError(f"{out}: parent folder {out.parent} does not exist")
    return out


def _identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of ``path`` (symlinks followed), or None when it does not exist."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _chain(path: Path) -> list[tuple[int, int]]:
    """The identities of ``path`` (resolved) and of every folder above it, nearest first."""
    real = Path(os.path.realpath(path))
    return [i for i in (_identity(p) for p in (real, *real.parents)) if i is not None]


def _refuse_protected(out: Path) -> None:
    """OUT must not be the current folder, the home folder, or an ancestor of either."""
    here = _identity(out)
    if here is None:
        return
    if here in _chain(Path.cwd()):
        raise InputError(f"{out}: OUT is the current folder or one of its ancestors; replacing it would delete the folder you are in")
    home = Path.home()
    if here in _chain(home):
        raise InputError(f"{out}: OUT is the home folder ({home}) or one of its ancestors; refused")


def _refuse_special_output(out: Path) -> None:
    """An existing OUT (or what its symlink points to) must be a regular file or a folder."""
    try:
        mode = os.stat(out).st_mode
    except (OSError, ValueError):
        return  # absent, or a dangling symlink: only the link itself would be replaced
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(f"{out}: OUT exists and is not a regular file or folder (a FIFO, device or socket); refused")


def _refuse_overlap(out: Path, src: Path) -> None:
    """OUT must not be ``src``, contain it, or lie inside it when it is a folder."""
    src_id = _identity(src)
    if src_id is None:
        return
    out_id = _identity(out)
    if out_id is not None and out_id == src_id:
        raise InputError(f"{out}: OUT must not be an input or lie inside an input folder ({src})")
    if out_id is not None and out_id in _chain(src):
        raise InputError(f"{out}: OUT contains the input {src}; replacing it would destroy the input")
    if os.path.isdir(src) and src_id in _chain(out if out_id is not None else out.parent):
        raise InputError(f"{out}: OUT must not be an input or lie inside an input folder ({src})")


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


_LOCK_SUFFIX = ".lock"


class _SiblingLock:
    """An exclusive ``flock`` on ``<sibling>.lock``, held while this process works on the sibling.

    Liveness is decided by the lock, not by a PID: a PID means nothing to a process in another
    PID namespace (a container, or a host sharing the storage), while a lock is released by the
    kernel whenever its holder ends, however it ends.
    """

    def __init__(self, sibling: Path):
        self.path = Path(f"{sibling}{_LOCK_SUFFIX}")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)


def _held_by_a_live_run(lock_path: Path) -> bool:
    """Whether another process holds ``lock_path``; False when it is free (its run is gone)."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(sibling: Path, prefix: str) -> bool:
    """Whether a temporary sibling was left by a run that has ended."""
    lock = Path(f"{sibling}{_LOCK_SUFFIX}")
    if lock.exists():
        return not _held_by_a_live_run(lock)
    # a sibling of a version without locks: judged by its PID (same namespace only)
    pid_text = sibling.name[len(prefix):].split("-")[0]
    return pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text))


def clean_stale_siblings(out: Path) -> None:
    """Remove temporary siblings of OUT (and their lock files) left by runs that ended.

    Siblings are matched by a literal name prefix: an OUT name holding ``*``, ``?`` or ``[``
    never matches another OUT's siblings.
    """
    parent = out.parent
    if not parent.is_dir():
        return
    prefixes = [f".{out.name}{tag}" for tag in (_TMP_TAG, _OLD_TAG)]
    with contextlib.suppress(OSError):
        for p in list(parent.iterdir()):
            prefix = next((x for x in prefixes if p.name.startswith(x)), None)
            if prefix is None:
                continue
            if p.name.endswith(_LOCK_SUFFIX):
                sibling = Path(str(p)[: -len(_LOCK_SUFFIX)])
                if not sibling.exists() and not sibling.is_symlink() and not _held_by_a_live_run(p):
                    _remove(p)
            elif _stale(p, prefix):
                _remove(p)
                _remove(Path(f"{p}{_LOCK_SUFFIX}"))


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
    lock = _SiblingLock(tmp)  # before the sibling exists: no other run ever sees it unlocked
    try:
        tmp.mkdir()
        crash_point()
        yield tmp
        _commit(tmp, out, force)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        lock.release()


@contextlib.contextmanager
def atomic_output_file(out: Path, *, force: bool = False, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Like ``atomic_output_dir`` for a single output file."""
    out = check_output_path(out, force=force, inputs=inputs)
    clean_stale_siblings(out)
    tmp = _sibling(out, _TMP_TAG)
    lock = _SiblingLock(tmp)
    try:
        crash_point()
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"{out}: nothing was written")
        _commit(tmp, out, force)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        lock.release()


def write_side_output(path: Path, write: Callable[[Path], object], *, force: bool, inputs: Iterable[Path] = (), completed: Path) -> None:
    """Write a file that accompanies a completed OUT (a report, a plot) atomically.

    Its path follows the rules of OUT and was checked before the work (``check_output_path``);
    should writing it still fail (a full disk), OUT stays as completed and the error says so,
    instead of claiming that the partial output was removed.

    Raises:
        InputError: naming the completed OUT, the file that could not be written and why.
    """
    try:
        with atomic_output_file(path, force=force, inputs=inputs) as tmp:
            write(tmp)
    except (OSError, InputError) as exc:
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
        raise InputError(f"{completed} was written completely, but {path} was not ({reason}); it was removed") from None
