"""The stream: one pass over a planned model, tensor by tensor, row block by row block.

For each output tensor of a ``MergePlan`` (built by ``loratool.merge.plan_merge``): read its
stored rows (``io.source.TensorSource``, zero-copy views of the memory-mapped files), decode them
to float32 (``engine.codecs``), apply the delta terms that target it (``engine.delta``: LoRA rows
in both stored layouts with ``sign`` +1 to merge and -1 to unmerge, DoRA's row scaling, a
lora_bias, a modules_to_save replacement), encode (round once to the output dtype, or hand the
finished tensor to a tensor hook, e.g. the bitsandbytes encoder of a quantized merge) and write
it with the one model writer (``io.writer.ModelWriter``). A producer thread reads and computes
while the calling thread writes; untouched tensors are copied byte for byte.

``execute_plan(plan, folder, *, device, progress, tensor_hook, weight_norms) -> dict``
    Streams the shards, the index json and the side files into ``folder``.

Numerics: every update is float32 math rounded once to the output dtype. Plain LoRA runs
as ``float32(W[rows]).addmm_(L[rows], R)`` on cache-sized sub-blocks (the scale folded into
L), so it may differ from PEFT's ``W + (B @ A) * scale`` by float32 rounding only.

Tensor hooks (how a later stage plugs in per-tensor work, e.g. quantization): an object with

* ``specs(name, dtype, shape, touched) -> list[(name, dtype, shape)] | None`` called at plan
  time for every output tensor; ``None`` leaves the tensor alone (untouched tensors stay raw
  byte copies), a list declares what the hook will emit instead (names may differ, several
  tensors may come out of one);
* ``__call__(name, tensor, touched) -> dict[str, Tensor]`` called with the finished tensor
  (in its output dtype, on the CPU) for every tensor whose ``specs`` was not ``None``; it
  must return exactly the declared tensors;
* optionally ``config_patch(config) -> config`` (applied to config.json by the writer) and
  ``finalize(folder, report)``, called before the folder is committed.

A plain callable ``hook(name, tensor) -> dict | Tensor | None`` is accepted too
(``as_tensor_hook``): it sees every tensor (so nothing is raw-copied) and may change values
only, not names, dtypes or shapes; ``None`` keeps the tensor.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from loratool.adapter import Adapter, LoraModule
from loratool.base import BaseModel
from loratool.engine.codecs import float as float_codec
from loratool.engine.codecs.float import HALF
from loratool.engine.combine import (
    CombinedStats,
    CombinedTerm,
    CombineSpec,
    combined_delta,
)
from loratool.engine.delta import DeltaKernel, ExpertsKernel, dora_rows
from loratool.errors import InputError
from loratool.io.source import TensorSource
from loratool.io.store import LazyTensor, TensorEntry
from loratool.io.writer import ModelWriter

F32 = torch.float32
BLOCK_ELEMS = 1 << 22  # elements per row block handed to the writer
SUB_ELEMS = 1 << 18  # elements per CPU sub-block: the float32 delta stays in cache
QUEUE_DEPTH = 4  # blocks computed ahead of the writer

# (mantissa bits + 1, smallest normal exponent as torch.frexp gives it) per half dtype
_FLOAT_BITS = {torch.float16: (11, -13), torch.bfloat16: (8, -125), torch.float32: (24, -125)}


# ----------------------------------------------------------------------------- plan (data)


@dataclass
class TensorTask:
    """One output tensor and the updates applied to it, in order."""

    name: str
    source: TensorEntry | None  # the base tensor (None: added from the adapter)
    dtype: torch.dtype  # output dtype (before any hook)
    shape: tuple[int, ...]
    replacement: LazyTensor | None = None
    loras: list[LoraModule] = field(default_factory=list)
    dora: LoraModule | None = None
    biases: list[LoraModule] = field(default_factory=list)
    experts: list[LoraModule] = field(default_factory=list)  # fused MoE experts terms on a 3-D tensor
    # a tensor a codec computes whole (QA-LoRA: zero points with the pooled delta folded in,
    # a dequantized weight plus its delta); returns it in ``dtype``
    compute: Callable[[], torch.Tensor] | None = None
    combined: CombinedTerm | None = None  # several adapters' deltas combined by a method (engine.combine)
    outputs: list[tuple[str, torch.dtype, tuple[int, ...]]] = field(default_factory=list)
    hooked: bool = False

    @property
    def touched(self) -> bool:
        return (
            self.replacement is not None or bool(self.loras) or self.dora is not None or bool(self.biases)
            or self.compute is not None or self.combined is not None or bool(self.experts)
        )

    @property
    def modules(self) -> list[LoraModule]:
        return self.loras + self.experts + ([self.dora] if self.dora is not None else [])

    @property
    def raw_copy(self) -> bool:
        """Whether the bytes can be copied unchanged from the base file."""
        return (
            not self.touched
            and not self.hooked
            and self.source is not None
            and self.source.begin is not None
            and self.source.dtype == self.dtype
        )


@dataclass
class ShardPlan:
    """One output safetensors file: its tensors in write order and its header metadata."""

    filename: str
    tasks: list[TensorTask]
    metadata: dict[str, str]

    def specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [spec for task in self.tasks for spec in task.outputs]


@dataclass
class MergePlan:
    """Everything ``execute_plan`` needs; built by ``plan_merge`` without reading tensor data."""

    base: BaseModel
    adapter: Adapter
    sign: int
    dtype: torch.dtype | None
    shards: list[ShardPlan]
    write_index: bool
    index_metadata: dict
    modules: dict[str, str]  # module name -> base tensor it updates
    modules_to_save: list[dict]
    warnings: list[str]
    side_files: list[str] = field(default_factory=list)  # base side files safe to copy (base.side_files)
    config_patch: Callable[[dict], dict] | None = None  # applied to config.json (before a tensor hook's)
    adapters: list[Adapter] = field(default_factory=list)  # several adapters combined (``combine`` says how)
    combine: CombineSpec | None = None

    def tasks(self) -> Iterator[TensorTask]:
        for shard in self.shards:
            yield from shard.tasks

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for shard in self.shards for _, d, s in shard.specs())


class _ValueHook:
    """A plain ``hook(name, tensor)`` callable seen as a full hook: every tensor, same name, dtype and shape."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def specs(self, name, dtype, shape, touched):
        return [(name, dtype, shape)]

    def __call__(self, name, tensor, touched):
        result = self.fn(name, tensor)
        if result is None:
            return {name: tensor}
        if isinstance(result, torch.Tensor):
            return {name: result}
        return result


def as_tensor_hook(hook: Any) -> Any:
    """Normalize ``tensor_hook``: an object with ``specs`` is used as is; a plain callable
    ``fn(name, tensor) -> dict | Tensor | None`` sees every tensor and may only change values."""
    if hook is None or hasattr(hook, "specs"):
        return hook
    if not callable(hook):
        raise TypeError("tensor_hook must be callable")
    return _ValueHook(hook)



# ----------------------------------------------------------------------------- execution


def _blocks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    if not shape:
        return [(0, 1)]
    rows = shape[0]
    row_elems = max(1, math.prod(shape[1:]))
    step = max(1, BLOCK_ELEMS // row_elems)
    return [(i, min(rows, i + step)) for i in range(0, rows, step)] or [(0, 0)]


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` floats at |x| (float32 tensor in, float32 out)."""
    bits, emin = _FLOAT_BITS[dtype]
    if x.device.type == "mps":  # frexp is not implemented there
        x = x.cpu()
    _, e = torch.frexp(x)
    e = torch.where(x == 0, torch.full_like(e, emin), e).clamp_(min=emin)
    return torch.ldexp(torch.ones_like(x), (e - bits).to(torch.int32))


@dataclass
class _ModuleStats:
    name: str
    tensor: str
    delta_sq: float = 0.0
    weight_sq: float | None = None
    seconds: float = 0.0
    rounding_bound: float = 0.0


class _Stop(Exception):
    pass


class _Producer:
    """Reads, merges and hands row blocks to the writer through a bounded queue."""

    def __init__(self, plan: MergePlan, device: torch.device, hook, track_rounding: bool, weight_norms: bool = True):
        self.plan = plan
        self.weight_norms = weight_norms
        self.device = device
        self.hook = hook
        self.track_rounding = track_rounding
        self.reader = TensorSource(plan.base.store)
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self.stop = threading.Event()
        self.stats: dict[str, _ModuleStats] = {}
        self.combined: dict[str, CombinedStats] = {}  # weight name -> what the combination did
        self.on_mask = None  # a test hook: sees each sparsifying mask (engine.combine.MaskHook)
        self.compute_s = 0.0
        self.wait_s = 0.0  # time the producer waited for the writer
        self.counts = Counter()
        # output blocks are recycled: fresh 16 MiB buffers would cost a page fault (and the
        # kernel zeroing a page) every 4 KiB of output
        self.pool: queue.Queue = queue.Queue()
        self._pool_bytes = BLOCK_ELEMS * 4
        self._pool_made = 0

    # -- queue --
    def put(self, item) -> None:
        try:
            self.queue.put_nowait(item)
            return
        except queue.Full:
            pass
        t0 = time.perf_counter()
        try:
            while True:
                if self.stop.is_set():
                    raise _Stop
                try:
                    self.queue.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue
        finally:
            self.wait_s += time.perf_counter() - t0

    def run(self) -> None:
        try:
            for task in self.plan.tasks():
                t0 = time.perf_counter()
                self._task(task)
                self.compute_s += time.perf_counter() - t0
            self.put(("done",))
        except _Stop:
            pass
        except BaseException as exc:  # handed to the writer thread, which re-raises it
            try:
                self.put(("error", exc))
            except _Stop:
                pass
        finally:
            self.reader.close()

    # -- tasks --
    def _task(self, task: TensorTask) -> None:
        if task.raw_copy:
            self.counts["copied"] += 1
            self.put(("raw", task.name, task.source))
            return
        t0 = time.perf_counter()
        if not task.touched:
            self.counts["converted"] += 1
            blocks = self._convert(task)
        elif task.compute is not None:
            self.counts["computed"] += 1
            blocks = self._computed(task)
        elif task.combined is not None:
            self.counts["merged"] += 1
            blocks = self._combined(task)
        elif task.experts:
            self.counts["merged"] += 1
            blocks = self._experts(task)
        elif task.dora is not None:
            self.counts["merged"] += 1
            blocks = self._dora(task)
        elif task.biases:
            self.counts["merged"] += 1
            blocks = self._bias(task)
        elif task.loras:
            self.counts["merged"] += 1
            blocks = self._lora(task)
        else:
            self.counts["added" if task.source is None else "replaced"] += 1
            blocks = self._replace(task)
        if task.hooked:
            parts = []
            for block in blocks:
                t, buf = block if isinstance(block, tuple) else (block, None)
                parts.append(t.clone() if buf is not None else t)
                if buf is not None:
                    self.pool.put(buf)
            full = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.empty(task.shape, dtype=task.dtype)
            produced = self.hook(task.name, full.reshape(task.shape), task.touched)
            del parts, full
            if set(produced) != {n for n, _, _ in task.outputs}:
                raise RuntimeError(f"tensor hook for {task.name} returned {sorted(produced)}, declared {[n for n, _, _ in task.outputs]}")
            for name, dtype, shape in task.outputs:
                t = produced[name]
                if t.dtype != dtype or tuple(t.shape) != shape:
                    raise RuntimeError(f"tensor hook: {name} is {t.dtype} {tuple(t.shape)}, declared {dtype} {shape}")
                self.put(("begin", name))
                self.put(("part", t, None))
                self.put(("end", name))
        else:
            self.put(("begin", task.name))
            for block in blocks:
                t, buf = block if isinstance(block, tuple) else (block, None)
                self.put(("part", t, buf))
            self.put(("end", task.name))
        for mod in task.modules:
            self.stats[mod.name].seconds += time.perf_counter() - t0
        if task.source is not None:
            self.reader.release(task.source)

    @property
    def staged(self) -> bool:
        """Whole row blocks go to the device and come back (an accelerator); on the CPU the math
        runs on cache-sized sub-blocks straight into recycled output buffers."""
        return self.device.type != "cpu"

    def _out_block(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An output block on the CPU: (tensor, pool buffer to give back once written, or None)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self._pool_bytes:
            return torch.empty(shape, dtype=dtype), None
        try:
            buf = self.pool.get_nowait()
        except queue.Empty:
            if self._pool_made < QUEUE_DEPTH + 2:
                self._pool_made += 1
                buf = torch.empty(self._pool_bytes, dtype=torch.uint8)
            else:
                t0 = time.perf_counter()
                while True:
                    if self.stop.is_set():
                        raise _Stop
                    try:
                        buf = self.pool.get(timeout=0.2)
                        break
                    except queue.Empty:
                        continue
                self.wait_s += time.perf_counter() - t0
        return buf[:nbytes].view(dtype).reshape(shape), buf

    def _view_rows(self, task: TensorTask, start: int, stop: int, replacement: torch.Tensor | None) -> torch.Tensor:
        """Rows of the tensor being updated, read-only (the replacement's, or the base's)."""
        if replacement is not None:
            return replacement if replacement.dim() == 0 else replacement[start:stop]
        return self.reader.rows(task.source, start, stop)

    def _source_rows(self, task: TensorTask, start: int, stop: int, replacement: torch.Tensor | None) -> torch.Tensor:
        """Rows as a float32 copy on the device, free to be modified in place."""
        return float_codec.decode(self._view_rows(task, start, stop, replacement), device=self.device)

    def _emit(self, block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return float_codec.encode(block, dtype)

    def _convert(self, task: TensorTask):
        for start, stop in _blocks(task.shape):
            src = self.reader.rows(task.source, start, stop)
            out = src.to(task.dtype, copy=True)
            if float_codec.may_overflow(src.dtype, task.dtype, 0.0):  # a cast to a narrower dtype
                _check_finite(task, src, out)
            yield out

    def _computed(self, task: TensorTask):
        t = task.compute()
        if t.dtype != task.dtype or tuple(t.shape) != task.shape:
            raise RuntimeError(f"{task.name}: computed {t.dtype} {tuple(t.shape)}, planned {task.dtype} {task.shape}")
        yield t.contiguous()

    def _replace(self, task: TensorTask):
        t = task.replacement.load()
        for start, stop in _blocks(task.shape):
            yield (t if t.dim() == 0 else t[start:stop]).to(task.dtype).contiguous()

    def _stat(self, mod: LoraModule, task: TensorTask) -> _ModuleStats:
        if mod.name not in self.stats:
            self.stats[mod.name] = _ModuleStats(mod.name, task.name)
        return self.stats[mod.name]

    def _replacement(self, task: TensorTask) -> torch.Tensor | None:
        if task.replacement is None or self.plan.sign < 0:
            return None
        return task.replacement.load()

    def _lora(self, task: TensorTask):
        """W + sign * sum(dW) for 2-D weights in float32, rounded once to the output dtype.

        On the CPU each block is split into sub-blocks that stay in cache: the rows of W are
        widened to float32 in a scratch buffer, ``addmm_`` adds L[rows] @ R (the scale folded
        into L) there, and the sum is rounded into the output block; W is never expanded to
        float32 in memory as a whole.
        """
        factors = [DeltaKernel.of(m, device=self.device) for m in task.loras]
        stats = [self._stat(m, task) for m in task.loras]
        for f, st in zip(factors, stats):
            st.delta_sq = f.norm_sq()
        pairs = [f.row_factors(sign=self.plan.sign) for f in factors]
        repl = self._replacement(task)
        rows_total, cols = task.shape[0], math.prod(task.shape[1:])
        staged = self.staged
        sub_rows = max(1, (BLOCK_ELEMS if staged else SUB_ELEMS) // max(1, cols))
        scratch = torch.empty((min(sub_rows, rows_total), cols), dtype=F32, device=self.device)
        src_dtype = repl.dtype if repl is not None else task.source.dtype
        track = self.track_rounding and (src_dtype in HALF or task.dtype in HALF)
        # blocks are checked for NaN/Inf only where the result can overflow (a pass per block costs ~20%)
        check = float_codec.may_overflow(src_dtype, task.dtype, sum(f.max_abs_bound() for f in factors))
        weight_sq = 0.0
        bound = 0.0
        for start, stop in _blocks(task.shape):
            src = self._view_rows(task, start, stop, repl).reshape(stop - start, cols)
            if staged:
                src = src.to(self.device)
                out, buf = torch.empty((stop - start, cols), dtype=task.dtype, device=self.device), None
            else:
                out, buf = self._out_block((stop - start, cols), task.dtype)
            for i in range(0, stop - start, sub_rows):
                j = min(stop - start, i + sub_rows)
                w = scratch[: j - i]
                w.copy_(src[i:j])  # W in float32, in a cache-sized scratch
                if self.weight_norms:
                    weight_sq += float(torch.linalg.vector_norm(w)) ** 2
                for L, R in pairs:
                    w.addmm_(L[start + i : start + j], R)  # + dW rows, in float32
                out[i:j].copy_(w)  # rounded to the output dtype once
                if check:
                    _check_finite(task, w, out[i:j])
                if track:
                    b = torch.zeros((), device=self.device)
                    if src_dtype in HALF:
                        b = 0.5 * _ulp(src[i:j].float(), src_dtype)
                    if task.dtype in HALF:
                        b = b + 0.5 * _ulp(out[i:j].float(), task.dtype).to(b.device)
                    bound = max(bound, float(b.max()))
            del src
            out = out.reshape((stop - start, *task.shape[1:]))
            yield (out, buf) if buf is not None else out.cpu()
        for st in stats:
            st.weight_sq = weight_sq if self.weight_norms else None
            st.rounding_bound = bound

    def _dora(self, task: TensorTask):
        mod = task.dora
        f = DeltaKernel.of(mod, device=self.device)
        magnitude = mod.magnitude.load().to(device=self.device, dtype=F32).reshape(-1)  # (out,)
        st = self._stat(mod, task)
        repl = self._replacement(task)
        blocks = _blocks(task.shape)
        col_norm = None
        if f.transposed:  # norm over the rows of the stored weight: a first pass
            acc_dtype = F32 if self.device.type == "mps" else torch.float64  # MPS has no float64
            acc = torch.zeros(task.shape[1], dtype=acc_dtype, device=self.device)
            for start, stop in blocks:
                v = self._source_rows(task, start, stop, repl)
                f.add_(v, start)
                acc += (v.to(acc_dtype) ** 2).sum(0)
            col_norm = acc.sqrt().to(F32)
        weight_sq = delta_sq = 0.0
        for start, stop in blocks:
            w = self._source_rows(task, start, stop, repl)
            if self.weight_norms:
                weight_sq += float(torch.linalg.vector_norm(w)) ** 2
            v = w.clone()
            f.add_(v, start)  # W + dW rows
            if f.transposed:  # the (out, in) rows are columns here: their norms came from the first pass
                v.mul_((magnitude / col_norm).view(1, -1))
            else:
                dora_rows(v, magnitude[start:stop])
            delta_sq += float(torch.linalg.vector_norm(v - w)) ** 2
            emitted = self._emit(v, task.dtype)
            _check_finite(task, v, emitted)
            yield emitted
        st.weight_sq, st.delta_sq = (weight_sq if self.weight_norms else None), delta_sq

    def _experts(self, task: TensorTask):
        """W + sign * dW_e for every expert e of a fused (E, d1, d2) tensor, a few experts per row
        block, in float32, rounded once (``engine.delta.ExpertsKernel``)."""
        kernels = [ExpertsKernel.of(m, device=self.device) for m in task.experts]
        stats = [self._stat(m, task) for m in task.experts]
        for k, st in zip(kernels, stats):
            st.delta_sq = k.norm_sq()
        repl = self._replacement(task)
        weight_sq = 0.0
        for start, stop in _blocks(task.shape):
            w = self._source_rows(task, start, stop, repl)  # (n, d1, d2) float32
            if self.weight_norms:
                weight_sq += float(torch.linalg.vector_norm(w)) ** 2
            for k in kernels:
                k.add_(w, start, sign=self.plan.sign)
            emitted = self._emit(w, task.dtype)
            _check_finite(task, w, emitted)
            yield emitted
        for st in stats:
            st.weight_sq = weight_sq if self.weight_norms else None

    def _combined(self, task: TensorTask):
        """W + D, D the combined delta of several adapters (formed whole: TIES and magnitude pruning
        rank every entry of a delta), in float32, rounded once."""
        t0 = time.perf_counter()
        D, st = combined_delta(task.combined, device=self.device, on_mask=self.on_mask)  # stored layout
        repl = self._replacement(task)
        cols = math.prod(task.shape[1:])
        D = D.reshape(task.shape[0], cols)
        weight_sq = 0.0
        for start, stop in _blocks(task.shape):
            w = self._source_rows(task, start, stop, repl).reshape(stop - start, cols)
            if self.weight_norms:
                weight_sq += float(torch.linalg.vector_norm(w)) ** 2
            w.add_(D[start:stop])
            emitted = self._emit(w, task.dtype)
            _check_finite(task, w, emitted)
            yield emitted.reshape((stop - start, *task.shape[1:]))
        st.weight_norm = math.sqrt(weight_sq) if self.weight_norms else None
        st.seconds = time.perf_counter() - t0
        self.combined[task.name] = st

    def _bias(self, task: TensorTask):
        repl = self._replacement(task)
        b = self._source_rows(task, 0, task.shape[0] if task.shape else 1, repl)
        for mod in task.biases:  # lora_bias: b' = b + sign * scale * lora_B.bias
            extra = mod.bias.load().to(device=self.device, dtype=F32).reshape(b.shape)
            b.add_(extra, alpha=float(self.plan.sign) * float(mod.scale))
        emitted = self._emit(b, task.dtype)
        _check_finite(task, b, emitted)
        yield emitted


def _check_finite(task: TensorTask, exact: torch.Tensor, out: torch.Tensor) -> None:
    """Refuse a block of output that holds NaN or Inf (an overflowing delta, or a result beyond the
    range of the output dtype), naming the module and the largest value, before anything is committed.

    One sum of the rounded block finds any NaN/Inf in it (they propagate); only when the sum itself
    is not finite are the values examined one by one (a sum of large finite values can overflow).

    Raises:
        InputError: naming the module (or tensor), the largest |value| and what to do.
    """
    if bool(torch.isfinite(out.sum())) or bool(torch.isfinite(out).all()):
        return
    what = ", ".join(m.name for m in task.modules) or task.name
    finite_exact = exact[torch.isfinite(exact)]
    largest = float(finite_exact.abs().max()) if finite_exact.numel() else math.inf
    if bool(torch.isfinite(exact).all()):  # float32 was fine: the output dtype's range is the cause
        limit = torch.finfo(out.dtype).max if out.dtype.is_floating_point else math.nan
        raise InputError(
            f"{what}: {task.name} would hold Inf in {str(out.dtype).replace('torch.', '')} (largest |value| {largest:.4g}, "
            f"the dtype ends at {limit:g}); merge with --dtype float32 or bfloat16"
        )
    raise InputError(
        f"{what}: {task.name} would hold NaN or Inf (largest finite |value| {largest:.4g}): the base tensor or "
        "the delta overflows float32 (factors too large?); refused"
    )


def execute_plan(
    plan: MergePlan,
    folder: Path,
    *,
    device: str | torch.device = "cpu",
    progress: Callable[..., None] | None = None,
    tensor_hook: Any = None,
    weight_norms: bool = True,
    mask_hook: Callable | None = None,
) -> dict:
    """Write the planned model into ``folder`` (normally a temporary sibling of OUT).

    ``mask_hook(weight, adapter index, kept mask)`` sees each mask a sparsifying combination draws
    (``engine.combine``; tests check DARE against its formula with it).

    ``weight_norms`` measures ||W|| of every adapted tensor for the report (one more read of
    each block; ||dW|| is always measured, from the r x r Gram matrices).

    Returns:
        Statistics for the report (modules, counts, bytes, timings).
    """
    folder = Path(folder)
    tensor_hook = as_tensor_hook(tensor_hook)
    device = torch.device(device) if not isinstance(device, torch.device) else device
    producer = _Producer(plan, device, tensor_hook, track_rounding=plan.sign < 0, weight_norms=weight_norms)
    producer.on_mask = mask_hook
    for task in plan.tasks():  # every module reports, even if a hook reorders work
        for mod in task.modules:
            producer._stat(mod, task)
    thread = threading.Thread(target=producer.run, name="loratool-merge-producer", daemon=True)
    t_start = time.perf_counter()
    write_s = 0.0
    # no fsync as each shard closes: it is flushed in the background as it grows and fsynced
    # there once complete, while the next one is written (the atomic commit fsyncs the folder again)
    writer = ModelWriter(folder, background_sync=True)
    thread.start()
    try:
        for shard in plan.shards:
            with writer.shard(shard.filename, shard.specs(), shard.metadata) as out:
                write_s += _write_shard(out, shard.filename, writer, producer, thread, progress)
        tail = _get(producer.queue, thread)
        if tail[0] == "error":
            raise tail[1]
    finally:
        producer.stop.set()
        thread.join()
        writer.close()
    stream_s = time.perf_counter() - t_start

    if plan.write_index:
        writer.write_index(plan.index_metadata)
    _write_side_files(plan, writer, getattr(tensor_hook, "config_patch", None))
    return {
        "stats": producer.stats,
        "combined": producer.combined,
        "counts": dict(producer.counts),
        "bytes": writer.total_bytes,
        "tensors": len(writer.weight_map),
        "stream_s": stream_s,
        "compute_s": producer.compute_s - producer.wait_s,
        "write_s": write_s,
        "files": list(writer.files),
    }


def _write_shard(out, filename: str, writer: ModelWriter, producer: "_Producer", thread: threading.Thread,
                 progress: Callable[..., None] | None) -> float:
    """Write one shard from the producer's items, in order: ("raw", name, entry) a byte copy of a base
    tensor; ("begin", name), then ("part", row block, pooled buffer or None) ..., ("end", name) a computed
    tensor; ("error", exception). Returns the seconds spent writing."""
    write_s, current = 0.0, None
    while out.remaining:
        item = _get(producer.queue, thread)
        kind, t0 = item[0], time.perf_counter()
        if kind == "raw":
            out.copy_raw(item[1], item[2])
            n, label = item[2].end - item[2].begin, item[1]
        elif kind == "begin":
            out.begin(item[1])
            n, current = 0, item[1]
        elif kind == "part":
            out.part(item[1])
            if item[2] is not None:
                producer.pool.put(item[2])
            n, label = item[1].numel() * item[1].element_size(), current
        elif kind == "end":
            out.end(item[1])
            n = 0
        elif kind == "error":
            raise item[1]
        else:
            raise RuntimeError(f"merge: unexpected {kind!r} before all tensors were written")
        if n:
            writer.wrote(filename, n)
            if progress:
                progress(n, label)
        write_s += time.perf_counter() - t0
    return write_s


def _get(q: queue.Queue, thread: threading.Thread):
    while True:
        try:
            return q.get(timeout=0.5)
        except queue.Empty:
            if not thread.is_alive() and q.empty():
                raise RuntimeError("merge: the compute thread stopped unexpectedly")


def _write_side_files(plan: MergePlan, writer: ModelWriter, config_patch: Callable[[dict], dict] | None) -> None:
    """config.json (the output dtype, the plan's patch, and a tensor hook's patch: a
    quantization_config) and the base's other side files, as they are."""
    names = list(plan.side_files)
    patches = [p for p in (plan.config_patch, config_patch) if p is not None]
    if "config.json" in names and (plan.dtype is not None or patches):
        names.remove("config.json")
        config = dict(plan.base.config)
        if plan.dtype is not None:
            dtype_name = str(plan.dtype).replace("torch.", "")
            config["dtype"] = dtype_name
            if "torch_dtype" in config:
                config["torch_dtype"] = dtype_name
        for patch in patches:
            config = patch(config)
        writer.write_json("config.json", config)
    writer.copy_side_files(plan.base.path, names)


