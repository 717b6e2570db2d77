"""Hugging Face Hub: resolve ``org/name[@revision]`` to a local snapshot (cache, offline mode).

An existing local path always wins over a repo id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loratool.errors import InputError

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")

ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json", "*.safetensors", "*.gguf", "*.pth", "*.yaml", "README.md"]
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer.model", "*.txt", "*.model", "*.jinja"]


def looks_like_repo_id(spec: str) -> bool:
    return bool(_REPO_RE.match(spec)) and not spec.startswith((".", "/"))


def resolve_path(spec: str | os.PathLike, *, kind: str = "adapter", token: str | None = None, subfolder: str | None = None) -> Path:
    """A local path for ``spec``: the path itself when it exists, else a Hub snapshot.

    Args:
        spec: a local path, ``org/name`` or ``org/name@revision``.
        kind: "adapter" or "model": which files to download.
        token: a Hub token (default: HF_TOKEN / the saved login).
        subfolder: restrict the download to this subfolder (a named sub-adapter).
    Raises:
        InputError: not a local path, and the repo cannot be resolved (offline and not cached, not found...).
    """
    path = Path(spec)
    if path.exists():
        return path
    text = str(spec)
    if not looks_like_repo_id(text):
        raise InputError(f"{text}: no such file or folder")
    repo_id, _, revision = text.partition("@")
    patterns = ADAPTER_PATTERNS if kind == "adapter" else MODEL_PATTERNS
    if subfolder:
        patterns = [f"{subfolder}/{p}" for p in patterns]
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise InputError(f"{text}: not a local path and huggingface_hub is not installed") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        local = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=patterns,
            token=token,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError:
        if offline:
            raise InputError(f"{text}: not a local path, and not in the Hugging Face cache (HF_HUB_OFFLINE=1 forbids downloading)") from None
        raise InputError(f"{text}: not a local path, and the Hub could not be reached (no cached copy)") from None
    except GatedRepoError:
        raise InputError(f"{text}: gated repository; pass --token or set HF_TOKEN with access") from None
    except RepositoryNotFoundError:
        raise InputError(f"{text}: no such repository on the Hub (or it is private: pass --token)") from None
    except RevisionNotFoundError:
        raise InputError(f"{text}: revision {revision!r} not found") from None
    except Exception as exc:  # network errors come in many types
        raise InputError(f"{text}: could not download from the Hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return Path(local)
