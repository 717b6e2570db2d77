"""Crash safety: SIGKILL and SIGINT at every output step, full disks, read-only and symlinked
inputs, OUT equal to or inside an input, two runs writing one OUT.

The kill points come from the documented testing hook ``loratool.io.atomic.crash_point``:
with ``LORATOOL_TEST_KILL_AFTER=N`` a run sends itself ``LORATOOL_TEST_KILL_SIGNAL`` (KILL by
default; INT; STOP) at the N-th step of writing its output (temporary folder created, each
tensor started, each file fsynced, before and after the final rename). Every run is a real
process, forked from a server that imported loratool once (tests/_fork_helpers.py).

Invariant after every kill: OUT is absent or complete (byte-identical to an uninterrupted run;
a merged model is also accepted by ``loratool verify``); the next run removes the killed run's
temporary siblings; the inputs are untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import ADAPTERS, BASES

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork server, /proc, rlimits and mounts are Linux-specific")

A_SRC = ADAPTERS / "llama-rslora"
B_SRC = BASES / "llama"

# name -> (OUT's name, arguments after `loratool`, given inputs and OUT)
SCENARIOS = {
    "merge": ("merged", lambda i, out: ["merge", i["base"], i["adapter"], out]),
    "rerank": ("reranked", lambda i, out: ["rerank", i["adapter"], out, "--rank", "2"]),
    "convert-peft": ("peft", lambda i, out: ["convert", i["adapter"], out, "--to", "peft", "--base", i["base"]]),
    "convert-gguf": ("adapter.gguf", lambda i, out: ["convert", i["adapter"], out, "--to", "gguf", "--base", i["base"]]),
    "convert-mlx": ("mlx", lambda i, out: ["convert", i["adapter"], out, "--to", "mlx", "--base", i["base"]]),
}
# outputs whose writers are not the safetensors stream (torch.save pickles, LitGPT folders): full-disk only
WRITER_SCENARIOS = {
    "convert-scratch": ("adapter.pth", lambda i, out: ["convert", i["adapter"], out, "--to", "scratch", "--base", i["base"]]),
    "convert-litgpt": ("litgpt", lambda i, out: ["convert", i["adapter"], out, "--to", "litgpt", "--base", i["base"]]),
}
KILL_POINTS: dict[str, int] = {}


# ----------------------------------------------------------------------------- helpers


def digest(path: Path) -> dict[str, str]:
    """Names and content hashes of a file or folder (empty when absent)."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def siblings(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.loratool-"))


def error_line(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{stderr}"
    assert lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert "internal error" not in lines[0], lines[0]
    return lines[0]


def _commands() -> set[str]:
    from loratool.cli import main

    return set(main.commands)


def need(*commands: str) -> None:
    missing = [c for c in commands if c not in _commands()]
    assert not missing, f"`loratool {missing[0]}` is missing (no loratool/cli/{missing[0]}_cmd.py)"


def _try(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only_after=None):
    """Mount a size-limited tmpfs at ``path`` (skips the test when mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount") or not _try(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]):
        pytest.skip("cannot mount a tmpfs here (not root, or the sandbox forbids mount)")
    try:
        if read_only_after is not None:
            read_only_after(path)
            if not _try(["mount", "-o", "remount,ro", str(path)]):
                pytest.skip("cannot remount the tmpfs read-only here")
        yield path
    finally:
        for _ in range(50):
            if _try(["umount", str(path)]):
                break
            time.sleep(0.1)


@pytest.fixture(scope="module")
def runner():
    from _fork_helpers import ForkRunner

    with ForkRunner() as r:
        yield r


@pytest.fixture
def work():
    """A scratch folder on tmpfs when available (fsync costs nothing there), with clean inputs."""
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="loratool-crash-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))
    shutil.copytree(A_SRC, root / "in" / A_SRC.name)
    shutil.copytree(B_SRC, root / "in" / B_SRC.name)
    try:
        yield root
    finally:
        for p in root.rglob("*"):  # a test may have left read-only mounts or modes behind
            with contextlib.suppress(OSError):
                if p.is_mount():
                    subprocess.run(["umount", str(p)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def inputs_of(work: Path) -> dict:
    return {"adapter": work / "in" / A_SRC.name, "base": work / "in" / B_SRC.name}


def reference(runner, work: Path, scenario: str, inputs: dict) -> Path:
    name, build = SCENARIOS[scenario]
    ref = work / "ref" / name
    ref.parent.mkdir(exist_ok=True)
    res = runner.run(build(inputs, ref), workdir=work)
    assert res.returncode == 0, res.stderr
    return ref


def verify_ok(runner, work: Path, inputs: dict, merged: Path) -> None:
    res = runner.run(["verify", inputs["base"], inputs["adapter"], merged], workdir=work)
    assert res.returncode == 0, f"verify refused {merged}:\n{res.stdout}\n{res.stderr}"


def accepted(runner, work: Path, scenario: str, inputs: dict, out: Path, ref: Path) -> None:
    """OUT is complete: identical to an uninterrupted run, and readable (verified for merge)."""
    assert digest(out) == digest(ref), f"{scenario}: OUT exists but differs from an uninterrupted run"
    if scenario == "merge":
        verify_ok(runner, work, inputs, out)
    else:
        res = runner.run(["inspect", out], workdir=work)
        assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------- SIGKILL / SIGINT


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kill_at_every_step(scenario, runner, work):
    """SIGKILL at every write step: no OUT or a complete one; the next run cleans up."""
    need(scenario.split("-")[0])
    inputs = inputs_of(work)
    before = digest(work / "in")
    ref = reference(runner, work, scenario, inputs)
    name, build = SCENARIOS[scenario]
    out = work / name
    seen_complete = False
    n = 0
    while True:
        n += 1
        assert n < 500, "the run never finished"
        h = runner.spawn(build(inputs, out) + ["--force"], workdir=work, env={"LORATOOL_TEST_KILL_AFTER": str(n)})
        res = runner.wait(h)
        if res.returncode == 0:
            break
        assert res.returncode == -signal.SIGKILL, f"step {n}: exit {res.returncode}\n{res.stderr}"
        if out.exists():
            if not seen_complete:
                accepted(runner, work, scenario, inputs, out, ref)
                seen_complete = True
            else:
                assert digest(out) == digest(ref)
        # this run removed every sibling of the runs killed before it; only its own may remain
        stale = [p for p in siblings(out) if f"-{h['pid']}-" not in p.name]
        assert not stale, f"step {n}: siblings of killed runs were not cleaned: {stale}"
    KILL_POINTS[scenario] = n - 1
    assert n - 1 >= 3, f"{scenario}: only {n - 1} kill points"
    assert not siblings(out), siblings(out)
    accepted(runner, work, scenario, inputs, out, ref)
    assert digest(work / "in") == before, "an input was modified"

    # SIGINT at a spread of the same steps, SIGTERM and SIGHUP at some: exit 128+signal, one
    # line, nothing left behind
    last = n - 1
    spread = sorted({1, 2, last // 2, last - 1, last})
    for sig, code, word, steps in (("INT", 130, "interrupted", spread), ("TERM", 143, "SIGTERM", [2, last // 2]), ("HUP", 129, "SIGHUP", [last // 2])):
        for k in steps:
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            res = runner.run(build(inputs, out), workdir=work, env={"LORATOOL_TEST_KILL_AFTER": str(k), "LORATOOL_TEST_KILL_SIGNAL": sig})
            assert res.returncode == code, f"SIG{sig} at step {k}: exit {res.returncode}\n{res.stderr}"
            assert word in error_line(res.stderr)
            assert not siblings(out), f"SIG{sig} at step {k} left {siblings(out)}"
            if out.exists():  # only when the signal came after the final rename: OUT is complete
                assert k == last, f"SIG{sig} at step {k} (of {last}) left an OUT"
                assert digest(out) == digest(ref)
    assert digest(work / "in") == before


def test_at_least_50_kill_points():
    if len(KILL_POINTS) < len(SCENARIOS):
        pytest.skip(f"only {sorted(KILL_POINTS)} ran")
    total = sum(KILL_POINTS.values())
    print(f"kill points: {KILL_POINTS} (total {total})")
    assert total >= 50, KILL_POINTS


def test_stale_siblings_of_other_processes(runner, work):
    """Siblings of a live process are left alone; those of a dead pid are removed."""
    need("rerank")
    inputs = inputs_of(work)
    out = work / "r"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = work / f".r.loratool-tmp-{dead.pid}-deadbeef"
    stale.mkdir()
    (stale / "junk").write_bytes(b"x" * 100)
    stale_file = work / f".r.loratool-old-{dead.pid}-cafe0000"
    stale_file.write_bytes(b"y")
    alive = work / f".r.loratool-tmp-{os.getpid()}-0000beef"  # this test process is alive
    alive.mkdir()
    foreign = work / ".r.loratool-tmp-notapid"
    foreign.mkdir()
    # a live run in another PID namespace: its PID means nothing here, its lock does
    elsewhere = work / f".r.loratool-tmp-{dead.pid}-0ther0ns"
    elsewhere.mkdir()
    held = os.open(f"{elsewhere}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    # a run that ended (its lock is free) although its PID is alive here
    ended = work / f".r.loratool-tmp-{os.getpid()}-ended000"
    ended.mkdir()
    pathlib_lock = Path(f"{ended}.lock")
    pathlib_lock.write_bytes(b"")
    # another OUT whose name holds glob characters must not match r's siblings, nor r its
    other = work / f".[r].loratool-tmp-{dead.pid}-abcdef00"
    other.mkdir()
    try:
        res = runner.run(["rerank", inputs["adapter"], out, "--rank", "2"], workdir=work)
        assert res.returncode == 0, res.stderr
        assert not stale.exists() and not stale_file.exists()
        assert alive.exists() and foreign.exists()
        assert elsewhere.exists() and Path(f"{elsewhere}.lock").exists()
        assert not ended.exists() and not pathlib_lock.exists()
        assert other.exists()
        res = runner.run(["rerank", inputs["adapter"], work / "?", "--rank", "2"], workdir=work)
        assert res.returncode == 0, res.stderr
        assert other.exists() and elsewhere.exists()
    finally:
        os.close(held)


# ----------------------------------------------------------------------------- full disk


FULL_DISK_CASES = {"merge": 100_000, "rerank": 2048, "convert-peft": 2048, "convert-gguf": 2048, "convert-mlx": 2048,
                   "convert-scratch": 2048, "convert-litgpt": 2048}


def _no_space(res, out: Path, before: dict, work: Path) -> None:
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stderr}"
    line = error_line(res.stderr)
    assert "no space left" in line, line
    assert not out.exists() and not out.is_symlink(), "a partial OUT was left"
    assert not siblings(out), siblings(out)
    assert digest(work / "in") == before


@pytest.mark.parametrize("scenario", list(FULL_DISK_CASES))
def test_full_disk_tmpfs(scenario, runner, work):
    """A tmpfs that fills up during the write: exit 2, 'no space left', the partial output removed."""
    need(scenario.split("-")[0])
    inputs = inputs_of(work)
    before = digest(work / "in")
    name, build = {**SCENARIOS, **WRITER_SCENARIOS}[scenario]
    with tmpfs(work / "disk", "1m") as disk:
        st = os.statvfs(disk)
        free = st.f_bavail * st.f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - FULL_DISK_CASES[scenario]))
        st = os.statvfs(disk)
        free_before = st.f_bavail * st.f_frsize
        out = disk / name
        res = runner.run(build(inputs, out), workdir=work)
        _no_space(res, out, before, work)
        st = os.statvfs(disk)
        assert st.f_bavail * st.f_frsize == free_before, "the partial output still takes space"


@pytest.mark.parametrize("scenario", list(FULL_DISK_CASES))
def test_file_size_limit(scenario, runner, work):
    """RLIMIT_FSIZE (works without mount rights): writes fail with EFBIG, reported as no space."""
    need(scenario.split("-")[0])
    inputs = inputs_of(work)
    before = digest(work / "in")
    name, build = {**SCENARIOS, **WRITER_SCENARIOS}[scenario]
    out = work / name
    res = runner.run(build(inputs, out), workdir=work, fsize=FULL_DISK_CASES[scenario])
    _no_space(res, out, before, work)


# ----------------------------------------------------------------------------- read-only, symlinks


def test_read_only_inputs(runner, work):
    """Inputs on a read-only filesystem (and read-only modes) work; OUT there fails in one line."""
    need("merge", "rerank", "convert")
    inputs = inputs_of(work)

    def fill(mnt: Path) -> None:
        for key, src in inputs.items():
            shutil.copytree(src, mnt / src.name)
        for p in mnt.rglob("*"):
            p.chmod(0o555 if p.is_dir() else 0o444)

    with tmpfs(work / "ro", "4m", read_only_after=fill) as ro:
        ro_inputs = {k: ro / v.name for k, v in inputs.items()}
        before = digest(ro)
        for scenario in ("merge", "rerank", "convert-gguf", "convert-peft"):
            name, build = SCENARIOS[scenario]
            ref = reference(runner, work, scenario, inputs)
            out = work / f"from-ro-{name}"
            res = runner.run(build(ro_inputs, out), workdir=work)
            assert res.returncode == 0, res.stderr
            assert digest(out) == digest(ref), scenario
            res = runner.run(build(ro_inputs, ro / name), workdir=work)
            assert res.returncode == 2
            line = error_line(res.stderr)
            assert "read-only" in line.lower(), line
        res = runner.run(["inspect", ro_inputs["adapter"], "--base", ro_inputs["base"]], workdir=work)
        assert res.returncode == 0, res.stderr
        assert digest(ro) == before


def test_symlinked_folders(runner, work):
    """Inputs and OUT's parent reached through symlinks; OUT a symlink to an input is refused."""
    need("merge", "rerank")
    inputs = inputs_of(work)
    before = digest(work / "in")
    links = work / "links"
    links.mkdir()
    (links / "adapter").symlink_to(inputs["adapter"], target_is_directory=True)
    (links / "base").symlink_to(inputs["base"], target_is_directory=True)
    real_out = work / "real-out"
    real_out.mkdir()
    (links / "outdir").symlink_to(real_out, target_is_directory=True)
    linked = {"adapter": links / "adapter", "base": links / "base"}
    ref = reference(runner, work, "merge", inputs)

    res = runner.run(["merge", linked["base"], linked["adapter"], links / "outdir" / "m"], workdir=work)
    assert res.returncode == 0, res.stderr
    assert digest(real_out / "m") == digest(ref)

    # OUT is a symlink to an input folder: refused, with or without --force
    (links / "to-base").symlink_to(inputs["base"], target_is_directory=True)
    (links / "to-adapter").symlink_to(inputs["adapter"], target_is_directory=True)
    for force in ([], ["--force"]):
        for out in (links / "to-base", links / "to-adapter"):
            res = runner.run(["merge", inputs["base"], inputs["adapter"], out, *force], workdir=work)
            assert res.returncode == 2
            assert "input" in error_line(res.stderr) or not force
        res = runner.run(["rerank", linked["adapter"], links / "to-adapter", "--rank", "2", *force], workdir=work)
        assert res.returncode == 2
        assert "input" in error_line(res.stderr) or not force

    # OUT a symlink to an unrelated folder: refused without --force; --force replaces the link only
    other = work / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    (links / "to-other").symlink_to(other, target_is_directory=True)
    res = runner.run(["rerank", linked["adapter"], links / "to-other", "--rank", "2"], workdir=work)
    assert res.returncode == 2 and "already exists" in error_line(res.stderr)
    res = runner.run(["rerank", linked["adapter"], links / "to-other", "--rank", "2", "--force"], workdir=work)
    assert res.returncode == 0, res.stderr
    assert not (links / "to-other").is_symlink() and (links / "to-other" / "adapter_model.safetensors").is_file()
    assert (other / "keep.txt").read_text() == "keep" and len(list(other.iterdir())) == 1

    # OUT a symlink loop or a dangling symlink: one line, never a traceback
    (links / "loop").symlink_to(links / "loop")
    (links / "dangling").symlink_to(work / "nowhere")
    for out in (links / "loop", links / "dangling"):
        res = runner.run(["rerank", linked["adapter"], out, "--rank", "2"], workdir=work)
        assert res.returncode == 2
        error_line(res.stderr)

    # the adapter's weights are a symlink into another folder: replacing that folder is refused
    split = work / "split-adapter"
    blobs = work / "blobs"
    split.mkdir()
    blobs.mkdir()
    shutil.copy(inputs["adapter"] / "adapter_model.safetensors", blobs / "weights")
    shutil.copy(inputs["adapter"] / "adapter_config.json", split / "adapter_config.json")
    (split / "adapter_model.safetensors").symlink_to(blobs / "weights")
    blob_digest = digest(blobs)
    for args in (["merge", inputs["base"], split, blobs, "--force"], ["rerank", split, blobs, "--rank", "2", "--force"],
                 ["convert", split, blobs, "--to", "peft", "--force"]):
        res = runner.run(args, workdir=work)
        assert res.returncode == 2, (args, res.stderr)
        assert "input" in error_line(res.stderr)
        assert digest(blobs) == blob_digest
    assert digest(work / "in") == before


# ----------------------------------------------------------------------------- OUT vs inputs


def _out_cases(i: dict) -> list[list]:
    a, b = i["adapter"], i["base"]
    cases = []
    for out in (b, b / "sub", a, a / "sub", b / "model.safetensors"):
        cases.append(["merge", b, a, out])
    cases.append(["merge", b, a, a.parent])  # OUT would contain both inputs
    for out in (a, a / "sub", a.parent, a / "adapter_model.safetensors"):
        cases.append(["rerank", a, out, "--rank", "2"])
    for out in (a, a / "x.gguf", a.parent):
        cases.append(["convert", a, out, "--to", "gguf", "--base", b])
    cases.append(["convert", a, b / "x.gguf", "--to", "gguf", "--base", b])
    return cases


def test_out_equal_to_or_inside_an_input(runner, work):
    inputs = inputs_of(work)
    before = digest(work / "in")
    ran = 0
    for args in _out_cases(inputs):
        for force in ([], ["--force"]):
            res = runner.run(args + force, workdir=work)
            assert res.returncode == 2, (args + force, res.stdout, res.stderr)
            error_line(res.stderr)
            assert digest(work / "in") == before, f"{args + force} modified an input"
            ran += 1
    assert ran >= 10
    assert not [p for p in work.rglob("*") if ".loratool-" in p.name]


# ----------------------------------------------------------------------------- concurrent runs


def _wait_stopped(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    raise AssertionError("the first run never reached its stop point")


@pytest.mark.parametrize("scenario", ["merge", "rerank", "convert-gguf"])
@pytest.mark.parametrize("force", [False, True])
def test_two_runs_one_out(scenario, force, runner, work):
    """Run 1 is paused once its temporary output exists while run 2 writes OUT completely.

    Without --force run 1 then refuses to replace the other run's OUT (exit 2, one line); with
    --force it replaces it atomically. Either way OUT is complete and no sibling is left.
    """
    need(scenario.split("-")[0])
    inputs = inputs_of(work)
    ref = reference(runner, work, scenario, inputs)
    name, build = SCENARIOS[scenario]
    out = work / name
    extra = ["--force"] if force else []
    # stop where run 1's temporary output exists (a single-file output is created after step 1)
    stop_at = "2" if name.endswith(".gguf") else "1"
    first = runner.spawn(build(inputs, out) + extra, workdir=work,
                         env={"LORATOOL_TEST_KILL_AFTER": stop_at, "LORATOOL_TEST_KILL_SIGNAL": "STOP"})
    try:
        _wait_stopped(first["pid"])
        assert [p for p in siblings(out) if f"-{first['pid']}-" in p.name], "run 1 has no temporary folder"
        second = runner.run(build(inputs, out) + extra, workdir=work)
        assert second.returncode == 0, second.stderr
        assert digest(out) == digest(ref)
        assert [p for p in siblings(out) if f"-{first['pid']}-" in p.name], "run 2 removed the live run's folder"
    finally:
        os.kill(first["pid"], signal.SIGCONT)
    res = runner.wait(first)
    if force:
        assert res.returncode == 0, res.stderr
    else:
        assert res.returncode == 2, res.stderr
        assert "another run" in error_line(res.stderr)
    assert digest(out) == digest(ref)
    assert not siblings(out), siblings(out)


def test_two_free_running_runs(runner, work):
    """Two runs started together on one OUT: one wins, the other exits 2 saying why."""
    need("merge")
    inputs = inputs_of(work)
    ref = reference(runner, work, "merge", inputs)
    name, build = SCENARIOS["merge"]
    out = work / name
    handles = [runner.spawn(build(inputs, out), workdir=work) for _ in range(2)]
    results = sorted((runner.wait(h) for h in handles), key=lambda r: r.returncode)
    assert [r.returncode for r in results] == [0, 2], [r.stderr for r in results]
    line = error_line(results[1].stderr)
    assert "already exists" in line or "another run" in line, line
    assert digest(out) == digest(ref)
    assert not siblings(out)


@pytest.mark.parametrize("which,step,how", [
    ("base", 16, "truncate"),     # mapped by the row source and read block by block
    ("base", 16, "rewrite"),      # opened to rewrite in place: the merge would mix old and new bytes
    ("base", 1, "truncate"),      # its header read, nothing mapped yet
    ("adapter", 16, "truncate"),  # read by safetensors' own get_tensor
])
def test_an_input_written_by_another_process_stops_the_merge_cleanly(runner, work, which, step, how):
    """While a merge reads its inputs, another process truncates one or opens it to rewrite it in place:
    the read lease holds that process back (the file stays intact for the merge), the merge stops with
    exit 2 and one line naming the file, leaves nothing, and the other process goes on once the merge is
    gone (without the lease: SIGBUS, exit 135, an internal error, or a merge of changed data)."""
    need("merge")
    inputs = inputs_of(work)
    victim = next(Path(inputs[which]).glob("*.safetensors"))
    size = os.path.getsize(victim)
    out = work / "merged"
    h = runner.spawn(["merge", inputs["base"], inputs["adapter"], out], workdir=work,
                     env={"LORATOOL_TEST_KILL_AFTER": str(step), "LORATOOL_TEST_KILL_SIGNAL": "STOP"})
    deadline = time.time() + 60
    while not _stopped(h["pid"]) and time.time() < deadline:
        time.sleep(0.05)
    assert _stopped(h["pid"]), f"the run never reached write step {step}"
    done = []

    def other_process():
        if how == "truncate":
            os.truncate(victim, size // 2)
        else:
            with open(victim, "r+b") as fh:
                fh.write(b"\0" * 64)
        done.append(time.time())

    writer = threading.Thread(target=other_process)
    writer.start()
    time.sleep(0.5)
    assert not done, f"the other process was not held back: the {which} was not leased"
    os.kill(h["pid"], signal.SIGCONT)
    res = runner.wait(h)
    writer.join(30)
    assert done, "the other process was still held back after the merge ended"
    assert res.returncode == 2, res.stderr
    line = error_line(res.stderr)
    assert victim.name in line and "another process" in line and "truncated" in line, line
    assert not out.exists() and not siblings(out)


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_base_truncated_without_a_lease_is_one_line_and_no_leftovers(runner, work):
    """Where no lease can be taken (here: the file is already open for writing by another process, which
    the kernel refuses a read lease for), a base truncated before the merge reads it is still one line
    naming the file, exit 2, no sibling, no OUT: the size check before each block."""
    need("merge")
    inputs = inputs_of(work)
    base_file = next(Path(inputs["base"]).glob("*.safetensors"))
    out = work / "merged"
    with open(base_file, "r+b") as holder:  # open for writing all along: no read lease is possible
        h = runner.spawn(["merge", inputs["base"], inputs["adapter"], out], workdir=work,
                         env={"LORATOOL_TEST_KILL_AFTER": "1", "LORATOOL_TEST_KILL_SIGNAL": "STOP"})
        deadline = time.time() + 60
        while not siblings(out) and time.time() < deadline:
            time.sleep(0.05)
        assert siblings(out), "the run never reached its first write step"
        holder.truncate(os.path.getsize(base_file) // 2)
        os.kill(h["pid"], signal.SIGCONT)
        res = runner.wait(h)
    assert res.returncode == 2, res.stderr
    line = error_line(res.stderr)
    assert "truncated" in line and base_file.name in line, line
    assert not out.exists() and not siblings(out)
