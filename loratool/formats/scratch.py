"""Hand-written ("from scratch") LoRA in a plain state dict, one .pth or .safetensors file.

Two key styles, both with ``dW = scale * B @ A`` in ``F.linear`` orientation (out, in):

    <parent>.lora_<leaf>_matrix_A   (r, in)    the LoRA of module <parent>.<leaf>, held by its parent
    <parent>.lora_<leaf>_matrix_B   (out, r)   (the RoBERTa tutorial: attention.self.lora_query_matrix_A)
    <module>.lora_matrix_A          (r, in)    a generic ``LoraLinear`` holding its own pair
    <module>.lora_matrix_B          (out, r)

No alpha is stored: the scale is 1 unless the reader is told ``scale`` (absolute) or
``alpha`` (scale = alpha / r). Other tensors (classifier head, biases, LayerNorm) and
non-tensor entries may sit in the same file: with a base model, the tensors of a module the
file holds completely (every tensor the base has for it, same shapes, outside the adapted
modules: a LayerNorm, a head) become modules_to_save, as do the tensors a
``modules_to_save`` entry (a list of names, written by loratool) names; the rest is reported
and carried along only when writing scratch again.

Writing produces one file (``OUTPUT_IS_FILE``): a torch pickle when OUT ends in .pth, .pt
or .bin, safetensors otherwise. Per-module scales are baked into B so the file reads back
exactly with the default scale 1.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path

import torch

from loratool.adapter import Adapter, LoraModule, ModuleKind
from loratool.errors import FormatError, InputError, UnsupportedError
from loratool.formats import refuse_lora_bias
from loratool.io.pickle_scan import open_torch_zip
from loratool.io.store import (
    LazyTensor,
    TensorStore,
    is_safetensors_file,
    is_torch_pickle,
    read_safetensors_header,
)
from loratool.io.writer import save_torch_pickle, write_safetensors

NAME = "scratch"
OUTPUT_IS_FILE = True

SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
MTS_ENTRY = "modules_to_save"  # a non-tensor entry naming the tensors that are modules_to_save

# <parent>.lora_<leaf>_matrix_<A|B>  or  <module>.lora_matrix_<A|B>
_KEY_RE = re.compile(r"^(?:(?P<parent>.+)\.)?lora_(?:(?P<leaf>[A-Za-z_][A-Za-z0-9_]*?)_)?matrix_(?P<ab>[AB])$")


def parse_key(key: str) -> tuple[str, str, str] | None:
    """(module name, "A"|"B", style) of a scratch LoRA key, style "attr" or "generic"; None otherwise."""
    m = _KEY_RE.match(key)
    if m is None:
        return None
    parent, leaf, ab = m.group("parent"), m.group("leaf"), m.group("ab")
    if leaf:
        return (f"{parent}.{leaf}" if parent else leaf), ab, "attr"
    if not parent:
        return None
    return parent, ab, "generic"


def lora_keys(module: str, style: str = "attr") -> tuple[str, str]:
    """The (A, B) keys of a module in a key style ("attr" falls back to "generic" for numeric leaves)."""
    parent, _, leaf = module.rpartition(".")
    if style == "attr" and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", leaf):
        prefix = f"{parent}." if parent else ""
        return f"{prefix}lora_{leaf}_matrix_A", f"{prefix}lora_{leaf}_matrix_B"
    return f"{module}.lora_matrix_A", f"{module}.lora_matrix_B"


_PICKLE_HINT = re.compile(rb"lora_(?:[A-Za-z0-9_]{0,64}_)?matrix_[AB]")  # bounded: linear on hostile bytes


def _pickle_may_hold_scratch(path: Path, limit: int = 1 << 20) -> bool:
    """A cheap look at a torch pickle's object stream (never unpickled) for scratch key names."""
    try:
        if zipfile.is_zipfile(path):
            with open_torch_zip(path) as zf:  # the directory's entry count bounded first
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                if not names:
                    return False
                with zf.open(names[0]) as fh:
                    head = fh.read(limit)
        else:
            with open(path, "rb") as fh:
                head = fh.read(limit)
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return False
    return _PICKLE_HINT.search(head) is not None


def _candidate_keys(path: Path) -> list[str] | None:
    """Tensor names of a candidate file, read cheaply; None if it is not one."""
    if is_safetensors_file(path):
        try:
            entries, _, _ = read_safetensors_header(path)
        except FormatError:
            return None
        return [e.name for e in entries]
    if is_torch_pickle(path):
        if not _pickle_may_hold_scratch(path):
            return None
        try:
            return TensorStore([path]).keys()
        except FormatError:
            return None
    return None


def _single_file(path: Path) -> Path | None:
    """The one scratch file of a folder, or None."""
    files = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix in SUFFIXES]
    hits = [p for p in files if any(parse_key(k) for k in (_candidate_keys(p) or []))]
    return hits[0] if len(hits) == 1 else None


def detect(path: Path) -> bool:
    path = Path(path)
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            return False
        return _single_file(path) is not None
    if not (path.is_file() and (is_torch_pickle(path) or is_safetensors_file(path))):  # by content, whatever its name
        return False
    keys = _candidate_keys(path)
    return bool(keys) and any(parse_key(k) for k in keys)


def _resolve_scale(alpha, scale, rank: int, path: Path) -> tuple[float, float]:
    if alpha is not None and scale is not None:
        raise InputError(f"{path}: give --alpha or --scale, not both")
    for what, v in (("alpha", alpha), ("scale", scale)):
        if v is not None and not math.isfinite(float(v)):
            raise InputError(f"{path}: --{what} must be finite, got {v}")
    if scale is not None:
        return float(scale) * rank, float(scale)
    if alpha is not None:
        return float(alpha), float(alpha) / rank
    return float(rank), 1.0


def _resolve_file(path: Path) -> Path:
    """The scratch file to read: ``path`` itself, or the one scratch file of a folder."""
    if path.is_dir():
        single = _single_file(path)
        if single is None:
            raise FormatError(path, "expected a folder with exactly one scratch LoRA file (.pth or .safetensors); give the file")
        return single
    return path


def _non_tensor_entries(store: TensorStore) -> dict[str, object]:
    """The file's non-tensor entries: pickle extras, plus safetensors metadata (JSON-decoded when it parses)."""
    entries: dict[str, object] = dict(store.extras)
    for k, v in store.metadata.items():
        if k == "format":
            continue
        try:
            entries[k] = json.loads(v)
        except ValueError:
            entries[k] = v
    return entries


def _pair_lora_keys(store: TensorStore, path: Path) -> tuple[dict[str, dict[str, str]], dict[str, str], list[str]]:
    """Group the LoRA keys by module: ({module: {"A"|"B": key}}, {module: style}, other keys)."""
    pairs: dict[str, dict[str, str]] = {}
    styles: dict[str, str] = {}
    others: list[str] = []
    for key in store.keys():
        parsed = parse_key(key)
        if parsed is None:
            others.append(key)
            continue
        module, ab, style = parsed
        if ab in pairs.setdefault(module, {}):
            raise FormatError(path, f"{module}: two lora_matrix_{ab} tensors ({pairs[module][ab]}, {key})")
        pairs[module][ab] = key
        styles[module] = style
    if not pairs:
        raise FormatError(path, "no scratch LoRA tensors (lora_*_matrix_A / lora_*_matrix_B)")
    return pairs, styles, others


def _check_pair_shapes(path: Path, module: str, A: LazyTensor, B: LazyTensor) -> None:
    """A must be (r, in) and B (out, r), with r > 0."""
    if len(A.shape) != 2 or len(B.shape) != 2:
        raise FormatError(path, f"{module}: LoRA matrices must be 2-D, got A {A.shape}, B {B.shape}")
    if A.shape[0] != B.shape[1]:
        if A.shape[1] == B.shape[0]:
            raise FormatError(path, f"{module}: A is {A.shape} and B is {B.shape}: expected A (r, in) and B (out, r)")
        raise FormatError(path, f"{module}: A is {A.shape} but B is {B.shape} (ranks differ)")
    if A.shape[0] == 0:
        raise FormatError(path, f"{module}: rank 0")


def _build_modules(
    path: Path, store: TensorStore, pairs: dict[str, dict[str, str]], base, alpha, scale, warnings: list[str]
) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """The LoraModules, keyed by their (base-mapped) names, and {file module name: that name}."""
    modules: dict[str, LoraModule] = {}
    renamed: dict[str, str] = {}
    for module, p in pairs.items():
        if "A" not in p or "B" not in p:
            raise FormatError(path, f"{module}: has lora_matrix_{'A' if 'A' in p else 'B'} without its pair")
        A, B = store.lazy(p["A"]), store.lazy(p["B"])
        _check_pair_shapes(path, module, A, B)
        mod_alpha, mod_scale = _resolve_scale(alpha, scale, A.shape[0], path)
        name = module
        kind = ModuleKind.LINEAR
        if base is not None:
            key = base.weight_name(module)
            if key is None:
                warnings.append(f"{module}: not in the base model {base.path}; name kept as in the file")
            else:
                name = key[: -len(".weight")]
                kind = base.module_kind(name, kind)
        renamed[module] = name
        if name in modules:
            raise FormatError(path, f"{module}: maps onto {name}, which another LoRA pair already targets")
        modules[name] = LoraModule(name, kind, A, B, alpha=mod_alpha, scale=mod_scale)
    return modules, renamed


def _sort_other_tensors(
    store: TensorStore, others: list[str], base, marked: set[str], adapted_files: set[str], adapted_base: set[str]
) -> tuple[dict[str, LazyTensor], dict[str, LazyTensor], dict[str, list[str]], dict[str, dict[str, tuple[str, str, LazyTensor]]]]:
    """Sort the non-LoRA tensors into (to_save, kept, {reason: kept keys}, candidates).

    Without a base only the tensors ``marked`` by a modules_to_save entry are saved; with one,
    a tensor the base has (same shape, outside the adapted modules) becomes a candidate:
    {base module: {leaf: (file key, base name, tensor)}}, see ``_take_whole_modules``.
    """
    to_save: dict[str, LazyTensor] = {}
    kept: dict[str, LazyTensor] = {}
    reasons: dict[str, list[str]] = {}
    candidates: dict[str, dict[str, tuple[str, str, LazyTensor]]] = {}
    for key in others:
        t = store.lazy(key)
        owner = key.rsplit(".", 1)[0] if "." in key else ""
        if base is None and key in marked:
            to_save[key] = t
            continue
        if base is None:
            reasons.setdefault("no --base to place them", []).append(key)
            kept[key] = t
            continue
        target = base.tensor_name(key)
        if target is None:
            reasons.setdefault("not in the base model", []).append(key)
            kept[key] = t
        elif owner in adapted_files or target.rsplit(".", 1)[0] in adapted_base:
            reasons.setdefault("they belong to a LoRA-adapted module, which PEFT cannot also replace", []).append(key)
            kept[key] = t
        elif tuple(base.store.shape(target)) != tuple(t.shape):
            reasons.setdefault("shape differs from the base", []).append(key)
            kept[key] = t
        else:
            mod, _, lf = target.rpartition(".")
            candidates.setdefault(mod, {})[lf] = (key, target, t)
    return to_save, kept, reasons, candidates


def _take_whole_modules(
    base,
    candidates: dict[str, dict[str, tuple[str, str, LazyTensor]]],
    to_save: dict[str, LazyTensor],
    kept: dict[str, LazyTensor],
    reasons: dict[str, list[str]],
) -> None:
    """Move candidates into ``to_save`` module by module, the rest into ``kept``.

    PEFT's modules_to_save replaces whole modules: take a module only when the file holds
    every tensor the base has for it (a LayerNorm's weight and bias, a head...).
    """
    base_leaves: dict[str, set[str]] = {}
    for k in base.keys():
        mod, _, lf = k.rpartition(".")
        base_leaves.setdefault(mod, set()).add(lf)
    for mod, leaves in candidates.items():
        if set(leaves) == base_leaves.get(mod, set()):
            for key, target, t in leaves.values():
                to_save[target] = t
        else:
            for key, _, t in leaves.values():
                reasons.setdefault("only part of their module is in the file (PEFT's modules_to_save replaces whole modules)", []).append(key)
                kept[key] = t


def _closing_warnings(
    path: Path, reasons: dict[str, list[str]], entries: dict[str, object], modules: dict[str, LoraModule], base, alpha, scale
) -> list[str]:
    """The warnings about what was not carried, names kept and the assumed scale."""
    warnings: list[str] = []
    for why, keys in reasons.items():
        shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
        warnings.append(f"{path.name}: {len(keys)} non-LoRA tensor(s) not carried as modules_to_save ({why}): {shown}")
    if entries:
        shown = ", ".join(f"{k}={v!r}" for k, v in list(entries.items())[:6])
        warnings.append(f"{path.name}: non-tensor entries kept only for scratch output: {shown}")
    if base is None and any("." in m for m in modules):
        warnings.append(f"{path.name}: module names kept as in the file (e.g. {next(iter(modules))}); pass --base to map them onto the base's names")
    if alpha is None and scale is None:
        warnings.append(f"{path.name}: scratch LoRA stores no alpha: scale 1 assumed (use --alpha or --scale otherwise)")
    return warnings


def read(path: Path, *, base=None, alpha: float | None = None, scale: float | None = None) -> Adapter:
    """Read a scratch LoRA state dict.

    Args:
        path: the .pth/.safetensors file (or a folder holding exactly one).
        base: optional ``BaseModel``: module names are mapped onto the base's names (a wrapper
            prefix such as ``model.`` is dropped), kinds follow the base, head tensors the base
            has become modules_to_save.
        alpha: scale = alpha / r for every module.
        scale: an absolute scale for every module (default 1).
    Raises:
        FormatError, InputError.
    """
    path = _resolve_file(Path(path))
    store = TensorStore([path])
    extras_entries = _non_tensor_entries(store)
    pairs, styles, others = _pair_lora_keys(store, path)

    warnings: list[str] = []
    modules, renamed = _build_modules(path, store, pairs, base, alpha, scale, warnings)

    marked = extras_entries.pop(MTS_ENTRY, None)
    marked = set(marked) if isinstance(marked, list) and all(isinstance(x, str) for x in marked) else set()
    to_save, kept, reasons, candidates = _sort_other_tensors(store, others, base, marked, set(pairs), set(modules))
    if candidates:
        _take_whole_modules(base, candidates, to_save, kept, reasons)
    warnings += _closing_warnings(path, reasons, extras_entries, modules, base, alpha, scale)

    return Adapter(
        format=NAME,
        modules=modules,
        modules_to_save=to_save,
        base_model=extras_entries.get("model_id") if isinstance(extras_entries.get("model_id"), str) else None,
        target_modules=sorted(modules),
        path=path,
        files=[path],
        config={},
        warnings=warnings,
        extras={
            "scratch_styles": {renamed[m]: s for m, s in styles.items()},
            "scratch_file_names": {renamed[m]: m for m in renamed},
            "scratch_tensors": kept,
            "scratch_entries": extras_entries,
        },
    )


def check_writable(adapter: Adapter) -> None:
    """Refuse what a scratch file cannot hold.

    Raises:
        UnsupportedError: DoRA magnitudes, lora_bias or embedding LoRA would be lost.
    """
    dora = [m.name for m in adapter if m.magnitude is not None]
    if dora:
        raise UnsupportedError(f"scratch cannot hold DoRA magnitudes (e.g. {dora[0]}); they would be lost")
    refuse_lora_bias(adapter, "scratch")
    emb = [m.name for m in adapter if m.kind is ModuleKind.EMBEDDING]
    if emb:
        raise UnsupportedError(f"scratch LoRA is linear only: the embedding LoRA of {emb[0]} would be lost")


def _json_safe(v: object) -> object:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    return str(v)


def write(adapter: Adapter, target: Path, *, base=None, out_name: str | None = None, container: str | None = None, report: dict | None = None) -> list[Path]:
    """Write one scratch state dict file.

    Args:
        adapter: the adapter.
        target: the file to write.
        out_name: the final OUT name; its suffix picks the container (.pth/.pt/.bin: torch pickle).
        container: "pickle" or "safetensors", overriding ``out_name``.
        report: a dict that receives ``baked`` notes.
    Raises:
        UnsupportedError: DoRA, lora_bias or embedding LoRA.
    """
    check_writable(adapter)
    target = Path(target)
    suffix = Path(out_name).suffix if out_name else target.suffix
    if container is None:
        container = "pickle" if suffix in PICKLE_SUFFIXES else "safetensors"
    styles = adapter.extras.get("scratch_styles", {}) if adapter.format == NAME else {}
    file_names = adapter.extras.get("scratch_file_names", {}) if adapter.format == NAME else {}
    baked = []
    sd: dict[str, torch.Tensor] = {}
    for m in adapter:
        A, B = m.A.load(), m.B.load()
        if m.scale != 1.0:
            B = (B.double() * m.scale).to(B.dtype)
            baked.append(m.name)
        a_key, b_key = lora_keys(file_names.get(m.name, m.name), styles.get(m.name, "attr"))
        for k in (a_key, b_key):
            if k in sd:
                raise InputError(f"{m.name}: scratch key {k} collides with another module")
        sd[a_key] = A.contiguous()
        sd[b_key] = B.contiguous()
    for name, t in adapter.modules_to_save.items():
        sd[name] = t.load().contiguous()
    if adapter.format == NAME:
        for name, t in adapter.extras.get("scratch_tensors", {}).items():
            sd.setdefault(name, t.load().contiguous())
    entries = dict(adapter.extras.get("scratch_entries", {})) if adapter.format == NAME else {}
    if adapter.modules_to_save:
        entries[MTS_ENTRY] = sorted(adapter.modules_to_save)
    if baked and report is not None:
        report.setdefault("baked", []).append(f"scale baked into B for {len(baked)} module(s) (scratch files hold scale 1)")
    if container == "pickle":
        obj: dict[str, object] = dict(sd)
        for k, v in entries.items():
            obj.setdefault(k, v)
        save_torch_pickle(obj, target)
    else:
        meta = {"format": "pt"}
        for k, v in entries.items():
            meta[str(k)] = json.dumps(_json_safe(v))
        write_safetensors(target, sd, metadata=meta)
    return [target]
