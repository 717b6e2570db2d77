"""Quantization-aware merging: the glue between the merge engine and ``loratool.engine.codecs.bnb``.

Three things plug into ``loratool.merge.merge_model`` through ``setup_quantization``:

* a *view* of the base (``QuantizedView``) that the engine reads instead of the files:
  with ``--qlora`` every weight transformers quantizes reads as dequantize(quantize(W)), the
  weight the adapter was trained against; a base saved by bitsandbytes (4-bit or 8-bit)
  reads as its dequantized weights, its bookkeeping tensors hidden. Other tensors pass
  through untouched (still copied byte for byte).
* a tensor hook (``QuantizeHook``) that, with ``--quantize``, turns each finished weight
  into bitsandbytes' serialized tensors, and for every adapted module measures how much of
  its delta survives the output (``modules[].retention`` in the report);
* its ``finalize`` step, which writes ``quantization_config`` into config.json (or removes
  it from a dequantized base) and adds the quantization summary to the report.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from loratool.adapter import Adapter, LoraModule
from loratool.base import BaseModel, is_conv1d
from loratool.engine.codecs import bnb as q
from loratool.engine.delta import DeltaKernel, dora_merged
from loratool.errors import FormatError, InputError, UnsupportedError
from loratool.io.store import TensorEntry, TensorStore
from loratool.io.writer import trim_padded

_LONGEST_FLOAT = -2.2250738585072014e-308  # the longest repr a double can have (24 characters)


@dataclass(frozen=True)
class QuantOptions:
    """What the user asked for: ``qlora`` (nf4/fp4), ``quantize`` (nf4/fp4/int8) and settings."""

    qlora: str | None = None
    quantize: str | None = None
    blocksize: int = q.TRANSFORMERS_BLOCKSIZE
    double_quant: bool = False
    retention_threshold: float = q.DEFAULT_RETENTION_THRESHOLD

    def __post_init__(self) -> None:
        if self.qlora is not None and self.qlora not in ("nf4", "fp4"):
            raise InputError(f"--qlora {self.qlora}: choose nf4 or fp4 (QLoRA trains on a 4-bit base)")
        if not 0.0 <= self.retention_threshold <= 1.0:
            raise InputError(f"--retention-threshold {self.retention_threshold}: choose a fraction between 0 and 1")

    @property
    def active(self) -> bool:
        return self.qlora is not None or self.quantize is not None


# ---------------------------------------------------------------------------------------------
# the base as the engine should see it


@dataclass
class _Logical:
    """One weight the view computes instead of reading: its shape, dtype and how to make it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


class QuantizedView:
    """(A ``io.store.TensorReader``.) A TensorStore look-alike over a base store with some weights computed, not read.

    Computed weights have entries without byte offsets (so the engine never copies them
    raw) and are produced once: the last one is cached, because the engine reads a tensor
    in row blocks.
    """

    def __init__(self, inner: TensorStore, logical: dict[str, _Logical], hidden: set[str]):
        self.inner = inner
        self.logical = logical
        self.hidden = hidden
        self.files = inner.files
        self.metadata = inner.metadata
        self.extras = inner.extras
        self._cache: tuple[str, torch.Tensor] | None = None

    def keys(self) -> list[str]:
        return [k for k in self.inner.keys() if k not in self.hidden]

    def __contains__(self, name: str) -> bool:
        return name in self.inner and name not in self.hidden

    def __len__(self) -> int:
        return len(self.keys())

    def entry(self, name: str) -> TensorEntry:
        if name in self.hidden:
            raise KeyError(name)
        e = self.inner.entry(name)
        lg = self.logical.get(name)
        if lg is None:
            return e
        return TensorEntry(name, e.path, lg.dtype, lg.shape, None, None, None)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entry(name).dtype

    def entries(self) -> Iterator[TensorEntry]:
        return (self.entry(e.name) for e in self.inner.entries() if e.name not in self.hidden)

    @property
    def is_safetensors(self) -> bool:
        return self.inner.is_safetensors

    def get(self, name: str) -> torch.Tensor:
        lg = self.logical.get(name)
        if lg is None:
            return self.inner.get(name)
        if self._cache is not None and self._cache[0] == name:
            return self._cache[1]
        t = lg.make()
        if tuple(t.shape) != lg.shape or t.dtype != lg.dtype:  # pragma: no cover - internal invariant
            raise RuntimeError(f"{name}: computed {t.dtype} {tuple(t.shape)}, expected {lg.dtype} {lg.shape}")
        self._cache = (name, t)
        return t

    def lazy(self, name: str):
        from loratool.io.store import LazyTensor

        e = self.entry(name)
        return LazyTensor(e.shape, e.dtype, lambda: self.get(name))

    def close(self) -> None:
        self._cache = None
        self.inner.close()

    def __enter__(self) -> "QuantizedView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class PrequantizedWeight:
    """A weight a bitsandbytes checkpoint stores quantized: its keys and logical layout."""

    key: str  # M.weight
    aux: list[str]  # the bookkeeping keys next to it
    method: str  # nf4 | fp4 | int8
    shape: tuple[int, ...]  # (out, in) as quantized
    transposed: bool  # stored for a Conv1D module: the checkpoint's layout is (in, out)


def load_dtype(config: dict, store, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype transformers loads a model in by default (``dtype="auto"``): ``dtype`` when
    given (the merge's --dtype), else config.json's ``dtype`` / ``torch_dtype``, else the first
    floating tensor of the checkpoint."""
    if dtype is not None:
        return dtype
    for key in ("dtype", "torch_dtype"):
        if config.get(key):
            try:
                return q.dtype_from_name(config[key], what=f"config.json {key}")
            except InputError:
                break
    for e in store.entries():
        if e.dtype.is_floating_point:
            return e.dtype
    return torch.float32


def find_prequantized(base: BaseModel) -> list[PrequantizedWeight]:
    """The bitsandbytes-quantized weights of a base checkpoint (empty for a 16-bit base).

    Raises:
        FormatError: a quantized weight without its quant state.
    """
    keys = set(base.store.keys())
    found = []
    for key in base.store.keys():
        if not key.endswith(".weight") or q.is_quantized_aux_key(key):
            continue
        aux = q.aux_keys(key, keys)
        if not aux:
            continue
        module = key.removesuffix(".weight")
        transposed = is_conv1d(base.model_type, module)
        if f"{module}.SCB" in aux:
            shape = tuple(base.store.shape(key))
            found.append(PrequantizedWeight(key, aux, "int8", shape, transposed))
            continue
        blob = [k for k in aux if ".quant_state.bitsandbytes__" in k]
        if len(blob) != 1:
            raise FormatError(base.path, f"{key}: 4-bit weight without exactly one quant_state.bitsandbytes__* entry")
        info = q.quant_state_info(base.store.get(blob[0]))
        shape = info.get("shape")
        if not isinstance(shape, list) or len(shape) != 2:
            raise FormatError(base.path, f"{key}: quant state has no 2-D shape")
        found.append(PrequantizedWeight(key, aux, blob[0].rsplit("__", 1)[1], tuple(int(s) for s in shape), transposed))
    return found


def _dequantizer(base: BaseModel, w: PrequantizedWeight, dtype: torch.dtype) -> _Logical:
    def make() -> torch.Tensor:
        tensors = {k: base.store.get(k) for k in [w.key, *w.aux]}
        dense = q.dequantize_weight(q.relative_entries(w.key, tensors))
        if w.method == "int8":
            dense = dense.to(dtype)  # int8 dequantizes to float32; the model computes in its dtype
        return (dense.T if w.transposed else dense).contiguous()

    if w.method == "int8":
        out_dtype = dtype
    else:
        blob = next(k for k in w.aux if ".quant_state.bitsandbytes__" in k)
        out_dtype = q.dtype_from_name(q.quant_state_info(base.store.get(blob)).get("dtype", "float32"))
    shape = (w.shape[1], w.shape[0]) if w.transposed else w.shape
    return _Logical(shape, out_dtype, make)


def _fake_quantizer(base: BaseModel, key: str, kind: str, spec: q.QuantSpec, dtype: torch.dtype) -> _Logical:
    stored = base.store.dtype(key)

    def make() -> torch.Tensor:
        w = base.store.get(key).to(dtype)
        w = w.T if kind == "conv1d" else w
        eff = q.fake_quantize(w, spec)
        return (eff.T if kind == "conv1d" else eff).to(stored).contiguous()

    return _Logical(tuple(base.store.shape(key)), stored, make)


# ---------------------------------------------------------------------------------------------
# the hook


class QuantizeHook:
    """Per-tensor work for the merge engine (see loratool.merge's module docstring)."""

    def __init__(
        self,
        *,
        base: BaseModel,
        raw: BaseModel,
        adapter: Adapter,
        reference: q.QuantSpec | None,
        output: q.QuantSpec | None,
        dtype: torch.dtype,
        out_dtype: torch.dtype | None,
        threshold: float,
        prequantized: dict[str, PrequantizedWeight],
        base_spec: q.QuantSpec | None,
        warnings: list[str],
        warn: Callable[[str], None] | None,
    ):
        self.base = base  # the view
        self.raw = raw  # the files as they are
        self.adapter = adapter
        self.reference = reference  # what the adapter was trained against (QLoRA / quantized base)
        self.output = output  # --quantize
        self.dtype = dtype  # input dtype of quantization: what transformers loads OUT in
        self.out_dtype = out_dtype
        self.threshold = threshold
        self.prequantized = prequantized
        self.base_spec = base_spec
        self.warnings = warnings
        self.warn = warn
        self.out_keys = q.quantized_weight_keys(base, output) if output is not None else {}
        self.passthrough = self._passthrough_keys()
        self.retention: dict[str, q.Retention] = {}
        self.padded: dict[str, int] = {}  # blob name -> its exact length (see finalize)
        self._modules = self._modules_by_tensor()

    def _passthrough_keys(self) -> set[str]:
        """Prequantized weights that OUT can keep as they are (same settings, not adapted)."""
        if self.output is None or self.base_spec is None:
            return set()
        same = self.base_spec.method == self.output.method and (
            not self.output.is_4bit or (self.base_spec.blocksize, self.base_spec.double_quant) == (self.output.blocksize, self.output.double_quant)
        )
        return {k for k, w in self.prequantized.items() if same and w.method == self.output.method and k in self.out_keys} if same else set()

    def _modules_by_tensor(self) -> dict[str, list[LoraModule]]:
        out: dict[str, list[LoraModule]] = defaultdict(list)
        for name, mod in self.adapter.modules.items():
            key = self.base.weight_name(name)
            if key is not None:
                out[key].append(mod)
        return out

    # -- plan time --
    def specs(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], touched: bool):
        if name in self.out_keys:
            if name in self.passthrough and not touched:
                return [(k, self.raw.store.dtype(k), tuple(self.raw.store.shape(k))) for k in [name, *self.prequantized[name].aux]]
            return self._quantized_specs(name, shape)
        if touched and name in self._modules:
            return [(name, dtype, shape)]  # seen only to measure retention
        return None

    def _quantized_specs(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        spec = self.output
        module = name.removesuffix(".weight")
        rows, cols = (shape[1], shape[0]) if self.out_keys[name] == "conv1d" else shape
        n = rows * cols
        if not spec.is_4bit:
            return [(name, torch.int8, (rows, cols)), (f"{module}.SCB", torch.float32, (rows,)), (f"{module}.weight_format", torch.uint8, ())]
        blocks = -(-n // spec.blocksize)
        out = [(name, torch.uint8, ((n + 1) // 2, 1))]
        if spec.double_quant:
            out += [
                (f"{name}.absmax", torch.uint8, (blocks,)),
                (f"{name}.quant_map", torch.float32, (16,)),
                (f"{name}.nested_absmax", torch.float32, (-(-blocks // q.NESTED_BLOCKSIZE),)),
                (f"{name}.nested_quant_map", torch.float32, (256,)),
            ]
        else:
            out += [(f"{name}.absmax", torch.float32, (blocks,)), (f"{name}.quant_map", torch.float32, (16,))]
        blob = f"{name}.quant_state.bitsandbytes__{spec.method}"
        out.append((blob, torch.uint8, (len(self._blob_text(rows, cols, _LONGEST_FLOAT if spec.double_quant else None)),)))
        return out

    def _blob_text(self, rows: int, cols: int, offset: float | None) -> bytes:
        """QuantState.as_dict(packed=True)'s JSON for a weight of this shape (the declared size)."""
        d = {"quant_type": self.output.method, "blocksize": self.output.blocksize, "dtype": q.dtype_name(self.dtype), "shape": [rows, cols]}
        if offset is not None:
            d.update({"nested_blocksize": q.NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": offset})
        return json.dumps(d).encode("utf-8")

    # -- execution --
    def __call__(self, name: str, tensor: torch.Tensor, touched: bool) -> dict[str, torch.Tensor]:
        if touched and name in self._modules:
            self._measure(name, tensor)
        if name not in self.out_keys:
            return {name: tensor}
        if name in self.passthrough and not touched:
            return {k: self.raw.store.get(k) for k in [name, *self.prequantized[name].aux]}
        w = tensor.to(self.dtype)
        w = w.T if self.out_keys[name] == "conv1d" else w
        module = name.removesuffix(".weight")
        produced = {f"{module}.{k}": v for k, v in q.quantize_weight(w, self.output).items()}
        blob = f"{name}.quant_state.bitsandbytes__{self.output.method}"
        if blob in produced and self.output.double_quant:
            # the declared size is an upper bound (the nested offset's digits are not known at
            # plan time); pad with JSON whitespace now, trim in finalize
            exact = produced[blob]
            rows, cols = w.shape
            size = len(self._blob_text(rows, cols, _LONGEST_FLOAT))
            self.padded[blob] = exact.numel()
            produced[blob] = torch.cat([exact, torch.full((size - exact.numel(),), ord(" "), dtype=torch.uint8)])
        return produced

    def _measure(self, name: str, merged_out: torch.Tensor) -> None:
        """Retention of every module updating ``name`` (one figure per tensor, shared)."""
        mods = self._modules[name]
        reference = self.base.store.get(name).to(torch.float32)  # the view: W, or deq(Q(W))
        if len(mods) == 1 and mods[0].magnitude is not None:
            delta = dora_merged(reference, mods[0]) - reference
        else:
            delta = sum(DeltaKernel.of(m).dense() for m in mods)  # stored layout
        if name in self.out_keys:
            conv = self.out_keys[name] == "conv1d"
            ref, d = (reference.T, delta.T) if conv else (reference, delta)
            ret = q.measure_retention(ref, d, self.output, dtype=self.dtype)
        else:
            ret = q.measure_retention(reference, delta, None, dtype=merged_out.dtype)
        for m in mods:
            self.retention[m.name] = ret

    # -- after the last shard --
    def finalize(self, folder: Path, report: dict) -> None:
        folder = Path(folder)
        saved = trim_padded(folder, self.padded) if self.padded else 0
        if saved:
            report["bytes_written"] = report.get("bytes_written", 0) - saved
        low = {}
        for entry in report.get("modules", []):
            ret = self.retention.get(entry["name"])
            if ret is None:
                continue
            entry["retention"] = dict(ret.as_dict(), low=ret.is_low(self.threshold))
            if ret.is_low(self.threshold):
                low[entry["name"]] = ret
        message = q.retention_warning(low, len(self.retention), self.output, self.threshold)
        report["quantization"] = {
            "reference": self.reference.as_dict() if self.reference is not None else None,
            "base_quantized": self.base_spec.as_dict() if self.base_spec is not None else None,
            "output": self.output.as_dict() if self.output is not None else {"method": None, "dtype": q.dtype_name(self.out_dtype or self.dtype)},
            "quantized_tensors": len(self.out_keys),
            "kept_quantized": len(self.passthrough),
            "retention_threshold": self.threshold,
            "retention": summarize(self.retention),
        }
        report.setdefault("warnings", []).extend(self.warnings)  # already shown when they arose
        if message:
            report["warnings"].append(message)
            if self.warn is not None:
                self.warn(message)

    def config_patch(self, config: dict) -> dict:
        """config.json of the output (the model writer applies it): the bitsandbytes codec's
        quantization_config, or none when the output is 16-bit (a --qlora merge of a 4-bit base)."""
        config = dict(config)
        if self.output is not None:
            config["quantization_config"] = self.output.to_config()
            config["dtype"] = q.dtype_name(self.dtype)
        else:
            config.pop("quantization_config", None)
        return config


def summarize(retention: dict[str, q.Retention]) -> list[dict]:
    """Retention grouped by module type (the last name component: q_proj, c_attn...)."""
    groups: dict[str, list[q.Retention]] = defaultdict(list)
    for name, r in retention.items():
        groups[name.rsplit(".", 1)[-1]].append(r)
    rows = []
    for leaf, rs in sorted(groups.items()):
        kept = sorted(r.retained for r in rs)
        rows.append({
            "module": leaf,
            "count": len(rs),
            "retained_mean": sum(kept) / len(kept),
            "retained_min": kept[0],
            "rel_error_mean": sum(r.rel_error for r in rs) / len(rs),
            "unchanged_mean": sum(r.unchanged for r in rs) / len(rs),
            "delta_ratio_mean": sum(r.delta_ratio for r in rs) / len(rs),
        })
    return rows


# ---------------------------------------------------------------------------------------------
# entry point for the engine


def setup_quantization(
    base: BaseModel,
    adapter: Adapter,
    options: QuantOptions | None,
    *,
    dtype: torch.dtype | None = None,
    sign: int = 1,
    tensor_hook=None,
    warn: Callable[[str], None] | None = None,
) -> tuple[BaseModel, object]:
    """The base the engine should read and the hook it should call, for ``options``.

    ``dtype`` is the merge's output dtype, already resolved (None: each tensor's own).

    A plain merge into a 16-bit base gets ``(base, tensor_hook)`` back unchanged.

    Raises:
        InputError, UnsupportedError: conflicting options, or a base transformers cannot build.
    """
    options = options or QuantOptions()
    qc = base.config.get("quantization_config")
    if options.active and isinstance(qc, dict) and str(qc.get("quant_method", "bitsandbytes")).lower() != "bitsandbytes":
        raise UnsupportedError(
            f"BASE is quantized with {qc.get('quant_method')}; --qlora / --quantize handle bitsandbytes only "
            "(a GPTQ base with a QA-LoRA adapter: merge --qalora)"
        )
    prequantized = find_prequantized(base)
    if not options.active and not prequantized:
        return base, tensor_hook
    if tensor_hook is not None:
        raise UnsupportedError("quantization cannot be combined with another tensor hook")
    if sign < 0 and options.active:
        raise UnsupportedError("--qlora / --quantize apply to merge only, not to unmerge")
    out_dtype = dtype
    warnings: list[str] = []
    base_spec = None
    if prequantized:
        base_spec = q.QuantSpec.from_config(qc, source="base config.json") if isinstance(qc, dict) else None
        if base_spec is None:
            methods = {w.method for w in prequantized}
            base_spec = q.QuantSpec(methods.pop() if len(methods) == 1 else "nf4", source="base checkpoint")
    recorded = base_spec or q.recorded_spec(("adapter config", adapter.config))

    flags_ref = None
    if options.qlora is not None:
        flags_ref = q.QuantSpec(options.qlora, blocksize=options.blocksize, double_quant=options.double_quant)
        if prequantized:
            warnings.append(f"BASE is already {base_spec.describe()}: --qlora only confirms it, the quantized weights are dequantized as they are")
    reference, more = q.resolve_spec(flags_ref, recorded if (options.qlora is not None or prequantized) else None)
    warnings += more
    ldtype = load_dtype(base.config, base.store, out_dtype)

    logical: dict[str, _Logical] = {}
    hidden: set[str] = set()
    pre = {w.key: w for w in prequantized}
    for w in prequantized:
        logical[w.key] = _dequantizer(base, w, ldtype)
        hidden.update(w.aux)
    if reference is not None and not prequantized:
        for key, kind in q.quantized_weight_keys(base, reference).items():
            logical[key] = _fake_quantizer(base, key, kind, reference, load_dtype(base.config, base.store))
    view = BaseModel(path=base.path, config=base.config, store=QuantizedView(base.store, logical, hidden))

    output = None
    if options.quantize is not None:
        compute = reference.compute_dtype if reference is not None else torch.float32
        output = q.QuantSpec(options.quantize, blocksize=options.blocksize, double_quant=options.double_quant, compute_dtype=compute)
        if output.is_4bit and output.blocksize != q.TRANSFORMERS_BLOCKSIZE:
            warnings.append(
                f"blocksize {output.blocksize}: transformers always quantizes with blocksize 64; OUT loads fine "
                "but differs from what transformers would make of the 16-bit merge"
            )
    if warn is not None:
        for w in warnings:
            warn(w)
    hook = QuantizeHook(
        base=view, raw=base, adapter=adapter, reference=reference, output=output, dtype=ldtype, out_dtype=out_dtype,
        threshold=options.retention_threshold, prequantized=pre, base_spec=base_spec, warnings=warnings, warn=warn,
    )
    return view, hook
