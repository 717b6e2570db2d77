"""QA-LoRA merges into GPTQ checkpoints, streamed one tensor at a time (see docs/qalora.md).

``merge_qalora`` reads a GPTQ folder (config.json with ``quantization_config``, or an AutoGPTQ
``quantize_config.json``) and a QA-LoRA adapter, and writes one of three outputs:

    dense        a 16-bit model with ``<module>.weight = deq(base) + dW``; exact up to the
                 rounding of the output dtype; any loader reads it
    float-zeros  qweight, scales and g_idx unchanged, the merged zero points stored in float
                 as ``<module>.zeros``; exact; read with ``DequantizedCheckpoint``
    gptq         a standard GPTQ checkpoint with the merged zero points rounded to integers:
                 low-bit everywhere, no longer exact (the report gives the error per module)

The math lives in ``loratool.ops.qalora`` (pooling conventions, fold into zeros) and
``loratool.engine.codecs.gptq`` (packed layout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from loratool.adapter import Adapter, LoraModule, ModuleKind
from loratool.base import SIDE_FILES, BaseModel, side_files
from loratool.engine.codecs import gptq as G
from loratool.engine.stream import MergePlan, ShardPlan, TensorTask, execute_plan
from loratool.errors import (
    FormatError,
    InputError,
    ModuleMismatchError,
    UnsupportedError,
)
from loratool.io.atomic import atomic_output_dir, check_output_path, write_side_output
from loratool.io.store import TensorEntry, TensorStore, entries_in_file_order, read_json
from loratool.io.writer import output_shard_names
from loratool.ops import qalora as Q

TO_CHOICES = ("dense", "float-zeros", "gptq")
POOLINGS = Q.POOLINGS
FLOAT_ZEROS_METHOD = "loratool_float_zeros"
FLOAT_ZEROS_LAYOUT = "gptq-float-zeros/1"
_QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".zeros")


# ----------------------------------------------------------------------------- the GPTQ checkpoint


@dataclass
class QuantConfig:
    """What a checkpoint's quantization config says, normalized."""

    method: str  # "gptq" or FLOAT_ZEROS_METHOD
    bits: int
    group_size: int  # -1: one group per output column
    desc_act: bool
    sym: bool | None
    zero_format: str  # "v1" or "v2": how the packed qzeros store their zero points
    source: str  # which file said so
    raw: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "zero_format": self.zero_format,
            "checkpoint_format": "gptq" if self.zero_format == "v1" else "gptq_v2",
            "source": self.source,
        }


def read_quant_config(folder: Path | str, config: dict | None = None) -> QuantConfig:
    """The quantization config of a GPTQ (or loratool float-zeros) checkpoint folder.

    ``checkpoint_format`` (or the newer ``format``) "gptq" means v1 zero points (stored
    zero - 1), "gptq_v2" v2 (stored as is); without either, v1 (AutoGPTQ's default).

    Raises:
        FormatError: no quantization config, or malformed fields.
        UnsupportedError: another quantization method, packing format or bit width.
    """
    folder = Path(folder)
    if config is None:
        config = read_json(folder / "config.json")
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    source = "config.json quantization_config"
    if not qc and (folder / "quantize_config.json").is_file():
        qc = read_json(folder / "quantize_config.json")
        source = "quantize_config.json"
    if not qc:
        raise FormatError(folder, "not a GPTQ checkpoint: config.json has no quantization_config and there is no quantize_config.json")
    if not isinstance(qc, dict):
        raise FormatError(folder, f"{source} is not a JSON object")
    method = str(qc.get("quant_method", "gptq")).lower()
    if method not in ("gptq", FLOAT_ZEROS_METHOD):
        raise UnsupportedError(f"{folder}: quant_method {method!r} is not GPTQ (only GPTQ checkpoints hold the group-wise zero points QA-LoRA folds into)")
    if qc.get("is_marlin_format"):
        raise UnsupportedError(f"{folder}: Marlin-repacked GPTQ weights are not supported (use the plain GPTQ checkpoint)")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if method == FLOAT_ZEROS_METHOD:
        fmt = {"v1": "gptq", "v2": "gptq_v2"}.get(str(qc.get("zero_format", "v1")), fmt)
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedError(f"{folder}: GPTQ checkpoint_format {fmt!r} is not supported (gptq and gptq_v2 are)")
    pack_dtype = qc.get("pack_dtype")
    if pack_dtype is not None and str(pack_dtype).replace("torch.", "") != "int32":
        raise UnsupportedError(f"{folder}: pack_dtype {pack_dtype!r} is not supported (GPTQ checkpoints pack into int32)")
    bits = qc.get("bits", 4)
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise FormatError(folder, f"{source}: bits must be an integer, got {bits!r}")
    if bits not in G.SUPPORTED_BITS:
        raise UnsupportedError(f"{folder}: {bits}-bit GPTQ is not supported (bits {', '.join(map(str, G.SUPPORTED_BITS))} are)")
    group_size = qc.get("group_size", 128)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size == 0 or group_size < -1:
        raise FormatError(folder, f"{source}: group_size must be a positive integer or -1, got {group_size!r}")
    sym = qc.get("sym")
    return QuantConfig(
        method=method,
        bits=bits,
        group_size=group_size,
        desc_act=bool(qc.get("desc_act", False)),
        sym=None if sym is None else bool(sym),
        zero_format="v1" if fmt == "gptq" else "v2",
        source=source,
        raw=dict(qc),
    )


@dataclass
class QuantLinear:
    """Where the tensors of one quantized linear live in a checkpoint, and its dimensions."""

    prefix: str  # the base's tensor-name prefix, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int
    groups: int
    bits: int
    float_zeros: bool  # zero points stored as ``<prefix>.zeros`` (float) rather than packed qzeros
    has_g_idx: bool
    has_bias: bool

    def key(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    @property
    def zeros_key(self) -> str:
        return self.key("zeros" if self.float_zeros else "qzeros")

    def g_idx(self, store: TensorStore, group_size: int) -> torch.Tensor:
        """The (in,) group of each input, read or derived (i // group_size)."""
        if not self.has_g_idx:
            gs = group_size if group_size > 0 else self.in_features
            return G.default_g_idx(self.in_features, gs)
        g = store.get(self.key("g_idx")).to(torch.int64)
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= self.groups):
            raise FormatError(store.entry(self.key("g_idx")).path, f"{self.key('g_idx')}: group indices must lie in [0, {self.groups}), got [{int(g.min())}, {int(g.max())}]")
        return g

    def zeros(self, store: TensorStore, zero_format: str) -> torch.Tensor:
        """(groups, out) zero points: float as stored in a float-zeros layout, else unpacked integers."""
        if self.float_zeros:
            return store.get(self.zeros_key)
        return G.unpack_qzeros(store.get(self.zeros_key), self.bits, zero_format)

    def dequantize(self, store: TensorStore, qcfg: QuantConfig, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) float weight."""
        return G.dequantize(
            store.get(self.key("qweight")),
            self.zeros(store, qcfg.zero_format),
            store.get(self.key("scales")),
            self.g_idx(store, qcfg.group_size),
            self.bits,
            dtype=dtype,
        )


def find_quant_linears(store: TensorStore, qcfg: QuantConfig) -> dict[str, QuantLinear]:
    """Every quantized linear of a checkpoint, by tensor-name prefix, with shapes checked.

    Raises:
        FormatError: a qweight without its scales or zero points, or inconsistent shapes.
    """
    found: dict[str, QuantLinear] = {}
    for key in store.keys():
        if not key.endswith(".qweight"):
            continue
        prefix = key[: -len(".qweight")]
        path = store.entry(key).path
        float_zeros = f"{prefix}.zeros" in store and f"{prefix}.qzeros" not in store
        zkey = f"{prefix}.zeros" if float_zeros else f"{prefix}.qzeros"
        for need in (f"{prefix}.scales", zkey):
            if need not in store:
                raise FormatError(path, f"{key} has no {need}")
        qshape, sshape, zshape = store.shape(key), store.shape(f"{prefix}.scales"), store.shape(zkey)
        if store.dtype(key) != torch.int32:
            raise UnsupportedError(f"{path}: {key} is {store.dtype(key)}; GPTQ packs into int32")
        has_g = f"{prefix}.g_idx" in store
        try:
            if float_zeros:
                if tuple(zshape) != tuple(sshape):
                    raise ValueError(f"zeros {tuple(zshape)} and scales {tuple(sshape)} differ in shape")
                if not has_g:
                    raise ValueError("a float-zeros module needs its g_idx")
                in_features = store.shape(f"{prefix}.g_idx")[0]
                if len(qshape) != 2 or qshape[1] != sshape[1] or (qshape[0] * 32) % in_features:
                    raise ValueError(f"qweight {tuple(qshape)} does not fit {in_features} inputs")
                bits = qshape[0] * 32 // in_features
                if bits not in G.SUPPORTED_BITS or G.packed_length(in_features, bits) != qshape[0]:
                    raise ValueError(f"qweight {tuple(qshape)} for {in_features} inputs is not a supported bit width")
                dims = {"in_features": in_features, "out_features": sshape[1], "groups": sshape[0], "bits": bits}
            else:
                dims = G.layer_dims(qshape, zshape, sshape)
            if has_g and tuple(store.shape(f"{prefix}.g_idx")) != (dims["in_features"],):
                raise ValueError(f"g_idx {tuple(store.shape(f'{prefix}.g_idx'))} does not match {dims['in_features']} inputs")
            if not has_g:
                gs = qcfg.group_size if qcfg.group_size > 0 else dims["in_features"]
                if -(-dims["in_features"] // gs) != dims["groups"]:
                    raise ValueError(f"{dims['groups']} groups do not fit {dims['in_features']} inputs in groups of {gs} (and there is no g_idx)")
        except ValueError as exc:
            raise FormatError(path, f"{prefix}: {exc}") from None
        found[prefix] = QuantLinear(
            prefix=prefix,
            float_zeros=float_zeros,
            has_g_idx=has_g,
            has_bias=f"{prefix}.bias" in store,
            **dims,
        )
    return found


def _open_base(base: BaseModel | str | Path) -> BaseModel:
    return base if isinstance(base, BaseModel) else BaseModel.open(base)


def _open_adapter(adapter: Adapter | str | Path) -> Adapter:
    if isinstance(adapter, Adapter):
        return adapter
    from loratool.formats import read_adapter

    return read_adapter(Path(adapter))


# ----------------------------------------------------------------------------- planning


@dataclass
class ModulePlan:
    """One adapter module bound to the checkpoint."""

    name: str  # adapter module name
    lora: LoraModule
    prefix: str  # base tensor-name prefix
    quant: QuantLinear | None  # None: a float weight in the base
    in_features: int
    out_features: int
    pool_size: int
    pooling: str
    factor: float
    obstacle: str | None = None  # why the delta does not fold into zero points
    stats: dict = field(default_factory=dict)

    def blocks(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(out, in / Lp) block deltas."""
        return Q.block_delta(
            self.lora.A.load(), self.lora.B.load(), self.lora.scale,
            pooling=self.pooling, in_features=self.in_features, pool_size=self.pool_size, dtype=dtype,
        )


def _config_pool_size(adapter: Adapter) -> int | None:
    value = adapter.config.get("qalora_group_size") if adapter.config else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FormatError(adapter.path or "adapter", f"qalora_group_size must be a positive integer, got {value!r}")
    return value


def resolve_convention(adapter: Adapter, pooling: str | None) -> tuple[str, str, list[str]]:
    """The pooling convention to apply: (name, where it came from, warnings).

    PEFT adapters with ``use_qalora`` use PEFT's convention; any other adapter is taken to come
    from the original QA-LoRA code, whose pooling is an average unless ``pooling`` says otherwise.
    """
    use_qalora = bool(adapter.config.get("use_qalora")) if adapter.config else False
    warnings: list[str] = []
    if pooling is not None:
        if pooling not in POOLINGS:
            raise InputError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if use_qalora and pooling != "peft":
            warnings.append(f"adapter_config.json sets use_qalora (PEFT's pooling: mean times the number of blocks) but --pooling {pooling} was given; using {pooling}")
        return pooling, "--pooling option", warnings
    if use_qalora:
        return "peft", "adapter_config.json use_qalora (PEFT: mean over each block times the number of blocks)", warnings
    return "avg", "default for adapters without use_qalora (the original QA-LoRA code's average pooling)", warnings


def plan_modules(
    adapter: Adapter,
    base: BaseModel,
    quant: dict[str, QuantLinear],
    qcfg: QuantConfig,
    *,
    pooling: str,
    group_size: int | None,
) -> list[ModulePlan]:
    """Bind every adapter module to the checkpoint and work out its pooling group size.

    Lp follows from the shapes (lora_A has in / Lp columns) and is checked against
    ``group_size`` and the adapter's ``qalora_group_size``.

    Raises:
        ModuleMismatchError: a module absent from the base or of the wrong shape.
        FormatError: the adapter's qalora_group_size contradicts its shapes.
        UnsupportedError: a module kind QA-LoRA cannot have (embedding, Conv1D).
    """
    cfg_lp = _config_pool_size(adapter)
    plans: list[ModulePlan] = []
    for name, mod in adapter.modules.items():
        if mod.kind is not ModuleKind.LINEAR:
            raise UnsupportedError(f"{name}: QA-LoRA merges apply to linear layers, not {mod.kind.value} modules")
        key = base.tensor_name(f"{name}.qweight")
        if key is not None:
            prefix = key[: -len(".qweight")]
            ql = quant[prefix]
            in_f, out_f = ql.in_features, ql.out_features
        else:
            key = base.tensor_name(f"{name}.weight")
            if key is None:
                raise ModuleMismatchError(name, f"adapter module is not in the GPTQ checkpoint {base.path} (no {name}.qweight or .weight)")
            shape = base.store.shape(key)
            if len(shape) != 2:
                raise ModuleMismatchError(name, f"base weight {key} is {tuple(shape)}, not a linear weight")
            prefix, ql = key[: -len(".weight")], None
            out_f, in_f = shape
        rank, cols = mod.A.shape
        if mod.B.shape != (out_f, rank):
            raise ModuleMismatchError(name, f"lora_B is {mod.B.shape} but the base module has {out_f} outputs and lora_A rank {rank}")
        if cols == 0 or in_f % cols:
            raise ModuleMismatchError(name, f"lora_A has {cols} columns, which does not divide the {in_f} inputs of {prefix}: not a QA-LoRA of this base")
        lp = in_f // cols
        if group_size is not None and group_size != lp:
            raise ModuleMismatchError(name, f"lora_A has {cols} columns for {in_f} inputs, so the pooling group size is {lp}, not --group-size {group_size}")
        if cfg_lp is not None and cfg_lp != lp:
            raise FormatError(adapter.path or "adapter", f"{name}: qalora_group_size is {cfg_lp} but lora_A has {cols} columns for {in_f} inputs (pooling group size {lp})")
        factor = Q.pooling_factor(pooling, in_f, lp)
        plan = ModulePlan(name, mod, prefix, ql, in_f, out_f, lp, pooling, factor)
        if ql is not None:
            g_idx = ql.g_idx(base.store, qcfg.group_size)
            plan.obstacle = Q.fold_obstacle(g_idx, ql.groups, lp, group_size=qcfg.group_size)
        plans.append(plan)
    return plans


# ----------------------------------------------------------------------------- writing


class _Merger:
    """Builds the output tensor list file by file, then streams it."""

    def __init__(self, base: BaseModel, qcfg: QuantConfig, quant: dict[str, QuantLinear], plans: list[ModulePlan],
                 to_save: dict[str, torch.Tensor | object], *, to: str, dtype: torch.dtype | None, zeros_dtype: torch.dtype):
        self.base, self.qcfg, self.quant, self.to = base, qcfg, quant, to
        self.store = base.store
        self.plans = {p.prefix: p for p in plans}
        self.to_save = to_save
        self.zeros_dtype = zeros_dtype
        first = next(iter(quant.values()), None)
        self.dtype = dtype or (self.store.dtype(first.key("scales")) if first else torch.float16)
        self.convert_floats = to == "dense" and dtype is not None  # --dtype: every floating tensor, as a plain merge

    def _compute_dtype(self, out_dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if out_dtype == torch.float64 else torch.float32

    # -- producers --
    def _dense_quant(self, ql: QuantLinear, plan: ModulePlan | None) -> torch.Tensor:
        cdt = self._compute_dtype(self.dtype)
        w = ql.dequantize(self.store, self.qcfg, dtype=cdt)
        if plan is not None:
            blocks = plan.blocks(torch.float64)
            plan.stats["max_abs_delta"] = float(blocks.abs().max()) if blocks.numel() else 0.0
            w += Q.expand_blocks(blocks.to(cdt), plan.pool_size)
        return w.to(self.dtype)

    def _dense_float(self, plan: ModulePlan, key: str, out_dtype: torch.dtype) -> torch.Tensor:
        w0 = self.store.get(key)
        cdt = self._compute_dtype(out_dtype)
        blocks = plan.blocks(torch.float64)
        plan.stats["max_abs_delta"] = float(blocks.abs().max()) if blocks.numel() else 0.0
        return (w0.to(cdt) + Q.expand_blocks(blocks.to(cdt), plan.pool_size)).to(out_dtype)

    def _folded(self, plan: ModulePlan) -> torch.Tensor:
        ql = plan.quant
        zeros = ql.zeros(self.store, self.qcfg.zero_format)
        scales = self.store.get(ql.key("scales"))
        g_idx = ql.g_idx(self.store, self.qcfg.group_size)
        blocks = plan.blocks(torch.float64)
        plan.stats["max_abs_delta"] = float(blocks.abs().max()) if blocks.numel() else 0.0
        try:
            return Q.fold_into_zeros(zeros, scales, blocks, g_idx, plan.pool_size)
        except ValueError as exc:
            raise UnsupportedError(f"{plan.name}: {exc}") from None

    def _float_zeros(self, plan: ModulePlan) -> torch.Tensor:
        z = self._folded(plan)
        plan.stats["max_zero_shift"] = float((z - plan.quant.zeros(self.store, self.qcfg.zero_format).to(torch.float64)).abs().max())
        return z.to(self.zeros_dtype)

    def _gptq_zeros(self, plan: ModulePlan) -> torch.Tensor:
        ql = plan.quant
        z = self._folded(plan)
        lo, hi = G.safe_zero_range(ql.bits, self.qcfg.zero_format)
        zi, stats = Q.round_zeros(z, lo, hi)
        scales = self.store.get(ql.key("scales")).to(torch.float64)
        used = torch.zeros(ql.groups, dtype=torch.bool)
        used[ql.g_idx(self.store, self.qcfg.group_size).unique()] = True
        err = (scales * (zi.to(torch.float64) - z)).abs()[used]
        stats["max_weight_error"] = float(err.max()) if err.numel() else 0.0
        stats["rms_weight_error"] = float(err.pow(2).mean().sqrt()) if err.numel() else 0.0
        plan.stats.update(stats)
        return G.pack_qzeros(zi, ql.bits, self.qcfg.zero_format)

    # -- the output tensors, as a plan for the stream --
    def shards(self, metadata: dict[str, str]) -> list[ShardPlan]:
        """One shard per base file that keeps a tensor, named as a merge names them; tensors in file order."""
        store = self.store
        tasks: dict[Path, list[TensorTask]] = {f: [] for f in store.files}
        handled: set[str] = set()
        for entry in entries_in_file_order(store):
            key = entry.name
            if key in handled:
                continue
            prefix, _, leaf = key.rpartition(".")
            ql = self.quant.get(prefix)
            if ql is not None and f".{leaf}" in _QUANT_SUFFIXES:
                tasks[store.entry(ql.key("qweight")).path].extend(self._quant_tasks(ql, handled))
            else:
                tasks[entry.path].append(self._float_task(entry))
                handled.add(key)
        names = output_shard_names(store.files)
        return [ShardPlan(names[path], ts, dict(metadata)) for path, ts in tasks.items() if ts]

    def _float_task(self, entry: TensorEntry) -> TensorTask:
        """A tensor of the base that is not part of a quantized linear: merged (a float weight the
        adapter targets), replaced (modules_to_save), cast (--dtype) or copied."""
        key, shape = entry.name, tuple(entry.shape)
        dtype = self.dtype if self.convert_floats and entry.dtype.is_floating_point else entry.dtype
        prefix, _, leaf = key.rpartition(".")
        plan = self.plans.get(prefix) if leaf == "weight" else None
        if plan is not None:
            return _computed(key, dtype, shape, lambda: self._dense_float(plan, key, dtype))
        return _planned(TensorTask(key, entry, dtype, shape, replacement=self.to_save.get(key)))

    def _quant_tasks(self, ql: QuantLinear, handled: set[str]) -> list[TensorTask]:
        """The tensors a quantized linear becomes: one dense weight, or its GPTQ tensors with the
        zero points re-encoded where the adapter targets it."""
        plan = self.plans.get(ql.prefix)
        handled.update(k for k in (ql.key(s) for s in ("qweight", "qzeros", "zeros", "scales", "g_idx")) if k in self.store)
        if self.to == "dense":
            return [_computed(ql.key("weight"), self.dtype, (ql.out_features, ql.in_features), lambda: self._dense_quant(ql, plan))]
        tasks = [self._copy(ql.key("qweight"))]
        if plan is None:
            tasks.append(self._copy(ql.zeros_key))
        elif self.to == "float-zeros":
            tasks.append(_computed(ql.key("zeros"), self.zeros_dtype, (ql.groups, ql.out_features), lambda: self._float_zeros(plan)))
        else:
            tasks.append(_computed(ql.key("qzeros"), torch.int32, tuple(self.store.shape(ql.key("qzeros"))), lambda: self._gptq_zeros(plan)))
        tasks.append(self._copy(ql.key("scales")))
        if ql.has_g_idx:
            tasks.append(self._copy(ql.key("g_idx")))
        elif self.to == "float-zeros" and plan is not None:
            # the float-zeros layout always carries g_idx: it is how a reader finds ``in``
            tasks.append(_computed(ql.key("g_idx"), torch.int32, (ql.in_features,),
                                   lambda: ql.g_idx(self.store, self.qcfg.group_size).to(torch.int32)))
        return tasks

    def _copy(self, key: str) -> TensorTask:
        entry = self.store.entry(key)
        return _planned(TensorTask(key, entry, entry.dtype, tuple(entry.shape)))


def _planned(task: TensorTask) -> TensorTask:
    task.outputs = [(task.name, task.dtype, task.shape)]
    return task


def _computed(name: str, dtype: torch.dtype, shape: tuple[int, ...], compute: Callable[[], torch.Tensor]) -> TensorTask:
    return _planned(TensorTask(name, None, dtype, tuple(shape), compute=compute))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _output_config(config: dict, qcfg: QuantConfig, to: str, dtype: torch.dtype) -> dict:
    cfg = json.loads(json.dumps(config))
    if to == "dense":
        cfg.pop("quantization_config", None)
        for k in ("dtype", "torch_dtype"):
            if k in cfg:
                cfg[k] = _dtype_name(dtype)
        if "dtype" not in cfg and "torch_dtype" not in cfg:
            cfg["dtype"] = _dtype_name(dtype)
    elif to == "float-zeros":
        cfg["quantization_config"] = {
            "quant_method": FLOAT_ZEROS_METHOD,
            "layout": FLOAT_ZEROS_LAYOUT,
            "bits": qcfg.bits,
            "group_size": qcfg.group_size,
            "desc_act": qcfg.desc_act,
            "sym": qcfg.sym,
            "zero_format": qcfg.zero_format,
            "source_quantization_config": qcfg.raw,
        }
    elif qcfg.source == "config.json quantization_config":
        cfg["quantization_config"] = qcfg.raw
    return cfg


# ----------------------------------------------------------------------------- the merge


def merge_qalora(
    gptq_base: BaseModel | str | Path,
    adapter: Adapter | str | Path,
    out: str | Path,
    *,
    pooling: str | None = None,
    group_size: int | None = None,
    to: str = "dense",
    force: bool = False,
    report_path: str | Path | None = None,
    dtype: torch.dtype | None = None,
    zeros_dtype: torch.dtype = torch.float32,
    progress: Callable[[int, str], None] | None = None,
) -> dict:
    """Merge a QA-LoRA adapter into a GPTQ checkpoint, streaming, and write OUT atomically.

    Args:
        gptq_base: a GPTQ checkpoint folder (or an opened ``BaseModel`` of one).
        adapter: a QA-LoRA adapter folder (PEFT with ``use_qalora``, or from the original
            QA-LoRA code), or an ``Adapter`` already read.
        out: the output folder.
        pooling: "avg", "sum" or "peft"; default: "peft" when adapter_config.json sets
            use_qalora, else "avg" (the original code).
        group_size: the pooling group size Lp, checked against the shapes (lora_A is r x in/Lp).
        to: "dense" (16-bit weights, exact), "float-zeros" (low-bit codes, float zero points,
            exact) or "gptq" (integer zero points: standard, not exact).
        force: replace an existing OUT.
        report_path: also write the returned report there as JSON.
        dtype: dtype of merged dense weights (default: the dtype of the scales, usually float16).
        zeros_dtype: dtype of the float zero points of ``to="float-zeros"`` (float32 or float64).
        progress: called as ``progress(nbytes, tensor_name)`` as the output is written.
    Returns:
        A report: the quantization read, the pooling convention used and why, per-module
        statistics (for "gptq": the largest zero-point rounding and weight error), warnings.
    Raises:
        InputError: bad options. FormatError: unreadable inputs. ModuleMismatchError: the
        adapter does not fit. UnsupportedError: DoRA, LoRA bias, or a delta that does not fold
        into the zero points (act-order g_idx, Lp not a multiple of G) for float-zeros / gptq.
        OutputExistsError: OUT exists and not ``force``.
    """
    _check_options(to, group_size, zeros_dtype, dtype)
    base, ad, qcfg, quant = _open_inputs(gptq_base, adapter)
    pool_name, pool_source, warnings = resolve_convention(ad, pooling)
    warnings = list(ad.warnings) + warnings
    plans = plan_modules(ad, base, quant, qcfg, pooling=pool_name, group_size=group_size)
    warnings += _plan_warnings(plans, to, pooling, pool_name)
    merger = _Merger(base, qcfg, quant, plans, _resolve_modules_to_save(ad, base, quant), to=to, dtype=dtype, zeros_dtype=zeros_dtype)
    plan = _stream_plan(merger, ad, plans, warnings)
    inputs = [base.path] + ([ad.path] if ad.path is not None else [])
    if report_path is not None:
        check_output_path(Path(report_path), force=force, inputs=inputs)
    with atomic_output_dir(Path(out), force=force, inputs=inputs) as tmp:
        written = execute_plan(plan, tmp, progress=progress)["files"]

    report = _report(base, ad, qcfg, plans, to, out, pool_name, pool_source, warnings, merger.dtype, zeros_dtype, written)
    if report_path is not None:
        write_side_output(Path(report_path), lambda tmp_report: tmp_report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8"),
                          force=force, inputs=inputs, completed=Path(out))
    return report


def _check_options(to: str, group_size: int | None, zeros_dtype: torch.dtype, dtype: torch.dtype | None) -> None:
    if to not in TO_CHOICES:
        raise InputError(f"--to must be one of {', '.join(TO_CHOICES)}, got {to!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0):
        raise InputError(f"--group-size must be a positive integer, got {group_size!r}")
    if zeros_dtype not in (torch.float32, torch.float64):
        raise InputError(f"zeros_dtype must be float32 or float64, got {zeros_dtype}")
    if dtype is not None and not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating dtype, got {dtype}")


def _open_inputs(gptq_base, adapter) -> tuple[BaseModel, Adapter, QuantConfig, dict[str, QuantLinear]]:
    """The GPTQ base, its quantization config and quantized linears, and an adapter QA-LoRA can merge."""
    base = _open_base(gptq_base)
    qcfg = read_quant_config(base.path, base.config)
    if qcfg.method != "gptq":
        raise UnsupportedError(f"{base.path}: is a loratool float-zeros checkpoint; merge into the original GPTQ checkpoint instead")
    ad = _open_adapter(adapter)
    if ad.use_dora or any(m.magnitude is not None for m in ad.modules.values()):
        raise UnsupportedError("DoRA adapters cannot be merged into GPTQ zero points (the magnitude rescales whole rows); QA-LoRA has no DoRA variant")
    if ad.lora_bias or any(m.bias is not None for m in ad.modules.values()):
        raise UnsupportedError("adapters with a LoRA bias (lora_bias=True) are not supported by the QA-LoRA merge")
    if not ad.modules:
        raise InputError(f"{ad.path}: the adapter has no LoRA modules to merge")
    quant = find_quant_linears(base.store, qcfg)
    if not quant:
        raise FormatError(base.path, "has a GPTQ quantization config but no quantized linears (no *.qweight tensors)")
    return base, ad, qcfg, quant


def _plan_warnings(plans: list[ModulePlan], to: str, pooling: str | None, pool_name: str) -> list[str]:
    """What the user should know about the pooling found, and modules that cannot stay low-bit
    (refused unless ``to`` is dense)."""
    warnings = []
    if all(p.pool_size == 1 for p in plans):
        warnings.append("every lora_A spans all inputs: this is a plain LoRA, not QA-LoRA (nothing is pooled)")
    elif pooling is None and pool_name == "avg":
        warnings.append(
            "adapter_config.json has no use_qalora: assuming the original QA-LoRA code's average pooling "
            "(dW = scale * B @ A / Lp); pass --pooling sum for its README's sum variant, --pooling peft for PEFT's"
        )
    blocked = [p for p in plans if p.quant is not None and p.obstacle]
    if blocked and to != "dense":
        p = blocked[0]
        more = f" ({len(blocked) - 1} more modules alike)" if len(blocked) > 1 else ""
        raise UnsupportedError(f"{p.name}: cannot merge exactly into the zero points: {p.obstacle}{more}; --to dense merges it exactly into a 16-bit model")
    if blocked:
        warnings.append(f"{len(blocked)} modules cannot stay low-bit ({blocked[0].obstacle}); --to dense merges them exactly, --to float-zeros / gptq would refuse")
    return warnings


def _stream_plan(merger: _Merger, ad: Adapter, plans: list[ModulePlan], warnings: list[str]) -> MergePlan:
    """The merge as a plan for the one stream: GPTQ tensors copied or re-encoded, config.json patched
    with the output's quantization config, the base's side files (refused ones become warnings)."""
    base, to = merger.base, merger.to
    metadata = {"format": "pt"}
    if to == "float-zeros":
        metadata["loratool_layout"] = FLOAT_ZEROS_LAYOUT
    names = tuple(n for n in SIDE_FILES if n != "config.json") + (("quantize_config.json",) if to == "gptq" else ())
    side, refused = side_files(base.path, names)
    warnings.extend(refused)
    shards = merger.shards(metadata)
    return MergePlan(
        base=base, adapter=ad, sign=1, dtype=None, shards=shards, write_index=len(shards) > 1, index_metadata={},
        modules={p.name: p.prefix for p in plans}, modules_to_save=[], warnings=warnings, side_files=["config.json", *side],
        config_patch=lambda config: _output_config(config, merger.qcfg, to, merger.dtype),
    )


def _resolve_modules_to_save(adapter: Adapter, base: BaseModel, quant: dict[str, QuantLinear]) -> dict:
    resolved = {}
    for name, lazy in adapter.modules_to_save.items():
        key = base.tensor_name(name)
        if key is None:
            raise ModuleMismatchError(name, f"modules_to_save tensor is not in the GPTQ checkpoint {base.path}")
        module = key.rpartition(".")[0]
        if module in quant:
            raise UnsupportedError(f"{name}: modules_to_save replaces a quantized module, which the QA-LoRA merge cannot do")
        if tuple(lazy.shape) != tuple(base.store.shape(key)):
            raise ModuleMismatchError(name, f"modules_to_save tensor is {tuple(lazy.shape)}, base {key} is {tuple(base.store.shape(key))}")
        resolved[key] = lazy
    return resolved


def _report(base, adapter, qcfg, plans, to, out, pool_name, pool_source, warnings, dtype, zeros_dtype, written) -> dict:
    modules = []
    for p in plans:
        m = {
            "name": p.name,
            "tensor_prefix": p.prefix,
            "quantized": p.quant is not None,
            "in_features": p.in_features,
            "out_features": p.out_features,
            "rank": p.lora.rank,
            "pool_size": p.pool_size,
            "scale": p.lora.scale,
            "pooling_factor": p.factor,
            "foldable": p.quant is not None and p.obstacle is None,
        }
        if p.quant is not None:
            m.update(bits=p.quant.bits, groups=p.quant.groups)
        if p.obstacle:
            m["obstacle"] = p.obstacle
        m.update(p.stats)
        modules.append(m)
    sizes = sorted({p.pool_size for p in plans})
    report = {
        "out": str(out),
        "to": to,
        "exact": to != "gptq",
        "base": str(base.path),
        "adapter": str(adapter.path) if adapter.path is not None else None,
        "quantization": qcfg.as_dict(),
        "convention": {
            "pooling": pool_name,
            "pool_size": sizes[0] if len(sizes) == 1 else sizes,
            "source": pool_source,
            "delta": {
                "avg": "dW[o, i] = scale * (B @ A)[o, i // Lp] / Lp",
                "sum": "dW[o, i] = scale * (B @ A)[o, i // Lp]",
                "peft": "dW[o, i] = scale * (B @ A)[o, i // Lp] * (in / Lp) / Lp",
            }[pool_name],
        },
        "modules": modules,
        "files": written,
        "warnings": warnings,
    }
    if to == "dense":
        report["dtype"] = _dtype_name(dtype)
    if to == "float-zeros":
        report["zeros_dtype"] = _dtype_name(zeros_dtype)
    if to == "gptq":
        worst = max((m for m in modules if "max_weight_error" in m), key=lambda m: m["max_weight_error"], default=None)
        if worst is not None:
            report["max_zero_rounding"] = max(m["max_zero_rounding"] for m in modules if "max_zero_rounding" in m)
            report["max_weight_error"] = worst["max_weight_error"]
            clamped = sum(m.get("clamped", 0) for m in modules)
            warnings.append(
                f"--to gptq rounds the merged zero points to integers, so the model is no longer exact: largest "
                f"|zero' - round(zero')| {report['max_zero_rounding']:.4g}, largest weight error {worst['max_weight_error']:.4g} "
                f"({worst['name']})" + (f"; {clamped} zero points were clamped to the storable range" if clamped else "")
                + "; --to float-zeros keeps it exact"
            )
    return report


# ----------------------------------------------------------------------------- reading merged outputs


class DequantizedCheckpoint:
    """(A ``io.store.TensorReader``.) A GPTQ or float-zeros checkpoint seen as float tensors, read one at a time.

    Quantized linears appear as ``<prefix>.weight`` (out, in), dequantized; their qweight,
    qzeros / zeros, scales and g_idx do not appear; every other tensor is returned as stored.
    This is the reader ``verify`` uses to compare a merged low-bit model with its expectation.
    """

    def __init__(self, path: str | Path | BaseModel):
        self.base = _open_base(path)
        self.path = self.base.path
        self.qcfg = read_quant_config(self.path, self.base.config)
        self.store = self.base.store
        self.linears = find_quant_linears(self.store, self.qcfg)
        self.layout = "float-zeros" if self.qcfg.method == FLOAT_ZEROS_METHOD else "gptq"
        self._keys: dict[str, QuantLinear | None] = {}
        for entry in self.store.entries():
            prefix, _, leaf = entry.name.rpartition(".")
            ql = self.linears.get(prefix)
            if ql is not None and f".{leaf}" in _QUANT_SUFFIXES:
                if leaf == "qweight":
                    self._keys[ql.key("weight")] = ql
                continue
            self._keys[entry.name] = None

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def is_quantized(self, name: str) -> bool:
        return self._keys.get(name) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        ql = self._keys[name]
        return (ql.out_features, ql.in_features) if ql is not None else tuple(self.store.shape(name))

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype (for a quantized linear, that of its scales)."""
        ql = self._keys[name]
        return self.store.dtype(ql.key("scales")) if ql is not None else self.store.dtype(name)

    def get(self, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor; quantized linears are dequantized in ``dtype`` (default float32).

        Raises:
            KeyError: unknown name.
        """
        if name not in self._keys:
            raise KeyError(name)
        ql = self._keys[name]
        if ql is None:
            t = self.store.get(name)
            return t if dtype is None else t.to(dtype)
        return ql.dequantize(self.store, self.qcfg, dtype=dtype or torch.float32)

    def close(self) -> None:
        self.store.close()


def read_float_zeros(path: str | Path) -> DequantizedCheckpoint:
    """Open a ``merge_qalora(..., to="float-zeros")`` output for dequantized reading.

    Raises:
        FormatError: the folder is not in the float-zeros layout.
    """
    ckpt = DequantizedCheckpoint(path)
    if ckpt.layout != "float-zeros":
        raise FormatError(path, f"is not a loratool float-zeros checkpoint (quant_method is {ckpt.qcfg.method!r})")
    return ckpt


def is_gptq_checkpoint(path: str | Path) -> bool:
    """Whether a folder holds a GPTQ or float-zeros checkpoint (cheap: config files only)."""
    path = Path(path)
    try:
        config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
        read_quant_config(path, config if isinstance(config, dict) else {})
        return True
    except (FormatError, UnsupportedError):
        return False


def verify_qalora_merge(
    gptq_base: BaseModel | str | Path,
    adapter: Adapter | str | Path,
    merged: BaseModel | str | Path,
    *,
    pooling: str | None = None,
    group_size: int | None = None,
) -> dict:
    """Compare a merged output (dense, float-zeros or gptq) with deq(base) + dW, module by module.

    Returns:
        {"modules": [{"name", "max_abs_error", "max_abs_weight", "max_abs_delta"}], "max_abs_error"},
        errors in float64 between the merged weight and the exact expectation.
    Raises:
        As ``merge_qalora`` for the inputs; ModuleMismatchError when OUT lacks a module.
    """
    base = _open_base(gptq_base)
    qcfg = read_quant_config(base.path, base.config)
    ad = _open_adapter(adapter)
    quant = find_quant_linears(base.store, qcfg)
    pool_name, _, _ = resolve_convention(ad, pooling)
    plans = plan_modules(ad, base, quant, qcfg, pooling=pool_name, group_size=group_size)
    merged_base = _open_base(merged)
    if "quantization_config" in merged_base.config or (merged_base.path / "quantize_config.json").is_file():
        view = DequantizedCheckpoint(merged_base)
        get = lambda k: view.get(k, dtype=torch.float64)  # noqa: E731
        has = view.__contains__
    else:
        get = lambda k: merged_base.store.get(k).to(torch.float64)  # noqa: E731
        has = merged_base.store.__contains__
    rows, worst = [], 0.0
    for p in plans:
        key = f"{p.prefix}.weight"
        if not has(key):
            raise ModuleMismatchError(p.name, f"the merged model {merged_base.path} has no {key}")
        ref = p.quant.dequantize(base.store, qcfg, dtype=torch.float64) if p.quant is not None else base.store.get(key).to(torch.float64)
        blocks = p.blocks(torch.float64)
        ref += Q.expand_blocks(blocks, p.pool_size)
        err = float((get(key) - ref).abs().max())
        worst = max(worst, err)
        rows.append({"name": p.name, "max_abs_error": err, "max_abs_weight": float(ref.abs().max()), "max_abs_delta": float(blocks.abs().max())})
    return {"modules": rows, "max_abs_error": worst}
