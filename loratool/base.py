"""Base models: a local transformers folder read lazily, tensor by tensor.

``BaseModel`` knows the config and where every tensor lives, and maps adapter module names
(relative to the task model PEFT wrapped, e.g. ``transformer.h.0.attn.c_attn`` or
``bert.encoder.layer.0.attention.self.query``) to the base's own tensor names, which may
lack or add the base-model prefix (``h.0.attn.c_attn.weight`` in the original GPT-2 files).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping

from loratool.adapter import Adapter, LoraModule, ModuleKind
from loratool.errors import FormatError, ModuleMismatchError
from loratool.io.store import TensorStore, checkpoint_files, dtype_name, read_json
from loratool.names import (  # noqa: F401 (re-exported)
    OUTPUT_HEAD_LEAVES,
    SIDE_FILES,
    TOKENIZER_FILES,
    is_input_embedding_weight,
    is_output_head,
)

# transformers architectures whose projections are GPT-2 style Conv1D (weight stored (in, out))
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt"})
CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})

# buffers that transformers checkpoints may carry but that are not parameters
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "position_ids", "rotary_emb.inv_freq")



def side_files(folder: Path, names: tuple[str, ...] = SIDE_FILES) -> tuple[list[str], list[str]]:
    """The side files of a base folder that may be copied into an output, and why others may not.

    A file is copied only when it resolves inside ``folder``, or inside the ``blobs`` of the
    cached repo when ``folder`` is a Hub cache snapshot (``models--org--name/snapshots/REV``,
    whose files link to ``../../blobs``). A symlink leading anywhere else (``tokenizer.json ->
    /home/me/.ssh/id_rsa``) is left out: it would be copied into OUT and pushed with it.

    Returns:
        (names to copy, one warning per file left out).
    """
    folder = Path(folder)
    roots = [Path(os.path.realpath(folder))]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        roots.append(Path(os.path.realpath(folder.parent.parent / "blobs")))
    keep, warnings = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        target = Path(os.path.realpath(path))
        if any(target.is_relative_to(root) for root in roots):
            keep.append(name)
        else:
            warnings.append(f"{path}: not copied into the output: it links to {target}, outside the base folder")
    return keep, warnings


def is_conv1d(model_type: str | None, module_name: str) -> bool:
    """Whether transformers builds this module as a GPT-2 Conv1D."""
    return model_type in CONV1D_MODEL_TYPES and module_name.rsplit(".", 1)[-1] in CONV1D_LEAVES


# sizes a model config may state, read before anything is built from them (a GGUF name table, a
# transformers model on the meta device, sample inputs); far above any real model
CONFIG_LIMITS = {
    "num_hidden_layers": 10_000, "n_layer": 10_000, "num_layers": 10_000, "n_layers": 10_000,
    "num_attention_heads": 100_000, "n_head": 100_000, "n_heads": 100_000, "num_key_value_heads": 100_000,
    "hidden_size": 1_000_000, "n_embd": 1_000_000, "intermediate_size": 10_000_000,
    "vocab_size": 100_000_000, "max_position_embeddings": 100_000_000, "n_positions": 100_000_000,
}


def read_model_config(path: Path) -> dict:
    """A model's config.json, its sizes checked: each one ``CONFIG_LIMITS`` names, when present, must be a
    whole number from 1 to its limit (a config claiming 10 million layers or 0 heads is refused before
    anything is allocated or divided by it).

    Raises:
        FormatError: naming the key, its value and the limit.
    """
    config = read_json(path)
    if not isinstance(config, dict):
        raise FormatError(path, "is not a JSON object")
    for key, limit in CONFIG_LIMITS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise FormatError(path, f"{key} is {value!r}; a model config needs a whole number from 1 to {limit:,}")
    return config


@dataclass
class BaseModel:
    """A transformers model folder, opened lazily."""

    path: Path
    config: dict
    store: TensorStore

    @classmethod
    def open(cls, path: Path | str) -> "BaseModel":
        """Open a local folder holding config.json and weights.

        Raises:
            FormatError: missing or malformed config or weights.
        """
        path = Path(path)
        if not path.exists():
            raise FormatError(path, "base model not found")
        if not path.is_dir():
            raise FormatError(path, "base model must be a folder with config.json and weights")
        config = read_model_config(path / "config.json")
        return cls(path=path, config=config, store=TensorStore(checkpoint_files(path)))

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", True))

    def keys(self) -> list[str]:
        return self.store.keys()

    @cached_property
    def _by_suffix(self) -> dict[str, str]:
        """Each key under a top-level prefix (``model.``, ``transformer.``), by what follows the
        prefix; the first key in file order wins. Built once: every lookup is then O(1), however
        many prefixes a checkpoint has."""
        index: dict[str, str] = {}
        for k in self.store.keys():
            head, dot, rest = k.partition(".")
            if dot and not head.isdigit():
                index.setdefault(rest, k)
        return index

    def tensor_name(self, name: str) -> str | None:
        """The base's key for a full tensor name (``x.weight``), tolerating task-model prefixes."""
        if name in self.store:
            return name
        head, _, rest = name.partition(".")
        if rest and rest in self.store:
            return rest  # adapter names carry a prefix the base checkpoint lacks
        found = self._by_suffix.get(name)  # the base has a prefix the adapter's names lack
        if found is not None:
            return found
        if "." in rest:  # swap a task prefix, never a module name
            return self._by_suffix.get(rest)
        return None

    def weight_name(self, module: str) -> str | None:
        """The base key of a module's weight."""
        return self.tensor_name(f"{module}.weight")

    def input_embedding_key(self) -> str | None:
        """The key of the token embedding (2-D), or None (``names.INPUT_EMBEDDING_LEAVES``)."""
        return next((k for k in self.store.keys() if is_input_embedding_weight(k) and len(self.store.shape(k)) == 2), None)

    def output_head_key(self) -> str | None:
        """The key of the language-model head's weight, when the checkpoint stores one."""
        return next((k for k in (self.tensor_name(f"{lf}.weight") for lf in OUTPUT_HEAD_LEAVES) if k is not None), None)

    def tied_head_key(self, module: str) -> str | None:
        """The embedding key an output head shares when the config ties them (None otherwise)."""
        if not is_output_head(module) or not self.tie_word_embeddings:
            return None
        return self.input_embedding_key()

    def module_kind(self, module: str, fallback: ModuleKind) -> ModuleKind:
        """Conv1D or linear, the way PEFT decides it: from the base module's class."""
        if fallback is ModuleKind.EMBEDDING:
            return fallback
        return ModuleKind.CONV1D if is_conv1d(self.model_type, module) else ModuleKind.LINEAR

    def unique_params(self) -> int:
        """Parameter count of the base: stored floating tensors, tied weights once, no buffers."""
        total = 0
        for e in self.store.entries():
            if not e.is_floating_point or e.name.endswith(_BUFFER_SUFFIXES):
                continue
            total += math.prod(e.shape)
        head, embed = self.output_head_key(), self.input_embedding_key()
        if self.tie_word_embeddings and head is not None and embed is not None and self.store.shape(embed) == self.store.shape(head):
            total -= math.prod(self.store.shape(head))
        return total


@dataclass(frozen=True)
class Binding:
    """An adapter bound to a base: which base weight each module updates.

    ``adapter`` is a copy whose modules carry the layout the base implies (Conv1D or linear);
    the adapter that was read is never changed.
    """

    adapter: Adapter
    keys: Mapping[str, str]  # module -> base weight key (an experts module: its first stored key)
    experts: Mapping[str, Any] = field(default_factory=dict)  # experts module -> experts.ExpertLayout


def bound_module(base: BaseModel, mod: LoraModule, key: str, *, strict_shapes: bool = True) -> LoraModule:
    """``mod`` with the kind the base implies for it, checked against the base weight ``key``.

    Raises:
        ModuleMismatchError: the shapes differ, or the base weight is not floating point.
    """
    kind = base.module_kind(mod.name, mod.kind)
    bound = mod if kind is mod.kind else replace(mod, kind=kind)
    shape = base.store.shape(key)
    if strict_shapes and tuple(shape) != bound.weight_shape:
        raise ModuleMismatchError(
            mod.name,
            f"shape mismatch: adapter gives {bound.kind.value} weight {tuple(bound.weight_shape)} "
            f"(A {bound.A.shape}, B {bound.B.shape}), base {key} is {tuple(shape)}",
        )
    entry = base.store.entry(key)
    if strict_shapes and not entry.is_floating_point:
        raise ModuleMismatchError(mod.name, f"base tensor {key} is {dtype_name(entry.lazy_dtype)}, not floating point; a LoRA delta cannot be merged into it")
    return bound


def bind_adapter(adapter: Adapter, base: BaseModel, *, strict_shapes: bool = True) -> Binding:
    """Resolve every module against the base: its weight key, its layout, its shape.

    modules_to_save names are checked separately by the callers that write them.

    Raises:
        ModuleMismatchError: a module is absent from the base, or its shape differs.
    """
    keys: dict[str, str] = {}
    modules: dict[str, LoraModule] = {}
    layouts: dict[str, Any] = {}
    for name, mod in adapter.modules.items():
        if mod.experts:  # a fused MoE parameter (PEFT target_parameters): stored fused or per expert
            from loratool.experts import bind_experts

            modules[name], layouts[name] = bind_experts(base, mod)
            keys[name] = layouts[name].keys[0]
            continue
        key = base.weight_name(name)
        if key is None:
            raise ModuleMismatchError(name, f"adapter module is not in the base model {base.path}")
        modules[name] = bound_module(base, mod, key, strict_shapes=strict_shapes)
        keys[name] = key
    return Binding(adapter.replace_modules(modules), keys, layouts)


def bind_with_tied_heads(base: BaseModel, adapter: Adapter, warnings: list[str]) -> tuple[Adapter, dict[str, str]]:
    """``bind_adapter``, where a module on a head the base ties to its input embedding (and does not
    store) targets the embedding, as PEFT's merge into the tied parameter does; a warning says so.

    Returns:
        (the adapter bound to the base, module -> base tensor).
    """
    mapping: dict[str, str] = {}
    tied: dict[str, LoraModule] = {}
    untied: dict[str, LoraModule] = {}
    for name, mod in adapter.modules.items():
        key = None if base.weight_name(name) is not None else base.tied_head_key(name)
        if key is None:
            untied[name] = mod
            continue
        tied[name] = bound_module(base, mod, key)  # the head's delta goes into the shared embedding
        mapping[name] = key
        warnings.append(f"{name}: the base ties it to {key} (tie_word_embeddings); the merged delta changes that shared tensor, as PEFT's merge does")
    binding = bind_adapter(adapter.replace_modules(untied), base)
    mapping.update(binding.keys)
    bound = {**tied, **binding.adapter.modules}
    return adapter.replace_modules({name: bound[name] for name in adapter.modules}), mapping


def module_names_matching(base: BaseModel, targets: object, suffixes: Iterable[str] = (".weight",)) -> list[str]:
    """Module names of the base that PEFT's target_modules rule would select (2-D weights only)."""
    from loratool.formats.peft import target_matches

    out = []
    for key in base.keys():
        if not key.endswith(".weight") or len(base.store.shape(key)) != 2:
            continue
        module = key[: -len(".weight")]
        if target_matches(targets, module):
            out.append(module)
    return out
