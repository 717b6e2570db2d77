"""Shared test helpers: fixture paths, a CLI runner, PEFT oracles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
BASES = FIXTURES / "bases"
ADAPTERS = FIXTURES / "adapters"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
ADAPTER_BASE = MANIFEST["adapters"]  # adapter fixture -> base fixture

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_runtest_setup(item):
    """Tests marked ``realworld`` skip with one reason without ../shared/realworld, and fail in CI."""
    if item.get_closest_marker("realworld") is None:
        return
    from realworld import MISSING_REASON, REQUIRE_ENV, realworld_available

    if realworld_available():
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 and this test {MISSING_REASON}", pytrace=False)
    pytest.skip(MISSING_REASON)


def run_cli(*args, env=None, timeout=600, input=None):
    """Run ``python -m loratool ARGS`` in a subprocess; returns CompletedProcess (text)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "loratool", *map(str, args)],
        capture_output=True, text=True, env=full_env, timeout=timeout, input=input,
    )


def invoke(*args):
    """Run the CLI in-process (fast); returns (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from loratool.cli import main

    runner = CliRunner()
    result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(stderr: str):
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


def peft_resolution(model, adapter_path, **kwargs):
    """(r, lora_alpha, scaling) of every LoRA layer after PeftModel.from_pretrained."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    pm = PeftModel.from_pretrained(model, str(adapter_path), **kwargs)
    out = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.r:
            short = name[len("base_model.model."):]
            out[short] = (mod.r["default"], mod.lora_alpha["default"], mod.scaling["default"])
    return out


@pytest.fixture(scope="session")
def realworld_bases(tmp_path_factory):
    """A cache of random bases of real shape, built on first use: name -> folder."""
    from realworld import save_base

    root = tmp_path_factory.mktemp("realworld-bases")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = save_base(name, root / name)
        return cache[name]

    return get
