"""LitGPT LoRA checkpoints: ``lit_model.pth.lora`` (``{"model": {...}}``) + ``hyperparameters.yaml``.

Key layout (layer ``i``; every factor is ``lora_A`` (r, in) / ``lora_B`` (out, r) and every
module shares ``scale = lora_alpha / lora_r``):

    transformer.h.i.attn.qkv.lora_A    (n * r, C)     q/k/v fused, n = enabled of q, k, v
    transformer.h.i.attn.qkv.lora_B    (sum of enabled sizes, r)   sizes H*hs, G*hs, G*hs
    transformer.h.i.attn.proj          self_attn.o_proj
    transformer.h.i.mlp.fc_1 / fc_2    mlp.gate_proj / mlp.up_proj
    transformer.h.i.mlp.proj           mlp.down_proj
    lm_head                            lm_head

The fused layer (``LoRAQKVLinear``) gives each enabled projection its own ``r`` rows of
``lora_A`` and its own row block of ``lora_B``: projection ``j``'s delta is ``B_j @ A_j``.
LitGPT keeps Hugging Face row order (no rotary permutation).

LitGPT before v0.5.5 (January 2025) named the fused layer ``attn.attn`` and stored the base
QKV weight interleaved per query group (``[q.. k v | q.. k v | ...]``). Its LoRA factors were
the same blocks, but where the delta landed depended on the version (see ``LEGACY_MODES``).
"""

from __future__ import annotations

import math
import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from loratool.adapter import Adapter, LoraModule, ModuleKind, refuse_saved_copies
from loratool.errors import FormatError, InputError, UnsupportedError
from loratool.formats import OPTIONS, _fused
from loratool.io.pickle_scan import open_torch_zip
from loratool.io.store import LazyTensor, TensorStore, is_torch_pickle
from loratool.io.writer import save_torch_pickle

NAME = "litgpt"
OUTPUT_IS_FILE = False
WEIGHTS_NAME = "lit_model.pth.lora"
HPARAMS_NAME = "hyperparameters.yaml"
CONFIG_NAMES = ("model_config.yaml", "lit_config.json")
DEFAULT_ALPHA = 16.0  # litgpt finetune lora's default lora_alpha

# Hugging Face (Llama family) module suffix -> LitGPT module suffix, inside layer i
HF_TO_LIT = {
    "self_attn.o_proj": "attn.proj",
    "mlp.gate_proj": "mlp.fc_1",
    "mlp.up_proj": "mlp.fc_2",
    "mlp.down_proj": "mlp.proj",
}
LIT_TO_HF = {v: k for k, v in HF_TO_LIT.items()}
QKV_HF = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
QKV_FLAGS = ("lora_query", "lora_key", "lora_value")
# legacy (lit_gpt) spellings of the LoRA hyperparameters
_OLD_HPARAMS = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout", "to_query": "lora_query",
                "to_key": "lora_key", "to_value": "lora_value", "to_projection": "lora_projection",
                "to_mlp": "lora_mlp", "to_head": "lora_head"}

_HF_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$")
_LIT_KEY_RE = re.compile(r"^(?:transformer\.h\.(?P<layer>\d+)\.(?P<mod>attn\.qkv|attn\.attn|attn\.proj|mlp\.fc_1|mlp\.fc_2|mlp\.proj)|(?P<head>lm_head))\.lora_(?P<part>[AB])$")
# bounded repetitions: detection scans up to SNIFF_BYTES of a file that may be hostile, in linear time
_DETECT_RE = re.compile(rb"transformer\.h\.\d{1,6}\.(?:attn\.(?:qkv|attn|proj)|mlp\.[\w.]{1,64})\.lora_[AB]|lm_head\.lora_[AB]")
SNIFF_BYTES = 1 << 20  # a LoRA checkpoint's object stream names its tensors well within this
_STRIP_PREFIXES = ("model.", "state_dict.", "_forward_module.", "module.")

# How the legacy ``attn.attn`` delta was placed on the interleaved base weight:
#   "scattered":  each projection's rows went to that projection's rows (LitGPT from February
#                 2024 (#900, v0.3.1) on; with q, k and v all enabled only up to v0.4.12);
#                 the factors then mean exactly what the current layout's do.
#   "contiguous": the delta rows [B_q A_q; B_k A_k; B_v A_v] were added to the interleaved
#                 weight's rows in order (lit-gpt before February 2024, and LitGPT v0.4.13 to
#                 v0.5.4 when q, k and v were all enabled: #1726 skipped the scatter then).
LEGACY_MODES = OPTIONS["legacy_qkv"].choices  # declared in the registry


# ---------------------------------------------------------------------------------------------
# Helpers shared with the Lit-LLaMA format (fused QKV factors, refusals, pickle sniffing)
# ---------------------------------------------------------------------------------------------


def pickle_head(path: Path, limit: int = SNIFF_BYTES) -> bytes:
    """The first bytes of a PyTorch pickle's object stream (never unpickled): for detection."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with open_torch_zip(path) as zf:  # the directory's entry count bounded first
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                if not names:
                    return b""
                with zf.open(names[0]) as fh:
                    return fh.read(limit)
        with open(path, "rb") as fh:
            return fh.read(limit)
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return b""


def strip_wrapper(name: str) -> str:
    """Drop the wrappers a training loop may put around parameter names."""
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def split_fused(A: LazyTensor, B: LazyTensor, sizes: Sequence[int], *, path: Path, what: str) -> list[tuple[LazyTensor, LazyTensor]]:
    """Split a fused pair (A: (n*r, C), B: (sum(sizes), r)) into n pairs (A_j (r, C), B_j (sizes[j], r)).

    Raises:
        FormatError: the shapes do not fit ``sizes``.
    """
    n = len(sizes)
    if len(A.shape) != 2 or len(B.shape) != 2:
        raise FormatError(path, f"{what}: lora_A/lora_B must be 2-D, got {A.shape} and {B.shape}")
    r = B.shape[1]
    if r == 0 or A.shape[0] != n * r:
        raise FormatError(path, f"{what}: lora_A is {A.shape} but {n} fused projection(s) of rank {r} need {n * r} rows")
    if B.shape[0] != sum(sizes):
        raise FormatError(path, f"{what}: lora_B has {B.shape[0]} rows, the fused projections need {'+'.join(map(str, sizes))} = {sum(sizes)}")
    out = []
    start = 0
    for j, size in enumerate(sizes):
        a0, b0 = j * r, start
        a = A.map(lambda t, a0=a0: t[a0:a0 + r], shape=(r, A.shape[1]))
        b = B.map(lambda t, b0=b0, size=size: t[b0:b0 + size], shape=(size, r))
        out.append((a, b))
        start += size
    return out


def describe_modules(names: Iterable[str]) -> str:
    """A short one-line summary of module names: their distinct leaves, a count and an example."""
    names = list(names)
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    count = f"{len(names)} module{'s' if len(names) != 1 else ''}"
    return f"{', '.join(leaves[:8])}{' ...' if len(leaves) > 8 else ''} ({count}, e.g. {names[0]})"


def check_writable(adapter: Adapter) -> None:
    """Refuse what a LitGPT LoRA checkpoint cannot hold (``refuse_unrepresentable``)."""
    refuse_unrepresentable(adapter, "LitGPT")


def refuse_unrepresentable(adapter: Adapter, fmt: str) -> None:
    """Refuse what no LitGPT/Lit-LLaMA LoRA file can hold: DoRA, bias deltas, modules_to_save,
    saved base-layer copies (``convert`` drops those identical to the base before writing).

    Raises:
        UnsupportedError: naming what the conversion would lose.
    """
    def names(items: Iterable[str]) -> str:
        items = list(items)
        shown = ", ".join(items[:3])
        return shown + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    refuse_saved_copies(adapter, fmt)
    if adapter.modules_to_save:
        raise UnsupportedError(f"{fmt} files hold only LoRA factors; converting would lose the modules_to_save tensors {names(adapter.modules_to_save)}")
    dora = [m.name for m in adapter.modules.values() if m.magnitude is not None]
    if dora:
        raise UnsupportedError(f"{fmt} has no DoRA and a DoRA delta is not low-rank, so it cannot be baked in; converting would lose the magnitude vectors of {describe_modules(dora)}")
    bias = [m.name for m in adapter.modules.values() if m.bias is not None]
    if bias:
        raise UnsupportedError(f"{fmt} has no LoRA bias; converting would lose the bias deltas (lora_B.bias) of {describe_modules(bias)}")
    other = [m.name for m in adapter.modules.values() if m.kind is not ModuleKind.LINEAR]
    if other:
        raise UnsupportedError(f"{fmt} holds LoRA on linear layers only; converting would lose the {adapter.modules[other[0]].kind.value} LoRA of {describe_modules(other)}")


def out_dtype(modules: Iterable[LoraModule], baked: bool) -> torch.dtype:
    """The dtype to write: the adapter's, or float32 when scales are baked into half-precision factors."""
    dtype = None
    for m in modules:
        for t in (m.A, m.B):
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    dtype = dtype or torch.float32
    if baked and dtype.is_floating_point and dtype.itemsize < 4:
        return torch.float32
    return dtype


def padded_factors(mod: LoraModule, rank: int, file_scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) with ``file_scale * B @ A == mod.scale * mod.B @ mod.A``.

    Extra rank rows/columns are zeros; a scale different from the file's is multiplied into B.
    """
    A = mod.A.load()
    B = mod.B.load()
    k = mod.scale / file_scale
    if k != 1.0:
        B = (B.to(torch.float64) * k).to(dtype)
    A, B = A.to(dtype), B.to(dtype)
    if mod.rank < rank:
        A = torch.cat([A, A.new_zeros(rank - mod.rank, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - mod.rank)], dim=1)
    return A.contiguous(), B.contiguous()


def report_packing(report: dict | None, fmt: str, mods: Sequence[LoraModule], *, rank: int, file_scale: float,
                   held: str, zero_filled: int, dtype: torch.dtype) -> None:
    """Record in convert's report what a single-rank, single-scale format changed (exactly)."""
    if report is None:
        return
    baked = [m for m in mods if m.scale != file_scale]
    padded = [m for m in mods if m.rank < rank]
    if baked:
        report.setdefault("baked", []).append(f"per-module scale baked into lora_B for {len(baked)} module(s) ({fmt} holds one {held})")
    if padded:
        report.setdefault("baked", []).append(f"rank zero-padded to {rank} for {len(padded)} module(s) ({fmt} holds one rank)")
    if zero_filled:
        report.setdefault("notes", []).append(
            f"{zero_filled} projection(s) the adapter lacks written as zeros ({fmt} adapts the same projections in every layer)"
        )
    src = {t.dtype for m in mods for t in (m.A, m.B)}
    if baked and dtype not in src:
        report.setdefault("notes", []).append(f"factors stored as {str(dtype).replace('torch.', '')} so that the baked scales stay exact")


def file_alpha(modules: Sequence[LoraModule], rank: int) -> float | int:
    """The single alpha a file stores: the most common scale of full-rank modules times the rank.

    Integral values are returned as int (LitGPT types lora_alpha as int); otherwise rounded,
    and the modules' factors absorb the difference.
    """
    # prefer a scale of full-rank modules: those are then written unchanged
    scales = Counter(m.scale for m in modules if m.rank == rank) or Counter(m.scale for m in modules)
    scale = scales.most_common(1)[0][0] if scales else 1.0
    alpha = scale * rank
    if abs(alpha - round(alpha)) < 1e-9 * max(1.0, abs(alpha)) and round(alpha) != 0:
        return int(round(alpha))
    return max(1, int(round(alpha)))


# ---------------------------------------------------------------------------------------------
# Detection and reading
# ---------------------------------------------------------------------------------------------


def _sidecars(folder: Path) -> list[Path]:
    return [folder / n for n in (HPARAMS_NAME, *CONFIG_NAMES) if (folder / n).is_file()]


def detect(path: Path) -> bool:
    path = Path(path)
    if path.is_dir():
        return (path / WEIGHTS_NAME).is_file()
    if not path.is_file():
        return False
    if path.name == WEIGHTS_NAME:
        return True
    if not _sidecars(path.parent) or not is_torch_pickle(path):  # by content, whatever its name
        return False
    return _DETECT_RE.search(pickle_head(path)) is not None


def _locate(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    if not path.exists():
        raise FormatError(path, "adapter not found")
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FormatError(path, f"no {WEIGHTS_NAME} (a LitGPT LoRA checkpoint folder holds {WEIGHTS_NAME} and {HPARAMS_NAME})")
        return path, weights
    return path.parent, path


MAX_YAML_DEPTH = 64  # LitGPT's hyperparameters nest a few levels


def _read_yaml(path: Path) -> dict:
    """A LitGPT YAML sidecar, bounded: its size like a JSON config's, its nesting depth walked by the
    streaming parser first (the loader recurses), aliases refused (they multiply what is built)."""
    import yaml

    from loratool.io.store import refuse_oversized_config

    try:
        refuse_oversized_config(path)
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise FormatError(path, "YAML aliases are not accepted in a LitGPT config")
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise FormatError(path, f"YAML nested more than {MAX_YAML_DEPTH} levels deep")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        data = yaml.safe_load(text)
    except OSError as exc:
        raise FormatError(path, exc.strerror or str(exc)) from None
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())[:200]
        raise FormatError(path, f"malformed YAML ({first})") from None
    except UnicodeDecodeError:
        raise FormatError(path, "is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FormatError(path, "is not a YAML mapping")
    return data


def _read_sidecar(path: Path) -> dict:
    if path.suffix == ".json":
        from loratool.io.store import read_json

        data = read_json(path)
        if not isinstance(data, dict):
            raise FormatError(path, "is not a JSON object")
        return data
    return _read_yaml(path)


def _lora_hparams(data: dict) -> dict:
    """The lora_* entries of a hyperparameters/config mapping, old spellings normalized."""
    out = {}
    for k, v in data.items():
        if k.startswith("lora_"):
            out[k] = v
        elif k in _OLD_HPARAMS:
            out.setdefault(_OLD_HPARAMS[k], v)
    return out


def _flag(hp: dict, key: str, path: Path) -> bool | None:
    if key not in hp or hp[key] is None:
        return None
    v = hp[key]
    if not isinstance(v, bool):
        raise FormatError(path, f"{key} must be true or false, got {v!r}")
    return v


def _positive_int(value, key: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value <= 0:
        raise FormatError(path, f"{key} must be a positive integer, got {value!r}")
    return int(value)


def _finite(value, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FormatError(path, f"{key} must be a number, got {value!r}")
    return float(value)


@dataclass
class _Geometry:
    """Row sizes of the fused QKV layer, and head counts where known."""

    q_size: int | None = None
    kv_size: int | None = None
    n_head: int | None = None
    n_query_groups: int | None = None
    head_size: int | None = None
    source: str = ""


def _geometry_from_model_config(cfg: dict, path: Path) -> _Geometry | None:
    n_head = cfg.get("n_head")
    if n_head is None:
        return None
    n_head = _positive_int(n_head, "n_head", path)
    groups = cfg.get("n_query_groups") or n_head
    groups = _positive_int(groups, "n_query_groups", path)
    head_size = cfg.get("head_size")
    if head_size is None:
        n_embd = cfg.get("n_embd")
        if n_embd is None:
            return None
        head_size = _positive_int(n_embd, "n_embd", path) // n_head
    head_size = _positive_int(head_size, "head_size", path)
    return _Geometry(n_head * head_size, groups * head_size, n_head, groups, head_size, str(path))


def _geometry_from_base(base) -> _Geometry | None:
    cfg = base.config
    heads = cfg.get("num_attention_heads")
    hidden = cfg.get("hidden_size")
    if not isinstance(heads, int) or heads <= 0:
        return None
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or (hidden // heads if isinstance(hidden, int) else None)
    if not isinstance(head_dim, int) or not isinstance(kv, int):
        return None
    return _Geometry(heads * head_dim, kv * head_dim, heads, kv, head_dim, f"base {base.path}")


def _parse_keys(store: TensorStore, path: Path) -> dict[str, dict[str, str]]:
    """LitGPT module name -> {"A": key, "B": key}."""
    parts: dict[str, dict[str, str]] = {}
    for key in store.keys():
        name = strip_wrapper(key)
        m = _LIT_KEY_RE.match(name)
        if m is None:
            if "lora_" in name:
                raise UnsupportedError(
                    f"{path}: LitGPT tensor {name} has no Hugging Face counterpart in loratool "
                    "(supported: Llama-family attn.qkv/attn.proj, mlp.fc_1/fc_2/proj, lm_head)"
                )
            raise UnsupportedError(f"{path}: holds {name}, which is not a LoRA factor; loratool reads LoRA-only LitGPT checkpoints ({WEIGHTS_NAME})")
        module = name[: -len(".lora_A")]
        parts.setdefault(module, {})[m.group("part")] = key
    return parts


@dataclass
class _Sidecars:
    """What sits beside a LitGPT checkpoint: hyperparameters, model config, and where lora_* came from."""

    hparams: dict
    hp: dict  # the lora_* entries (from hyperparameters.yaml, else from the model config)
    model_config: dict
    model_config_path: Path | None
    hp_src: Path  # the file named in errors about lora_* values
    files: list[Path]


def _read_sidecars(folder: Path, weights: Path) -> _Sidecars:
    hparams: dict = {}
    hp_path = folder / HPARAMS_NAME
    files = [weights]
    if hp_path.is_file():
        hparams = _read_yaml(hp_path)
        files.append(hp_path)
    hp = _lora_hparams(hparams)
    model_config: dict = {}
    model_config_path = None
    for name in CONFIG_NAMES:
        if (folder / name).is_file():
            model_config_path = folder / name
            model_config = _read_sidecar(model_config_path)
            files.append(model_config_path)
            break
    if not hp and model_config:
        hp = _lora_hparams(model_config)
    hp_src = hp_path if hp_path.is_file() else (model_config_path or weights)
    return _Sidecars(hparams, hp, model_config, model_config_path, hp_src, files)


def _paired_parts(store: TensorStore, weights: Path) -> dict[str, dict[str, str]]:
    """``_parse_keys``, refusing a file without LoRA tensors or with an unpaired factor."""
    parts = _parse_keys(store, weights)
    if not parts:
        raise FormatError(weights, "holds no LoRA tensors")
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            raise FormatError(weights, f"{module}: has lora_{'A' if 'B' not in p else 'B'} without its pair")
    return parts


def _rank_and_scale(
    parts: dict[str, dict[str, str]], store: TensorStore, side: _Sidecars, weights: Path,
    alpha: float | None, scale: float | None, warns: list[str],
) -> tuple[int, float, float]:
    """(lora_r, lora_alpha, scale): one rank for the file; scale beats alpha beats lora_alpha beats the default."""
    hp, hp_src = side.hp, side.hp_src
    ranks = {store.shape(p["B"])[1] if len(store.shape(p["B"])) == 2 else -1 for p in parts.values()}
    if len(ranks) != 1 or -1 in ranks:
        raise FormatError(weights, f"LitGPT uses one lora_r for every module, found ranks {sorted(ranks)}")
    r = ranks.pop()
    if hp.get("lora_r") is not None and _positive_int(hp["lora_r"], "lora_r", hp_src) != r:
        raise FormatError(hp_src, f"lora_r is {hp['lora_r']} but the tensors have rank {r}")
    if scale is not None:
        scale = _finite(scale, "scale", hp_src)
        return r, scale * r, scale
    if alpha is not None:
        file_alpha_value = _finite(alpha, "alpha", hp_src)
        if hp.get("lora_alpha") is not None and float(hp["lora_alpha"]) != file_alpha_value:
            warns.append(f"{hp_src}: lora_alpha {hp['lora_alpha']} overridden by alpha {file_alpha_value:g}")
    elif hp.get("lora_alpha") is not None:
        file_alpha_value = _finite(hp["lora_alpha"], "lora_alpha", hp_src)
    else:
        file_alpha_value = DEFAULT_ALPHA
        warns.append(f"{weights}: no lora_alpha beside the file; assumed {DEFAULT_ALPHA:g} (LitGPT's default); pass --alpha to change it")
    return r, file_alpha_value, file_alpha_value / r


def _qkv_pairs(
    lit_name: str, A: LazyTensor, B: LazyTensor, *, geometry: _Geometry | None, side: _Sidecars,
    parts: dict[str, dict[str, str]], store: TensorStore, weights: Path, legacy_qkv: str | None,
) -> list[tuple[str, LazyTensor, LazyTensor]]:
    """(Hugging Face suffix, A, B) of the q/k/v projections a fused attn.qkv / legacy attn.attn LoRA adapts.

    The legacy ``attn.attn`` delta is "scattered" (split like attn.qkv) or "contiguous" (its
    rows landed in order on the interleaved weight, see ``_contiguous_legacy``).
    """
    enabled = _enabled_qkv(side.hp, A, B, side.hp_src, lit_name)
    geo = _qkv_geometry(geometry, enabled, A, B, parts, store, weights, lit_name)
    sizes = [s for s, e in zip((geo.q_size, geo.kv_size, geo.kv_size), enabled) if e]
    pairs = split_fused(A, B, sizes, path=weights, what=lit_name)
    mode = "scattered"
    if lit_name.endswith(".attn.attn"):
        mode = _legacy_mode(legacy_qkv, weights, enabled)
    if mode == "scattered":
        return [(hf, a, b) for (a, b), hf in zip(pairs, [h for h, e in zip(QKV_HF, enabled) if e])]
    if geo.n_head is None:
        raise InputError(f"{weights}: reading the legacy attn.attn layout as contiguous needs the head counts: pass --base (or put LitGPT's model_config.yaml beside the file)")
    return [(hf, a, b) for hf, (a, b) in _contiguous_legacy(pairs, enabled, geo, weights).items()]


def _hf_modules(
    parts: dict[str, dict[str, str]], store: TensorStore, side: _Sidecars, weights: Path,
    geometry: _Geometry | None, legacy_qkv: str | None, alpha: float, scale: float,
) -> dict[str, LoraModule]:
    """The LoRA modules under their Hugging Face names, fused q/k/v split apart."""
    modules: dict[str, LoraModule] = {}

    def add(name: str, A: LazyTensor, B: LazyTensor) -> None:
        if len(A.shape) != 2 or len(B.shape) != 2 or A.shape[0] != B.shape[1]:
            raise FormatError(weights, f"{name}: lora_A {A.shape} and lora_B {B.shape} do not pair")
        modules[name] = LoraModule(name, ModuleKind.LINEAR, A, B, alpha=alpha, scale=scale)

    for lit_name in sorted(parts, key=_lit_sort_key):
        p = parts[lit_name]
        A, B = store.lazy(p["A"]), store.lazy(p["B"])
        if lit_name == "lm_head":
            add("lm_head", A, B)
            continue
        layer, sub = lit_name.split(".", 3)[2], lit_name.split(".", 3)[3]
        prefix = f"model.layers.{layer}."
        if sub in LIT_TO_HF:
            add(prefix + LIT_TO_HF[sub], A, B)
            continue
        for hf, a, b in _qkv_pairs(lit_name, A, B, geometry=geometry, side=side, parts=parts, store=store,
                                   weights=weights, legacy_qkv=legacy_qkv):
            add(prefix + hf, a, b)
    return modules


def _base_model_name(hparams: dict) -> str | None:
    """The base named by LitGPT's ``checkpoint_dir`` (``checkpoints/`` dropped)."""
    checkpoint_dir = hparams.get("checkpoint_dir")
    if isinstance(checkpoint_dir, str) and checkpoint_dir:
        return checkpoint_dir[len("checkpoints/"):] if checkpoint_dir.startswith("checkpoints/") else checkpoint_dir
    return None


def read(path: Path, *, base=None, alpha: float | None = None, scale: float | None = None, legacy_qkv: str | None = None) -> Adapter:
    """Read a LitGPT LoRA checkpoint into canonical form (Hugging Face module names).

    Args:
        path: the checkpoint folder or its ``lit_model.pth.lora``.
        base: optional ``BaseModel``: head sizes when no model_config.yaml is beside the file.
        alpha: overrides ``lora_alpha`` (needed when no hyperparameters are beside the file).
        scale: an absolute scale for every module (overrides alpha / r).
        legacy_qkv: for the pre-v0.5.5 ``attn.attn`` layout, "scattered" or
            "contiguous" (see ``LEGACY_MODES``); guessed from the file name when None.
    Raises:
        FormatError, UnsupportedError, InputError.
    """
    folder, weights = _locate(path)
    warns: list[str] = []
    side = _read_sidecars(folder, weights)

    store = TensorStore([weights])
    parts = _paired_parts(store, weights)
    r, file_alpha_value, scale = _rank_and_scale(parts, store, side, weights, alpha, scale, warns)

    geometry = None
    if side.model_config:
        geometry = _geometry_from_model_config(side.model_config, side.model_config_path)
    if geometry is None and base is not None:
        geometry = _geometry_from_base(base)

    modules = _hf_modules(parts, store, side, weights, geometry, legacy_qkv, file_alpha_value, scale)
    if _fused_layout(base, side.model_config) and geometry is not None:
        modules = _fused.fused(modules, geometry.q_size, geometry.kv_size)
    if any(name.endswith(".attn.attn") for name in parts):
        warns.extend(_legacy_warning(legacy_qkv, weights, side.hp))

    flags = {k: v for k, v in side.hp.items() if k in ("lora_query", "lora_key", "lora_value", "lora_projection", "lora_mlp", "lora_head")}
    return Adapter(
        format=NAME,
        modules=modules,
        base_model=_base_model_name(side.hparams),
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in modules}),
        path=Path(path),
        files=side.files,
        config=side.hparams,
        warnings=warns,
        extras={"litgpt_flags": flags, "litgpt_model_config": side.model_config, "lora_r": r, "lora_alpha": file_alpha_value},
    )


def _fused_layout(base, model_config: dict | None) -> bool:
    """Whether the Hugging Face model stores q/k/v and gate/up fused (Phi-3, phi-4): the base says so
    when given, else LitGPT's model name (its Phi-3 conversion: ``copy_weights_phi``)."""
    if base is not None:
        return base.tensor_name("model.layers.0.self_attn.qkv_proj.weight") is not None
    name = str((model_config or {}).get("name") or "")
    return name.startswith(("Phi-3", "phi-4", "Phi-4"))


def _lit_sort_key(name: str):
    m = re.match(r"transformer\.h\.(\d+)\.(.*)", name)
    if m is None:
        return (1 << 30, name)
    order = ["attn.qkv", "attn.attn", "attn.proj", "mlp.fc_1", "mlp.fc_2", "mlp.proj"]
    return (int(m.group(1)), order.index(m.group(2)) if m.group(2) in order else 99)


def _enabled_qkv(hp: dict, A: LazyTensor, B: LazyTensor, hp_src: Path, what: str) -> tuple[bool, bool, bool]:
    flags = tuple(_flag(hp, k, hp_src) for k in QKV_FLAGS)
    r = B.shape[1] if len(B.shape) == 2 else 0
    n = A.shape[0] // r if r and len(A.shape) == 2 else 0
    if all(f is not None for f in flags):
        if sum(flags) != n:
            raise FormatError(hp_src, f"{what}: lora_query/key/value enable {sum(flags)} projection(s) but lora_A holds {n} blocks of rank {r}")
        return flags  # type: ignore[return-value]
    if n == 3:
        return (True, True, True)
    raise InputError(
        f"{hp_src}: cannot tell which of q, k, v the fused LoRA of {what} adapts ({n} of 3): "
        f"{HPARAMS_NAME} with lora_query/lora_key/lora_value is needed beside the checkpoint"
    )


def _qkv_geometry(geometry, enabled, A, B, parts, store, weights, what) -> _Geometry:
    eq, ek, ev = enabled
    rows = B.shape[0]
    if geometry is not None:
        return geometry
    # infer the query size from attn.proj (in = H*hs), then the key/value size from the rows
    q_size = None
    layer_prefix = what.rsplit(".", 2)[0]
    proj = parts.get(f"{layer_prefix}.attn.proj")
    if proj is not None:
        q_size = store.shape(proj["A"])[1]
    n_kv = int(ek) + int(ev)
    if not eq:
        if rows % n_kv:
            raise FormatError(weights, f"{what}: lora_B rows {rows} do not split into {n_kv} equal key/value blocks")
        return _Geometry(None, rows // n_kv, source="shapes")
    if n_kv == 0:
        return _Geometry(rows, None, source="shapes")
    if q_size is not None and rows > q_size and (rows - q_size) % n_kv == 0:
        return _Geometry(q_size, (rows - q_size) // n_kv, source="shapes")
    raise InputError(
        f"{weights}: the sizes of q, k and v in {what} ({rows} rows of lora_B) cannot be told apart from the tensors: "
        "pass --base (or put LitGPT's model_config.yaml beside the file)"
    )


def _legacy_mode(option: str | None, weights: Path, enabled) -> str:
    if option is not None:
        if option not in LEGACY_MODES:
            raise InputError(f"legacy_qkv must be one of {', '.join(LEGACY_MODES)}, got {option!r}")
        return option
    # lit_model.pth.lora names files from March 2024 on, after the February 2024 fix
    return "scattered" if weights.name == WEIGHTS_NAME else "contiguous"


def _legacy_warning(option, weights: Path, hp: dict) -> list[str]:
    if option is not None:
        return []
    all_enabled = all(hp.get(k) is True for k in QKV_FLAGS)
    if weights.name == WEIGHTS_NAME and not all_enabled:
        return []
    mode = _legacy_mode(None, weights, None)
    other = "contiguous" if mode == "scattered" else "scattered"
    return [
        f"{weights}: legacy LitGPT attn.attn layout read as {mode}; LitGPT versions differed in where this delta landed "
        f"(read with legacy_qkv='{other}', --legacy-qkv {other} on the command line, if the checkpoint came from a LitGPT release that placed it {other})"
    ]


def _interleaved_rows(geo: _Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of the interleaved base QKV weight: (projection 0/1/2, row in that projection)."""
    hs, H, G = geo.head_size, geo.n_head, geo.n_query_groups
    q_per_kv = H // G
    total = (H + 2 * G) * hs
    j = torch.arange(total)
    group_len = (q_per_kv + 2) * hs
    g, o = j // group_len, j % group_len
    slot, w = o // hs, o % hs
    proj = torch.where(slot < q_per_kv, 0, torch.where(slot == q_per_kv, 1, 2))
    row = torch.where(proj == 0, (g * q_per_kv + slot) * hs + w, g * hs + w)
    return proj, row


def _contiguous_legacy(pairs, enabled, geo: _Geometry, path: Path) -> dict[str, tuple[LazyTensor, LazyTensor]]:
    """Hugging Face q/k/v factors of a legacy delta whose rows were added in order to the interleaved weight.

    The delta [B_q A_q; B_k A_k; B_v A_v] occupies contiguous row ranges [0, q), [q, q+kv),
    [q+kv, q+2kv) of the interleaved weight, so one Hugging Face projection can receive rows
    from several blocks; its factors are then A = the stacked A blocks it touches and a
    block-sparse B.
    """
    if geo.n_head % geo.n_query_groups:
        raise FormatError(path, f"n_head {geo.n_head} is not a multiple of n_query_groups {geo.n_query_groups}")
    sizes = {0: geo.q_size, 1: geo.kv_size, 2: geo.kv_size}
    starts = {0: 0, 1: geo.q_size, 2: geo.q_size + geo.kv_size}
    proj, row = _interleaved_rows(geo)
    j = torch.arange(proj.numel())
    block = torch.where(j < starts[1], 0, torch.where(j < starts[2], 1, 2))
    local = j - torch.tensor([starts[0], starts[1], starts[2]])[block]
    enabled_blocks = [b for b in range(3) if enabled[b]]
    by_block = dict(zip(enabled_blocks, pairs))
    r = pairs[0][0].shape[0]
    C = pairs[0][0].shape[1]
    out = {}
    for p in range(3):
        used = [b for b in enabled_blocks if bool(((proj == p) & (block == b)).any())]
        if not used:
            continue
        size_p = sizes[p]

        def load_B(p=p, used=used, size_p=size_p):
            Bs = {b: by_block[b][1].load() for b in used}
            first = Bs[used[0]]
            out_B = first.new_zeros(size_p, r * len(used))
            for col, b in enumerate(used):
                sel = (proj == p) & (block == b)
                out_B[row[sel], col * r:(col + 1) * r] = Bs[b][local[sel]]
            return out_B

        def load_A(used=used):
            return torch.cat([by_block[b][0].load() for b in used])

        dtype = pairs[0][1].dtype
        out[QKV_HF[p]] = (
            LazyTensor((r * len(used), C), pairs[0][0].dtype, load_A),
            LazyTensor((size_p, r * len(used)), dtype, load_B),
        )
    return out


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _plan(adapter: Adapter) -> dict[str, tuple[int, str]]:
    """Adapter module name -> (layer or -1 for lm_head, Hugging Face suffix); refuses the rest."""
    plan: dict[str, tuple[int, str]] = {}
    bad = []
    for name in adapter.modules:
        if name == "lm_head":
            plan[name] = (-1, "lm_head")
            continue
        m = _HF_LAYER_RE.match(name)
        if m is None:
            bad.append(name)
            continue
        plan[name] = (int(m.group(1)), m.group(2))
    if bad:
        raise UnsupportedError(
            f"LitGPT holds LoRA on Llama-family q/k/v/o_proj, gate/up/down_proj and lm_head only; converting would lose {describe_modules(bad)}"
        )
    return plan


def _lora_flags(by_layer: dict[int, dict[str, LoraModule]]) -> dict[str, bool]:
    """LitGPT's lora_query/key/value/projection/mlp/head switches for the slots the adapter fills."""
    present = {suffix for layer, d in by_layer.items() if layer >= 0 for suffix in d}
    return {
        "lora_query": "self_attn.q_proj" in present,
        "lora_key": "self_attn.k_proj" in present,
        "lora_value": "self_attn.v_proj" in present,
        "lora_projection": "self_attn.o_proj" in present,
        "lora_mlp": bool(present & {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
        "lora_head": -1 in by_layer,
    }


def _layer_count(by_layer: dict[int, dict[str, LoraModule]], base) -> int:
    """Layers to write: the base's count when known (every layer gets its factors), else up to the last adapted one."""
    n_layers = max((l for l in by_layer if l >= 0), default=-1) + 1
    if base is not None:
        n_base = base.config.get("num_hidden_layers")
        if isinstance(n_base, int):
            if n_base < n_layers:
                raise UnsupportedError(f"the adapter has layer {n_layers - 1} but the base {base.path} has {n_base} layers")
            n_layers = n_base
    return n_layers


def _layer_tensors(pre: str, d: dict[str, LoraModule], flags: dict[str, bool], factors) -> dict[str, torch.Tensor]:
    """The lora_A/lora_B tensors of one layer (``pre`` = ``transformer.h.i.``); ``factors`` zero-fills missing slots."""
    sd: dict[str, torch.Tensor] = {}
    qkv_on = [hf for hf, f in zip(QKV_HF, QKV_FLAGS) if flags[f]]
    if qkv_on:
        blocks = [factors(d.get(hf), hf) for hf in qkv_on]
        sd[pre + "attn.qkv.lora_A"] = torch.cat([a for a, _ in blocks]).contiguous()
        sd[pre + "attn.qkv.lora_B"] = torch.cat([b for _, b in blocks]).contiguous()
    if flags["lora_projection"]:
        sd[pre + "attn.proj.lora_A"], sd[pre + "attn.proj.lora_B"] = factors(d.get("self_attn.o_proj"), "self_attn.o_proj")
    if flags["lora_mlp"]:
        for hf in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            lit = HF_TO_LIT[hf]
            sd[pre + lit + ".lora_A"], sd[pre + lit + ".lora_B"] = factors(d.get(hf), hf)
    return sd


def build_state_dict(adapter: Adapter, *, base=None, report: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The ``lit_model.pth.lora`` tensors and the lora_* hyperparameters for an adapter.

    Raises:
        UnsupportedError: something the format cannot hold.
    """
    refuse_unrepresentable(adapter, "LitGPT")
    if not adapter.modules:
        raise UnsupportedError("the adapter has no LoRA modules; a LitGPT LoRA checkpoint needs at least one")
    if _fused.has_fused(adapter):  # Phi-3: LitGPT adapts q/k/v and gate/up separately
        geo = _geometry_from_base(base) if base is not None else None
        adapter = _fused.unfused(adapter, geo.q_size if geo else None, geo.kv_size if geo else None)
    plan = _plan(adapter)
    mods = list(adapter.modules.values())
    rank = max(m.rank for m in mods)
    alpha = file_alpha(mods, rank)
    file_scale = alpha / rank
    baked = any(m.scale != file_scale for m in mods)
    dtype = out_dtype(mods, baked)

    by_layer: dict[int, dict[str, LoraModule]] = {}
    for name, (layer, suffix) in plan.items():
        by_layer.setdefault(layer, {})[suffix] = adapter.modules[name]
    flags = _lora_flags(by_layer)
    shapes = _slot_shapes(adapter, plan, base)
    n_layers = _layer_count(by_layer, base)

    zero_filled = 0

    def factors(mod: LoraModule | None, suffix: str) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal zero_filled
        if mod is not None:
            return padded_factors(mod, rank, file_scale, dtype)
        zero_filled += 1
        out_f, in_f = shapes[suffix]
        return torch.zeros(rank, in_f, dtype=dtype), torch.zeros(out_f, rank, dtype=dtype)

    sd: dict[str, torch.Tensor] = {}
    if flags["lora_head"]:
        A, B = factors(by_layer[-1]["lm_head"], "lm_head")
        sd["lm_head.lora_A"], sd["lm_head.lora_B"] = A, B
    for layer in range(n_layers):
        sd.update(_layer_tensors(f"transformer.h.{layer}.", by_layer.get(layer, {}), flags, factors))
    report_packing(report, "LitGPT", mods, rank=rank, file_scale=file_scale, held=f"lora_alpha / lora_r = {alpha}/{rank}",
                   zero_filled=zero_filled, dtype=dtype)
    hparams = {"lora_r": rank, "lora_alpha": alpha, **flags}
    return sd, hparams


def _slot_shapes(adapter: Adapter, plan, base) -> dict[str, tuple[int, int]]:
    """(out, in) of every Llama-family slot, from the adapter's own modules (and the base)."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, (_, suffix) in plan.items():
        m = adapter.modules[name]
        shape = (m.out_features, m.in_features)
        if shapes.setdefault(suffix, shape) != shape:
            raise UnsupportedError(f"{name}: shape {shape} differs from other {suffix} modules {shapes[suffix]}; LitGPT layers are uniform")
    if base is not None:
        geo = _geometry_from_base(base)
        hidden = base.config.get("hidden_size")
        if geo is not None and isinstance(hidden, int):
            shapes.setdefault("self_attn.q_proj", (geo.q_size, hidden))
            shapes.setdefault("self_attn.k_proj", (geo.kv_size, hidden))
            shapes.setdefault("self_attn.v_proj", (geo.kv_size, hidden))
            shapes.setdefault("self_attn.o_proj", (hidden, geo.q_size))
        inter = base.config.get("intermediate_size")
        if isinstance(inter, int) and isinstance(hidden, int):
            shapes.setdefault("mlp.gate_proj", (inter, hidden))
            shapes.setdefault("mlp.up_proj", (inter, hidden))
            shapes.setdefault("mlp.down_proj", (hidden, inter))
    # the MLP slots determine each other
    g, u, d = (shapes.get(k) for k in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    known = g or u or (d[::-1] if d else None)
    if known:
        shapes.setdefault("mlp.gate_proj", known)
        shapes.setdefault("mlp.up_proj", known)
        shapes.setdefault("mlp.down_proj", known[::-1])
    # k and v share a shape; q/o need the base when only k or v is adapted (never padded then)
    kv = shapes.get("self_attn.k_proj") or shapes.get("self_attn.v_proj")
    if kv:
        shapes.setdefault("self_attn.k_proj", kv)
        shapes.setdefault("self_attn.v_proj", kv)
    return shapes


def write(adapter: Adapter, target: Path, *, base=None, report: dict | None = None) -> list[Path]:
    """Write a LitGPT LoRA checkpoint folder: lit_model.pth.lora + hyperparameters.yaml.

    Ranks are zero-padded to the largest, per-module scales are multiplied into B (one
    lora_alpha / lora_r for the file), and projections a layer lacks are written as zeros.

    Raises:
        UnsupportedError: DoRA, bias deltas, modules_to_save, or modules LitGPT cannot name.
    """
    import yaml

    target = Path(target)
    sd, lora_hp = build_state_dict(adapter, base=base, report=report)
    target.mkdir(parents=True, exist_ok=True)
    hparams: dict = {}
    if adapter.format == NAME and isinstance(adapter.config, dict):
        hparams.update(adapter.config)
    elif adapter.base_model:
        bm = str(adapter.base_model)
        hparams["checkpoint_dir"] = f"checkpoints/{bm}" if re.fullmatch(r"[\w.-]+/[\w.-]+", bm) else bm
    for old in _OLD_HPARAMS:
        hparams.pop(old, None)
    hparams.update(lora_hp)
    hparams.setdefault("lora_dropout", 0.0)
    weights = target / WEIGHTS_NAME
    save_torch_pickle({"model": sd}, weights)
    hp_path = target / HPARAMS_NAME
    with open(hp_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(hparams, fh, sort_keys=False)
    files = [weights, hp_path]
    model_config = adapter.extras.get("litgpt_model_config") if adapter.format == NAME else None
    if model_config:
        mc = target / "model_config.yaml"
        with open(mc, "w", encoding="utf-8") as fh:
            yaml.safe_dump(model_config, fh, sort_keys=False)
        files.append(mc)
    return files
