"""Shared CLI pieces: the group with its error boundary, common options, and output."""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import json
import logging
import os
import signal
import sys
import threading
import unicodedata
import warnings
from typing import Any, Callable, Iterable

import click

from loratool import __version__
from loratool.errors import LoratoolError
from loratool.io.leases import guard_inputs

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

# storage dtypes of adapter factors a command may write (loratool.surgery.DTYPES)
FACTOR_DTYPES = ("float32", "float16", "bfloat16", "float64")


def lazy(module: str, name: str) -> Callable:
    """``module.name``, imported when first called: command modules load the library (and torch)
    only when a command runs, so that ``--help`` stays instant."""

    @functools.wraps(_placeholder)
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _placeholder(*args, **kwargs):  # gives lazy() wrappers a plain signature
    raise NotImplementedError


class _HeldWarnings:
    """Warnings of the running command, held until it ends so that a failure stays one line.

    On success they are printed as ``warning:`` lines; on failure they are folded into the
    single ``error:`` line. With --debug they are printed at once, in order with the rest.
    """

    def __init__(self, *, immediate: bool = False) -> None:
        self.messages: list[str] = []
        self.immediate = immediate

    def add(self, message: str) -> None:
        if self.immediate:
            click.echo(f"warning: {message}", err=True)
        else:
            self.messages.append(message)

    def flush(self) -> None:
        for m in self.messages:
            click.echo(f"warning: {m}", err=True)
        self.messages = []

    def fold_into(self, error: str) -> str:
        """``error`` with the held warnings appended (they often explain it), then forgotten."""
        held, self.messages = self.messages, []
        if not held:
            return error
        more = f" (and {len(held) - 1} more)" if len(held) > 1 else ""
        return f"{error} [warning: {held[0]}{more}]"


class Output:
    """Human / JSON / quiet printing, in one place. Data goes to stdout, diagnostics to stderr."""

    def __init__(self, *, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        # the running command's held warnings (LoratoolGroup puts them in the context); none: print at once
        ctx = click.get_current_context(silent=True)
        held = ctx.obj if ctx is not None else None
        self._warnings = held if isinstance(held, _HeldWarnings) else _HeldWarnings(immediate=True)

    def info(self, message: str) -> None:
        if not self.quiet and not self.json_mode:
            _to_stdout(message)

    def warn(self, message: str) -> None:
        """A warning, printed when the command ends (see _HeldWarnings); nothing with --quiet."""
        if not self.quiet:
            self._warnings.add(message)

    def json(self, obj: Any) -> None:
        _to_stdout(json.dumps(obj, indent=2, default=_json_default))

    def progress(self, *, total: int, desc: str, unit: str = "B") -> "Progress":
        enabled = not self.quiet and sys.stderr.isatty()
        return Progress(total=total, desc=desc, unit=unit, enabled=enabled)


def _to_stdout(text: str) -> None:
    """Print to stdout; a reader that went away (``| head``, ``| true``) is not a failure of the
    command: the rest of its output is dropped and it ends with its own exit code."""
    try:
        click.echo(text)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's last flush does not fail too
        os.close(devnull)


class Progress:
    """A tqdm bar on stderr when it is a TTY; a no-op otherwise. Call it with an increment."""

    def __init__(self, *, total: int, desc: str, unit: str, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, leave=False)

    def __call__(self, n: int = 1, label: str | None = None) -> None:
        if self._bar is not None:
            if label:
                self._bar.set_postfix_str(label[-40:], refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__fspath__"):
        return os.fspath(o)
    return str(o)


def _one_line(text: str) -> str:
    """``text`` on one line, at most 600 characters, safe for a terminal (``_escape_controls``)."""
    text = _escape_controls(" ".join(str(text).split()))
    return text if len(text) <= 600 else text[:597] + "..."


def _escape_controls(text: str) -> str:
    """Control characters (an ESC of a terminal sequence in a file name) shown as ``\\x1b``, and
    the bytes of a name that is not valid UTF-8 (kept by Python as surrogate escapes) as ``\\xff``."""
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # surrogate escape of the raw byte code - 0xDC00
            out.append(f"\\x{code - 0xDC00:02x}")
        elif unicodedata.category(ch) in ("Cc", "Cs"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        where = f" while writing {exc.filename}" if exc.filename else ""
        return f"no space left on device{where}; the partial output was removed"
    if exc.errno == errno.EFBIG:
        where = f" while writing {exc.filename}" if exc.filename else ""
        return f"no space left for the output (file size limit reached{where}); the partial output was removed"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded; the partial output was removed"
    name = exc.filename or ""
    reason = exc.strerror or str(exc)
    return f"{name}: {reason}" if name else reason


class _Interrupted(Exception):
    """Ctrl-C inside a command, carried past click (which would print an extra empty line)."""


class _Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that outputs are cleaned up as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, _frame) -> None:
    raise _Terminated(signum)


@contextlib.contextmanager
def _terminate_like_interrupt():
    """While a command runs, SIGTERM (``timeout``, ``kill``) and SIGHUP (a closed terminal) unwind
    like Ctrl-C: every temporary output is removed and one line is printed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class LoratoolGroup(click.Group):
    """A click group whose ``main`` turns every failure into one line and an exit code."""

    def invoke(self, ctx):  # noqa: D102
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted() from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        debug = "--debug" in (sys.argv[1:] if args is None else list(args))
        if not debug:
            warnings.filterwarnings("ignore")
            logging.disable(logging.WARNING)
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        held = _HeldWarnings(immediate=debug)
        fail = functools.partial(_fail, held)
        try:
            with _terminate_like_interrupt(), guard_inputs():
                rv = super().main(args=args, prog_name=prog_name or "loratool", complete_var=complete_var, standalone_mode=False, obj=held, **extra)
        except _Terminated as exc:
            code = fail(f"terminated by {signal.Signals(exc.signum).name}; partial output removed", 128 + exc.signum)
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        except click.Abort:
            code = fail("interrupted", EXIT_INTERRUPTED)
        except click.ClickException as exc:
            code = fail(exc.format_message(), EXIT_BAD_INPUT)
        except LoratoolError as exc:
            code = fail(str(exc), exc.exit_code, traceback=debug)
        except (KeyboardInterrupt, _Interrupted):
            code = fail("interrupted; partial output removed", EXIT_INTERRUPTED)
        except MemoryError:
            code = fail("out of memory", EXIT_BAD_INPUT)
        except OSError as exc:
            code = fail(describe_os_error(exc), EXIT_BAD_INPUT, traceback=debug)
        except Exception as exc:  # an internal bug: still one line unless --debug
            code = fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)", EXIT_BAD_INPUT, traceback=debug)
        else:
            code = rv if isinstance(rv, int) else EXIT_OK
        held.flush()
        if not standalone_mode:
            return code
        sys.exit(code)


def _fail(held: _HeldWarnings, message: str, code: int, *, traceback: bool = False) -> int:
    """Print the one ``error:`` line (held warnings folded in; the traceback first with --debug)."""
    if traceback:
        import traceback as tb

        tb.print_exc()
    click.echo(f"error: {_one_line(held.fold_into(_one_line(message)))}", err=True)
    return code


def common_options(fn: Callable) -> Callable:
    """--quiet and --debug on a command (--debug is read before parsing, see LoratoolGroup)."""

    @click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors (and --json output).")
    @click.option("--debug", is_flag=True, help="Show Python tracebacks and library warnings.")
    @functools.wraps(fn)
    def wrapper(*args, quiet: bool = False, debug: bool = False, **kwargs):
        return fn(*args, quiet=quiet, **kwargs)

    return wrapper


def json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")(fn)


def combine_options(fn: Callable) -> Callable:
    """--weights, --method, --density, --majority-sign, --seed: how several adapters combine
    (``engine.methods``; docs/merge.md#several-adapters)."""
    from loratool.engine.methods import MAJORITY_SIGN, METHODS

    options = [
        click.option("--weights", metavar="W1,W2,...", help="One weight per adapter, comma-separated (default 1 each)."),
        click.option("--method", type=click.Choice(METHODS), help="How several adapters' deltas combine (default linear: the weighted sum)."),
        click.option("--density", type=float, help="ties, dare_*, magnitude_prune: the fraction of each delta's entries kept, in (0, 1]."),
        click.option("--majority-sign", "majority_sign", type=click.Choice(MAJORITY_SIGN), default="total", show_default=True,
                     help="ties, dare_ties: elect each entry's sign by the sum of the deltas (total) or by counting signs (frequency)."),
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="dare_*: the random seed of the drop masks (default 0; the same seed gives the same bytes)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def combine_spec(n_adapters: int, *, weights: str | None, method: str | None, density: float | None,
                 majority_sign: str, seed: int | None):
    """The checked ``CombineSpec``, or None for a plain merge of one adapter (no method options given)."""
    from loratool.engine.methods import CombineSpec

    if n_adapters == 1 and weights is None and method is None and density is None and seed is None:
        return None
    parsed = None
    if weights is not None:
        try:
            parsed = [float(w) for w in weights.split(",")]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {weights!r}", param_hint="--weights") from None
    return CombineSpec.checked(n_adapters, method=method or "linear", weights=parsed, density=density,
                               majority_sign=majority_sign, seed=seed or 0)


def emit_warnings(out: Output, messages: Iterable[str]) -> None:
    for m in messages:
        out.warn(m)


@click.group(cls=LoratoolGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="loratool")
@click.option("--debug", is_flag=True, hidden=True)
def main_group(debug: bool = False) -> None:
    """loratool: audit, merge, unmerge, verify, reshape and convert LoRA adapters.

    Every command streams tensors one at a time and writes its output atomically.
    Exit codes: 0 success, 1 a check failed, 2 bad input or refused operation.
    Run `loratool COMMAND --help` for a command's options and an example.
    """
