"""Where a fused MoE expert parameter lives in a checkpoint, and the delta terms that reach it.

PEFT's ``target_parameters`` adapts a fused parameter of an ``*Experts`` module, e.g.
``model.layers.0.mlp.experts.gate_up_proj`` (E, 2I, H) or ``...down_proj`` (E, H, I), as the
model holds it in memory. A checkpoint stores it either

* fused, as one tensor under that name: (E, out, in) for most models, (E, in, out) for the ones
  whose experts module sets ``is_transposed`` (gpt-oss); or
* one expert at a time, as transformers 5 saves Qwen-MoE, Mixtral, OLMoE, DeepSeek checkpoints:
  ``experts.<e>.gate_proj.weight`` (I, H) and ``experts.<e>.up_proj.weight`` (I, H) are rows
  [0, I) and [I, 2I) of expert e's (2I, H) slice (``names.EXPERT_SOURCES``).

``expert_layout`` finds which, and checks the adapter against it; ``ExpertLayout.terms`` turns the
module into what the engine applies: one experts term on the fused tensor, or an ordinary linear
LoRA term per stored expert tensor (expert e's factors, B's rows cut to the part that tensor holds).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, replace

from loratool.adapter import LoraModule, ModuleKind
from loratool.errors import ModuleMismatchError
from loratool.io.store import LazyTensor
from loratool.names import EXPERT_PATH_RENAMES, EXPERT_SOURCES


@dataclass(frozen=True)
class ExpertLayout:
    """How one fused expert parameter is stored: ``fused`` (one key) or per expert (``parts``:
    for each expert, the stored keys and the rows of the (out, in) slice each holds)."""

    module: str  # the adapter's name for the parameter
    experts: int
    transposed: bool  # stored (E, in, out)
    fused: str | None = None
    parts: tuple[tuple[tuple[str, int, int], ...], ...] = ()  # per expert: (key, row start, row stop)

    @property
    def keys(self) -> list[str]:
        return [self.fused] if self.fused is not None else [k for expert in self.parts for k, _, _ in expert]

    def terms(self, mod: LoraModule) -> list[tuple[str, LoraModule]]:
        """(base key, the term applied to it): the experts module itself on a fused tensor, or per
        stored expert tensor an ordinary linear LoRA module (rank r, expert e's factors)."""
        if self.fused is not None:
            return [(self.fused, mod)]
        out = []
        for e, pieces in enumerate(self.parts):
            for key, start, stop in pieces:
                out.append((key, expert_part(mod, e, start, stop, key)))
        return out


class _RecentLoads:
    """The last few fused factors loaded: every expert part of a module slices the same A and B, and
    a checkpoint stores a layer's experts next to each other (gate, up, down of expert 0, then 1...)."""

    def __init__(self, size: int = 4):
        self.size = size
        self.items: OrderedDict[int, tuple[LazyTensor, object]] = OrderedDict()

    def load(self, lazy: LazyTensor):
        hit = self.items.get(id(lazy))
        if hit is not None and hit[0] is lazy:
            self.items.move_to_end(id(lazy))
            return hit[1]
        t = lazy.load()
        self.items[id(lazy)] = (lazy, t)
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return t


_RECENT = _RecentLoads()


def expert_part(mod: LoraModule, e: int, start: int, stop: int, key: str) -> LoraModule:
    """Expert ``e``'s LoRA restricted to rows [start, stop) of its (out, in) delta: a linear module
    (factors as in ``engine.delta.expert_factors``: A[e * r:(e + 1) * r], B[start:stop, e::E])."""
    E, r = mod.experts, mod.rank
    A = LazyTensor((r, mod.in_features), mod.A._dtype, lambda: _RECENT.load(mod.A)[e * r : (e + 1) * r])  # (r, in)
    B = LazyTensor((stop - start, r), mod.B._dtype, lambda: _RECENT.load(mod.B)[start:stop, e::E])  # (rows, r)
    name = f"{mod.name}[{e}]" + (f"[{start}:{stop}]" if (start, stop) != (0, mod.out_features) else "")
    return replace(mod, name=name, kind=ModuleKind.LINEAR, A=A, B=B, experts=0, bias=None, magnitude=None, folded_params=0)


def expert_layout(base, mod: LoraModule) -> ExpertLayout:
    """The storage of ``mod``'s fused parameter in ``base``, checked against the adapter.

    Raises:
        ModuleMismatchError: the parameter is not in the base, the expert count differs, or the
            shapes match neither (E, out, in) nor (E, in, out) (naming the parameter and shapes).
    """
    key = base.tensor_name(mod.name)
    if key is not None:
        return _fused_layout(base, mod, key)
    for path in _candidate_paths(mod.name):
        layout = _per_expert_layout(base, mod, path)
        if layout is not None:
            return layout
    raise ModuleMismatchError(mod.name, f"fused expert parameter is in neither layout of the base model {base.path} "
                              "(no fused tensor, no per-expert tensors)")


def _fused_layout(base, mod: LoraModule, key: str) -> ExpertLayout:
    shape = tuple(base.store.shape(key))
    E, out_f, in_f = mod.experts, mod.out_features, mod.in_features
    if len(shape) != 3 or shape[0] != E:
        what = f"{shape[0]} experts" if len(shape) == 3 else f"a {len(shape)}-D tensor"
        raise ModuleMismatchError(mod.name, f"the adapter has {E} experts (lora_A {mod.A.shape}), base {key} is {shape}: {what}")
    oriented = {(E, out_f, in_f): False, (E, in_f, out_f): True}
    if shape not in oriented:
        raise ModuleMismatchError(
            mod.name, f"base {key} is {shape}, which is neither (E, out, in) = {(E, out_f, in_f)} nor (E, in, out) = "
            f"{(E, in_f, out_f)} for lora_A {mod.A.shape} and lora_B {mod.B.shape}")
    transposed = oriented[shape] if out_f != in_f else _square_transposed(base, mod)
    return ExpertLayout(mod.name, E, transposed, fused=key)


def _square_transposed(base, mod: LoraModule) -> bool:
    """For square experts the shapes cannot tell: the transformers class says (``is_transposed``)."""
    from loratool.names import TRANSPOSED_EXPERT_MODEL_TYPES

    return base.model_type in TRANSPOSED_EXPERT_MODEL_TYPES


def _candidate_paths(name: str) -> list[str]:
    paths = [name]
    for fused, stored in EXPERT_PATH_RENAMES:
        if fused in name:
            paths.append(name.replace(fused, stored))
    return paths


def _per_expert_layout(base, mod: LoraModule, path: str) -> ExpertLayout | None:
    """Per-expert tensors ``<experts>.<e>.<leaf>.weight`` for one of the known source tuples."""
    experts_path, _, param = path.rpartition(".")
    for leaves in EXPERT_SOURCES.get(param, ()):
        first = base.tensor_name(f"{experts_path}.0.{leaves[0]}.weight")
        if first is None:
            continue
        prefix = first[: -len(f".0.{leaves[0]}.weight")]
        count = _expert_count(base, prefix, leaves[0])
        if count != mod.experts:
            raise ModuleMismatchError(mod.name, f"the adapter has {mod.experts} experts (lora_A {mod.A.shape}), the base stores {count} under {prefix}")
        parts = tuple(_expert_pieces(base, mod, prefix, e, leaves) for e in range(count))
        return ExpertLayout(mod.name, count, False, parts=parts)
    return None


def _expert_count(base, prefix: str, leaf: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\." + re.escape(leaf) + r"\.weight$")
    found = {int(m.group(1)) for k in base.keys() if (m := pattern.match(k))}
    return max(found) + 1 if found and found == set(range(max(found) + 1)) else len(found)


def _expert_pieces(base, mod: LoraModule, prefix: str, e: int, leaves: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    """Expert e's stored tensors and their rows of the (out, in) slice, concatenated in order."""
    pieces, row = [], 0
    for leaf in leaves:
        key = f"{prefix}.{e}.{leaf}.weight"
        if key not in base.store:
            raise ModuleMismatchError(mod.name, f"the base lacks {key} (expert {e} of {mod.experts})")
        rows, cols = (tuple(base.store.shape(key)) + (None,))[:2]
        if cols != mod.in_features:
            raise ModuleMismatchError(mod.name, f"base {key} is {tuple(base.store.shape(key))}, the adapter's experts take {mod.in_features} inputs (lora_A {mod.A.shape})")
        pieces.append((key, row, row + rows))
        row += rows
    if row != mod.out_features:
        raise ModuleMismatchError(mod.name, f"expert {e}'s stored tensors have {row} rows, the adapter's lora_B {mod.B.shape} has {mod.out_features}")
    return tuple(pieces)


def bind_experts(base, mod: LoraModule) -> tuple[LoraModule, ExpertLayout]:
    """``mod`` with its stored orientation, and its layout."""
    layout = expert_layout(base, mod)
    kind = ModuleKind.EXPERTS_T if layout.transposed else ModuleKind.EXPERTS
    return (mod if mod.kind is kind else replace(mod, kind=kind)), layout



# ----------------------------------------------------------------------------- conversions


def to_per_expert(adapter, base):
    """Every fused experts module as one linear LoRA per stored expert tensor, named as the base
    stores it (``...experts.<e>.gate_proj``): exact, the parts of an expert share its A_e.

    Raises:
        UnsupportedError: the base stores the parameter fused (no per-expert modules to name).
    """
    from loratool.errors import UnsupportedError

    modules: dict[str, LoraModule] = {}
    for name, mod in adapter.modules.items():
        if not mod.experts:
            modules[name] = mod
            continue
        layout = expert_layout(base, mod)
        if layout.fused is not None:
            raise UnsupportedError(f"{name}: the base stores it fused ({layout.fused}); there are no per-expert modules to name")
        for key, part in layout.terms(mod):
            module = key[: -len(".weight")]
            modules[module] = replace(part, name=module)
    return adapter.replace_modules(modules, target_modules=None, extras={k: v for k, v in adapter.extras.items() if k != "peft_modules"})


_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<leaf>[^.]+)$")


def to_fused(adapter):
    """Per-expert modules (``<experts>.<e>.<leaf>``, as adapters trained on transformers 4 name them)
    grouped into PEFT's fused parameters (``names.EXPERT_SOURCES``), exactly: expert e's fused
    factors stack the parts' A and put their B (each times its scale) block-diagonally, so its rank
    is the sum of the parts' ranks (experts padded with zeros to one rank). Modules that do not form
    a complete set of experts and leaves stay as they are."""
    groups: dict[str, dict[int, dict[str, LoraModule]]] = {}
    for name, mod in adapter.modules.items():
        m = _PER_EXPERT.match(name)
        if m and not mod.experts and mod.kind is ModuleKind.LINEAR and mod.magnitude is None and mod.bias is None:
            groups.setdefault(m.group("prefix"), {}).setdefault(int(m.group("e")), {})[m.group("leaf")] = mod
    modules = dict(adapter.modules)
    for prefix, experts in groups.items():
        for param, options in EXPERT_SOURCES.items():
            leaves = next((ls for ls in options if all(set(ls) <= set(experts.get(e, {})) for e in range(len(experts)))), None)
            if leaves is None or sorted(experts) != list(range(len(experts))):
                continue
            parts = [[experts[e][leaf] for leaf in leaves] for e in range(len(experts))]
            fused = _fuse(_fused_name(prefix, param), parts, adapter.use_rslora)
            for e in range(len(experts)):
                for leaf in leaves:
                    modules.pop(experts[e][leaf].name)
            modules[fused.name] = fused
    return adapter.replace_modules(modules, target_modules=None, extras={k: v for k, v in adapter.extras.items() if k != "peft_modules"})


def _fused_name(prefix: str, param: str) -> str:
    for fused, stored in EXPERT_PATH_RENAMES:
        if stored in prefix + ".":
            prefix = (prefix + ".").replace(stored + ".", fused + ".")[:-1]
    return f"{prefix}.{param}"


def _fuse(name: str, parts: list[list[LoraModule]], rslora: bool) -> LoraModule:
    """One fused experts module from per-expert parts (rows concatenated in leaf order)."""
    import torch

    from loratool.adapter import lora_scale
    from loratool.engine.delta import join_experts

    rank = max(sum(m.rank for m in expert) for expert in parts)
    alpha = float(rank) ** 0.5 if rslora else float(rank)
    scale = lora_scale(alpha, rank, rslora=rslora)  # 1: the parts' scales go into B
    pairs = []
    for expert in parts:
        A = torch.zeros(rank, expert[0].in_features, dtype=torch.float32)  # (R, in)
        B = torch.zeros(sum(m.out_features for m in expert), rank, dtype=torch.float32)  # (out, R)
        row = col = 0
        for m in expert:
            A[col : col + m.rank] = m.A.load().float()
            B[row : row + m.out_features, col : col + m.rank] = m.B.load().float() * (m.scale / scale)
            row, col = row + m.out_features, col + m.rank
        pairs.append((A, B))
    A, B = join_experts(pairs)  # (E * R, in), (out, R * E)
    return LoraModule(name, ModuleKind.EXPERTS, LazyTensor.of(A), LazyTensor.of(B), alpha=alpha, scale=scale, experts=len(parts))
