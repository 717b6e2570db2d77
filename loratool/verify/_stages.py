"""The model's own transformers implementation, built on the meta device and run one stage at a time.

The output check never holds a whole model. ``Skeleton`` is the transformers task model built
from config.json with every parameter on the meta device (buffers such as rotary frequencies and
position ids are computed for real, as transformers computes them). The model is then run in
stages, each with only its own parameters materialized:

    embeddings  the model's forward up to its first decoder layer: a pre-hook on layer 0 captures
                the hidden states and the arguments the model passes its layers (masks, rotary
                cos/sin, positions), then stops the forward;
    layer i     ``layers[i](hidden, *captured args)``, the decoder (or encoder) layer itself;
    output      the model's forward again with every layer replaced by one that returns the last
                layer's hidden states: the final norm, pooling and head run as transformers wrote them.

Modules outside the layer stack (embeddings, norms, head) are materialized by hooks as the
forward enters them and dropped when it leaves, so at any time one layer's weights, or one of
those modules', are resident.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from loratool.errors import InputError, UnsupportedError

# value(param_name) -> the float32 tensor a stage runs with
Values = Callable[[str], torch.Tensor]


class _Stop(Exception):
    """Raised by the capture hook: the forward has reached the first layer."""


@dataclass
class Captured:
    """One input's state at the first layer: its hidden states and the arguments the model passes layers."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    as_tuple: bool = False  # the layers return tuples (hidden, ...) rather than the hidden states


@dataclass
class Skeleton:
    """A transformers task model on the meta device and its layer stack."""

    model: nn.Module
    layers: nn.ModuleList
    prefix: str  # the stack's name, e.g. "model.layers"
    tied: dict[str, str] = field(default_factory=dict)  # parameter -> the parameter it is tied to

    def layer_names(self, i: int) -> list[str]:
        """The full names of layer ``i``'s parameters."""
        return [f"{self.prefix}.{i}.{n}" for n, _ in self.layers[i].named_parameters()]

    def outside_modules(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every module outside the stack that holds parameters of its own."""
        out = []
        for name, mod in self.model.named_modules():
            if name == self.prefix or name.startswith(self.prefix + ".") or not any(p is not None for p in mod._parameters.values()):
                continue
            out.append((name, mod))
        return out

    def accepts(self, arg: str) -> bool:
        return arg in inspect.signature(self.model.forward).parameters


def build_skeleton(path, auto) -> Skeleton:
    """The task model of the folder ``path`` on the meta device (nothing read but config.json).

    Raises:
        InputError: transformers cannot build the architecture.
        UnsupportedError: the model has no stack of layers to stream.
    """
    import transformers
    from accelerate import init_empty_weights

    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
        with init_empty_weights(include_buffers=False):
            model = auto.from_config(config, dtype=torch.float32)
    except Exception as exc:  # unknown model_type, missing custom code, a config transformers rejects
        what = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"{path}: transformers {transformers.__version__} cannot build this architecture ({what})") from None
    model.eval()
    prefix, layers = _layer_stack(model)
    if layers is None:
        raise UnsupportedError(f"{path}: {type(model).__name__} has no stack of layers the output check can stream")
    return Skeleton(model, layers, prefix, _tied_parameters(model, config))


def _layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList | None]:
    """The ModuleList of identical layers holding the most parameters (the decoder or encoder stack)."""
    best, best_n = ("", None), 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        n = sum(p.numel() for p in mod.parameters())
        if n > best_n:
            best, best_n = (name, mod), n
    return best


def _tied_parameters(model: nn.Module, config) -> dict[str, str]:
    """Parameters transformers ties to another (the output head to the input embedding)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "tie_word_embeddings", False):
        return {}
    keys = getattr(model, "_tied_weights_keys", None)
    if isinstance(keys, dict):
        return dict(keys)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None or in_emb is None:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}


# ----------------------------------------------------------------------------- materializing


class Materialized:
    """Parameters of ``model`` set to real tensors for a while, and put back on the meta device."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._saved: list[tuple[nn.Module, str, nn.Parameter]] = []

    def set(self, name: str, value: torch.Tensor) -> None:
        owner_name, _, leaf = name.rpartition(".")
        owner = self.model.get_submodule(owner_name)
        self._saved.append((owner, leaf, owner._parameters[leaf]))
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)

    def get(self, name: str) -> torch.Tensor:
        owner_name, _, leaf = name.rpartition(".")
        return self.model.get_submodule(owner_name)._parameters[leaf].data

    def restore(self) -> None:
        saved, self._saved = self._saved, []
        for owner, leaf, meta in reversed(saved):
            owner._parameters[leaf] = meta


class _OutsideHooks:
    """Materialize each module outside the stack while the forward runs it (``values`` gives its tensors)."""

    def __init__(self, sk: Skeleton, values: Values):
        self.sk, self.values = sk, values
        self.handles: list = []

    def __enter__(self) -> "_OutsideHooks":
        for name, mod in self.sk.outside_modules():
            live = Materialized(self.sk.model)
            self.handles.append(mod.register_forward_pre_hook(self._enter(name, mod, live)))
            self.handles.append(mod.register_forward_hook(lambda m, a, o, live=live: live.restore()))
        return self

    def _enter(self, name: str, mod: nn.Module, live: Materialized):
        def hook(module, args):
            for leaf, p in list(mod._parameters.items()):
                if p is None:
                    continue
                full = f"{name}.{leaf}" if name else leaf
                live.set(full, self.values(full))
        return hook

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ----------------------------------------------------------------------------- the three stages


def _forward_kwargs(sk: Skeleton, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    kwargs = dict(batch)
    if sk.accepts("use_cache"):
        kwargs["use_cache"] = False  # no cache object: layers are called again and again
    return kwargs


def _without_cache(kwargs: dict) -> dict:
    """The captured layer arguments without a KV cache (each layer runs several times on its input)."""
    from transformers.cache_utils import Cache

    out = {k: (None if isinstance(v, Cache) else v) for k, v in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@torch.no_grad()
def run_embeddings(sk: Skeleton, batch: dict[str, torch.Tensor], values: Values) -> Captured:
    """The model's forward up to layer 0: the hidden states entering the stack and the layers' arguments."""
    seen: dict[str, Any] = {}

    def capture(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Stop

    handle = sk.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with _OutsideHooks(sk, values):
            sk.model(**_forward_kwargs(sk, batch))
    except _Stop:
        pass
    finally:
        handle.remove()
    if "args" not in seen:
        raise UnsupportedError(f"{type(sk.model).__name__}: the forward never reached {sk.prefix}.0")
    args, kwargs = seen["args"], _without_cache(seen["kwargs"])
    hidden = args[0] if args else kwargs.pop("hidden_states")
    from transformers.cache_utils import Cache

    rest = tuple(None if isinstance(a, Cache) else a for a in args[1:])
    return Captured(_real(hidden, "embeddings"), rest, kwargs)


@torch.no_grad()
def run_layer(sk: Skeleton, i: int, state: Captured, hidden: torch.Tensor) -> torch.Tensor:
    """Layer ``i`` (its parameters materialized by the caller) on ``hidden``, with the captured arguments."""
    out = sk.layers[i](hidden, *state.args, **state.kwargs)
    if isinstance(out, tuple):
        state.as_tuple = True
        out = out[0]
    return _real(out, f"{sk.prefix}.{i}")


class _Replay(nn.Module):
    """Stands in for a layer in the output stage: returns the stack's final hidden states, whatever it is given."""

    def __init__(self, layer: nn.Module, value: Any):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: its meta parameters stay out of the way
        object.__setattr__(self, "_value", value)

    def __getattr__(self, name: str):  # attributes the model's loop reads (attention_type, layer_idx...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args, **kwargs):
        return self._value


@torch.no_grad()
def run_output(sk: Skeleton, batch: dict[str, torch.Tensor], state: Captured, hidden: torch.Tensor, task: str, values: Values) -> torch.Tensor:
    """The model's forward after the stack (final norm, pooling, head) on the stack's output ``hidden``."""
    value = (hidden,) if state.as_tuple else hidden
    originals = list(sk.layers)
    for j, layer in enumerate(originals):
        sk.layers[j] = _Replay(layer, value)
    kwargs = _forward_kwargs(sk, batch)
    if sk.accepts("inputs_embeds") and "input_ids" in kwargs:
        # the embeddings are not looked up again (their output is replaced anyway): zeros of the right shape
        ids = kwargs.pop("input_ids")
        dim = sk.model.get_input_embeddings().weight.shape[-1]
        kwargs["inputs_embeds"] = torch.zeros((*ids.shape, dim), dtype=hidden.dtype, device=hidden.device)
    try:
        with _OutsideHooks(sk, values):
            res = sk.model(**kwargs)
    finally:
        for j, layer in enumerate(originals):
            sk.layers[j] = layer
    y = res.last_hidden_state if task == "base" else res.logits
    return _real(y, "the output head")


def _real(t: Any, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.is_meta:
        raise UnsupportedError(f"the output check cannot run this model stage by stage: {where} used a parameter outside its own modules")
    return t
