"""PEFT adapters (adapter_config.json + adapter_model.safetensors / .bin), read and written as PEFT does.

Key layout (prefix ``base_model.model.``, adapter name removed on save):

    <module>.lora_A.weight           (r, in)         <module>.lora_B.weight   (out, r)
    <module>.lora_B.bias             (out,)          lora_bias=True
    <module>.lora_embedding_A        (r, num_emb)    <module>.lora_embedding_B (dim, r)
    <module>.lora_magnitude_vector   (out,)          DoRA (older PEFT: ``...vector.weight``)
    <module>.lora_E                  (r, 1)          AdaLoRA: dW = B @ (A * E) * alpha / ranknum
    <tensor name>                    any             modules_to_save (e.g. ``classifier.weight``)

Rank and alpha per module follow PEFT's own rule (``get_pattern_key``): a pattern key matches
module name ``n`` when ``re.match(rf"(.*\\.)?({key})$", n)``; the first matching key wins.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from loratool.adapter import Adapter, LoraModule, ModuleKind, lora_scale
from loratool.errors import FormatError, InputError, UnsupportedError
from loratool.io.store import LazyTensor, TensorStore, read_json, refuse_tensor_count
from loratool.names import SAVED_EMBEDDING_LEAVES

if TYPE_CHECKING:  # reading a PEFT folder (inspect) needs no torch; writing one imports it
    import torch

NAME = "peft"
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."

SUPPORTED_TYPES = {"LORA", "ADALORA"}

# Fields of LoraConfig/AdaLoraConfig across PEFT 0.3 .. current. Anything else gets a warning.
_KNOWN_FIELDS = {
    "alora_invocation_tokens", "arrow_config", "alpha_pattern", "auto_mapping", "base_model_name_or_path",
    "beta1", "beta2", "bias", "corda_config", "deltaT", "ensure_weight_tying", "eva_config", "exclude_modules",
    "enable_lora", "fan_in_fan_out", "inference_mode", "init_lora_weights", "init_r", "layer_replication",
    "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout",
    "lora_ga_config", "megatron_config", "megatron_core", "merge_weights", "modules_to_save", "orth_reg_weight",
    "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config",
    "target_modules", "target_parameters", "target_r", "task_type", "tfinal", "tinit", "total_step",
    "trainable_token_indices", "use_dora", "use_qalora", "use_rslora", "layers_to_transform", "use_bdlora",
    "bdlora_config", "lora_ga_config", "use_alora", "modules_to_tie", "kasa_config", "monteclora_config",
    "velora_config", "trainable_token_indices", "lora_bias",
}

_KEY_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|lora_E|ranknum)"
    r"(?:\.(?P<adapter>(?!weight$|bias$)[^.]+))?(?:\.(?P<leaf>weight|bias))?$"
)


def detect(path: Path) -> bool:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir() or path.name == CONFIG_NAME:
        # an MLX-LM folder also has adapter_config.json, beside adapters.safetensors
        if (folder / "adapters.safetensors").is_file() and not any((folder / w).exists() for w in WEIGHT_NAMES):
            return False
        return (folder / CONFIG_NAME).is_file()
    return path.name in WEIGHT_NAMES


def locate(path: Path, adapter_name: str | None = None) -> tuple[Path, Path]:
    """Find (adapter_config.json, weights file) for a folder, a weights file or a sub-adapter.

    Raises:
        FormatError: the folder lacks a config or weights.
    """
    path = Path(path)
    if not path.exists():
        raise FormatError(path, "adapter not found")
    if path.is_file():
        folder = path.parent
        weights = path if path.name != CONFIG_NAME else None
    else:
        folder = path / adapter_name if adapter_name else path
        if adapter_name and not folder.is_dir():
            raise FormatError(path, f"has no sub-adapter folder {adapter_name!r}")
        weights = None
    config = folder / CONFIG_NAME
    if not config.is_file():
        subs = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file()) if folder.is_dir() else []
        hint = f" (sub-adapters here: {', '.join(subs)}; pick one with --adapter-name)" if subs else ""
        raise FormatError(folder, f"no {CONFIG_NAME}{hint}")
    if weights is None:
        for name in WEIGHT_NAMES:
            if (folder / name).exists():
                weights = folder / name
                break
        else:
            raise FormatError(folder, f"no adapter weights ({' or '.join(WEIGHT_NAMES)})")
    return config, weights


# a user pattern from a config (target_modules, rank_pattern, alpha_pattern, layers_pattern) gets
# this long to match one module name; LORATOOL_REGEX_SECONDS raises it
REGEX_SECONDS = 0.5


def user_match(pattern: str, name: str, *, what: str, full: bool = False):
    """``re.match`` / ``re.fullmatch`` of a pattern that came from a file, under a time bound.

    A pattern with catastrophic backtracking (``(x+x+)+y``) would otherwise hang every command;
    the ``regex`` package (re's semantics, with a timeout) stops it.

    Returns:
        The match, or None (also for a pattern that does not compile, as PEFT skips it).
    Raises:
        InputError: the match took longer than the bound, naming ``what`` and the pattern.
    """
    import regex

    seconds = float(os.environ.get("LORATOOL_REGEX_SECONDS", REGEX_SECONDS))
    try:
        return (regex.fullmatch if full else regex.match)(pattern, name, timeout=seconds)
    except TimeoutError:
        raise InputError(
            f"{what} pattern {pattern!r} takes more than {seconds:g} s to match {name!r} (catastrophic backtracking); "
            "refused (raise the bound with LORATOOL_REGEX_SECONDS)"
        ) from None
    except (regex.error, re.error, TypeError, ValueError):
        return None


def pattern_key(patterns, name: str, *, what: str = "rank_pattern/alpha_pattern") -> str | None:
    """PEFT's get_pattern_key: the first key whose regex matches the end of ``name``."""
    for key in patterns:
        if user_match(rf"(.*\.)?({key})$", name, what=f"{what} key") is not None:
            return key
    return None


def target_matches(targets, name: str, *, layers_to_transform=None, layers_pattern=None) -> bool:
    """PEFT's target_modules rule: a string is a full regex match, a list a suffix match."""
    if targets is None:
        return False
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        return user_match(targets, name, what="target_modules", full=True) is not None
    found = name in targets or any(name.endswith(f".{t}") for t in targets)
    if found and layers_to_transform not in (None, []):
        layers = [layers_to_transform] if isinstance(layers_to_transform, int) else list(layers_to_transform)
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [])
        match = None
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        for pattern in patterns:
            match = user_match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name, what="layers_pattern")
            if match:
                break
        found = match is not None and int(match.group("idx")) in layers
    return found


_F32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _number(config: dict, key: str, default, path: Path, *, kind=float):
    value = config.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise FormatError(path, f"{key} must be a number, got {value!r}")
    return kind(value)


def read_config(path: Path) -> dict:
    """Read and sanity-check adapter_config.json (types of the fields loratool relies on)."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise FormatError(path, "is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type not in SUPPORTED_TYPES:
        raise UnsupportedError(f"{path}: PEFT type {peft_type} is not supported (loratool handles LoRA and AdaLoRA)")
    if config.get("enable_lora"):
        raise UnsupportedError(f"{path}: PEFT's legacy merged-QKV LoRA (enable_lora={config['enable_lora']}) is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise FormatError(path, f"{key} must be an object, got {type(value).__name__}")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        raise FormatError(path, f"target_modules must be a list or a string, got {type(targets).__name__}")
    name = config.get("base_model_name_or_path")
    if name is not None and not isinstance(name, str):
        raise FormatError(path, f"base_model_name_or_path must be a string, got {type(name).__name__}")
    mts = config.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
        raise FormatError(path, "modules_to_save must be a list of names")
    refuse_tensor_count(path, len(mts or ()), "modules_to_save names")
    return config


def _module_rank_alpha(config: dict, module: str, path: Path) -> tuple[int | None, float]:
    rank_key = pattern_key((config.get("rank_pattern") or {}).keys(), module, what="rank_pattern")
    alpha_key = pattern_key((config.get("alpha_pattern") or {}).keys(), module, what="alpha_pattern")
    if rank_key is not None:
        rank = config["rank_pattern"][rank_key]
        if isinstance(rank, list):  # AdaLoRA stores boolean masks
            rank = sum(bool(x) for x in rank)
    else:
        rank = config.get("r", 8)
    alpha = config["alpha_pattern"][alpha_key] if alpha_key is not None else config.get("lora_alpha", 8)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or (isinstance(rank, float) and not rank.is_integer()) or rank <= 0:
        raise FormatError(path, f"{module}: rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not _finite(alpha):
        raise FormatError(path, f"{module}: lora_alpha must be a number, got {alpha!r}")
    return int(rank), float(alpha)


def read(path: Path, *, adapter_name: str | None = None) -> Adapter:
    """Read a PEFT adapter into canonical form (tensors stay lazy).

    Raises:
        FormatError, UnsupportedError, InputError.
    """
    config_path, weights_path = locate(path, adapter_name)
    config = read_config(config_path)
    warns: list[str] = []
    unknown = sorted(set(config) - _KNOWN_FIELDS)
    if unknown:
        warns.append(f"{config_path}: fields unknown to this loratool were ignored: {', '.join(unknown)}")
    store = TensorStore([weights_path])
    parts, full = _group_keys(store, weights_path)
    wrapped = _param_wrappers(list(parts), config, weights_path)
    plain_wrapped: dict[str, str] = {}  # 2-D parameters PEFT wraps (a router's weight): module -> parameter
    modules: dict[str, LoraModule] = {}
    for key_module, p in parts.items():
        module, param = wrapped.get(key_module, (key_module, None))
        mod = _read_module(module, param, p, store, config, config_path, weights_path)
        if mod.name in modules:
            raise FormatError(weights_path, f"{mod.name}: two sets of LoRA tensors claim it")
        if param is not None and not mod.experts:
            plain_wrapped[module] = param
        modules[mod.name] = mod
    to_save = {name: store.lazy(key) for name, key in full.items()}
    declared = [m for m in (config.get("modules_to_save") or []) if isinstance(m, str)]
    copies = frozenset(n for n, key in full.items() if _is_saved_copy(key, n, declared, set(parts)))
    if not modules and not to_save:
        warns.append(f"{weights_path}: holds no LoRA tensors")
    return Adapter(
        format=NAME,
        modules=modules,
        modules_to_save=to_save,
        base_model=config.get("base_model_name_or_path"),
        target_modules=config.get("target_modules"),
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)) or any(m.magnitude is not None for m in modules.values()),
        lora_bias=bool(config.get("lora_bias", False)) or any(m.bias is not None for m in modules.values()),
        variant=_variant(config),
        task_type=config.get("task_type"),
        path=Path(path),
        files=[config_path, weights_path],
        config=config,
        warnings=warns,
        extras={"peft_modules": list(modules), **({"param_wrappers": plain_wrapped} if plain_wrapped else {})},
        base_layer_copies=copies,
    )


def _variant(config: dict) -> str:
    return "adalora" if str(config.get("peft_type", "LORA")).upper() == "ADALORA" else "lora"


def _group_keys(store: TensorStore, weights_path: Path) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """(module -> {part: key} for the LoRA factors, tensor name -> key for full tensors); two keys
    claiming one role are refused (``_claim``)."""
    parts: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}
    for key in store.keys():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _KEY_RE.match(name)
        if m is None:
            if ".original_module." in name:
                continue  # PEFT's copy of the untouched base module
            _claim(full, _full_tensor_name(name), key, "the full tensor", weights_path)
            continue
        part = m.group("part")
        if m.group("leaf") == "bias":
            if part != "lora_B":
                raise FormatError(weights_path, f"unexpected tensor {key}")
            part = "lora_B.bias"
        _claim(parts.setdefault(m.group("module"), {}), part, key, f"{m.group('module')}'s {part}", weights_path)
    return parts, full


def _factor_pair(module: str, p: dict[str, str], store: TensorStore, weights_path: Path) -> tuple[LazyTensor, LazyTensor, bool]:
    """(A, B, is an embedding LoRA), their shapes checked."""
    embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
    a_key = p.get("lora_embedding_A" if embedding else "lora_A")
    b_key = p.get("lora_embedding_B" if embedding else "lora_B")
    if a_key is None or b_key is None:
        raise FormatError(weights_path, f"{module}: has {'lora_A' if b_key is None else 'lora_B'} without its pair")
    A, B = store.lazy(a_key), store.lazy(b_key)
    if len(A.shape) != 2 or len(B.shape) != 2:
        raise UnsupportedError(f"{weights_path}: {module}: LoRA on a convolution ({len(A.shape)}-D factors) is not supported")
    if A.shape[0] != B.shape[1]:
        raise FormatError(weights_path, f"{module}: lora_A is {A.shape} but lora_B is {B.shape} (ranks differ)")
    if A.shape[0] == 0:
        raise FormatError(weights_path, f"{module}: rank 0")
    return A, B, embedding


def _read_module(module: str, param: str | None, p: dict[str, str], store: TensorStore, config: dict,
                 config_path: Path, weights_path: Path) -> LoraModule:
    """One module (a wrapped 3-D parameter becomes a fused experts module named ``<module>.<param>``)."""
    A, B, embedding = _factor_pair(module, p, store, weights_path)
    # a wrapped parameter's rank and alpha patterns match its full name (PEFT's current_key)
    rank, alpha = _module_rank_alpha(config, f"{module}.{param}" if param else module, config_path)
    experts = _expert_count(module, param, rank, A.shape, weights_path)
    if experts:
        module, rank = f"{module}.{param}", rank * experts
    folded = 0
    if _variant(config) == "adalora":
        if "lora_E" not in p:
            raise FormatError(weights_path, f"{module}: AdaLoRA module without lora_E")
        E = store.lazy(p["lora_E"])
        A, folded = _adalora_fold(A, E), E.numel
        scale = (alpha if alpha > 0 else float(A.shape[0])) / (A.shape[0] + 1e-5)  # ranknum is the stored rank
    else:
        if rank != A.shape[0]:
            raise FormatError(weights_path, f"{module}: config rank {rank} but lora_A is {A.shape}")
        scale = lora_scale(alpha, rank // max(experts, 1), rslora=bool(config.get("use_rslora", False)))
    if not abs(scale) <= _F32_MAX:  # every merge computes in float32
        raise FormatError(config_path, f"{module}: scaling {scale:g} (lora_alpha {alpha:g}, rank {rank}) does not fit in float32")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    kind = ModuleKind.EXPERTS if experts else ModuleKind.EMBEDDING if embedding else (ModuleKind.CONV1D if fan_in_fan_out else ModuleKind.LINEAR)
    bias, magnitude = _row_vectors(module, p, store, B, weights_path)
    return LoraModule(module, kind, A, B, alpha=alpha, scale=scale, bias=bias, magnitude=magnitude, folded_params=folded, experts=experts)


def _row_vectors(module: str, p: dict[str, str], store: TensorStore, B: LazyTensor, weights_path: Path):
    """(lora_B.bias, DoRA's magnitude), each (out,) or None."""
    bias = store.lazy(p["lora_B.bias"]) if "lora_B.bias" in p else None
    magnitude = store.lazy(p["lora_magnitude_vector"]) if "lora_magnitude_vector" in p else None
    for what, t in (("lora_B.bias", bias), ("lora_magnitude_vector", magnitude)):
        if t is not None and math.prod(t.shape) != B.shape[0]:
            raise FormatError(weights_path, f"{module}: {what} has shape {t.shape}, expected ({B.shape[0]},) for lora_B {B.shape}")
    if magnitude is not None:
        magnitude = magnitude.map(lambda t: t.reshape(-1), shape=(math.prod(magnitude.shape),))
    return bias, magnitude


def _wrapper_paths(adapter: Adapter) -> dict[str, str]:
    """Where PEFT saves each fused experts module's factors: ``<experts module>(.base_layer)*``, one
    ``.base_layer`` per parameter of that module registered after it (see ``_param_wrappers``)."""
    by_module: dict[str, list[str]] = {}
    for m in adapter.modules.values():
        if m.experts:
            module, _, param = m.name.rpartition(".")
            by_module.setdefault(module, []).append(param)
    out = {}
    for module, params in by_module.items():
        ordered = _targeted_params(module, [f"{module}.{p}" for p in params])
        for i, p in enumerate(ordered):
            out[f"{module}.{p}"] = module + ".base_layer" * (len(ordered) - 1 - i)
    return out


def _param_wrappers(modules: list[str], config: dict, path: Path) -> dict[str, tuple[str, str]]:
    """PEFT's ParamWrapper keys (``target_parameters``): ``<module>(.base_layer)*`` -> (module, parameter).

    PEFT nests one wrapper per targeted parameter of a module, in the order the module registers
    its parameters (tuners_utils ``_inject_parameters``): the last is outermost, its factors at
    ``<module>.lora_A``, the one before at ``<module>.base_layer.lora_A``, and so on.
    """
    targets = [t for t in (config.get("target_parameters") or []) if isinstance(t, str)]
    if not targets:
        return {}
    depth: dict[str, dict[int, str]] = {}
    for name in modules:
        stripped, n = name, 0
        while stripped.endswith(".base_layer"):
            stripped, n = stripped[: -len(".base_layer")], n + 1
        depth.setdefault(stripped, {})[n] = name
    out: dict[str, tuple[str, str]] = {}
    for stripped, levels in depth.items():
        params = _targeted_params(stripped, targets)
        if not params:
            continue
        if sorted(levels) != list(range(len(params))):
            raise FormatError(path, f"{stripped}: {len(levels)} nested LoRA wrappers, but target_parameters names "
                              f"{len(params)} parameters of it ({', '.join(params)})")
        for level, name in levels.items():
            out[name] = (stripped, params[len(params) - 1 - level])
    return out


def _targeted_params(module: str, targets: list[str]) -> list[str]:
    """The parameters of ``module`` that target_parameters selects (PEFT: ``module.param`` equals a
    target or ends with ``.`` + it), in registration order (``names.EXPERT_PARAM_ORDER`` first)."""
    from loratool.names import EXPERT_PARAM_ORDER

    found = {t.rpartition(".")[2] for t in targets
             if f"{module}.{t.rpartition('.')[2]}" == t or f"{module}.{t.rpartition('.')[2]}".endswith(f".{t}")}
    known = [p for p in EXPERT_PARAM_ORDER if p in found]
    return known + sorted(found - set(known))


def _expert_count(module: str, param: str | None, rank: int, a_shape: tuple[int, ...], path: Path) -> int:
    """E for a fused 3-D parameter (lora_A is (E * r, in)); 0 for an ordinary module (a 2-D parameter).

    Raises:
        FormatError: lora_A's rows are not a multiple of the rank.
    """
    if param is None or a_shape[0] == rank:
        return 0
    if a_shape[0] % rank:
        raise FormatError(path, f"{module}.{param}: lora_A is {a_shape}, not a multiple of the rank {rank} "
                          "(target_parameters: E experts x rank rows)")
    return a_shape[0] // rank


def _full_tensor_name(name: str) -> str:
    """The base tensor a full tensor of a PEFT file replaces: wrapper infixes removed.

    ``classifier.modules_to_save.weight`` (modules_to_save) and ``lm_head.base_layer.weight``
    (save_embedding_layers) both replace the base tensor of the plain name.
    """
    name = re.sub(r"\.modules_to_save(?:\.[^.]+)?\.(?=[^.]+$)", ".", name)
    return re.sub(r"\.base_layer\.(?=[^.]+$)", ".", name)


def _is_saved_copy(key: str, name: str, declared: list[str], adapted: set[str]) -> bool:
    """Whether the full tensor ``name`` (stored under ``key``) is a saved copy of a base layer.

    PEFT's ``save_embedding_layers`` writes the weight of the input and output embeddings
    whole: as ``<module>.base_layer.weight`` when LoRA targets the layer, as
    ``<module>.weight`` when it does not (a resized vocabulary). Trained tensors (the
    modules_to_save the config declares, ``bias="all"`` biases) are not copies.
    """
    module, _, leaf = name.rpartition(".")
    if leaf != "weight" or ".modules_to_save." in key:
        return False
    if key.endswith(".base_layer.weight"):
        return True
    if module in adapted or any(f".{d}." in f".{module}." for d in declared):
        return False
    return module.rpartition(".")[2] in SAVED_EMBEDDING_LEAVES


def _adalora_fold(A: LazyTensor, E: LazyTensor) -> LazyTensor:
    """AdaLoRA's delta is B @ (A * E): fold E (r, 1) into A."""
    return LazyTensor(A.shape, A.dtype, lambda: A.load() * E.load().reshape(-1, 1).to(A.dtype))


def _most_common(values):
    return Counter(values).most_common(1)[0][0] if values else None


def module_alpha(module: LoraModule, rslora: bool) -> float:
    """The lora_alpha PEFT needs so that its scaling equals ``module.scale``."""
    if math.isclose(lora_scale(module.alpha, module.rank, rslora=rslora), module.scale, rel_tol=1e-13, abs_tol=0.0):
        return module.alpha  # the recorded alpha, not scale * r with its rounding (7.999999999999999)
    return module.scale * (math.sqrt(module.rank) if rslora else module.rank)


def build_config(adapter: Adapter, *, base_model: str | None = None) -> dict:
    """The adapter_config.json that makes PEFT reproduce every module's scale and rank."""
    rslora = adapter.use_rslora
    mods = list(adapter.modules.values())
    ranks = {m.name: m.rank for m in mods}
    alphas = {m.name: _clean(module_alpha(m, rslora)) for m in mods}
    r = _most_common(list(ranks.values())) or 8
    alpha = _most_common(list(alphas.values()))
    if alpha is None:
        alpha = r
    # PEFT matches the patterns of a wrapped parameter against its full name (``<module>.<param>``)
    wrapped = adapter.extras.get("param_wrappers") or {}
    key = {n: f"{n}.{wrapped[n]}" if n in wrapped else n for n in ranks}
    rank_pattern = {re.escape(key[n]): v for n, v in ranks.items() if v != r}
    alpha_pattern = {re.escape(key[n]): v for n, v in alphas.items() if v != alpha}
    carried = {}
    if adapter.format == NAME and adapter.target_modules is not None and set(adapter.modules) == set(_original_modules(adapter)):
        # same modules as read: keep the user's targeting rule and what narrows it
        targets = adapter.target_modules
        carried = {k: adapter.config.get(k) for k in ("layers_to_transform", "layers_pattern", "exclude_modules") if adapter.config.get(k)}
    else:
        targets = sorted(m.name for m in mods if not m.experts and m.name not in wrapped) if mods else []
    target_parameters = sorted(key[m.name] for m in mods if m.experts or m.name in wrapped)
    if target_parameters and carried is not None and adapter.format == NAME and targets is adapter.target_modules:
        target_parameters = adapter.config.get("target_parameters") or target_parameters
    mts_names = _modules_to_save_names(adapter)
    config = {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": base_model if base_model is not None else adapter.base_model,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
        **({"target_parameters": target_parameters} if target_parameters else {}),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": rslora,
        "use_dora": any(m.magnitude is not None for m in mods),
        "lora_bias": any(m.bias is not None for m in mods),
        "fan_in_fan_out": any(m.kind is ModuleKind.CONV1D for m in mods),
        "modules_to_save": mts_names or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    config.update(carried)
    return config


def _modules_to_save_names(adapter: Adapter) -> list[str]:
    """Module names for the config's modules_to_save: the source's own names where they cover a
    tensor (``classifier`` for ``classifier.dense.weight``), else the tensor's module path."""
    declared = [m for m in (adapter.config.get("modules_to_save") or []) if isinstance(m, str)]
    names: list[str] = []
    for tname in adapter.trained_to_save:  # saved base-layer copies are not declared
        module = tname.rsplit(".", 1)[0]
        if module in adapter.modules:
            continue  # a replaced base weight of an adapted module, not a modules_to_save wrapper
        hit = next((m for m in declared if f".{m}." in f".{module}."), module)
        if hit not in names:
            names.append(hit)
    return sorted(names)


def _original_modules(adapter: Adapter) -> list[str]:
    return list(adapter.extras.get("peft_modules", adapter.modules))


def _claim(slots: dict[str, str], role: str, key: str, what: str, path: Path) -> None:
    """Record that ``key`` holds ``role``; two tensors claiming one role are refused (which one a
    loader takes is arbitrary: merging either would silently apply the wrong delta).

    Raises:
        FormatError: naming both keys.
    """
    if role in slots:
        raise FormatError(path, f"{slots[role]} and {key} both claim {what}; refused (remove the one that does not belong)")
    slots[role] = key


def _clean(x: float) -> float | int:
    """Store integral alphas as ints, like PEFT configs written by hand."""
    return int(x) if float(x).is_integer() else float(x)


def state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter_model tensors PEFT saves for this adapter."""
    import torch

    sd: dict[str, torch.Tensor] = {}
    any_bias = any(m.bias is not None for m in adapter.modules.values())
    wrapper_paths = _wrapper_paths(adapter)
    for m in adapter.modules.values():
        base = PREFIX + wrapper_paths.get(m.name, m.name)
        A, B = m.A.load(), m.B.load()
        if m.kind is ModuleKind.EMBEDDING:
            sd[f"{base}.lora_embedding_A"] = A.contiguous()
            sd[f"{base}.lora_embedding_B"] = B.contiguous()
        else:
            sd[f"{base}.lora_A.weight"] = A.contiguous()
            sd[f"{base}.lora_B.weight"] = B.contiguous()
            if any_bias:
                bias = m.bias.load() if m.bias is not None else torch.zeros(m.out_features, dtype=B.dtype)
                sd[f"{base}.lora_B.bias"] = bias.contiguous()
        if m.magnitude is not None:
            sd[f"{base}.lora_magnitude_vector"] = m.magnitude.load().contiguous()
    for name, t in adapter.modules_to_save.items():
        module, leaf = name.rsplit(".", 1) if "." in name else (name, "")
        if module in adapter.modules:
            # a replaced tensor of an adapted module: PEFT's save_embedding_layers layout for a
            # weight, bias="all" for a bias
            name = f"{module}.base_layer.{leaf}"
        sd[PREFIX + name] = t.load().contiguous()
    return sd


def write(adapter: Adapter, folder: Path, *, base_model: str | None = None, safe_serialization: bool = True) -> list[Path]:
    """Write a folder that ``PeftModel.from_pretrained`` loads unchanged."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if adapter.use_dora and any(m.magnitude is None for m in adapter.modules.values()):
        missing = next(m.name for m in adapter.modules.values() if m.magnitude is None)
        raise InputError(f"{missing}: DoRA adapter module without a magnitude vector")
    config = build_config(adapter, base_model=base_model)
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")

    from loratool.io.writer import save_torch_pickle, write_safetensors

    sd = state_dict(adapter)
    if safe_serialization:
        weights = folder / "adapter_model.safetensors"
        write_safetensors(weights, sd, metadata={"format": "pt"})
    else:
        weights = folder / "adapter_model.bin"
        save_torch_pickle(sd, weights)
    return [folder / CONFIG_NAME, weights]
