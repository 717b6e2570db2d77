"""The streaming merge engine behind ``loratool merge`` and ``loratool unmerge``.

It writes what PEFT's ``merge_and_unload()`` + ``save_pretrained()`` would give, without ever
building the model: base tensors are read in row blocks straight from their files, merged in
float32 (on the CPU or an accelerator), rounded once, and streamed into safetensors shards that
mirror the base's own sharding. Untouched tensors are copied byte for byte (``copy_raw``).
A producer thread reads and computes while the calling thread writes, so reading, math and
writing overlap; peak memory is a few row blocks plus the adapter, whatever the model size.

API::

    report = merge_model(base, adapter, out, *, dtype=None, device="auto", force=False,
                         strict=False, sign=+1, keep_modules_to_save=False, report_path=None,
                         progress=None, tensor_hook=None, warn=None, weight_norms=None,
                         quantization=None)

``base`` is a folder or a ``BaseModel``; ``adapter`` a path or an ``Adapter``. ``sign=-1``
unmerges. ``report`` is a JSON-ready dict (also written to ``report_path``). Internally:

``plan_merge(base, adapter, ...) -> MergePlan``
    Pure planning, no tensor data read: binds the adapter to the base (name mapping, kinds,
    shapes), resolves modules_to_save, tied embeddings and lora biases, and lays out one
    ``TensorTask`` per output tensor, grouped in ``ShardPlan`` s that mirror the base files.
    Raises the refusals (``ModuleMismatchError``, ``UnsupportedError``, ``InputError``).
``check_adapter_finite(adapter)``
    Raises ``InputError`` on NaN/Inf in any adapter tensor; called before OUT is created.
``execute_plan(plan, folder, *, device, progress, tensor_hook, weight_norms) -> dict``
    Streams the shards, the index json and the side files into ``folder``.

Numerics: every update is float32 math rounded once to the output dtype. Plain LoRA runs
as ``float32(W[rows]).addmm_(L[rows], R)`` on cache-sized sub-blocks (the scale folded into
L), so it may differ from PEFT's ``W + (B @ A) * scale`` by float32 rounding only.

A ``TensorTask`` is one base tensor (or one tensor the adapter adds) and the ordered updates
that apply to it: ``replacement`` (modules_to_save, or PEFT's saved ``base_layer.weight``),
then the ``loras`` deltas (or one ``dora`` merge), or the ``biases`` (lora_bias) for a bias.

Tensor hooks (how later stages plug in per-tensor work, e.g. quantization or verification):
an object with

* ``specs(name, dtype, shape, touched) -> list[(name, dtype, shape)] | None`` called at plan
  time for every output tensor; ``None`` leaves the tensor alone (untouched tensors stay raw
  byte copies), a list declares what the hook will emit instead (names may differ, several
  tensors may come out of one);
* ``__call__(name, tensor, touched) -> dict[str, Tensor]`` called with the finished tensor
  (in its output dtype, on the CPU) for every tensor whose ``specs`` was not ``None``; it
  must return exactly the declared tensors;
* optionally ``finalize(folder, report)``, called after every shard and side file is in the
  temporary folder and before it is committed (e.g. to add a quantization_config).

A plain callable ``hook(name, tensor) -> dict | Tensor | None`` is accepted too
(``as_tensor_hook``): it sees every tensor (so nothing is raw-copied) and may change values
only, not names, dtypes or shapes; ``None`` keeps the tensor.

Tied embeddings: see docs/merge.md. In short, a base whose checkpoint has no ``lm_head``
because ``tie_word_embeddings`` is set keeps it tied; a LoRA on ``lm_head`` (or on the
embedding) changes the one shared tensor, exactly as PEFT's merge into the tied parameter does.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from loratool.adapter import Adapter, LoraModule, ModuleKind
from loratool.base import BaseModel, bind_adapter, bound_module, side_files
from loratool.engine.codecs import float as float_codec
from loratool.engine.codecs.float import CONVERTIBLE, HALF
from loratool.engine.delta import DeltaKernel, dora_rows
from loratool.errors import InputError, ModuleMismatchError, UnsupportedError
from loratool.io.atomic import atomic_output_dir, check_output_path, write_side_output
from loratool.io.source import TensorSource
from loratool.io.store import (
    LazyTensor,
    TensorEntry,
    read_json,
    read_safetensors_header,
)
from loratool.io.writer import INDEX_NAME, ModelWriter, output_shard_names

F32 = torch.float32
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCK_ELEMS = 1 << 22  # elements per row block handed to the writer
SUB_ELEMS = 1 << 18  # elements per CPU sub-block: the float32 delta stays in cache
QUEUE_DEPTH = 4  # blocks computed ahead of the writer

# (mantissa bits + 1, smallest normal exponent as torch.frexp gives it) per half dtype
_FLOAT_BITS = {torch.float16: (11, -13), torch.bfloat16: (8, -125), torch.float32: (24, -125)}


# ----------------------------------------------------------------------------- plan


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
    outputs: list[tuple[str, torch.dtype, tuple[int, ...]]] = field(default_factory=list)
    hooked: bool = False

    @property
    def touched(self) -> bool:
        return self.replacement is not None or bool(self.loras) or self.dora is not None or bool(self.biases)

    @property
    def modules(self) -> list[LoraModule]:
        return self.loras + ([self.dora] if self.dora is not None else [])

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

    def tasks(self) -> Iterator[TensorTask]:
        for shard in self.shards:
            yield from shard.tasks

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for shard in self.shards for _, d, s in shard.specs())


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` -> torch.bfloat16 (None stays None).

    Raises:
        InputError: not float32, float16 or bfloat16.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in DTYPES.values():
            raise InputError(f"--dtype {dtype}: choose float32, float16 or bfloat16")
        return dtype
    try:
        return DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise InputError(f"--dtype {dtype}: choose float32, float16 or bfloat16") from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device the merge math runs on: ``auto`` picks CUDA, then MPS, then the CPU.

    Raises:
        InputError: the named accelerator is not available.
    """
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu or auto")
        return torch.device(name)
    if name == "mps":
        if not _mps_available():
            raise InputError("--device mps: Apple MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"--device {name}: choose auto, cpu, cuda or mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


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


def _norm_name(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _base_names(base: BaseModel) -> list[str]:
    names = [base.path.name, str(base.config.get("_name_or_path") or "")]
    for part in base.path.parts:  # a Hub cache snapshot: .../models--org--name/snapshots/<hash>
        if part.startswith("models--"):
            names.append(part.split("--")[-1])
    return [n for n in names if n]


def base_mismatch(adapter: Adapter, base: BaseModel) -> str | None:
    """Why the adapter may not belong to BASE: its base_model_name_or_path names another model.

    The comparison is loose: the last path component, lowercased, alphanumerics only; one
    name containing the other counts as a match (``gpt2`` vs a folder ``gpt2-finetuned``).
    """
    claimed = (adapter.base_model or "").strip()
    if not claimed:
        return None
    try:
        if Path(claimed).exists() and Path(claimed).resolve() == base.path.resolve():
            return None
    except OSError:
        pass
    want = _norm_name(Path(claimed.split("@", 1)[0].rstrip("/")).name)
    if not want:
        return None
    for name in _base_names(base):
        have = _norm_name(Path(name.rstrip("/")).name)
        if have and (have == want or have in want or want in have):
            return None
    return f"the adapter was trained on {claimed!r} but BASE is {base.path} ({base.path.name})"


def _default_float_dtype(base: BaseModel) -> torch.dtype:
    counts = Counter(e.dtype for e in base.store.entries() if e.dtype in CONVERTIBLE)
    return counts.most_common(1)[0][0] if counts else F32


def plan_merge(
    base: BaseModel,
    adapter: Adapter,
    *,
    dtype: torch.dtype | str | None = None,
    sign: int = 1,
    keep_modules_to_save: bool = False,
    strict: bool = False,
    tensor_hook: Any = None,
) -> MergePlan:
    """Lay out the merge (or unmerge, ``sign=-1``) of ``adapter`` into ``base``; reads no tensor data.

    Returns:
        A ``MergePlan``.
    Raises:
        ModuleMismatchError: a module or modules_to_save tensor is absent from the base, or its shape differs.
        UnsupportedError: unmerging DoRA, or modules_to_save without ``keep_modules_to_save``.
        InputError: ``strict`` and the adapter names another base model.
    """
    if sign not in (1, -1):
        raise ValueError("sign must be +1 or -1")
    out_dtype = resolve_dtype(dtype)
    tensor_hook = as_tensor_hook(tensor_hook)
    warnings = list(adapter.warnings)
    # unmerge reads a merged model, which is not the model the adapter names by construction
    mismatch = base_mismatch(adapter, base) if sign > 0 else None
    if mismatch:
        if strict:
            raise InputError(f"{mismatch}; refused (--strict)")
        warnings.append(f"{mismatch}; merging anyway (use --strict to refuse)")
    if sign < 0 and any(m.magnitude is not None for m in adapter.modules.values()):
        raise UnsupportedError(
            "a DoRA adapter cannot be unmerged: DoRA rescales each row by m / ||W + dW||, and that pre-merge norm "
            "cannot be recovered from the merged weights"
        )

    # modules -> base tensors (tied heads first: their weight is the embedding)
    mapping: dict[str, str] = {}
    tied: dict[str, LoraModule] = {}
    untied: dict[str, LoraModule] = {}
    for name, mod in adapter.modules.items():
        key = None if base.weight_name(name) is not None else base.tied_head_key(name)
        if key is None:
            untied[name] = mod
            continue
        tied[name] = bound_module(base, mod, key)  # the head's delta goes into the shared embedding
        mapping[name] = key
        warnings.append(f"{name}: the base ties it to {key} (tie_word_embeddings); the merged delta changes that shared tensor, as PEFT's merge does")
    binding = bind_adapter(adapter.replace_modules(untied), base)
    mapping.update(binding.keys)
    bound = {**tied, **binding.adapter.modules}
    adapter = adapter.replace_modules({name: bound[name] for name in adapter.modules})

    float_default = _default_float_dtype(base)
    tasks: dict[str, TensorTask] = {}

    def task_for(key: str) -> TensorTask:
        if key not in tasks:
            e = base.store.entry(key)
            tasks[key] = TensorTask(key, e, float_codec.output_dtype(e.dtype, out_dtype), tuple(e.shape))
        return tasks[key]

    added: list[TensorTask] = []
    mts_report: list[dict] = []
    refused: list[str] = []
    module_weights = {f"{n}.weight" for n in adapter.modules}
    for tname, tensor in adapter.modules_to_save.items():
        is_base_layer = tname in module_weights  # PEFT's saved base_layer.weight of a LoRA'd module
        key = base.tensor_name(tname)
        tied_head = key is None and tname.endswith(".weight") and base.tied_head_key(tname[: -len(".weight")]) is not None
        if tied_head and is_base_layer:
            key = base.tied_head_key(tname[: -len(".weight")])  # PEFT loaded it into the shared tensor
        if sign < 0:
            if is_base_layer:
                continue  # subtracting the delta recovers it
            if keep_modules_to_save:
                mts_report.append({"name": tname, "tensor": key, "action": "kept" if key else "absent"})
                continue
            refused.append(tname)
            continue
        if key is None:
            t = TensorTask(tname, None, float_codec.output_dtype(tensor.dtype, out_dtype or float_default), tuple(tensor.shape), replacement=tensor)
            added.append(t)
            mts_report.append({"name": tname, "tensor": tname, "action": "added"})
            why = " (the config ties it to the input embedding, so transformers ignores it unless tie_word_embeddings is turned off)" if tied_head else ""
            warnings.append(f"{tname}: modules_to_save tensor is not in the base; it is added to the output{why}")
            continue
        if tuple(base.store.shape(key)) != tuple(tensor.shape):
            raise ModuleMismatchError(tname, f"shape mismatch: adapter gives modules_to_save tensor {tuple(tensor.shape)}, base {key} is {tuple(base.store.shape(key))}")
        task_for(key).replacement = tensor
        mts_report.append({"name": tname, "tensor": key, "action": "replaced"})
    if refused:
        raise UnsupportedError(
            f"cannot unmerge modules_to_save ({', '.join(refused)}): the adapter replaced those base tensors and the originals are gone; "
            "pass --keep-modules-to-save to keep them as they are in MERGED"
        )

    for name, key in mapping.items():
        mod = adapter.modules[name]
        task = task_for(key)
        if mod.magnitude is not None:
            if task.dora is not None or task.loras:
                raise UnsupportedError(f"{name}: a DoRA module shares base tensor {key} with another module; PEFT cannot merge that either")
            task.dora = mod
        else:
            if task.dora is not None:
                raise UnsupportedError(f"{name}: a DoRA module shares base tensor {key} with another module; PEFT cannot merge that either")
            task.loras.append(mod)
        if mod.bias is not None:
            if mod.kind is not ModuleKind.LINEAR and mod.kind is not ModuleKind.CONV1D:
                raise UnsupportedError(f"{name}: lora_bias on an embedding is not supported (PEFT refuses it too)")
            bkey = base.tensor_name(f"{name}.bias")
            if bkey is None:
                raise ModuleMismatchError(name, "lora_bias needs a bias in the base layer, and the base has none")
            if tuple(base.store.shape(bkey)) != (mod.out_features,):
                raise ModuleMismatchError(name, f"shape mismatch: lora bias is ({mod.out_features},), base {bkey} is {tuple(base.store.shape(bkey))}")
            task_for(bkey).biases.append(mod)

    _mirror_tied(base, tasks, task_for, warnings)

    # shards mirror the base files; tensors keep their file order (sequential reads)
    shards: list[ShardPlan] = []
    shard_names = output_shard_names(base.store.files)
    for path in base.store.files:
        entries = [e for e in base.store.entries() if e.path == path]
        entries.sort(key=lambda e: (e.begin if e.begin is not None else 0))
        shard_tasks = [tasks.get(e.name) or TensorTask(e.name, e, float_codec.output_dtype(e.dtype, out_dtype), tuple(e.shape)) for e in entries]
        meta = {"format": "pt"}
        if path.suffix == ".safetensors":
            meta.update(read_safetensors_header(path)[1])
        shards.append(ShardPlan(shard_names[path], shard_tasks, meta))
    if added:
        shards[-1].tasks.extend(added)
    names = Counter(s.filename for s in shards)
    if any(n > 1 for n in names.values()):
        raise InputError(f"{base.path}: two weight files map to the same output name")

    for task in (t for s in shards for t in s.tasks):
        spec = None
        if tensor_hook is not None:
            spec = tensor_hook.specs(task.name, task.dtype, task.shape, task.touched)
        if spec is None:
            task.outputs = [(task.name, task.dtype, task.shape)]
        else:
            task.hooked = True
            task.outputs = [(n, d, tuple(s)) for n, d, s in spec]

    index_path = base.path / INDEX_NAME
    bin_index = base.path / "pytorch_model.bin.index.json"
    index_meta: dict = {}
    for p in (index_path, bin_index):
        if p.is_file():
            data = read_json(p)
            if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
                index_meta = dict(data["metadata"])
            break
    write_index = len(shards) > 1 or index_path.is_file() or bin_index.is_file()
    copied, refused = side_files(base.path)
    return MergePlan(
        base=base,
        adapter=adapter,
        sign=sign,
        dtype=out_dtype,
        shards=shards,
        write_index=write_index,
        index_metadata=index_meta,
        modules=mapping,
        modules_to_save=mts_report,
        warnings=warnings + refused,
        side_files=copied,
    )


def _mirror_tied(base: BaseModel, tasks: dict[str, TensorTask], task_for, warnings: list[str]) -> None:
    """A checkpoint that stores both halves of a tied pair gets the same update in both."""
    if not base.config.get("tie_word_embeddings"):
        return
    embed, head = base.input_embedding_key(), base.output_head_key()
    if embed is None or head is None or embed == head or base.store.shape(embed) != base.store.shape(head):
        return
    a, b = tasks.get(embed), tasks.get(head)
    if not ((a is not None and a.touched) or (b is not None and b.touched)):
        return
    ta, tb = task_for(embed), task_for(head)
    replacement = ta.replacement if ta.replacement is not None else tb.replacement
    loras = ta.loras + tb.loras
    dora = ta.dora or tb.dora
    if dora is not None and (loras or (ta.dora is not None and tb.dora is not None)):
        raise UnsupportedError(f"DoRA on a tied embedding ({embed} / {head}) together with another module is not supported")
    for t in (ta, tb):
        t.replacement, t.loras, t.dora = replacement, list(loras), dora
    warnings.append(f"{embed} and {head} are tied (tie_word_embeddings) and both stored; both get the same merged tensor")


def check_adapter_finite(adapter: Adapter) -> None:
    """Refuse NaN or Inf anywhere in the adapter's tensors.

    Raises:
        InputError: names the first offending tensor.
    """
    for name, mod in adapter.modules.items():
        for part, t in (("lora_A", mod.A), ("lora_B", mod.B), ("lora_B.bias", mod.bias), ("lora_magnitude_vector", mod.magnitude)):
            if t is not None and not _finite(t.load()):
                raise InputError(f"{name}: {part} holds NaN or Inf; refusing to merge a broken adapter")
    for name, t in adapter.modules_to_save.items():
        if not _finite(t.load()):
            raise InputError(f"{name}: modules_to_save tensor holds NaN or Inf; refusing to merge a broken adapter")


def _finite(t: torch.Tensor) -> bool:
    if not t.dtype.is_floating_point:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float64))):  # fast path: NaN and Inf both propagate into the sum
        return True
    return bool(torch.isfinite(t).all())


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
            yield src.to(task.dtype, copy=True)

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
            yield self._emit(v, task.dtype)
        st.weight_sq, st.delta_sq = (weight_sq if self.weight_norms else None), delta_sq

    def _bias(self, task: TensorTask):
        repl = self._replacement(task)
        b = self._source_rows(task, 0, task.shape[0] if task.shape else 1, repl)
        for mod in task.biases:  # lora_bias: b' = b + sign * scale * lora_B.bias
            extra = mod.bias.load().to(device=self.device, dtype=F32).reshape(b.shape)
            b.add_(extra, alpha=float(self.plan.sign) * float(mod.scale))
        yield self._emit(b, task.dtype)


def execute_plan(
    plan: MergePlan,
    folder: Path,
    *,
    device: str | torch.device = "cpu",
    progress: Callable[..., None] | None = None,
    tensor_hook: Any = None,
    weight_norms: bool = True,
) -> dict:
    """Write the planned model into ``folder`` (normally a temporary sibling of OUT).

    ``weight_norms`` measures ||W|| of every adapted tensor for the report (one more read of
    each block; ||dW|| is always measured, from the r x r Gram matrices).

    Returns:
        Statistics for the report (modules, counts, bytes, timings).
    """
    folder = Path(folder)
    tensor_hook = as_tensor_hook(tensor_hook)
    device = torch.device(device) if not isinstance(device, torch.device) else device
    producer = _Producer(plan, device, tensor_hook, track_rounding=plan.sign < 0, weight_norms=weight_norms)
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
                while out.remaining:
                    item = _get(producer.queue, thread)
                    kind = item[0]
                    t0 = time.perf_counter()
                    if kind == "raw":
                        out.copy_raw(item[1], item[2])
                        n = item[2].end - item[2].begin
                        writer.wrote(shard.filename, n)
                        if progress:
                            progress(n, item[1])
                    elif kind == "begin":
                        out.begin(item[1])
                        current = item[1]
                    elif kind == "part":
                        out.part(item[1])
                        if item[2] is not None:
                            producer.pool.put(item[2])
                        n = item[1].numel() * item[1].element_size()
                        writer.wrote(shard.filename, n)
                        if progress:
                            progress(n, current)
                    elif kind == "end":
                        out.end(item[1])
                    elif kind == "error":
                        raise item[1]
                    else:
                        raise RuntimeError(f"merge: unexpected {kind!r} before all tensors were written")
                    write_s += time.perf_counter() - t0
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
        "counts": dict(producer.counts),
        "bytes": writer.total_bytes,
        "tensors": len(writer.weight_map),
        "stream_s": stream_s,
        "compute_s": producer.compute_s - producer.wait_s,
        "write_s": write_s,
    }


def _get(q: queue.Queue, thread: threading.Thread):
    while True:
        try:
            return q.get(timeout=0.5)
        except queue.Empty:
            if not thread.is_alive() and q.empty():
                raise RuntimeError("merge: the compute thread stopped unexpectedly")


def _write_side_files(plan: MergePlan, writer: ModelWriter, config_patch: Callable[[dict], dict] | None) -> None:
    """config.json (the output dtype, and a tensor hook's patch: a quantization_config) and the
    base's other side files, as they are."""
    names = list(plan.side_files)
    if "config.json" in names and (plan.dtype is not None or config_patch is not None):
        names.remove("config.json")
        config = dict(plan.base.config)
        if plan.dtype is not None:
            dtype_name = str(plan.dtype).replace("torch.", "")
            config["dtype"] = dtype_name
            if "torch_dtype" in config:
                config["torch_dtype"] = dtype_name
        writer.write_json("config.json", config_patch(config) if config_patch is not None else config)
    writer.copy_side_files(plan.base.path, names)


# ----------------------------------------------------------------------------- entry point


def merge_model(
    base: BaseModel | str | os.PathLike,
    adapter: Adapter | str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "auto",
    force: bool = False,
    strict: bool = False,
    sign: int = 1,
    keep_modules_to_save: bool = False,
    report_path: str | os.PathLike | None = None,
    progress: Callable[..., None] | None = None,
    tensor_hook: Any = None,
    warn: Callable[[str], None] | None = None,
    weight_norms: bool | None = None,
    quantization: Any = None,
) -> dict:
    """Merge (``sign=+1``) or unmerge (``sign=-1``) an adapter into a base, streaming, into OUT.

    Args:
        base: base model folder or ``BaseModel`` (for unmerge: the merged model).
        adapter: adapter path (any format ``read_adapter`` detects) or ``Adapter``.
        out: the output folder; written to a temporary sibling and renamed when complete.
        dtype: output dtype for floating tensors (default: each base tensor's own).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``: where the float32 merge math runs.
        force: replace an existing OUT.
        strict: refuse an adapter whose base_model_name_or_path names another model.
        sign: +1 merges, -1 unmerges.
        keep_modules_to_save: unmerge only: keep modules_to_save tensors as they are instead of refusing.
        report_path: also write the report there as JSON.
        progress: called as ``progress(nbytes, label)`` as output is written.
        tensor_hook: per-tensor hook (see the module docstring).
        warn: called with each warning as soon as it is known (they are also in the report).
        weight_norms: measure ||W|| (and so ||dW||/||W||) per module; default: when ``report_path`` is given.
        quantization: a ``loratool.quantized.QuantOptions`` (--qlora / --quantize); a base saved
            quantized by bitsandbytes is dequantized whatever this says (see docs/quantization.md).
    Returns:
        The report: per-module ||dW||, ||dW||/||W|| and seconds, counts, timings, warnings.
    Raises:
        ModuleMismatchError, UnsupportedError, InputError, OutputExistsError (all exit 2 in the CLI).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if not isinstance(base, BaseModel):
        base = BaseModel.open(base)
    if not isinstance(adapter, Adapter):
        from loratool.formats import read_adapter

        adapter = read_adapter(adapter)
    dev = resolve_device(device)
    tensor_hook = as_tensor_hook(tensor_hook)
    inputs = [base.path] + ([adapter.path] if adapter.path is not None else []) + [Path(f).parent for f in adapter.files]
    check_output_path(out, force=force, inputs=inputs)
    if report_path is not None:
        check_output_path(Path(report_path), force=force, inputs=inputs)
    # bitsandbytes (--qlora / --quantize, or a quantized base): a dequantizing view of the base
    # and a per-tensor hook that quantizes the output
    from loratool.quantized import setup_quantization

    base, tensor_hook = setup_quantization(base, adapter, quantization, dtype=resolve_dtype(dtype), sign=sign, tensor_hook=tensor_hook, warn=warn)
    try:
        plan = plan_merge(base, adapter, dtype=dtype, sign=sign, keep_modules_to_save=keep_modules_to_save, strict=strict, tensor_hook=tensor_hook)
    except ModuleMismatchError:
        # an adapter trained on another model is the likely cause: say so with the refusal
        mismatch = base_mismatch(adapter, base) if sign > 0 and warn is not None else None
        if mismatch:
            warn(mismatch)
        raise
    if warn is not None:
        for w in plan.warnings:
            warn(w)
    t_plan = time.perf_counter()
    threads = torch.get_num_threads()
    # the calling thread writes while the compute thread merges: leave it a core (on a small
    # machine, two torch threads fighting the writer cost more than they give)
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    try:
        check_adapter_finite(adapter)
        t_check = time.perf_counter()
        with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
            norms = report_path is not None if weight_norms is None else weight_norms
            result = execute_plan(plan, tmp, device=dev, progress=progress, tensor_hook=tensor_hook, weight_norms=norms)
            report = _report(plan, result, out, dev)
            if tensor_hook is not None and hasattr(tensor_hook, "finalize"):
                tensor_hook.finalize(tmp, report)
            t_commit = time.perf_counter()
        t_end = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    report["timings"] = {
        "plan_s": round(t_plan - t0, 4),
        "check_s": round(t_check - t_plan, 4),
        "stream_s": round(result["stream_s"], 4),
        "compute_s": round(result["compute_s"], 4),
        "write_s": round(result["write_s"], 4),
        "commit_s": round(t_end - t_commit, 4),
        "total_s": round(t_end - t0, 4),
    }
    if report_path is not None:
        write_side_output(Path(report_path), lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8"),
                          force=force, inputs=inputs, completed=out)
    return report


def _report(plan: MergePlan, result: dict, out: Path, device: torch.device) -> dict:
    modules = []
    for name, st in result["stats"].items():
        mod = plan.adapter.modules.get(name)
        d = math.sqrt(st.delta_sq)
        w = math.sqrt(st.weight_sq) if st.weight_sq is not None else None
        entry = {
            "name": name,
            "tensor": st.tensor,
            "kind": mod.kind.value if mod else None,
            "rank": mod.rank if mod else None,
            "scale": mod.scale if mod else None,
            "dora": bool(mod is not None and mod.magnitude is not None),
            "delta_norm": d,
            "weight_norm": w,
            "relative_delta": d / w if w else None,
            "seconds": round(st.seconds, 6),
        }
        if plan.sign < 0:
            entry["rounding_bound"] = st.rounding_bound
        modules.append(entry)
    report: dict[str, Any] = {
        "command": "merge" if plan.sign > 0 else "unmerge",
        "base": str(plan.base.path),
        "adapter": str(plan.adapter.path) if plan.adapter.path else None,
        "out": str(out),
        "device": str(device),
        "dtype": str(plan.dtype).replace("torch.", "") if plan.dtype is not None else None,
        "modules": modules,
        "modules_to_save": plan.modules_to_save,
        "tensors": {"total": result["tensors"], **{k: result["counts"].get(k, 0) for k in ("copied", "converted", "merged", "replaced", "added")}},
        "shards": [s.filename for s in plan.shards],
        "bytes_written": result["bytes"],
        "warnings": plan.warnings,
    }
    if plan.sign < 0:
        half = sorted({str(t.source.dtype if t.source is not None else t.dtype).replace("torch.", "") for t in plan.tasks() if t.loras and ((t.source is not None and t.source.dtype in HALF) or t.dtype in HALF)})
        bound = max((m.get("rounding_bound", 0.0) for m in modules), default=0.0)
        report["rounding"] = {
            "half_precision": half,
            "max_abs_bound": bound,
            "note": (
                "unmerge subtracts dW exactly in float32, but a merged half-precision weight was rounded once on the way in "
                "and the result is rounded again on the way out: |unmerged - original| <= 0.5 ulp(merged) + 0.5 ulp(unmerged) "
                "per element (ulp = 2^-7 relative for bfloat16, 2^-10 for float16); max_abs_bound is the largest such bound here"
                if half
                else "float32 throughout: the unmerged weights differ from the original by float32 rounding of the delta only"
            ),
        }
    return report
