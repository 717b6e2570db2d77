"""The bitsandbytes weight codec (NF4, FP4, LLM.int8): quantization as transformers applies it,
which weights, how they are saved, and how a stored weight decodes back to float32.

Everything here calls ``bitsandbytes.functional`` (the same functions ``Params4bit`` and
``Int8Params`` call when transformers loads a model with a ``BitsAndBytesConfig``), so the
results are bit-identical to what transformers produces, not an approximation of it.

Facts this module relies on (transformers 4.4x-5.x, bitsandbytes 0.4x-0.50):

* transformers quantizes every module whose type is exactly ``nn.Linear`` (or GPT-2's
  ``Conv1D``, transposed to (out, in) first) unless its name matches one of the
  "modules to not convert": ``llm_int8_skip_modules`` when given, else the tied weights, the
  module of the model's last parameter and the output embeddings (lm_head); plus the
  model's ``_keep_in_fp32_modules``. Embeddings, norms and biases are never quantized.
* A weight is quantized from the dtype the model is loaded in (config ``dtype``), with
  ``quantize_4bit(W, blocksize=64, compress_statistics=double_quant, quant_type=...)`` for
  4-bit and ``int8_vectorwise_quant(W.half())`` for 8-bit.
* Serialization of a 4-bit weight ``M.weight``: ``M.weight`` (packed, ``(ceil(n/2), 1)``),
  ``M.weight.absmax``, ``M.weight.quant_map``, ``M.weight.quant_state.bitsandbytes__<type>``
  (a JSON blob as uint8) and with double quantization ``M.weight.nested_absmax`` and
  ``M.weight.nested_quant_map``: exactly ``QuantState.as_dict(packed=True)``.
  An 8-bit weight: ``M.weight`` (int8, (out, in)), ``M.SCB`` (float32 row scales) and
  ``M.weight_format`` (uint8 scalar 0, "row").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from loratool.errors import InputError, UnsupportedError

QUANT_METHODS = ("nf4", "fp4", "int8")
FOUR_BIT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
TRANSFORMERS_BLOCKSIZE = 64  # Linear4bit never passes a blocksize, so Params4bit's default applies
NESTED_BLOCKSIZE = 256  # quantize_4bit's double quantization of absmax
INT8_ROW_FORMAT = 0  # bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"]
DEFAULT_RETENTION_THRESHOLD = 0.5

_QS_PREFIX = "quant_state.bitsandbytes__"
_FOUR_BIT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", _QS_PREFIX + "nf4", _QS_PREFIX + "fp4")
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
                "uint8": torch.uint8, "int8": torch.int8}


# bitsandbytes 0.49+ on a CPU with AVX512-BF16 asks the `kernels` package, while it is imported,
# for a compiled gemm from the Hub (kernels-community/quantization-bitsandbytes) and logs a
# warning from this logger when that fails; its own built-in CPU kernel is used either way.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def import_bitsandbytes():
    """``bitsandbytes.functional``, imported without any Hub download.

    loratool reaches the network only for repo ids and ``push``. bitsandbytes' CPU back end
    fetches a kernel at import time on some processors (see ``_BNB_CPU_LOGGER``); the import runs
    with ``kernels`` hidden (a ``None`` entry in ``sys.modules`` makes ``import kernels`` fail),
    so bitsandbytes falls back to the kernel it ships, and the warning about it is muted. Call this
    before anything (transformers included) imports bitsandbytes.

    Raises:
        UnsupportedError: bitsandbytes cannot be imported (missing, or a broken native library).
    """
    import logging
    import sys

    if "bitsandbytes.functional" in sys.modules:
        return sys.modules["bitsandbytes.functional"]
    logger = logging.getLogger(_BNB_CPU_LOGGER)
    saved_kernels, saved_disabled = sys.modules.get("kernels"), logger.disabled
    sys.modules["kernels"] = None  # type: ignore[assignment]
    logger.disabled = True
    try:
        import bitsandbytes.functional as F
    except Exception as exc:  # ImportError, or a broken native library
        raise UnsupportedError(f"bitsandbytes cannot be imported ({exc}); pip install bitsandbytes") from None
    finally:
        logger.disabled = saved_disabled
        if saved_kernels is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved_kernels
    return F




def dtype_from_name(name: object, *, what: str = "dtype") -> torch.dtype:
    """A torch dtype from a config string (``"bfloat16"``, ``"torch.float16"``) or a dtype.

    Raises:
        InputError: unknown name.
    """
    if isinstance(name, torch.dtype):
        return name
    text = str(name).removeprefix("torch.")
    if text not in _DTYPE_NAMES:
        raise InputError(f"unknown {what} {name!r} (expected one of {', '.join(_DTYPE_NAMES)})")
    return _DTYPE_NAMES[text]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class QuantSpec:
    """What a transformers ``BitsAndBytesConfig`` asks for, as far as the weights are concerned.

    ``method`` is ``nf4``, ``fp4`` or ``int8``. ``compute_dtype`` is the dtype a Linear4bit
    multiplies in (its dequantized weight is cast to it). ``skip_modules`` is
    ``llm_int8_skip_modules`` (None: transformers' default skips).
    """

    method: str
    blocksize: int = TRANSFORMERS_BLOCKSIZE
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.float32
    quant_storage: torch.dtype = torch.uint8
    int8_threshold: float = 6.0
    int8_has_fp16_weight: bool = False
    skip_modules: tuple[str, ...] | None = None
    source: str = "flags"  # where the settings came from, for reports

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise InputError(f"unknown quantization {self.method!r} (expected one of {', '.join(QUANT_METHODS)})")
        if self.is_4bit and self.blocksize not in FOUR_BIT_BLOCKSIZES:
            raise InputError(f"blocksize {self.blocksize} is not one bitsandbytes supports ({', '.join(map(str, FOUR_BIT_BLOCKSIZES))})")
        if self.compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InputError(f"compute dtype {self.compute_dtype} is not float32, float16 or bfloat16")

    @property
    def is_4bit(self) -> bool:
        return self.method in ("nf4", "fp4")

    @property
    def bits(self) -> int:
        return 4 if self.is_4bit else 8

    def describe(self) -> str:
        """A short label, e.g. ``nf4 (blocksize 64, double quant, compute bfloat16)``."""
        if not self.is_4bit:
            return "int8 (LLM.int8 row-wise)"
        parts = [f"blocksize {self.blocksize}"]
        if self.double_quant:
            parts.append("double quant")
        parts.append(f"compute {dtype_name(self.compute_dtype)}")
        return f"{self.method} ({', '.join(parts)})"

    def as_dict(self) -> dict:
        """The settings as plain JSON values (for reports)."""
        return {
            "method": self.method,
            "blocksize": self.blocksize if self.is_4bit else None,
            "double_quant": self.double_quant if self.is_4bit else None,
            "compute_dtype": dtype_name(self.compute_dtype) if self.is_4bit else None,
            "source": self.source,
        }

    def to_config(self) -> dict:
        """The ``quantization_config`` transformers writes into config.json for these settings."""
        four = self.is_4bit
        return {
            "_load_in_4bit": four,
            "_load_in_8bit": not four,
            "bnb_4bit_compute_dtype": dtype_name(self.compute_dtype),
            "bnb_4bit_quant_storage": dtype_name(self.quant_storage),
            "bnb_4bit_quant_type": self.method if four else "fp4",
            "bnb_4bit_use_double_quant": bool(self.double_quant and four),
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": self.int8_has_fp16_weight,
            "llm_int8_skip_modules": list(self.skip_modules) if self.skip_modules is not None else None,
            "llm_int8_threshold": float(self.int8_threshold),
            "load_in_4bit": four,
            "load_in_8bit": not four,
            "quant_method": "bitsandbytes",
        }

    @classmethod
    def from_config(cls, qc: Mapping, *, source: str = "config") -> "QuantSpec":
        """Settings from a ``quantization_config`` (config.json) as BitsAndBytesConfig reads it.

        Raises:
            UnsupportedError: another quantization method (GPTQ, AWQ...) or no bit width.
            InputError: malformed values.
        """
        if not isinstance(qc, Mapping):
            raise InputError("quantization_config is not a JSON object")
        method = str(qc.get("quant_method", "bitsandbytes")).lower()
        if method not in ("bitsandbytes", "bitsandbytes_4bit", "bitsandbytes_8bit"):
            raise UnsupportedError(f"quantization method {method!r} is not bitsandbytes; only bitsandbytes 4-bit/8-bit is supported")
        four = bool(qc.get("load_in_4bit", qc.get("_load_in_4bit", False))) or method == "bitsandbytes_4bit"
        eight = bool(qc.get("load_in_8bit", qc.get("_load_in_8bit", False))) or method == "bitsandbytes_8bit"
        if four == eight:
            raise InputError("quantization_config sets neither or both of load_in_4bit and load_in_8bit")
        skip = qc.get("llm_int8_skip_modules")
        if skip is not None and (not isinstance(skip, list) or not all(isinstance(s, str) for s in skip)):
            raise InputError("quantization_config llm_int8_skip_modules must be a list of strings")
        compute = qc.get("bnb_4bit_compute_dtype")
        storage = qc.get("bnb_4bit_quant_storage")
        return cls(
            method=str(qc.get("bnb_4bit_quant_type", "fp4")) if four else "int8",
            blocksize=int(qc.get("bnb_4bit_blocksize", TRANSFORMERS_BLOCKSIZE)),
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=torch.float32 if compute is None else dtype_from_name(compute, what="bnb_4bit_compute_dtype"),
            quant_storage=torch.uint8 if storage is None else dtype_from_name(storage, what="bnb_4bit_quant_storage"),
            int8_threshold=float(qc.get("llm_int8_threshold", 6.0)),
            int8_has_fp16_weight=bool(qc.get("llm_int8_has_fp16_weight", False)),
            skip_modules=tuple(skip) if skip is not None else None,
            source=source,
        )


def recorded_spec(*configs: tuple[str, Mapping | None]) -> QuantSpec | None:
    """The first bitsandbytes ``quantization_config`` found in (label, config) pairs, or None.

    An adapter's config rarely records it; a QLoRA base saved quantized always does.
    """
    for label, cfg in configs:
        if isinstance(cfg, Mapping) and isinstance(cfg.get("quantization_config"), Mapping):
            return QuantSpec.from_config(cfg["quantization_config"], source=label)
    return None


def resolve_spec(flags: QuantSpec | None, recorded: QuantSpec | None) -> tuple[QuantSpec | None, list[str]]:
    """Recorded settings win over flags; a disagreement is reported, never silently dropped.

    Returns:
        (the settings to use, warnings)
    """
    if recorded is None:
        return flags, []
    if flags is None:
        return recorded, []
    diffs = [
        f"{name} {getattr(flags, attr)!s} vs {getattr(recorded, attr)!s}"
        for name, attr in (("quantization", "method"), ("blocksize", "blocksize"), ("double quant", "double_quant"))
        if getattr(flags, attr) != getattr(recorded, attr) and (recorded.is_4bit or attr == "method")
    ]
    if diffs:
        return recorded, [f"the {recorded.source} records {recorded.describe()}; using it instead of the flags ({'; '.join(diffs)})"]
    return recorded, []


# ---------------------------------------------------------------------------------------------
# which weights transformers quantizes


def _meta_model(config: Mapping):
    """The transformers model of ``config`` on the meta device (no memory), or None."""
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError:  # pragma: no cover
        return None
    model_type = config.get("model_type")
    if not model_type:
        return None
    try:
        cfg = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k not in ("model_type", "quantization_config")})
    except (ValueError, KeyError, TypeError):
        return None
    classes = [getattr(transformers, a, None) for a in (config.get("architectures") or [])]
    classes = [c for c in classes if c is not None]
    if not classes:
        classes = [transformers.AutoModel]
    import warnings

    for cls in classes:
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if cls is transformers.AutoModel:
                    return cls.from_config(cfg)
                return cls(cfg)
        except Exception:  # transformers raises many types for configs it cannot build
            continue
    return None


def _skip_patterns(model, skip_modules: Iterable[str] | None) -> list[str]:
    """transformers' modules_to_not_convert for a model (see get_keys_to_not_convert)."""
    patterns: set[str] = set()
    if skip_modules is None:
        tied = getattr(model, "all_tied_weights_keys", None)
        if tied is None:  # transformers 4.x
            tied = {k: k for k in (getattr(model, "_tied_weights_keys", None) or [])}
        if tied:
            patterns |= set(tied.keys()) | set(tied.values())
        params = list(model.named_parameters())
        if params:
            patterns.add(params[-1][0])  # the module of the last parameter (usually the head)
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out_emb is not None:
            patterns |= {n for n, m in model.named_modules() if m is out_emb}
        patterns = {p.removesuffix(".weight") for p in patterns}
    else:
        patterns |= set(skip_modules)
    patterns |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sorted(patterns)


def _is_skipped(name: str, patterns: Iterable[str]) -> bool:
    """transformers' should_convert_module, negated: a pattern matches from the start up to a
    module boundary, as a regex with that boundary, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in patterns:
        try:
            if re.match(rf"(?:{key}){boundary}", name):
                return True
        except re.error:
            pass
        if name.endswith(key):
            return True
    return False


@dataclass
class QuantizedLayout:
    """Which modules transformers quantizes in one model, in the model's own naming.

    ``modules`` maps module names to ``"linear"`` or ``"conv1d"`` (weight stored (in, out),
    quantized transposed).
    """

    modules: dict[str, str]
    skipped: list[str] = field(default_factory=list)  # patterns of modules_to_not_convert


def quantized_layout(config: Mapping, spec: QuantSpec) -> QuantizedLayout:
    """The modules a transformers model of ``config`` turns into Linear4bit / Linear8bitLt.

    The model is built on the meta device (no weights, no memory), and transformers' rule is
    applied to it: exactly ``nn.Linear`` or ``Conv1D`` modules, minus modules_to_not_convert.

    Raises:
        UnsupportedError: transformers cannot build the architecture offline.
    """
    model = _meta_model(config)
    if model is None:
        arch = ", ".join(config.get("architectures") or []) or config.get("model_type") or "unknown"
        raise UnsupportedError(
            f"cannot tell which modules transformers quantizes for architecture {arch} "
            "(transformers cannot build it from config.json here)"
        )
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    patterns = _skip_patterns(model, spec.skip_modules)
    modules: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or _is_skipped(name, patterns):
            continue
        if Conv1D and isinstance(module, Conv1D):
            modules[name] = "conv1d"
        elif type(module) is torch.nn.Linear:
            modules[name] = "linear"
    return QuantizedLayout(modules=modules, skipped=patterns)


def quantized_weight_keys(base, spec: QuantSpec) -> dict[str, str]:
    """Checkpoint weight keys of ``base`` (a loratool BaseModel) that transformers quantizes.

    Returns:
        {weight key as stored in the base: "linear" | "conv1d"}
    Raises:
        UnsupportedError: see ``quantized_layout``.
    """
    layout = quantized_layout(base.config, spec)
    out: dict[str, str] = {}
    for module, kind in layout.modules.items():
        key = base.tensor_name(f"{module}.weight")
        if key is not None and key not in out:
            out[key] = kind
    return out


# ---------------------------------------------------------------------------------------------
# quantize / dequantize exactly as bitsandbytes does


def quantize_4bit(weight: torch.Tensor, spec: QuantSpec):
    """``bitsandbytes.functional.quantize_4bit`` with the settings of ``spec``.

    Args:
        weight: (out, in) in the dtype the model is loaded in.
    Returns:
        (packed tensor, QuantState)
    """
    F = import_bitsandbytes()
    return F.quantize_4bit(
        weight.contiguous(),
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.method,
        quant_storage=spec.quant_storage,
    )


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 row-wise quantization as ``Int8Params`` does it (from float16).

    Returns:
        (int8 weight (out, in), float32 row scales SCB (out,))
    """
    F = import_bitsandbytes()
    cb, scb, _ = F.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return cb, scb


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Serialized tensors of one quantized weight, named relative to its module.

    4-bit: ``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.quant_state.bitsandbytes__<t>``
    (+ ``weight.nested_absmax``, ``weight.nested_quant_map``). int8: ``weight``, ``SCB``, ``weight_format``.

    Args:
        weight: (out, in) in the dtype the model is loaded in (Conv1D weights transposed first).
    """
    if spec.is_4bit:
        packed, state = quantize_4bit(weight, spec)
        out = {"weight": packed}
        out.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
        return out
    cb, scb = quantize_int8(weight)
    return {"weight": cb, "SCB": scb, "weight_format": torch.tensor(INT8_ROW_FORMAT, dtype=torch.uint8)}


def serialized_suffixes(spec: QuantSpec) -> tuple[str, ...]:
    """The key suffixes (after ``module.``) a quantized weight is saved under, in save order."""
    if not spec.is_4bit:
        return ("weight", "SCB", "weight_format")
    keys = ["weight", "weight.absmax", "weight.quant_map"]
    if spec.double_quant:
        keys += ["weight.nested_absmax", "weight.nested_quant_map"]
    keys.append(f"weight.{_QS_PREFIX}{spec.method}")
    return tuple(keys)


def dequantize_weight(entries: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight of serialized quantized entries (named as ``quantize_weight`` names them),
    dequantized as bitsandbytes does: 4-bit in the dtype recorded in its quant state, int8 in float32.

    Raises:
        FormatError-like InputError: entries that are neither layout.
    """
    F = import_bitsandbytes()
    if "SCB" in entries:
        return F.int8_vectorwise_dequant(entries["weight"], entries["SCB"].to(torch.float32))
    state = quant_state_from_entries(entries)
    return F.dequantize_4bit(entries["weight"], state)


def quant_state_from_entries(entries: Mapping[str, torch.Tensor], *, device: str | torch.device = "cpu"):
    """The QuantState of serialized 4-bit entries (``weight.absmax``, ``weight.quant_state...``)."""
    F = import_bitsandbytes()
    stats = {k[len("weight."):]: v for k, v in entries.items() if k.startswith("weight.")}
    if not stats:
        raise InputError("quantized weight has no quant state (weight.absmax / weight.quant_state.*)")
    try:
        return F.QuantState.from_dict(qs_dict=dict(stats), device=torch.device(device))
    except (ValueError, AssertionError, KeyError) as exc:
        raise InputError(f"malformed bitsandbytes quant state: {exc}") from None


def fake_quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The weight a quantized layer actually multiplies with: dequantize(quantize(W)).

    4-bit: dequantized in ``weight``'s dtype then cast to the compute dtype, as Linear4bit's
    matmul does. int8: CB * SCB / 127 (float32).

    Args:
        weight: (out, in) in the dtype the model is loaded in.
    """
    return _quantize_effective(weight, spec)[0]


def _quantize_effective(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(effective weight, the integer code of every entry) of ``weight`` under ``spec``."""
    F = import_bitsandbytes()
    if spec.is_4bit:
        packed, state = quantize_4bit(weight, spec)
        return F.dequantize_4bit(packed, state).to(spec.compute_dtype), unpack_4bit_codes(packed, state.shape)
    cb, scb = quantize_int8(weight)
    return F.int8_vectorwise_dequant(cb, scb), cb


def unpack_4bit_codes(packed: torch.Tensor, shape) -> torch.Tensor:
    """The 4-bit code (0..15) of every entry of a packed weight, in ``shape`` (high nibble first)."""
    flat = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    n = math.prod(shape)
    return codes[:n].reshape(tuple(shape))


def effective_weight(entries: Mapping[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """What a layer built from serialized entries multiplies with (see ``fake_quantize``)."""
    w = dequantize_weight(entries)
    return w.to(spec.compute_dtype) if spec.is_4bit else w


# ---------------------------------------------------------------------------------------------
# retention of a delta through quantization


@dataclass(frozen=True)
class Retention:
    """How much of a delta dW survives a quantizer Q applied to the merged weight.

    ``retained`` = <Q(W + dW) - Q(W), dW> / ||dW||^2: the share of dW found in the effective
    change (1 = all of it; a delta that rounds away gives ~0).
    ``rel_error`` = ||(Q(W + dW) - Q(W)) - dW|| / ||dW||: how far the effective delta is from
    dW (0 = exact; above 1 the merge adds more error than the whole delta is worth).
    ``unchanged`` = share of entries whose quantized code (or 16-bit value) is the same in
    Q(W + dW) and Q(W): the delta rounded away there.
    ``delta_ratio`` = ||dW|| / ||W||: how small the delta is against its weight.
    """

    retained: float
    rel_error: float
    unchanged: float
    delta_ratio: float

    def as_dict(self) -> dict:
        return {"retained": self.retained, "rel_error": self.rel_error, "unchanged": self.unchanged, "delta_ratio": self.delta_ratio}

    def is_low(self, threshold: float) -> bool:
        """Whether less than ``threshold`` of the delta is kept."""
        return self.retained < threshold


def retention_of(
    base_q: torch.Tensor,
    merged_q: torch.Tensor,
    delta: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    base_codes: torch.Tensor | None = None,
    merged_codes: torch.Tensor | None = None,
) -> Retention:
    """Retention figures from effective weights Q(W), Q(W + dW) and the intended delta dW.

    All in the same orientation; computed in float64. ``base`` (W, for ``delta_ratio``)
    defaults to ``base_q``; the codes default to the effective values.
    """
    d = delta.to(torch.float64)
    eff = merged_q.to(torch.float64) - base_q.to(torch.float64)
    dd = float((d * d).sum())
    ref = base if base is not None else base_q
    wn = float(torch.linalg.vector_norm(ref.to(torch.float64)))
    if dd == 0.0:
        return Retention(retained=1.0, rel_error=0.0, unchanged=1.0, delta_ratio=0.0)
    if base_codes is None or merged_codes is None:
        base_codes, merged_codes = base_q, merged_q
    return Retention(
        retained=float((eff * d).sum()) / dd,
        rel_error=float(torch.linalg.vector_norm(eff - d)) / math.sqrt(dd),
        unchanged=float((merged_codes == base_codes).to(torch.float64).mean()),
        delta_ratio=math.sqrt(dd) / wn if wn else math.inf,
    )


def measure_retention(weight: torch.Tensor, delta: torch.Tensor, spec: QuantSpec | None, *, dtype: torch.dtype) -> Retention:
    """Retention of ``delta`` when ``weight + delta`` is quantized with ``spec``.

    With ``spec`` None the "quantizer" is the cast to the 16-bit output ``dtype``; otherwise
    W + dW is cast to ``dtype`` (what transformers loads the merged model in) and quantized.

    Args:
        weight: the reference weight W (out, in): what the output is compared against (the
            16-bit base, or the QLoRA-dequantized base).
        delta: dW (out, in).
        dtype: the dtype of the merged model.
    """
    w32 = weight.to(torch.float32)
    merged = w32 + delta.to(torch.float32)
    if spec is None:
        bq, mq = w32.to(dtype), merged.to(dtype)
        return retention_of(bq, mq, delta, base=w32)
    bq, bc = _quantize_effective(w32.to(dtype), spec)
    mq, mc = _quantize_effective(merged.to(dtype), spec)
    return retention_of(bq, mq, delta, base=w32, base_codes=bc, merged_codes=mc)


def retention_warning(low: Mapping[str, Retention], total: int, spec: QuantSpec | None, threshold: float) -> str | None:
    """One warning for the modules that keep less than ``threshold`` of their delta, or None.

    Args:
        low: module -> retention, only the modules below the threshold.
        total: how many adapted modules were measured.
    """
    if not low:
        return None
    worst_name, worst = min(low.items(), key=lambda kv: kv[1].retained)
    target = spec.describe() if spec is not None else "the 16-bit output"
    advice = "merge with --quantize int8 or keep the adapter unmerged" if spec is None or spec.is_4bit else "keep the adapter unmerged"
    return (
        f"{len(low)} of {total} modules keep less than {threshold:.0%} of their delta in {target} "
        f"(worst {worst_name}: {worst.retained:.1%} kept, delta {worst.delta_ratio:.2%} of the weight's norm, "
        f"{worst.unchanged:.0%} of entries unchanged); {advice}"
    )


# ---------------------------------------------------------------------------------------------
# reading bases that are already quantized


def is_quantized_aux_key(key: str) -> bool:
    """Whether a checkpoint key is bitsandbytes bookkeeping next to a quantized ``.weight``."""
    if key.endswith((".SCB", ".weight_format")):
        return True
    head, sep, tail = key.rpartition(".weight.")
    return bool(sep) and tail in _FOUR_BIT_SUFFIXES


def aux_keys(weight_key: str, keys) -> list[str]:
    """The bookkeeping keys that belong to quantized ``weight_key`` (``M.weight``).

    Args:
        keys: the checkpoint's keys (a set, for speed).
    """
    module = weight_key.removesuffix(".weight")
    wanted = [f"{weight_key}.{s}" for s in _FOUR_BIT_SUFFIXES] + [f"{module}.SCB", f"{module}.weight_format"]
    return [k for k in wanted if k in keys]


def stored_kind(weight_key: str, keys) -> str | None:
    """"4bit" / "int8" when a checkpoint with ``keys`` (a set) stores ``weight_key`` quantized by
    bitsandbytes (its quant state or its SCB row scales sit beside it), else None."""
    module = weight_key.removesuffix(".weight")
    if any(f"{weight_key}.{_QS_PREFIX}{m}" in keys for m in ("nf4", "fp4")):
        return "4bit"
    return "int8" if f"{module}.SCB" in keys else None


@dataclass
class Decoded:
    """A stored quantized weight decoded to float32, and the quantizer of its own scheme."""

    weight: torch.Tensor  # float32, the stored (out, in) shape
    requantize: Callable[[torch.Tensor], torch.Tensor]  # W -> dequantize(quantize(W)), float32
    scheme: str


def decode_stored(entries: Mapping[str, torch.Tensor], *, device: str | torch.device = "cpu") -> Decoded:
    """Decode serialized entries (``relative_entries``) to float32, with a requantizer that applies
    the same scheme (4-bit: its blocksize, type, nesting and storage; int8: LLM.int8's row absmax
    of the float16 weight, as transformers quantizes it)."""
    F = import_bitsandbytes()
    device = torch.device(device)
    packed = entries["weight"].to(device)
    if "SCB" in entries:
        weight = F.int8_vectorwise_dequant(packed, entries["SCB"].to(device=device, dtype=torch.float32)).float()

        def requant8(w: torch.Tensor) -> torch.Tensor:
            q, scb, _ = F.int8_vectorwise_quant(w.to(device=device, dtype=torch.float16).contiguous())
            return F.int8_vectorwise_dequant(q, scb.float()).float()

        return Decoded(weight, requant8, "bnb-int8")
    state = quant_state_from_entries(entries, device=device)
    weight = F.dequantize_4bit(packed, state).float()

    def requant4(w: torch.Tensor) -> torch.Tensor:
        q, st = F.quantize_4bit(w.to(device=device, dtype=state.dtype).contiguous(), blocksize=state.blocksize,
                                quant_type=state.quant_type, compress_statistics=state.nested, quant_storage=packed.dtype)
        return F.dequantize_4bit(q, st).float()

    return Decoded(weight, requant4, f"bnb-4bit-{state.quant_type}")


def relative_entries(weight_key: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a quantized weight's checkpoint tensors relative to its module (``weight``, ``SCB``...)."""
    module = weight_key.removesuffix(".weight")
    return {k[len(module) + 1:]: v for k, v in tensors.items()}


def quant_state_info(blob: torch.Tensor) -> dict:
    """The JSON fields of a packed ``quant_state.bitsandbytes__*`` tensor (shape, dtype, ...)."""
    import json

    try:
        return json.loads(bytes(blob.to(torch.uint8).cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"malformed bitsandbytes quant_state blob: {exc}") from None
