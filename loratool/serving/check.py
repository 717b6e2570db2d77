"""``check``: every reason a serving engine would reject an adapter or serve only part of it.

Each finding names the modules, what was found, what the engine does with it (the rule of
``loratool.serving.rules``, with its source) and the fix. Findings whose rule has the effect
``note`` are reported but do not make the adapter incompatible.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from loratool.adapter import Adapter
from loratool.errors import InputError, UnsupportedError
from loratool.serving.rules import ENGINES, FOREIGN_PREFIXES, Engine, Rule

MERGE_HINT = "merge it into the base instead (loratool merge BASE ADAPTER OUT)"
VLLM_INIT_OK = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # vllm/lora/peft_helper.py _init_is_supported
FIX_TEXT = {
    "convert": "--fix writes the {writes} format",
    "rename": "--fix renames it to {detail}",
    "drop_copies": "--fix drops it (checked bit-identical to the base)",
    "dora_to_lora": "--fix truncates DoRA's effective delta to plain LoRA (needs --base; error reported per module)",
    "truncate": "--fix truncates it to rank {limit} (optimal SVD; error reported per module)",
    "bake_scale": "--fix bakes each module's scale into lora_B with one lora_alpha (exact)",
    "pad_rank": "--fix pads every module to one rank with zeros and bakes the scales (exact)",
}


@dataclass
class Finding:
    """One problem (or note): a rule that applies to some modules."""

    rule: Rule
    modules: list[str]
    what: str
    detail: str = ""  # the fix's parameter (a new name...)
    fixable: bool = True

    def as_dict(self, engine: Engine, limit: int | None) -> dict[str, Any]:
        return {
            "rule": self.rule.id,
            "module": self.modules[0] + (f" (and {len(self.modules) - 1} more)" if len(self.modules) > 1 else ""),
            "modules": self.modules,
            "what": self.what,
            "effect": self.rule.effect,
            "why": self.rule.why,
            "source": f"{engine.version}: {self.rule.source}",
            "fixable": self.fixable and self.rule.fix is not None,
            "fix": self.fix_text(engine, limit),
        }

    def fix_text(self, engine: Engine, limit: int | None) -> str:
        if self.rule.effect == "note":
            return "nothing to do"
        if not self.fixable or self.rule.fix is None:
            return f"cannot be fixed in the adapter: {MERGE_HINT}"
        return FIX_TEXT[self.rule.fix].format(writes=engine.writes, detail=self.detail, limit=limit)


@dataclass
class Context:
    """What the detectors look at: the adapter, the engine, the base (optional) and the rank limit."""

    adapter: Adapter
    engine: Engine
    base: Any = None  # loratool.base.BaseModel or None
    limit: int | None = None
    notes: list[str] = field(default_factory=list)

    def rule(self, rule_id: str) -> Rule | None:
        return self.engine.rules.get(rule_id)


def get_engine(name: str) -> Engine:
    """The engine named ``name``.

    Raises:
        InputError: unknown engine.
    """
    if name not in ENGINES:
        raise InputError(f"unknown target {name!r} (known: {', '.join(ENGINES)})")
    return ENGINES[name]


def rank_limit(engine: Engine, max_rank: int | None) -> int | None:
    """The rank limit to check against: ``max_rank`` or the engine's default.

    Raises:
        InputError: a value the engine's option does not accept.
    """
    if max_rank is None:
        return engine.max_rank_default
    if "rank" not in engine.rules:
        raise InputError(f"--max-rank does not apply to {engine.name}: it has no rank limit")
    if isinstance(max_rank, bool) or int(max_rank) != max_rank or max_rank < 1:
        raise InputError(f"--max-rank must be a positive integer, got {max_rank}")
    allowed = engine.max_rank_allowed
    if allowed is not None and max_rank not in allowed:
        raise InputError(f"{engine.name} accepts {engine.max_rank_option} {', '.join(map(str, allowed))} only, not {max_rank}")
    return int(max_rank)


# --------------------------------------------------------------------------- detectors


def _format(ctx: Context) -> list[Finding]:
    if ctx.adapter.format in ctx.engine.reads:
        return []
    return [Finding(ctx.rule("format"), ["(adapter)"], f"a {ctx.adapter.format} adapter")]


def _dora(ctx: Context) -> list[Finding]:
    mods = [m.name for m in ctx.adapter if m.magnitude is not None]
    return [Finding(ctx.rule("dora"), mods, "DoRA (lora_magnitude_vector)")] if mods else []


def _modules_to_save(ctx: Context) -> list[Finding]:
    names = sorted(ctx.adapter.trained_to_save)
    if ctx.engine.name == "vllm":  # classification heads are allowed (peft_helper.py)
        names = [n for n in names if n.split(".")[0] not in ("classifier", "score")]
    return [Finding(ctx.rule("modules_to_save"), names, "modules_to_save (a trained full tensor)", fixable=False)] if names else []


def _saved_copies(ctx: Context) -> list[Finding]:
    copies = sorted(ctx.adapter.saved_copies)
    if not copies:
        return []
    from loratool.conversion import drop_identical_copies

    rule = ctx.rule("saved_copy")
    try:
        drop_identical_copies(ctx.adapter, ctx.base, holder=ctx.engine.name)
    except UnsupportedError as exc:
        fixable = "pass --base" in str(exc)
        what = "a saved base-layer copy not checked against a base (give --base)" if fixable else "a saved base-layer copy that differs from the base"
        return [Finding(rule, copies, what, fixable=fixable)]
    if rule.effect == "ignored":  # the base's own tensor is served, and it is the same
        ctx.notes.append(f"{', '.join(copies)}: saved copy bit-identical to the base; {ctx.engine.name} serves the base's")
        return []
    return [Finding(rule, copies, "a saved base-layer copy (bit-identical to the base)")]


def _rank(ctx: Context) -> list[Finding]:
    if ctx.limit is None or ctx.rule("rank") is None:
        return []
    mods = [m.name for m in ctx.adapter if m.magnitude is None and m.rank > ctx.limit]
    if not mods:
        return []
    top = max(ctx.adapter.modules[n].rank for n in mods)
    return [Finding(ctx.rule("rank"), mods, f"rank {top} above the limit {ctx.limit}")]


def _lora_bias(ctx: Context) -> list[Finding]:
    mods = [m.name for m in ctx.adapter if m.bias is not None]
    return [Finding(ctx.rule("lora_bias"), mods, "lora_bias (lora_B.bias)", fixable=False)] if mods else []


def _config_features(ctx: Context) -> list[Finding]:
    """Fields of a PEFT config that some engines refuse (vLLM's PEFTHelper)."""
    cfg = ctx.adapter.config if ctx.adapter.format == "peft" else {}
    found = []
    if ctx.rule("bias") and cfg.get("bias", "none") not in (None, "none"):
        found.append(Finding(ctx.rule("bias"), ["adapter_config.json"], f"bias={cfg['bias']!r}", fixable=False))
    init = cfg.get("init_lora_weights", True)
    if ctx.rule("init") and isinstance(init, str) and init.lower() not in VLLM_INIT_OK:
        found.append(Finding(ctx.rule("init"), ["adapter_config.json"], f"init_lora_weights={init!r}", fixable=False))
    on = [k for k in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora") if cfg.get(k)]
    if ctx.rule("feature") and on:
        found.append(Finding(ctx.rule("feature"), ["adapter_config.json"], ", ".join(on), fixable=False))
    return found


def _scales(ctx: Context) -> list[Finding]:
    """Engines with one scale rule for the whole adapter: rsLoRA, per-module alphas and ranks."""
    from loratool.formats.peft import module_alpha

    ad, found = ctx.adapter, []
    mods = [m for m in ad if m.magnitude is None]
    if ctx.rule("rslora") and ad.use_rslora and mods:
        found.append(Finding(ctx.rule("rslora"), [m.name for m in mods], "rsLoRA (scale lora_alpha / sqrt(r))"))
    alphas = {m.name: round(module_alpha(m, ad.use_rslora), 9) for m in mods}
    if ctx.rule("alpha_pattern") and not ad.use_rslora and len(set(alphas.values())) > 1:
        common = Counter(alphas.values()).most_common(1)[0][0]
        odd = [n for n, a in alphas.items() if a != common]
        found.append(Finding(ctx.rule("alpha_pattern"), odd, f"per-module lora_alpha (alpha_pattern; most modules {common:g})"))
    ranks = {m.name: m.rank for m in mods}
    if ctx.rule("rank_pattern") and len(set(ranks.values())) > 1:
        common = Counter(ranks.values()).most_common(1)[0][0]
        odd = [n for n, r in ranks.items() if r != common]
        found.append(Finding(ctx.rule("rank_pattern"), odd, f"per-module ranks (rank_pattern; most modules r={common})"))
    return found


def _tied_head(ctx: Context) -> list[Finding]:
    if ctx.rule("tied_head") is None or ctx.base is None or not ctx.base.tie_word_embeddings:
        return []
    mods = [n for n in ctx.adapter.modules if n.rsplit(".", 1)[-1] == "lm_head"]
    return [Finding(ctx.rule("tied_head"), mods, "an lm_head LoRA on a base with tied embeddings", fixable=False)] if mods else []


def served_name(name: str, base) -> str | None:
    """The module's name as the engine knows it: the base's own (None: not in the base), or
    without a training wrapper's prefix when there is no base."""
    if base is not None and len(base.store):
        key = base.weight_name(name)
        return None if key is None else key[: -len(".weight")]
    for prefix, becomes in FOREIGN_PREFIXES.items():
        while name.startswith(prefix):
            name = becomes + name[len(prefix):]
    return name


def _names(ctx: Context) -> list[Finding]:
    """Prefixes the engine does not strip, modules absent from the base, modules it cannot adapt."""
    renamed = {n: served_name(n, ctx.base) for n in ctx.adapter.modules}
    found = []
    absent = [n for n, s in renamed.items() if s is None]
    if absent and ctx.rule("module"):
        found.append(Finding(ctx.rule("module"), absent, "not a module of the base", fixable=False))
    moved = {n: s for n, s in renamed.items() if s is not None and s != n}
    if moved and ctx.rule("prefix"):
        first = next(iter(moved))
        found.append(Finding(ctx.rule("prefix"), list(moved), "a name prefix the engine does not strip", detail=f"{moved[first]} ..."))
    return found + _unsupported(ctx, [n for n in renamed if n not in absent])


def _unsupported(ctx: Context, names: list[str]) -> list[Finding]:
    if ctx.rule("module") is None:
        return []
    if ctx.base is None:
        ctx.notes.append(f"target modules not checked against the architecture: give --base ({ctx.engine.name} adapts different modules per model)")
        return []
    arch = (ctx.base.architectures or ["(no architectures in config.json)"])[0]
    leaves = ctx.engine.modules.get(arch)
    if leaves is None:
        ctx.notes.append(f"target modules not checked: no {ctx.engine.name} module table for {arch} in loratool.serving.rules")
        return []
    odd = [n for n in names if n.rsplit(".", 1)[-1] not in leaves]
    what = f"a module {ctx.engine.name} does not adapt in {arch}"
    return [Finding(ctx.rule("module"), odd, what, fixable=False)] if odd else []


def _dtype(ctx: Context) -> list[Finding]:
    rule, dtype = ctx.rule("dtype"), ctx.adapter.dtype_name
    return [Finding(rule, ["(adapter)"], f"factors stored as {dtype}")] if rule is not None and dtype else []


def _needs(rule_id: str, detect: Callable[[Context], list[Finding]]) -> Callable[[Context], list[Finding]]:
    return lambda ctx: detect(ctx) if ctx.rule(rule_id) is not None else []


DETECTORS: tuple[Callable[[Context], list[Finding]], ...] = (
    _needs("format", _format), _needs("dora", _dora), _needs("modules_to_save", _modules_to_save),
    _needs("saved_copy", _saved_copies), _rank, _needs("lora_bias", _lora_bias), _config_features, _scales,
    _tied_head, _names, _dtype,
)


def findings(adapter: Adapter, engine: Engine, *, base=None, limit: int | None = None) -> tuple[list[Finding], list[str]]:
    """(problems and notes as ``Finding``s, extra notes) of ``adapter`` for ``engine``."""
    ctx = Context(adapter, engine, base, limit)
    out = [f for detect in DETECTORS for f in detect(ctx)]
    return out, ctx.notes


def check_adapter(adapter: Adapter, *, target: str, base=None, max_rank: int | None = None) -> dict[str, Any]:
    """Every reason ``target`` would reject ``adapter`` or serve only part of it.

    Args:
        adapter: the adapter, in any format loratool reads.
        target: an engine of ``loratool.serving.rules.ENGINES`` (vllm, sglang, llama.cpp, mlx-lm).
        base: the base model (a ``BaseModel``): module names, architecture, tied embeddings, saved copies.
        max_rank: the engine's rank limit (default: the engine's own default, if it has one).
    Returns:
        A JSON-ready report: ``compatible``, ``problems`` (one dict per finding: module, what,
        effect, why, source, fix, fixable) and ``notes``.
    Raises:
        InputError: unknown target, a rank limit the engine does not accept.
    """
    engine = get_engine(target)
    limit = rank_limit(engine, max_rank)
    found, notes = findings(adapter, engine, base=base, limit=limit)
    problems = [f.as_dict(engine, limit) for f in found if f.rule.effect != "note"]
    notes = notes + [f"{f.what}: {f.rule.why} [{engine.version}: {f.rule.source}]" for f in found if f.rule.effect == "note"]
    return {
        "target": engine.name,
        "engine": engine.version,
        "adapter": str(adapter.path) if adapter.path else None,
        "format": adapter.format,
        "max_rank": limit,
        "compatible": not problems,
        "problems": problems,
        "notes": notes,
    }


def problem_line(p: dict[str, Any]) -> str:
    """One problem on one line: module, what, why (effect, source), the fix."""
    return f"{p['module']}: {p['what']}: {p['effect']}: {p['why']} [{p['source']}]; fix: {p['fix']}"
