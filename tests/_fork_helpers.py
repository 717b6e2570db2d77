"""Fast real subprocesses for the crash, signal, limit and memory tests.

Starting ``python -m loratool`` costs seconds (torch's import); these tests need hundreds of
runs. ``ForkRunner`` starts this file once as a server that imports loratool, then forks one
child per run: each child is a separate process (its own pid, signals, rlimits, exit status),
applies the requested environment and limits, runs the CLI and exits with its code.

Requests are JSON lines on the server's stdin; each answer is one JSON line on its stdout.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    """What a forked run left: exit status (negative: killed by that signal), output, measures."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_growth: int  # bytes: peak RSS of the child minus its RSS when it started running the CLI
    timed_out: bool

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None


class ForkRunner:
    """Client of the fork server. Use as a context manager (or call ``close``)."""

    def __init__(self):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("HF_HUB_OFFLINE", "1")
        self.proc = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT)
        )
        ready = self.proc.stdout.readline()
        if not ready.startswith("ready"):
            raise RuntimeError(f"fork server failed to start: {ready!r}")
        self._n = 0

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("fork server died")
        return json.loads(line)

    def spawn(self, args, *, workdir: Path, env: dict | None = None, fsize: int | None = None, as_extra: int | None = None) -> dict:
        """Start a run without waiting; returns a handle for ``wait``."""
        self._n += 1
        base = Path(workdir) / f".fork-{os.getpid()}-{self._n}"
        handle = {"stdout": f"{base}.out", "stderr": f"{base}.err", "stats": f"{base}.stats"}
        reply = self._ask({"op": "spawn", "args": [str(a) for a in args], "env": env or {}, "fsize": fsize,
                           "as_extra": as_extra, **handle})
        handle["pid"] = reply["pid"]
        return handle

    def wait(self, handle: dict, *, timeout: float = 120.0) -> Result:
        reply = self._ask({"op": "wait", "pid": handle["pid"], "timeout": timeout})
        out, err, stats = (Path(handle[k]) for k in ("stdout", "stderr", "stats"))
        growth = json.loads(stats.read_text())["peak_growth"] if stats.exists() else -1
        res = Result(reply["returncode"], out.read_text(errors="replace"), err.read_text(errors="replace"),
                     reply["wall_s"], growth, reply["timed_out"])
        for p in (out, err, stats):
            p.unlink(missing_ok=True)
        return res

    def signal(self, handle: dict, sig: int) -> None:
        os.kill(handle["pid"], sig)

    def run(self, args, *, workdir: Path, timeout: float = 120.0, **kwargs) -> Result:
        """Run ``loratool ARGS`` in a forked child and wait for it."""
        return self.wait(self.spawn(args, workdir=workdir, **kwargs), timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ForkRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- server side


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child(req: dict) -> None:
    """Runs in the forked child; never returns."""
    code = 99
    try:
        for fd, key in ((1, "stdout"), (2, "stderr")):
            f = os.open(req[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.environ.update(req["env"])
        if req.get("fsize") is not None:
            # Python ignores SIGXFSZ, so writes past the limit fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        if req.get("as_extra") is not None:
            limit = _status_kb("VmSize") * 1024 + int(req["as_extra"])
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        rss0 = _status_kb("VmRSS")
        from loratool.cli import main

        code = main.main(args=req["args"], prog_name="loratool", standalone_mode=False)
        sys.stdout.flush()
        sys.stderr.flush()
        with open(req["stats"], "w") as fh:
            json.dump({"peak_growth": max(0, _status_kb("VmHWM") - rss0) * 1024}, fh)
    except BaseException:  # a bug of the CLI's error boundary: show it to the test
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        code = 98
    os._exit(code if isinstance(code, int) else 97)


def _serve() -> None:
    import torch

    torch.set_num_threads(1)  # no thread pools exist before fork, so children can't inherit a locked one
    import loratool.cli  # noqa: F401  (the import the children share)

    children: dict[int, float] = {}
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                _child(req)
            children[pid] = time.monotonic()
            reply = {"pid": pid}
        elif req["op"] == "wait":
            pid = req["pid"]
            deadline = time.monotonic() + req["timeout"]
            timed_out = False
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    break
                time.sleep(0.005)
            reply = {"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
                     "wall_s": time.monotonic() - children.pop(pid)}
        else:
            reply = {"error": f"unknown op {req['op']!r}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    _serve()
