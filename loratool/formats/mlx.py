"""MLX-LM adapters: a folder with adapters.safetensors and adapter_config.json.

Layout (mlx_lm/tuner/lora.py, dora.py, utils.py), names as in the transformers model:

    <module>.lora_a   (in, r)    = A^T    (embeddings: (num_embeddings, r))
    <module>.lora_b   (r, out)   = B^T    (embeddings: (r, dim))
    <module>.m        (out,)     DoRA magnitude (fine_tune_type "dora")

    dW (out, in) = scale * lora_b^T @ lora_a^T = scale * B @ A

adapter_config.json: ``fine_tune_type`` (lora | dora | full), ``num_layers`` (LoRA goes into
the last N blocks), ``lora_parameters {rank, scale, dropout, keys}``. ``scale`` is absolute;
an ``alpha`` there is ignored by mlx-lm. ``keys`` are module paths inside a block
(``self_attn.q_proj``) or, for modules outside the blocks, full paths (``lm_head``).

mlx-lm builds every adapted layer with the one rank and scale of ``lora_parameters``:
writing pads lower ranks with zero rows/columns and bakes per-module scales into lora_b,
both exact. A LoRA bias and modules_to_save have no place in the format and are refused;
DoRA is written as fine_tune_type "dora" when every module has a magnitude.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch

from loratool.adapter import Adapter, LoraModule, ModuleKind, refuse_saved_copies
from loratool.errors import FormatError, InputError, UnsupportedError
from loratool.formats import refuse_lora_bias, refuse_modules_to_save
from loratool.io.store import TensorStore, read_json, read_safetensors_header
from loratool.io.writer import write_safetensors
from loratool.names import is_embedding_name, split_layer

NAME = "mlx"
OUTPUT_IS_FILE = False
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
LEAVES = ("lora_a", "lora_b", "m")


def _is_mlx_config(path: Path) -> bool:
    try:
        cfg = read_json(path)
    except FormatError:
        return False
    return isinstance(cfg, dict) and "peft_type" not in cfg and ("lora_parameters" in cfg or "fine_tune_type" in cfg)


def _has_mlx_keys(path: Path) -> bool:
    try:
        entries, _, _ = read_safetensors_header(path)
    except FormatError:
        return False
    return any(e.name.endswith((".lora_a", ".lora_b")) for e in entries)


def detect(path: Path) -> bool:
    path = Path(path)
    if path.is_dir():
        if (path / WEIGHTS_NAME).is_file():
            return not any((path / n).exists() for n in ("adapter_model.safetensors", "adapter_model.bin"))
        return (path / CONFIG_NAME).is_file() and _is_mlx_config(path / CONFIG_NAME)
    if path.name == CONFIG_NAME:
        return _is_mlx_config(path)
    return path.suffix == ".safetensors" and _has_mlx_keys(path)


def _locate(path: Path) -> tuple[Path | None, Path]:
    path = Path(path)
    if not path.exists():
        raise FormatError(path, "adapter not found")
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() and path.name != CONFIG_NAME else folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FormatError(folder, f"no {WEIGHTS_NAME}")
    config = folder / CONFIG_NAME
    return (config if config.is_file() else None), weights


def _number(value, what: str, path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FormatError(path, f"{what} must be a number, got {value!r}")
    return float(value)


def read(path: Path, *, base=None, scale: float | None = None) -> Adapter:
    """Read an MLX-LM adapter folder (or its adapters.safetensors).

    Args:
        path: the folder, or adapters.safetensors beside its adapter_config.json.
        base: optional ``BaseModel`` (kinds of the modules).
        scale: the absolute scale (overrides lora_parameters.scale, with a warning when they differ).
    Raises:
        FormatError, UnsupportedError.
    """
    config_path, weights = _locate(path)
    config: dict = {}
    warnings: list[str] = []
    if config_path is not None:
        raw = read_json(config_path)
        if not isinstance(raw, dict):
            raise FormatError(config_path, "is not a JSON object")
        config = raw
    else:
        warnings.append(f"{weights.parent}: no {CONFIG_NAME}; rank from the tensors")
    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type == "full":
        raise UnsupportedError(f"{config_path}: fine_tune_type 'full' holds full weights, not a LoRA adapter")
    if fine_tune_type not in ("lora", "dora"):
        raise FormatError(config_path, f"unknown fine_tune_type {fine_tune_type!r}")
    params = config.get("lora_parameters") or {}
    if not isinstance(params, dict):
        raise FormatError(config_path, "lora_parameters must be an object")
    if scale is not None:  # an explicit scale wins, as LitGPT's alpha override does
        mlx_scale = _number(scale, "--scale", weights)
        stored = params.get("scale")
        if stored is not None and _number(stored, "lora_parameters.scale", config_path) != mlx_scale:
            warnings.append(f"{config_path}: lora_parameters.scale {stored} overridden by --scale {mlx_scale:g}")
    elif params.get("scale") is not None:
        mlx_scale = _number(params["scale"], "lora_parameters.scale", config_path)
    else:
        raise FormatError(config_path or weights, "lora_parameters.scale is missing; give the scale with --scale")
    config_rank = params.get("rank")

    store = TensorStore([weights])
    parts: dict[str, dict[str, str]] = {}
    for key in store.keys():
        module, _, leaf = key.rpartition(".")
        if leaf not in LEAVES or not module:
            raise FormatError(weights, f"unexpected tensor {key!r} (MLX adapters hold lora_a, lora_b and m)")
        parts.setdefault(module, {})[leaf] = key

    modules: dict[str, LoraModule] = {}
    for module, p in parts.items():
        if "lora_a" not in p or "lora_b" not in p:
            raise FormatError(weights, f"{module}: has {'lora_a' if 'lora_a' in p else 'lora_b'} without its pair")
        la, lb = store.lazy(p["lora_a"]), store.lazy(p["lora_b"])
        if len(la.shape) != 2 or len(lb.shape) != 2:
            raise UnsupportedError(f"{weights}: {module}: {len(la.shape)}-D LoRA (mixture-of-experts SwitchLinear) is not supported")
        if la.shape[1] != lb.shape[0]:
            raise FormatError(weights, f"{module}: lora_a is {la.shape} but lora_b is {lb.shape} (ranks differ)")
        rank = la.shape[1]
        if rank == 0:
            raise FormatError(weights, f"{module}: rank 0")
        if config_rank is not None and config_rank != rank:
            warnings.append(f"{module}: rank {rank} differs from lora_parameters.rank {config_rank}")
        A = la.map(lambda t: t.T, shape=(la.shape[1], la.shape[0]))
        B = lb.map(lambda t: t.T, shape=(lb.shape[1], lb.shape[0]))
        kind = ModuleKind.EMBEDDING if is_embedding_name(module) else ModuleKind.LINEAR
        if base is not None and kind is not ModuleKind.EMBEDDING:
            kind = base.module_kind(module, kind)
        magnitude = None
        if "m" in p:
            magnitude = store.lazy(p["m"])
            if magnitude.shape != (B.shape[0],):
                raise FormatError(weights, f"{module}: DoRA magnitude m is {magnitude.shape}, expected ({B.shape[0]},)")
        elif fine_tune_type == "dora":
            raise FormatError(weights, f"{module}: fine_tune_type is dora but the module has no magnitude m")
        modules[module] = LoraModule(module, kind, A, B, alpha=mlx_scale * rank, scale=mlx_scale, magnitude=magnitude)
    if not modules:
        warnings.append(f"{weights}: holds no LoRA tensors")
    return Adapter(
        format=NAME,
        modules=modules,
        base_model=config.get("model") if isinstance(config.get("model"), str) else None,
        target_modules=params.get("keys"),
        use_dora=any(m.magnitude is not None for m in modules.values()),
        path=Path(path),
        files=[f for f in (config_path, weights) if f is not None],
        config=config,
        warnings=warnings,
        extras={"mlx_modules": sorted(modules)},
    )


def check_writable(adapter: Adapter) -> None:
    """Refuse what MLX-LM cannot hold.

    Raises:
        UnsupportedError: lora_bias, saved base-layer copies, modules_to_save, DoRA on some
            modules only, DoRA embeddings.
    """
    refuse_lora_bias(adapter, "MLX")
    refuse_saved_copies(adapter, "MLX")
    refuse_modules_to_save(adapter, "MLX")
    dora = [m for m in adapter if m.magnitude is not None]
    if dora and len(dora) != len(adapter):
        plain = next(m.name for m in adapter if m.magnitude is None)
        raise UnsupportedError(f"MLX applies DoRA to every adapted layer, but {plain} has no DoRA magnitude")
    emb = [m.name for m in dora if m.kind is ModuleKind.EMBEDDING]
    if emb:
        raise UnsupportedError(f"DoRA on the embedding {emb[0]} cannot be written for MLX")


def _num_layers(adapter: Adapter, base, indices: list[int]) -> tuple[int, str | None]:
    if base is not None:
        n = base.config.get("num_hidden_layers") or base.config.get("n_layer") or (base.config.get("text_config") or {}).get("num_hidden_layers")
        if isinstance(n, int) and n > 0:
            return (n - min(indices)) if indices else 0, None
    if adapter.format == NAME and set(adapter.modules) == set(adapter.extras.get("mlx_modules", ())) and isinstance(adapter.config.get("num_layers"), int):
        return adapter.config["num_layers"], None
    if not indices:
        return 0, None
    # the block count is unknown: -1 builds LoRA layers in every block (mlx-lm: layers[-max(n, 0):]);
    # blocks without tensors keep lora_b = 0, an exact zero delta. max(indices) + 1 would put them
    # in the wrong blocks whenever the model has more (load_adapters then refuses the tensors).
    low = min(indices)
    return -1, (f"num_layers -1: LoRA layers in every block, zero in blocks below {low} "
                "(pass --base to take num_layers from the base config)") if low else None


def write(adapter: Adapter, folder: Path, *, base=None, report: dict | None = None) -> list[Path]:
    """Write an MLX-LM adapter folder.

    Args:
        adapter: the adapter.
        folder: the output folder.
        base: optional ``BaseModel``: gives num_layers exactly.
        report: a dict that receives ``baked`` and ``notes`` lists.
    Raises:
        UnsupportedError: see ``check_writable``.
    """
    check_writable(adapter)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mods = list(adapter)
    rank = max((m.rank for m in mods), default=8)
    scale = Counter(m.scale for m in mods).most_common(1)[0][0] if mods else 1.0
    if scale == 0:
        nonzero = [m.scale for m in mods if m.scale != 0]
        scale = Counter(nonzero).most_common(1)[0][0] if nonzero else 1.0
    padded, rescaled = [], []
    sd: dict[str, torch.Tensor] = {}
    keys: list[str] = []
    indices: list[int] = []
    for m in mods:
        A, B = m.A.load(), m.B.load()
        if m.scale != scale:
            B = (B.double() * (m.scale / scale)).to(B.dtype)
            rescaled.append(m.name)
        if m.rank < rank:
            A = torch.cat([A, A.new_zeros(rank - m.rank, A.shape[1])], dim=0)
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - m.rank)], dim=1)
            padded.append(m.name)
        sd[f"{m.name}.lora_a"] = A.T.contiguous()
        sd[f"{m.name}.lora_b"] = B.T.contiguous()
        if m.magnitude is not None:
            sd[f"{m.name}.m"] = m.magnitude.load().contiguous()
        parts = split_layer(m.name)
        if parts is not None:
            indices.append(parts[1])
            key = parts[2]
        else:
            key = m.name
        if key not in keys:
            keys.append(key)
    num_layers, note = _num_layers(adapter, base, indices)
    config = {
        "fine_tune_type": "dora" if adapter.use_dora or any(m.magnitude is not None for m in mods) else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys},
        "model": adapter.base_model,
    }
    if config["fine_tune_type"] == "dora" and not all(m.magnitude is not None for m in mods):
        raise InputError("DoRA adapter module without a magnitude vector")
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=4)
        fh.write("\n")
    write_safetensors(folder / WEIGHTS_NAME, sd, metadata={"format": "mlx"})
    if report is not None:
        if rescaled:
            report.setdefault("baked", []).append(f"per-module scale baked into lora_b for {len(rescaled)} module(s) (MLX holds one scale, {scale:g})")
        if padded:
            report.setdefault("baked", []).append(f"rank zero-padded to {rank} for {len(padded)} module(s) (MLX holds one rank)")
        if note:
            report.setdefault("notes", []).append(note)
    return [folder / CONFIG_NAME, folder / WEIGHTS_NAME]
