"""``loratool merge`` and ``loratool unmerge``: plan a model, then run the engine's stream.

It writes what PEFT's ``merge_and_unload()`` + ``save_pretrained()`` would give, without ever
building the model. This module plans; ``loratool.engine.stream`` executes (read row blocks,
decode, apply the delta terms, encode, write); peak memory is a few row blocks plus the
adapter, whatever the model size.

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

A ``TensorTask`` is one base tensor (or one tensor the adapter adds) and the ordered delta
terms that apply to it: ``replacement`` (modules_to_save, or PEFT's saved ``base_layer.weight``),
then the ``loras`` deltas (or one ``dora`` merge), or the ``biases`` (lora_bias) for a bias.
Tensor hooks (a quantized merge's encoder): see ``loratool.engine.stream``.

Tied embeddings: see docs/merge.md. In short, a base whose checkpoint has no ``lm_head``
because ``tie_word_embeddings`` is set keeps it tied; a LoRA on ``lm_head`` (or on the
embedding) changes the one shared tensor, exactly as PEFT's merge into the tied parameter does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from loratool.adapter import Adapter, LoraModule, ModuleKind
from loratool.base import BaseModel, bind_with_tied_heads, side_files
from loratool.engine.codecs import float as float_codec
from loratool.engine.codecs.float import CONVERTIBLE, HALF
from loratool.engine.combine import CombinedTerm, CombineSpec
from loratool.engine.stream import (
    MergePlan,
    ShardPlan,
    TensorTask,
    as_tensor_hook,
    execute_plan,
)
from loratool.errors import InputError, ModuleMismatchError, UnsupportedError
from loratool.experts import expert_layout
from loratool.io.atomic import atomic_output_dir, check_output_path, write_side_output
from loratool.io.store import TensorEntry, read_json, read_safetensors_header
from loratool.io.writer import INDEX_NAME, output_shard_names
from loratool.surgery import check_same_base, refuse_unprunable, shared_modules_to_save

F32 = torch.float32
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- plan


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
    warnings = list(adapter.warnings) + _check_direction(base, adapter, sign=sign, strict=strict)
    adapter, mapping = bind_with_tied_heads(base, adapter, warnings)
    tasks = _TaskTable(base, out_dtype)
    added, mts_report = _plan_modules_to_save(base, adapter, tasks, sign=sign, keep=keep_modules_to_save,
                                              float_default=_default_float_dtype(base), warnings=warnings)
    _attach_modules(base, adapter, mapping, tasks)
    _mirror_tied(base, tasks.tasks, tasks.get, warnings)
    return _finish_plan(base, adapter, tasks, added, out_dtype, tensor_hook, sign=sign,
                        mapping=mapping, mts_report=mts_report, warnings=warnings)


def _finish_plan(base: BaseModel, adapter: Adapter, tasks: "_TaskTable", added: list[TensorTask], out_dtype: torch.dtype | None,
                 tensor_hook: Any, *, sign: int, mapping: dict[str, str], mts_report: list[dict], warnings: list[str]) -> MergePlan:
    """Shards, declared outputs, the index and side files around the planned tasks."""
    shards = _shards(base, tasks, added)
    _declare_outputs(shards, as_tensor_hook(tensor_hook))
    index_meta, has_index = _index_metadata(base)
    copied, refused = side_files(base.path)
    return MergePlan(
        base=base,
        adapter=adapter,
        sign=sign,
        dtype=out_dtype,
        shards=shards,
        write_index=len(shards) > 1 or has_index,
        index_metadata=index_meta,
        modules=mapping,
        modules_to_save=mts_report,
        warnings=warnings + refused,
        side_files=copied,
    )


def plan_combined_merge(
    base: BaseModel,
    adapters: list[Adapter],
    spec: CombineSpec,
    *,
    dtype: torch.dtype | str | None = None,
    strict: bool = False,
    tensor_hook: Any = None,
) -> MergePlan:
    """Lay out one merge of several adapters into ``base``: every weight any of them targets gets one
    ``CombinedTerm`` (their deltas combined by ``spec.method``, see ``engine.combine``); reads no tensor data.

    Raises:
        ModuleMismatchError: adapters for different bases (a module's shapes differ), or a module the base lacks.
        UnsupportedError: DoRA; modules_to_save or lora_bias with a sparsifying method; modules_to_save
            that differ between adapters.
        InputError: ``strict`` and an adapter names another base model.
    """
    out_dtype = resolve_dtype(dtype)
    labels = [str(a.path) if a.path else f"adapter {i + 1}" for i, a in enumerate(adapters)]
    _refuse_uncombinable(adapters, labels, spec)
    check_same_base(adapters, labels=labels, ignore_base_name=True)
    warnings = [w for a in adapters for w in a.warnings]
    parts: dict[str, list[tuple[int, LoraModule]]] = {}
    bound: list[Adapter] = []
    tasks = _TaskTable(base, out_dtype)
    for i, adapter in enumerate(adapters):
        warnings += _check_direction(base, adapter, sign=1, strict=strict)
        adapter, mapping = bind_with_tied_heads(base, adapter, warnings)
        bound.append(adapter)
        for name, key in mapping.items():
            mod = adapter.modules[name]
            for term_key, term in (expert_layout(base, mod).terms(mod) if mod.experts else [(key, mod)]):
                parts.setdefault(term_key, []).append((i, term))
            if mod.bias is not None:  # linear only: lora_bias terms add with the adapter's weight
                tasks.get(_bias_key(base, name, mod)).biases.append(replace(mod, scale=mod.scale * spec.weights[i]))
    for key, pairs in parts.items():
        tasks.get(key).combined = CombinedTerm(key, tuple(pairs), spec)
    view = bound[0].replace_modules({n: m for a in reversed(bound) for n, m in a.modules.items()},
                                    modules_to_save=shared_modules_to_save(adapters, labels, what="merge"))
    added, mts_report = _plan_modules_to_save(base, view, tasks, sign=1, keep=False,
                                              float_default=_default_float_dtype(base), warnings=warnings)
    _mirror_tied(base, tasks.tasks, tasks.get, warnings)
    plan = _finish_plan(base, bound[0], tasks, added, out_dtype, tensor_hook, sign=1,
                        mapping={}, mts_report=mts_report, warnings=warnings)
    plan.adapters, plan.combine = bound, spec
    return plan


def _refuse_uncombinable(adapters: list[Adapter], labels: list[str], spec: CombineSpec) -> None:
    """What several adapters cannot combine: DoRA always; trained modules_to_save and lora_bias under
    a sparsifying method."""
    for a, label in zip(adapters, labels):
        if any(m.magnitude is not None for m in a.modules.values()):
            raise UnsupportedError(
                f"{label}: is a DoRA adapter; DoRA rescales each row of W + dW by m / ||W + dW||, which is not a delta "
                "that adds up or can be pruned across adapters (merge it alone)"
            )
        if spec.sparsifying:
            refuse_unprunable(a, label, spec.method)


def _check_direction(base: BaseModel, adapter: Adapter, *, sign: int, strict: bool) -> list[str]:
    """Refusals and warnings that depend on the direction: an adapter naming another base (merge),
    DoRA (unmerge)."""
    warnings = []
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
    return warnings


class _TaskTable:
    """The ``TensorTask`` of each base tensor that gets a term, made on first use."""

    def __init__(self, base: BaseModel, out_dtype: torch.dtype | None):
        self.base, self.out_dtype = base, out_dtype
        self.tasks: dict[str, TensorTask] = {}

    def get(self, key: str) -> TensorTask:
        if key not in self.tasks:
            self.tasks[key] = self.plain(self.base.store.entry(key))
        return self.tasks[key]

    def plain(self, e: TensorEntry) -> TensorTask:
        """A tensor copied (or cast to the output dtype)."""
        return TensorTask(e.name, e, float_codec.output_dtype(e.dtype, self.out_dtype), tuple(e.shape))


def _plan_modules_to_save(base: BaseModel, adapter: Adapter, tasks: _TaskTable, *, sign: int, keep: bool,
                          float_default: torch.dtype, warnings: list[str]) -> tuple[list[TensorTask], list[dict]]:
    """modules_to_save tensors (and PEFT's saved ``base_layer.weight``) as replacements of base
    tensors, or tensors added to the output; on unmerge, kept (``keep``) or refused.

    Returns:
        (tasks of tensors the base lacks, the modules_to_save report).
    """
    added: list[TensorTask] = []
    report: list[dict] = []
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
            if keep:
                report.append({"name": tname, "tensor": key, "action": "kept" if key else "absent"})
            else:
                refused.append(tname)
            continue
        if key is None:
            dtype = float_codec.output_dtype(tensor.dtype, tasks.out_dtype or float_default)
            added.append(TensorTask(tname, None, dtype, tuple(tensor.shape), replacement=tensor))
            report.append({"name": tname, "tensor": tname, "action": "added"})
            why = " (the config ties it to the input embedding, so transformers ignores it unless tie_word_embeddings is turned off)" if tied_head else ""
            warnings.append(f"{tname}: modules_to_save tensor is not in the base; it is added to the output{why}")
            continue
        if tuple(base.store.shape(key)) != tuple(tensor.shape):
            raise ModuleMismatchError(tname, f"shape mismatch: adapter gives modules_to_save tensor {tuple(tensor.shape)}, base {key} is {tuple(base.store.shape(key))}")
        tasks.get(key).replacement = tensor
        report.append({"name": tname, "tensor": key, "action": "replaced"})
    if refused:
        raise UnsupportedError(
            f"cannot unmerge modules_to_save ({', '.join(refused)}): the adapter replaced those base tensors and the originals are gone; "
            "pass --keep-modules-to-save to keep them as they are in MERGED"
        )
    return added, report


def _attach_modules(base: BaseModel, adapter: Adapter, mapping: dict[str, str], tasks: _TaskTable) -> None:
    """Each module's delta term on its base tensor (LoRA terms add up; DoRA stands alone), and a
    lora_bias on the layer's bias."""
    for name, key in mapping.items():
        mod = adapter.modules[name]
        if mod.experts:
            _attach_experts(base, mod, tasks)
            continue
        task = tasks.get(key)
        if task.dora is not None or (mod.magnitude is not None and task.loras):
            raise UnsupportedError(f"{name}: a DoRA module shares base tensor {key} with another module; PEFT cannot merge that either")
        if mod.magnitude is not None:
            task.dora = mod
        else:
            task.loras.append(mod)
        if mod.bias is not None:
            tasks.get(_bias_key(base, name, mod)).biases.append(mod)


def _attach_experts(base: BaseModel, mod: LoraModule, tasks: _TaskTable) -> None:
    """A fused experts module: one experts term on the fused tensor, or a linear term per stored
    expert tensor (``experts.ExpertLayout.terms``)."""
    for key, term in expert_layout(base, mod).terms(mod):
        if term.experts:
            tasks.get(key).experts.append(term)
        else:
            tasks.get(key).loras.append(term)


def _bias_key(base: BaseModel, name: str, mod: LoraModule) -> str:
    """The base bias a lora_bias adds to (checked: the layer has one, of the right shape)."""
    if mod.kind is not ModuleKind.LINEAR and mod.kind is not ModuleKind.CONV1D:
        raise UnsupportedError(f"{name}: lora_bias on an embedding is not supported (PEFT refuses it too)")
    bkey = base.tensor_name(f"{name}.bias")
    if bkey is None:
        raise ModuleMismatchError(name, "lora_bias needs a bias in the base layer, and the base has none")
    if tuple(base.store.shape(bkey)) != (mod.out_features,):
        raise ModuleMismatchError(name, f"shape mismatch: lora bias is ({mod.out_features},), base {bkey} is {tuple(base.store.shape(bkey))}")
    return bkey


def _shards(base: BaseModel, tasks: _TaskTable, added: list[TensorTask]) -> list[ShardPlan]:
    """Shards mirror the base files; tensors keep their file order (sequential reads); tensors the
    adapter adds go last."""
    shards: list[ShardPlan] = []
    shard_names = output_shard_names(base.store.files)
    for path in base.store.files:
        entries = [e for e in base.store.entries() if e.path == path]
        entries.sort(key=lambda e: (e.begin if e.begin is not None else 0))
        shard_tasks = [tasks.tasks.get(e.name) or tasks.plain(e) for e in entries]
        meta = {"format": "pt"}
        if path.suffix == ".safetensors":
            meta.update(read_safetensors_header(path)[1])
        shards.append(ShardPlan(shard_names[path], shard_tasks, meta))
    if added:
        shards[-1].tasks.extend(added)
    names = Counter(s.filename for s in shards)
    if any(n > 1 for n in names.values()):
        raise InputError(f"{base.path}: two weight files map to the same output name")
    return shards


def _declare_outputs(shards: list[ShardPlan], tensor_hook: Any) -> None:
    """What each task writes: itself, or what the tensor hook declares it emits instead."""
    for task in (t for s in shards for t in s.tasks):
        spec = None
        if tensor_hook is not None:
            spec = tensor_hook.specs(task.name, task.dtype, task.shape, task.touched)
        if spec is None:
            task.outputs = [(task.name, task.dtype, task.shape)]
        else:
            task.hooked = True
            task.outputs = [(n, d, tuple(s)) for n, d, s in spec]


def _index_metadata(base: BaseModel) -> tuple[dict, bool]:
    """(the base index's metadata, whether the base has an index at all)."""
    for p in (base.path / INDEX_NAME, base.path / "pytorch_model.bin.index.json"):
        if p.is_file():
            data = read_json(p)
            if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
                return dict(data["metadata"]), True
            return {}, True
    return {}, False


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
    combined = _tied_combination(ta.combined, tb.combined, embed)
    for t in (ta, tb):
        t.replacement, t.loras, t.dora, t.combined = replacement, list(loras), dora, combined
    warnings.append(f"{embed} and {head} are tied (tie_word_embeddings) and both stored; both get the same merged tensor")


def _tied_combination(a: CombinedTerm | None, b: CombinedTerm | None, key: str) -> CombinedTerm | None:
    """One combined term for both halves of a stored tied pair: the parts of both (an adapter with
    modules on both halves has its two deltas summed as its task vector by PEFT's merge too)."""
    if a is None or b is None:
        return a or b
    if {i for i, _ in a.parts} & {i for i, _ in b.parts}:
        raise UnsupportedError(f"{key}: an adapter adapts both halves of a tied embedding pair; combining that with other adapters is not supported")
    return CombinedTerm(key, tuple(sorted(a.parts + b.parts, key=lambda p: p[0])), a.spec)


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
    combine: CombineSpec | None = None,
    mask_hook: Callable | None = None,
) -> dict:
    """Merge (``sign=+1``) or unmerge (``sign=-1``) an adapter into a base, streaming, into OUT.

    Args:
        base: base model folder or ``BaseModel`` (for unmerge: the merged model).
        adapter: adapter path (any format ``read_adapter`` detects) or ``Adapter``; a list of them
            merges several at once, combined as ``combine`` says (default: linear, weights 1).
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
        combine: how several adapters combine (``engine.combine.CombineSpec``: linear, ties, dare_linear,
            dare_ties, magnitude_prune, weights, density, seed); also applies to a single adapter.
        mask_hook: a test hook ``(weight, adapter index, kept mask)`` seeing each sparsifying mask.
    Returns:
        The report: per-module ||dW||, ||dW||/||W|| and seconds, counts, timings, warnings.
    Raises:
        ModuleMismatchError, UnsupportedError, InputError, OutputExistsError (all exit 2 in the CLI).
    """
    t0 = time.perf_counter()
    out = Path(out)
    base, adapters = _open_inputs(base, adapter)
    dev = resolve_device(device)
    inputs = [base.path] + [a.path for a in adapters if a.path is not None] + [Path(f).parent for a in adapters for f in a.files]
    check_output_path(out, force=force, inputs=inputs)
    if report_path is not None:
        check_output_path(Path(report_path), force=force, inputs=inputs)
    spec = (combine or CombineSpec.checked(len(adapters))) if len(adapters) > 1 or combine is not None else None
    plan, tensor_hook = _plan_for(base, adapters, spec, dtype=dtype, sign=sign, strict=strict, keep_modules_to_save=keep_modules_to_save,
                                  quantization=quantization, tensor_hook=tensor_hook, warn=warn)
    t_plan = time.perf_counter()
    with _one_core_for_the_writer():
        for a in adapters:
            check_adapter_finite(a)
        t_check = time.perf_counter()
        with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
            norms = report_path is not None if weight_norms is None else weight_norms
            result = execute_plan(plan, tmp, device=dev, progress=progress, tensor_hook=tensor_hook, weight_norms=norms,
                                  mask_hook=mask_hook)
            report = _report(plan, result, out, dev)
            if tensor_hook is not None and hasattr(tensor_hook, "finalize"):
                tensor_hook.finalize(tmp, report)
            t_commit = time.perf_counter()
        t_end = time.perf_counter()
    timings = {"plan_s": t_plan - t0, "check_s": t_check - t_plan, "stream_s": result["stream_s"], "compute_s": result["compute_s"],
               "write_s": result["write_s"], "commit_s": t_end - t_commit, "total_s": t_end - t0}
    report["timings"] = {k: round(v, 4) for k, v in timings.items()}
    if report_path is not None:
        write_side_output(Path(report_path), lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8"),
                          force=force, inputs=inputs, completed=out)
    return report


def _plan_for(base: BaseModel, adapters: list[Adapter], spec: CombineSpec | None, *, dtype, sign: int, strict: bool,
              keep_modules_to_save: bool, quantization: Any, tensor_hook: Any, warn) -> tuple[MergePlan, Any]:
    """The plan of one merge and the tensor hook it runs with: adapters combined as ``spec`` says, or
    (``spec`` None) one adapter, through bitsandbytes when the base or the options say so (a
    dequantizing view of the base and a hook that quantizes the output)."""
    if spec is not None:
        _refuse_combined_options(base, spec, len(adapters), sign=sign, quantization=quantization, tensor_hook=tensor_hook)
        return _plan_explained(base, adapters, warn, combine=spec, dtype=dtype, strict=strict), tensor_hook
    from loratool.quantized import setup_quantization

    base, tensor_hook = setup_quantization(base, adapters[0], quantization, dtype=resolve_dtype(dtype), sign=sign,
                                           tensor_hook=as_tensor_hook(tensor_hook), warn=warn)
    plan = _plan_explained(base, adapters, warn, dtype=dtype, sign=sign, keep_modules_to_save=keep_modules_to_save,
                           strict=strict, tensor_hook=tensor_hook)
    return plan, tensor_hook


def _open_inputs(base, adapter) -> tuple[BaseModel, list[Adapter]]:
    """The base and the adapter(s), each opened if given as a path."""
    if not isinstance(base, BaseModel):
        base = BaseModel.open(base)
    adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter]
    if not adapters:
        raise InputError("no adapter to merge")
    if not all(isinstance(a, Adapter) for a in adapters):
        from loratool.formats import read_adapter

        adapters = [a if isinstance(a, Adapter) else read_adapter(a) for a in adapters]
    return base, adapters


def _refuse_combined_options(base: BaseModel, spec: CombineSpec, n: int, *, sign: int, quantization: Any, tensor_hook: Any) -> None:
    """What a merge of several adapters (or one with --method / --weights) does not do."""
    if len(spec.weights) != n:
        raise InputError(f"{len(spec.weights)} weights for {n} adapters")
    if sign < 0:
        raise UnsupportedError("unmerge takes one adapter; unmerging a combination is not supported")
    quantized = getattr(quantization, "active", False) or isinstance(base.config.get("quantization_config"), dict)
    if quantized:
        raise UnsupportedError("several adapters (or --method / --weights) into a quantized model are not supported; merge into the 16-bit base")
    if tensor_hook is not None:
        raise UnsupportedError("a tensor hook with several adapters is not supported")


def _plan_explained(base: BaseModel, adapters: list[Adapter], warn: Callable[[str], None] | None, *,
                    combine: CombineSpec | None = None, **options) -> MergePlan:
    """``plan_merge`` (or ``plan_combined_merge``), with its warnings passed to ``warn`` as soon as
    they are known, and a refused module preceded by the likely cause (an adapter trained on another model)."""
    try:
        if combine is not None:
            plan = plan_combined_merge(base, adapters, combine, **options)
        else:
            plan = plan_merge(base, adapters[0], **options)
    except ModuleMismatchError:
        if options.get("sign", 1) > 0 and warn is not None:
            for mismatch in filter(None, (base_mismatch(a, base) for a in adapters)):
                warn(mismatch)
        raise
    if warn is not None:
        for w in plan.warnings:
            warn(w)
    return plan


@contextlib.contextmanager
def _one_core_for_the_writer() -> Iterator[None]:
    """The calling thread writes while the compute thread merges: leave it a core (on a small
    machine, two torch threads fighting the writer cost more than they give)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    if plan.combine is not None:
        report["adapters"] = [str(a.path) if a.path else None for a in plan.adapters]
        report["combination"] = plan.combine.as_dict()
        report["combined"] = [result["combined"][t.name].as_dict() for t in plan.tasks() if t.name in result["combined"]]
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
