"""Hugging Face Hub: ``org/name[@revision]`` in (cache, offline mode), adapters and models out.

``resolve_path`` turns a CLI argument into a local folder: an existing local path always wins;
otherwise ``org/name`` or ``org/name@revision`` is fetched with ``snapshot_download``, limited to
the files the command needs, through the Hugging Face cache (``HF_HUB_OFFLINE=1``: the cache only).

``push`` uploads an adapter or merged-model folder in one commit, leaving out training leftovers,
with a generated model card (``model_card``) when the folder has no README.md or only PEFT's
template, and the metadata completed when the folder's own README.md lacks ``base_model``
(``push_card``).
"""

from __future__ import annotations

import fnmatch
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

from loratool.errors import FormatError, InputError
from loratool.names import SIDE_FILES, TOKENIZER_FILES

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

MODEL_SIDE_FILES = (*SIDE_FILES, "processor_config.json")

# Training leftovers: never downloaded, never pushed unless --include names them.
TRAINING_LEFTOVERS = (
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    "training_args.bin",
)

# What resolve_path downloads, tried in order until the snapshot holds what the command reads.
# Only top-level files (or those of the named sub-adapter folder) are fetched.
ADAPTER_PATTERN_SETS = (
    ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "adapters.safetensors"],
    ["*.gguf", "*.safetensors", "*.bin", "*.pth", "*.pt", "*.yaml", "*.json", "*.lora"],
)
# never fetched as an adapter: a model repo passed where an adapter belongs would be downloaded whole
_NOT_ADAPTER_FILES = ("model*.safetensors", "pytorch_model*.bin", "consolidated*", "*.safetensors.index.json", "*.bin.index.json")
MODEL_PATTERN_SETS = (
    [*MODEL_SIDE_FILES, "*.safetensors", "model.safetensors.index.json"],
    [*MODEL_SIDE_FILES, "pytorch_model*.bin", "pytorch_model.bin.index.json"],
)


def looks_like_repo_id(spec: str) -> bool:
    """Whether ``spec`` has the shape ``org/name`` or ``org/name@revision``.

    Every part must be a plain name: a revision is a branch or tag (``main``, ``v1.0``,
    ``refs/pr/3``) or a commit hash, never a path that walks out of the cache (``..``).
    """
    if not _REPO_RE.match(spec) or spec.startswith((".", "/")):
        return False
    repo_id, at, revision = spec.partition("@")
    return _plain_parts(repo_id) and (not at or _plain_parts(revision))


def _plain_parts(text: str) -> bool:
    """No empty, ``.`` or ``..`` component, no leading or trailing slash, no backslash."""
    return "\\" not in text and all(part not in ("", ".", "..") for part in text.split("/"))


def parse_repo_id(spec: str) -> tuple[str, str | None]:
    """Split ``org/name@revision`` into ``(org/name, revision or None)``.

    Raises:
        InputError: ``spec`` is not a repo id.
    """
    if not looks_like_repo_id(spec):
        raise InputError(f"{spec}: not a Hugging Face repo id (expected org/name or org/name@revision)")
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME)."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids network access."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return False


def resolve_path(
    spec: str | os.PathLike,
    *,
    kind: str = "adapter",
    token: str | None = None,
    subfolder: str | None = None,
    local_only: bool = False,
) -> Path:
    """A local path for ``spec``: the path itself when it exists, else a Hub snapshot.

    Args:
        spec: a local path, ``org/name`` or ``org/name@revision`` (branch, tag or commit).
        kind: "adapter" or "model": which files to download.
        token: a Hub token (default: HF_TOKEN / the saved login).
        subfolder: restrict the download to this subfolder (a named sub-adapter).
        local_only: read the Hugging Face cache only, even when online.
    Returns:
        The local path (for a repo id, the snapshot folder in the cache).
    Raises:
        InputError: not a local path, and the repo cannot be resolved (not cached while offline,
            no such repo or revision, gated, no network...).
    """
    path = Path(spec)
    if path.exists():
        return path
    text = os.fspath(spec)
    if not looks_like_repo_id(text):
        raise InputError(f"{text}: no such file or folder (nor a Hub repo id, which looks like org/name[@revision])")
    if kind not in ("adapter", "model"):
        raise ValueError(f"kind must be 'adapter' or 'model', not {kind!r}")
    repo_id, revision = parse_repo_id(text)
    download = _snapshot_downloader(text, repo_id, revision, token=token, offline=local_only or hub_offline())
    return _fetch_snapshot(text, download, kind=kind, subfolder=subfolder)


def _snapshot_downloader(text: str, repo_id: str, revision: str | None, *, token: str | None, offline: bool) -> Callable[[list[str], list[str]], Path | str]:
    """``download(allow_patterns, ignore_patterns)``: ``snapshot_download`` of the repo into the Hugging
    Face cache, returning the snapshot folder, or the reason (a str) when the snapshot is incomplete.

    Every other Hub failure raises an InputError that says what went wrong.
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            IncompleteSnapshotError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise InputError(f"{text}: not a local path and huggingface_hub is not installed") from None

    cache = hub_cache_dir()

    def download(allow: list[str], ignore: list[str]) -> Path | str:
        try:
            found = snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=str(cache),
                allow_patterns=allow,
                ignore_patterns=ignore,
                token=token or None,
                local_files_only=offline,
            )
        except IncompleteSnapshotError as exc:
            return str(exc).split(". ")[0]
        except LocalEntryNotFoundError:
            raise InputError(_not_cached_message(text, repo_id, revision, cache, offline)) from None
        except GatedRepoError:
            raise InputError(f"{text}: gated repository; accept its terms on the Hub, then pass --token or set HF_TOKEN") from None
        except RevisionNotFoundError:
            raise InputError(f"{text}: revision {revision!r} not found on the Hub") from None
        except RepositoryNotFoundError:
            raise InputError(f"{text}: no such repository on the Hub (or it is private: pass --token or set HF_TOKEN)") from None
        except Exception as exc:  # network errors come in many types
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise InputError(f"{text}: could not download from the Hub ({type(exc).__name__}: {first})") from None
        return Path(found)

    return download


def _fetch_snapshot(text: str, download: Callable[[list[str], list[str]], Path | str], *, kind: str, subfolder: str | None) -> Path:
    """Download the pattern sets of ``kind`` in order until the snapshot holds what the command reads.

    Only top-level files (or those of ``subfolder``) are fetched, never training leftovers.
    """
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    pattern_sets = ADAPTER_PATTERN_SETS if kind == "adapter" else MODEL_PATTERN_SETS
    ignores = TRAINING_LEFTOVERS + (_NOT_ADAPTER_FILES if kind == "adapter" else ())
    incomplete: str | None = None
    local: Path | None = None
    for patterns in pattern_sets:
        found = download([prefix + p for p in patterns], [f"{prefix}*/*", *(prefix + p for p in ignores)])
        if isinstance(found, str):
            incomplete = found
            continue
        local = found
        if _has_needed_files(local / prefix if prefix else local, kind):
            return local
    if local is not None and local.is_dir():
        return local  # the reader names what is missing
    if incomplete:
        raise InputError(f"{text}: {incomplete}; connect to the network (unset HF_HUB_OFFLINE) to complete it")
    what = "adapter" if kind == "adapter" else "model"
    raise InputError(f"{text}: the repository has no {what} files{f' under {subfolder}/' if subfolder else ''}")


def _has_needed_files(folder: Path, kind: str) -> bool:
    if not folder.is_dir():
        return False
    names = {p.name for p in folder.iterdir() if p.is_file()}
    if kind == "adapter":
        return bool(names & {"adapter_config.json", "adapters.safetensors"})
    return any(n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin")) for n in names)


def _not_cached_message(text: str, repo_id: str, revision: str | None, cache: Path, offline: bool) -> str:
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    why = "HF_HUB_OFFLINE=1 forbids downloading" if offline else "the Hub could not be reached"
    if not storage.is_dir():
        return f"{text}: not a local path, and not in the Hugging Face cache ({cache}); {why}"
    known = sorted(p.name for p in (storage / "refs").glob("*") if p.is_file()) if (storage / "refs").is_dir() else []
    known += sorted(p.name[:12] for p in (storage / "snapshots").glob("*")) if (storage / "snapshots").is_dir() else []
    have = f" (cached: {', '.join(known)})" if known else ""
    return f"{text}: revision {revision or 'main'!r} not in the Hugging Face cache{have}; {why}"


# ----------------------------------------------------------------------------------------------
# push: the files of an adapter or merged-model folder, a model card, one commit


def folder_kind(path: Path) -> str:
    """``"adapter"`` or ``"model"`` for a folder to push.

    Raises:
        InputError: neither an adapter nor a transformers model folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: push takes a folder (an adapter or a merged model)")
    if (path / "adapter_config.json").is_file() or any(
        (p / "adapter_config.json").is_file() for p in path.iterdir() if p.is_dir() and not p.name.startswith(("checkpoint-", "."))
    ):
        return "adapter"
    if (path / "config.json").is_file():
        return "model"
    from loratool.formats import detect_format

    try:
        detect_format(path)
    except FormatError:
        ckpts = sorted(p.name for p in path.glob("checkpoint-*") if p.is_dir())
        hint = f"; push one of its checkpoints instead, e.g. {path / ckpts[-1]}" if ckpts else ""
        raise InputError(f"{path}: neither an adapter (adapter_config.json...) nor a model folder (config.json and weights){hint}") from None
    return "adapter"


def select_files(path: Path, kind: str, *, include: Iterable[str] = (), adapter_files: Iterable[Path] = ()) -> tuple[list[str], list[str]]:
    """Split the files under ``path`` into (kept, left out), as POSIX paths relative to ``path``.

    Adapters keep their config and weights (also in sub-adapter folders), README.md and tokenizer
    files; models keep config / generation / tokenizer files, safetensors weights (pickled weights
    only when there are none) and index JSON. Hidden files, ``checkpoint-*/`` folders and training
    leftovers (optimizer, scheduler, RNG states, trainer state) are left out. A file matching an
    ``include`` glob (or lying in a folder that matches) is kept whatever it is.
    """
    path = Path(path)
    include = [p.rstrip("/") for p in include if p]
    rel_files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    extra = {Path(f).resolve() for f in adapter_files}
    has_safetensors = any("/" not in f and f.endswith(".safetensors") for f in rel_files)
    kept, left = [], []
    for rel in rel_files:
        if _matches_include(rel, include):
            kept.append(rel)
            continue
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts) or any(fnmatch.fnmatchcase(p, "checkpoint-*") for p in parts[:-1]):
            left.append(rel)
            continue
        if any(fnmatch.fnmatchcase(parts[-1], pat) for pat in TRAINING_LEFTOVERS):
            left.append(rel)
            continue
        if _keep(rel, parts, kind, has_safetensors) or (path / rel).resolve() in extra:
            kept.append(rel)
        else:
            left.append(rel)
    return kept, left


def _matches_include(rel: str, include: list[str]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for pat in include for p in prefixes) or any(
        fnmatch.fnmatchcase(parts[-1], pat) for pat in include
    )


def _keep(rel: str, parts: list[str], kind: str, has_safetensors: bool) -> bool:
    name = parts[-1]
    if rel == "README.md":
        return True
    if kind == "adapter":
        if len(parts) > 2:
            return False
        if name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
            return True  # top level, or a PEFT sub-adapter folder
        return len(parts) == 1 and (name in TOKENIZER_FILES or name == "adapters.safetensors")
    if len(parts) > 1:
        return False
    if name in MODEL_SIDE_FILES or name.endswith(".index.json"):
        return True
    if name.endswith(".safetensors"):
        return True
    return not has_safetensors and fnmatch.fnmatchcase(name, "pytorch_model*.bin")


def _hub_id_shaped(value: Any) -> bool:
    """Whether ``value`` is shaped like a Hub model id (``org/name`` or a legacy ``gpt2``), not a path."""
    if not isinstance(value, str) or not value or os.path.isabs(value) or value.startswith((".", "~")):
        return False
    return bool(_HUB_ID_RE.match(value)) and "--" not in value and ".." not in value


def _hub_id(value: Any) -> str | None:
    """``value`` when it can name a Hub model (``org/name`` or a legacy ``gpt2``), else None."""
    if isinstance(value, str):
        value = value.split("@", 1)[0]
    if not _hub_id_shaped(value):
        return None
    if Path(value).exists():
        return None  # a local path wins over a repo id
    return value


def _in_hub_cache(spec: str) -> bool:
    """Whether the Hugging Face cache holds anything of the repo ``org/name[@revision]``."""
    repo_id = spec.partition("@")[0]
    return (hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))).is_dir()


def _open_card_base(base: str | os.PathLike | None, fallback: str | None, token: str | None):
    """The base model for a card's numbers: ``base`` (resolved), else ``fallback`` if local or cached."""
    from loratool.base import BaseModel

    if base is not None:
        return BaseModel.open(resolve_path(base, kind="model", token=token))
    if not fallback:
        return None
    try:
        if Path(fallback).exists():
            return BaseModel.open(fallback)
        if looks_like_repo_id(fallback) and _in_hub_cache(fallback):
            return BaseModel.open(resolve_path(fallback, kind="model", token=token, local_only=True))
    except (InputError, OSError):
        return None
    return None


_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_PIPELINE_TAGS = {
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForSeq2SeqLM": "text2text-generation",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModel": "feature-extraction",
}


def _auto_class(task_type: str | None, architecture: str | None) -> str:
    if task_type and task_type in _AUTO_CLASSES:
        return _AUTO_CLASSES[task_type]
    arch = architecture or ""
    for suffix, cls in (
        ("ForCausalLM", "AutoModelForCausalLM"),
        ("LMHeadModel", "AutoModelForCausalLM"),
        ("ForSequenceClassification", "AutoModelForSequenceClassification"),
        ("ForTokenClassification", "AutoModelForTokenClassification"),
        ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
        ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ):
        if arch.endswith(suffix):
            return cls
    return "AutoModelForCausalLM" if not arch else "AutoModel"


def _model_type_from_config(config: dict) -> str | None:
    """The transformers model type an adapter config implies (PEFT's auto_mapping), if any."""
    mapping = config.get("auto_mapping") if isinstance(config, dict) else None
    if isinstance(mapping, dict):
        lib = mapping.get("parent_library") or ""
        m = re.match(r"^transformers\.models\.([\w]+)\.", lib)
        if m:
            return m.group(1)
    return None


_INSPECT_NOTE = "_Figures from `loratool inspect`._"


def _fmt_params(n: int) -> str:
    return f"{n:,}"


def _join(values: Iterable[Any]) -> str:
    return ", ".join(f"`{v}`" for v in values)


class _CardParts(NamedTuple):
    """A generated card before assembly: metadata, title, one-line summary, the loratool sections."""

    data: Any  # huggingface_hub.ModelCardData
    title: str
    summary: str
    sections: list[str]

    def card(self):
        """The whole card, a ``huggingface_hub.ModelCard``."""
        from huggingface_hub import ModelCard

        body = "\n".join([f"# {self.title}", "", self.summary, "", *self.sections]).strip()
        return ModelCard(f"---\n{self.data.to_yaml()}\n---\n\n{body}\n")


def model_card(
    path: str | os.PathLike,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    base: str | os.PathLike | None = None,
    adapter: str | None = None,
    token: str | None = None,
):
    """Generate a model card for an adapter or merged-model folder.

    Adapter cards carry ``base_model`` (from ``base`` or adapter_config's base_model_name_or_path),
    ``library_name: peft`` for PEFT adapters, tags (lora, peft, the architecture) and a section
    from ``inspect_adapter``: rank(s), alpha, target modules, LoRA parameters and their percent of
    the base (when the base is ``base``, a local folder or in the Hugging Face cache), and how to
    load the adapter. Merged-model cards carry ``library_name: transformers`` and a note that the
    model was merged with loratool.

    Args:
        path: the folder to describe.
        repo_id: the repo the folder goes to (for the loading snippets).
        revision: the branch it goes to (for the loading snippets).
        base: the base model (path or repo id), when the folder's own metadata lacks or misnames it.
        adapter: for a merged model, the adapter that was merged (for the note).
        token: a Hub token, used only to resolve ``base``.
    Returns:
        A ``huggingface_hub.ModelCard`` (``str(card)`` is the README.md text).
    Raises:
        InputError / FormatError: the folder is not an adapter or model, or cannot be read.
    """
    return _card_parts(path, repo_id=repo_id, revision=revision, base=base, adapter=adapter, token=token).card()


def _card_parts(path, *, repo_id, revision, base, adapter, token, named_base: str | None = None) -> _CardParts:
    """The card of a folder in parts; ``named_base``: a base model id from an old card's metadata,
    used when neither ``base`` nor the folder's config names one."""
    path = Path(path)
    if folder_kind(path) == "adapter":
        return _adapter_card(path, repo_id=repo_id, revision=revision, base=base, token=token, named_base=named_base)
    return _model_card(path, repo_id=repo_id, revision=revision, base=base, adapter=adapter, token=token, named_base=named_base)


def _read_adapters(path: Path):
    """[(sub-adapter name or None, Adapter)]: the top-level adapter, or every PEFT sub-adapter."""
    from loratool.formats import read_adapter

    subs = sorted(
        p.name
        for p in path.iterdir()
        if p.is_dir() and (p / "adapter_config.json").is_file() and not p.name.startswith(("checkpoint-", "."))
    )
    found = [(None, read_adapter(path))] if (path / "adapter_config.json").is_file() or not subs else []
    return found + [(name, read_adapter(path, format="peft", adapter_name=name)) for name in subs]


def _adapter_card_data(first, base_obj, base_model_id: str | None):
    """(``ModelCardData``, the transformers Auto class that loads the base) of an adapter card."""
    from huggingface_hub import ModelCardData

    model_type = (base_obj.model_type if base_obj is not None else None) or _model_type_from_config(first.config)
    architecture = None
    if base_obj is not None and base_obj.architectures:
        architecture = base_obj.architectures[0]
    elif isinstance(first.config.get("auto_mapping"), dict):
        architecture = first.config["auto_mapping"].get("base_model_class")
    auto_cls = _auto_class(first.task_type, architecture)
    is_peft = first.format == "peft"

    tags = ["lora"]
    tags += ["peft"] if is_peft else [first.format]
    if first.use_dora:
        tags.append("dora")
    if model_type:
        tags.append(model_type)
    tags.append("loratool")
    data = ModelCardData(
        base_model=base_model_id,
        library_name="peft" if is_peft else None,
        pipeline_tag=_PIPELINE_TAGS.get(auto_cls) if (first.task_type or architecture) else None,
        tags=tags,
    )
    return data, auto_cls


def _adapter_summary(first, base_model_id: str | None) -> str:
    """The card's one-line summary: what kind of adapter, for which base."""
    if base_model_id:
        base_text = f"[`{base_model_id}`](https://huggingface.co/{base_model_id})"
    elif first.base_model:
        base_text = f"a local base model (`{Path(first.base_model).name}`)"
    else:
        base_text = "an unnamed base model"
    kind_text = "DoRA" if first.use_dora else ("AdaLoRA" if first.variant == "adalora" else "LoRA")
    return f"A {kind_text} adapter for {base_text}."


def _how_to_load(first, sub: str | None, auto_cls: str, *, repo_id, revision, base_model_id: str | None) -> list[str]:
    """The card's "How to load" section: with PEFT (PEFT adapters), and merging with loratool."""
    repo = repo_id or "REPO_ID"
    rev_arg = f', revision="{revision}"' if revision else ""
    base_ref = base_model_id or "BASE_MODEL"
    lines = ["## How to load", ""]
    if first.format == "peft":
        sub_arg = f', subfolder="{sub}"' if sub else ""
        lines += [
            "With PEFT:",
            "",
            "```python",
            f"from transformers import {auto_cls}",
            "from peft import PeftModel",
            "",
            f'base = {auto_cls}.from_pretrained("{base_ref}")',
            f'model = PeftModel.from_pretrained(base, "{repo}"{sub_arg}{rev_arg})',
            "```",
            "",
        ]
    else:
        lines += [f"This adapter is in {first.format} format; `loratool convert` turns it into a PEFT adapter.", ""]
    spec = f"{repo}@{revision}" if revision else repo
    name_opt = f" --adapter-name {sub}" if sub else ""
    lines += [
        "To merge it into the base weights with loratool:",
        "",
        "```bash",
        f"loratool merge {base_ref} {spec} merged/{name_opt}",
        "```",
    ]
    if not base_model_id:
        lines += ["", "Replace `BASE_MODEL` with the base model this adapter was trained on."]
    return lines


def _adapter_card(path: Path, *, repo_id, revision, base, token, named_base=None):
    from loratool.inspect import inspect_adapter

    adapters = _read_adapters(path)
    first = adapters[0][1]
    base_model_id = _hub_id(os.fspath(base)) if base is not None else None
    base_model_id = base_model_id or _hub_id(first.base_model) or _hub_id(named_base)
    base_obj = _open_card_base(base, first.base_model, token)
    data, auto_cls = _adapter_card_data(first, base_obj, base_model_id)
    name = repo_id.split("/")[-1] if repo_id else path.name
    summary = _adapter_summary(first, base_model_id)
    lines: list[str] = []
    for sub, ad in adapters:
        report = inspect_adapter(ad, base=base_obj, scan=False)
        lines += _adapter_section(sub, ad, report)
    lines += _how_to_load(first, adapters[0][0], auto_cls, repo_id=repo_id, revision=revision, base_model_id=base_model_id)
    return _CardParts(data, name, summary, lines)


def _adapter_section(sub: str | None, ad, report: dict) -> list[str]:
    modules = report["modules"]
    ranks = sorted({m["rank"] for m in modules})
    alphas = sorted({m["alpha"] for m in modules})
    scales = sorted({round(m["scale"], 6) for m in modules})
    targets = ad.target_modules
    if isinstance(targets, (list, tuple, set)):
        target_text = _join(sorted(targets))
    elif isinstance(targets, str):
        target_text = f"`{targets}`"
    else:
        target_text = _join(sorted({m["name"].rsplit(".", 1)[-1] for m in modules}))
    params = _fmt_params(report["lora_params"])
    if report.get("percent_of_base") is not None:
        params += f" ({report['percent_of_base']:.4g}% of the base's {_fmt_params(report['base_params'])})"
    flags = [f for f in ("rslora", "dora", "bias") if report.get(f)]
    rows = [
        ("format", f"{report['format']} ({report['variant']})"),
        ("rank" + ("s" if len(ranks) > 1 else ""), ", ".join(map(str, ranks)) or "-"),
        ("alpha", ", ".join(f"{a:g}" for a in alphas) or "-"),
        ("scale", ", ".join(f"{s:g}" for s in scales) or "-"),
        ("target modules", target_text or "-"),
        ("adapted modules", str(len(modules))),
        ("LoRA parameters", params),
        ("dtype", report.get("dtype") or "-"),
    ]
    if flags:
        rows.append(("flags", ", ".join(flags)))
    if report["modules_to_save"]:
        rows.append(("modules_to_save", _join(report["modules_to_save"])))
    if len(ranks) > 1:
        hist = ", ".join(f"r={r}: {n}" for r, n in report["rank_histogram"].items())
        rows.append(("rank histogram", hist))
    title = "## Adapter" + (f" `{sub}`" if sub else "")
    out = [title, "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", _INSPECT_NOTE, ""]
    return out


def _adapter_base_id(adapter: str | os.PathLike | None) -> str | None:
    """The Hub id of the base an adapter (local or cached) names in its adapter_config.json."""
    if adapter is None:
        return None
    from loratool.io.store import read_json

    try:
        folder = resolve_path(adapter, kind="adapter", local_only=True)
        config = read_json((folder if folder.is_dir() else folder.parent) / "adapter_config.json")
    except (InputError, OSError):
        return None
    return _hub_id(config.get("base_model_name_or_path")) if isinstance(config, dict) else None


def _model_card(path: Path, *, repo_id, revision, base, adapter, token, named_base=None):
    from huggingface_hub import ModelCardData

    from loratool.base import BaseModel

    model = BaseModel.open(path)
    base_model_id = _hub_id(os.fspath(base)) if base is not None else None
    base_model_id = base_model_id or _hub_id(model.config.get("_name_or_path")) or _adapter_base_id(adapter)
    base_model_id = base_model_id or _hub_id(named_base)
    arch = model.architectures[0] if model.architectures else None
    auto_cls = _auto_class(None, arch)
    tags = ["loratool", "lora-merged"]
    if model.model_type:
        tags.append(model.model_type)
    data = ModelCardData(
        base_model=base_model_id,
        library_name="transformers",
        pipeline_tag=_PIPELINE_TAGS.get(auto_cls) if arch else None,
        tags=tags,
    )
    name = repo_id.split("/")[-1] if repo_id else path.name
    base_text = f"[`{base_model_id}`](https://huggingface.co/{base_model_id})" if base_model_id else "its base model"
    adapter_text = ""
    if adapter:
        aid = _hub_id(os.fspath(adapter))
        adapter_text = f" [`{aid}`](https://huggingface.co/{aid})" if aid else f" `{Path(adapter).name}`"
    dtypes = sorted({str(e.dtype).replace("torch.", "") for e in model.store.entries() if e.dtype.is_floating_point})
    rows = [
        ("architecture", f"`{arch}`" if arch else "-"),
        ("model type", model.model_type or "-"),
        ("parameters", _fmt_params(model.unique_params())),
        ("dtype", ", ".join(dtypes) or "-"),
    ]
    rev_arg = f', revision="{revision}"' if revision else ""
    summary = (
        f"This model is {base_text} with a LoRA adapter{adapter_text} merged into its weights by loratool. "
        "It is a plain transformers model: loading it needs no PEFT."
    )
    lines = [
        "## Model",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "## How to load",
        "",
        "```python",
        f"from transformers import {auto_cls}",
        "",
        f'model = {auto_cls}.from_pretrained("{repo_id or "REPO_ID"}"{rev_arg})',
        "```",
    ]
    return _CardParts(data, name, summary, lines)


# ----------------------------------------------------------------------------------------------
# README.md of a folder to push: kept, completed, or replaced by a generated card

PEFT_PLACEHOLDER = "[More Information Needed]"
# PEFT's additions to the template: its version, and the quantization config used in training
_PEFT_VERSION_LINE = re.compile(r"^- PEFT \S+$")
_PEFT_QUANT_PREFIX = "The following `bitsandbytes` quantization config was used during training:"
_CONFIG_ITEM_LINE = re.compile(r"^- \w+: .*$")
_HEADING_LINE = re.compile(r"^#{1,6}\s")
_LABELLED_PLACEHOLDER = re.compile(r"^(- )?\*\*[^*]+:\*\*$")  # "- **License:** [More Information Needed]"
_MIN_TEMPLATE_PLACEHOLDERS = 3
_FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?\r?\n)?---[ \t]*(?:\r?\n|\Z)", re.S)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
# the card metadata loratool fills in itself when it replaces PEFT's template
_GENERATED_KEYS = ("base_model", "library_name", "pipeline_tag", "tags")


def split_front_matter(text: str) -> tuple[str | None, str]:
    """Split README text into its YAML front matter and its Markdown body.

    Args:
        text: the README.md text.
    Returns:
        (the YAML between the ``---`` lines, or None when there is no front matter; the body).
    """
    match = _FRONT_MATTER.match(text)
    if not match:
        return None, text
    return match.group(1) or "", text[match.end():]


def _content_lines(body: str) -> list[str]:
    """The non-blank lines of a Markdown body, stripped, HTML comments removed."""
    return [line.strip() for line in _HTML_COMMENT.sub("", body).splitlines() if line.strip()]


@lru_cache(maxsize=1)
def _hub_template_lines() -> frozenset[str]:
    """The lines of huggingface_hub's default model card template, the one PEFT fills in."""
    from huggingface_hub import ModelCard, ModelCardData

    try:
        return frozenset(_content_lines(ModelCard.from_template(ModelCardData()).text))
    except Exception:  # no jinja2: the template's fixed lines, unrendered
        pass
    try:
        raw = Path(ModelCard.default_template_path).read_text(encoding="utf-8")
    except (OSError, AttributeError, TypeError):
        return frozenset()  # the generic rules alone
    return frozenset(line for line in _content_lines(raw) if "{{" not in line and "{%" not in line)


def _is_template_line(line: str, template_lines: frozenset[str], quantized: bool) -> bool:
    """Whether one line of a README body can come from PEFT's template without anyone editing it."""
    if line in template_lines or _HEADING_LINE.match(line) or _PEFT_VERSION_LINE.match(line):
        return True
    if line == _PEFT_QUANT_PREFIX or (quantized and _CONFIG_ITEM_LINE.match(line)):
        return True
    if PEFT_PLACEHOLDER not in line:
        return False
    rest = line.replace(PEFT_PLACEHOLDER, "").strip()
    return not rest or bool(_LABELLED_PLACEHOLDER.match(rest))


def is_untouched_peft_template(text: str) -> bool:
    """Whether README text is the template card PEFT's ``save_pretrained`` writes, unedited.

    PEFT fills huggingface_hub's default model card template: headings ("# Model Card for Model
    ID", "## Model Details", ...), HTML comments, and "[More Information Needed]" in every section,
    then appends "### Framework versions" / "- PEFT x.y.z" (and the bitsandbytes config of a
    quantized training). The text is that template when its body has at least three placeholders
    and every other line is a heading, a placeholder (possibly labelled, "- **License:** [More
    Information Needed]"), a fixed sentence of the template or one of PEFT's additions. One line
    written by a person makes it the user's README. The front matter is not considered.

    Args:
        text: the README.md text.
    Returns:
        True for PEFT's untouched template.
    """
    lines = _content_lines(split_front_matter(text)[1])
    if sum(PEFT_PLACEHOLDER in line for line in lines) < _MIN_TEMPLATE_PLACEHOLDERS:
        return False
    template_lines = _hub_template_lines()
    quantized = _PEFT_QUANT_PREFIX in lines
    return all(_is_template_line(line, template_lines, quantized) for line in lines)


def is_valid_base_model(value: Any) -> bool:
    """Whether a card's ``base_model`` metadata names Hub models: ``org/name`` (or legacy ``gpt2``).

    Args:
        value: the metadata value: a string, or a list of strings (a merge of several bases).
    Returns:
        False for a missing or empty value, a local path, or anything else the Hub rejects.
    """
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(_hub_id_shaped(v) for v in values)


def _read_readme(readme: Path) -> str:
    """The text of a README.md to push.

    Raises:
        InputError: not UTF-8.
    """
    try:
        return readme.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{readme}: not UTF-8 text (byte {exc.start}); a model card must be UTF-8") from None


def _parse_card(text: str, readme: Path):
    """A ``ModelCard`` of README text; its metadata must be a YAML mapping.

    Raises:
        InputError: the front matter is not valid YAML, or not a mapping the Hub accepts.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if split_front_matter(text)[0] is None:
        text = f"---\n{ModelCardData().to_yaml()}\n---\n\n{text}"  # no front matter: empty metadata
    try:
        return ModelCard(text)
    except Exception as exc:  # yaml.YAMLError, ValueError (not a mapping, bad model-index), TypeError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{readme}: its YAML front matter cannot be read ({first})") from None


def readme_action(text: str, readme: Path) -> str:
    """What push does with a folder's README.md.

    Args:
        text: the README.md text.
        readme: its path (for error messages).
    Returns:
        "replace" (PEFT's untouched template: a generated card takes its place), "complete" (the
        user's own text without a valid ``base_model``: metadata and the loratool section are
        added) or "keep" (a complete card: pushed byte for byte).
    Raises:
        InputError: the front matter cannot be read.
    """
    if is_untouched_peft_template(text):
        return "replace"
    card = _parse_card(text, readme)
    return "keep" if is_valid_base_model(card.data.get("base_model")) else "complete"


def _template_metadata(text: str, readme: Path) -> dict:
    """The metadata of PEFT's template README; {} when unreadable (it is PEFT's own, and replaced)."""
    try:
        return _parse_card(text, readme).data.to_dict()
    except InputError:
        return {}


def _replace_template(old: dict, parts: _CardParts):
    """The generated card, carrying over metadata the user added to PEFT's template (license...)."""
    card = parts.card()
    for key, value in old.items():
        if key not in _GENERATED_KEYS and card.data.get(key) is None:
            card.data[key] = value
    return card


def _complete_card(text: str, readme: Path, parts: _CardParts):
    """The user's README with base_model, library_name, pipeline_tag and tags completed and the
    loratool section appended (unless it is there already); their text is kept as written."""
    card = _parse_card(text, readme)
    data, generated = card.data, parts.data
    if generated.base_model:
        data.base_model = generated.base_model
    else:
        data.pop("base_model")  # missing, empty or a local path: the Hub refuses it
    for key in ("library_name", "pipeline_tag"):
        if not data.get(key) and generated.get(key):
            data[key] = generated[key]
    own_tags = data.get("tags") or []
    own_tags = [own_tags] if isinstance(own_tags, str) else list(own_tags)
    data.tags = own_tags + [t for t in generated.tags or [] if t not in own_tags]
    card.text = _completed_body(card.text, parts, "\r\n" if "\r\n" in text else "\n")
    return card


def _completed_body(body: str, parts: _CardParts, newline: str) -> str:
    """The user's Markdown body followed by loratool's summary and sections (all of the generated
    card when the body is empty; nothing added when loratool's section is there already)."""
    if not body.strip():
        return newline + newline.join([f"# {parts.title}", "", parts.summary, "", *parts.sections]).strip() + newline
    if parts.summary in body or _INSPECT_NOTE in body:
        return body
    added = newline.join([parts.summary, "", *parts.sections]).strip()
    return body.rstrip() + newline + newline + added + newline


def push_card(
    path: str | os.PathLike,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    base: str | os.PathLike | None = None,
    adapter: str | None = None,
    token: str | None = None,
) -> tuple[str, str]:
    """The README.md that ``push`` uploads for a folder, and where it comes from.

    No README.md: a card is generated (``model_card``). PEFT's untouched template
    (``is_untouched_peft_template``): replaced by the generated card, keeping metadata the user
    added (license, datasets...) and the template's base_model when nothing else names the base.
    The user's own README without a valid ``base_model``: kept as written, its metadata completed
    (base_model, library_name, pipeline_tag, tags) and the loratool section appended. Otherwise
    the README is pushed unchanged. Nothing is written into ``path``.

    Args:
        path: the adapter or merged-model folder.
        repo_id, revision: where it goes (for the loading snippets).
        base: the base model (path or repo id), when the folder's own metadata lacks it.
        adapter: for a merged model, the adapter that was merged.
        token: a Hub token, used only to resolve ``base``.
    Returns:
        (the README.md text, its source: "generated", "replaced-template", "completed" or "kept").
    Raises:
        InputError: the README is not UTF-8 or its front matter cannot be read; the folder cannot be read.
    """
    path = Path(path)
    readme = path / "README.md"
    if not readme.is_file():
        action, text = "generate", ""
    else:
        text = _read_readme(readme)
        action = readme_action(text, readme)
    if action == "keep":
        return text, "kept"
    old = _template_metadata(text, readme) if action == "replace" else {}
    named = old.get("base_model") if isinstance(old.get("base_model"), str) else None
    parts = _card_parts(path, repo_id=repo_id, revision=revision, base=base, adapter=adapter, token=token, named_base=named)
    if action == "generate":
        return str(parts.card()), "generated"
    if action == "replace":
        return str(_replace_template(old, parts)), "replaced-template"
    return str(_complete_card(text, readme, parts)), "completed"


def check_push_repo_id(repo_id: str) -> None:
    """Refuse a push target that is not ``org/name``.

    Raises:
        InputError: malformed, or carrying an ``@revision`` (the branch is a separate option).
    """
    if "@" in repo_id:
        raise InputError(f"{repo_id}: name the branch with --revision, not @")
    if not looks_like_repo_id(repo_id):
        raise InputError(f"{repo_id}: not a Hugging Face repo id (expected org/name)")


def _files_to_push(path: Path, kind: str, include: Iterable[str]) -> tuple[list[str], list[str]]:
    """(files to send, files left out), relative to ``path``, once the folder was read as ``kind``.

    Raises:
        InputError: an unreadable adapter or model, or nothing to push.
    """
    adapter_files: list[Path] = []
    if kind == "adapter":
        try:
            adapter_files = [f for _, ad in _read_adapters(path) for f in ad.files]
        except FormatError as exc:
            raise InputError(f"{path}: not a readable adapter ({exc.reason})") from None
    else:
        from loratool.base import BaseModel

        BaseModel.open(path)  # config.json and weights must be readable
    kept, left_out = select_files(path, kind, include=include, adapter_files=adapter_files)
    if not kept:
        raise InputError(f"{path}: nothing to push")
    return kept, left_out


def _upload(api, path: Path, repo_id: str, kept: list[str], card: bytes | None, *, message: str, private: bool,
            revision: str | None, create_pr: bool, token: str | None):
    """Create the repo (and branch) when missing and commit ``kept`` plus the in-memory README ``card``
    in one commit; the ``create_commit`` result.

    Raises:
        InputError: the upload failed.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = api if api is not None else HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path / rel)) for rel in kept]
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    try:
        api.create_repo(repo_id, token=token, private=True if private else None, repo_type="model", exist_ok=True)
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
        return api.create_commit(
            repo_id,
            operations,
            commit_message=message,
            token=token,
            repo_type="model",
            revision=revision,
            create_pr=create_pr or None,
        )
    except HfHubHTTPError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{repo_id}: upload failed ({first})") from None
    except OSError as exc:
        raise InputError(f"{repo_id}: upload failed ({type(exc).__name__}: {exc})") from None


def push(
    path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    include: Iterable[str] = (),
    token: str | None = None,
    api=None,
    base: str | os.PathLike | None = None,
    adapter: str | None = None,
) -> dict[str, Any]:
    """Upload an adapter or merged-model folder to the Hub in one commit.

    The repo is created when missing (``create_repo(exist_ok=True)``), the branch too when
    ``revision`` names one that does not exist (unless ``create_pr``). Only the files of the
    adapter or model are sent (see ``select_files``). The README.md is chosen by ``push_card``: a
    generated model card when the folder has none or only PEFT's untouched template, the folder's
    own with its metadata completed when it lacks ``base_model``, else the folder's own unchanged.
    A generated or completed card is committed from memory: nothing is written into ``path``.

    Args:
        path: the local folder.
        repo_id: ``org/name`` on the Hub.
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to (default: main).
        commit_message: the commit title (default: "Upload LoRA adapter with loratool" / "... merged model ...").
        create_pr: open a pull request instead of committing to the branch.
        dry_run: compute the files and the card and return them; no network at all.
        include: glob patterns of files to send even though they are normally left out.
        token: a Hub token (default: HF_TOKEN / the saved login).
        api: an ``huggingface_hub.HfApi``-like object (default: ``HfApi(token=token)``).
        base: the base model (path or repo id) for the card, when the folder's metadata lacks it.
        adapter: for a merged model, the adapter that was merged (named in the card).
    Returns:
        A dict: repo_id, revision, kind, files [{path, size, generated (the card loratool made)}],
        left_out, card (the README.md text uploaded), card_source ("generated",
        "replaced-template", "completed" or "kept"), dry_run, and after an upload commit_url and
        pr_url.
    Raises:
        InputError: not an adapter or model folder, a bad repo id, an unreadable README.md, or
            the upload failed.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such folder (push takes a local adapter or model folder)")
    check_push_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise InputError("--revision must not be empty")
    kind = folder_kind(path)
    kept, left_out = _files_to_push(path, kind, include)

    card_text, card_source = push_card(path, repo_id=repo_id, revision=revision, base=base, adapter=adapter, token=token)
    card = None if card_source == "kept" else card_text.encode("utf-8")  # committed from memory
    if card is not None:
        kept = [rel for rel in kept if rel != "README.md"]
    files = [{"path": rel, "size": (path / rel).stat().st_size} for rel in kept]
    if card is not None:
        files.append({"path": "README.md", "size": len(card), "generated": True})
    message = commit_message or f"Upload {'LoRA adapter' if kind == 'adapter' else 'merged model'} with loratool"
    result: dict[str, Any] = {
        "repo_id": repo_id, "revision": revision, "kind": kind, "path": str(path), "private": private,
        "create_pr": create_pr, "commit_message": message, "files": files,
        "total_size": sum(f["size"] for f in files), "left_out": left_out,
        "card": card_text, "card_source": card_source, "dry_run": dry_run,
    }
    if dry_run:
        return result
    info = _upload(api, path, repo_id, kept, card, message=message, private=private, revision=revision,
                   create_pr=create_pr, token=token or None)
    result["commit_url"] = getattr(info, "commit_url", None)
    result["pr_url"] = getattr(info, "pr_url", None)
    return result
