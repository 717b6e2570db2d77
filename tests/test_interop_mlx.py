"""mlx-lm itself against PEFT, both directions, on tiny random Llama (GQA), Qwen2 (q/k/v biases, tied
head), Phi-3 (fused ``qkv_proj`` / ``gate_up_proj``) and Gemma (tied head, (1 + w) norms) bases.

- loratool -> mlx-lm: a PEFT adapter written for mlx-lm by ``check --target mlx-lm --fix`` and by
  ``convert --to mlx`` is loaded by mlx-lm (``load_model`` + ``tuner.utils.load_adapters``); its logits
  match PEFT's unmerged model on the original adapter within the reported error.
- mlx-lm -> loratool: mlx-lm's own training (``mlx_lm.lora.train_model``, what ``mlx_lm.lora --train``
  runs after loading its data: ``linear_to_lora_layers``, Adam, two iterations on random tokens, its
  adapters.safetensors and adapter_config.json) writes an adapter; ``convert --to peft`` reads it, and
  PEFT's logits on the result equal mlx-lm's own with its adapter.

mlx-lm runs on the CPU (mlx-cpu). Each base is first checked to give transformers' logits in mlx-lm.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from _interop_bases import ARCHS, make_adapter, make_base
from _oracle import load_base_model, peft_model
from conftest import ADAPTERS, invoke

import loratool
from loratool.formats import write_adapter

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install mlx mlx-cpu mlx-lm)")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install mlx mlx-cpu mlx-lm)")

IDS = [1, 5, 77, 200, 3, 9, 255, 128]
# float32 in two libraries; Gemma: mlx-lm's gemma.py uses the exact (erf) GELU where transformers runs
# gelu_pytorch_tanh: measured up to 2.6e-4 on the logits
NUMERIC = 1e-3


def _mlx_ready(base: Path) -> Path:
    """mlx-lm 0.32.2's ModelArgs read ``rope_theta`` at the top of config.json (Qwen2's default is 1e6);
    transformers 5 writes it under ``rope_parameters``: both get the same value."""
    path = base / "config.json"
    cfg = json.loads(path.read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in cfg:
        path.write_text(json.dumps({**cfg, "rope_theta": theta}))
    return base


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """arch -> a tiny base folder both transformers and mlx-lm load (made once per module)."""
    made, top = {}, tmp_path_factory.mktemp("mlx-bases")

    def get(arch):
        if arch not in made:
            made[arch] = _mlx_ready(make_base(arch, top / arch))
        return made[arch]
    return get


def _mlx_logits(base, adapter=None):
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(base))
    if adapter is not None:
        model = load_adapters(model, str(adapter))
    return torch.from_numpy(np.array(model(mx.array([IDS])).astype(mx.float32))[0]).double()


def _peft_logits(base, adapter=None):
    model = (peft_model(base, adapter) if adapter else load_base_model(base)).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].double()


def _assert_within(got, want, plain, reported, what):
    """mlx-lm's logits ``got`` against PEFT's ``want``: max |diff| <= 4 x reported error x the adapter's
    effect + NUMERIC. Returns the difference (printed by the tests: pytest -s shows the measurements)."""
    effect = float((want - plain).abs().max())
    assert effect > 1e-2, f"{what}: the adapter changes the logits by only {effect:.3g}"
    diff = float((got - want).abs().max())
    assert diff <= 4 * reported * effect + NUMERIC, f"{what}: mlx-lm vs PEFT {diff:.3g} (adapter effect {effect:.3g})"
    print(f"{what}: mlx-lm vs PEFT max |diff| {diff:.2g} (adapter effect {effect:.2g}, reported error {reported:.2g})")
    return diff


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_lm_runs_each_base_as_transformers(arch, bases):
    diff = float((_mlx_logits(bases(arch)) - _peft_logits(bases(arch))).abs().max())
    assert diff <= NUMERIC, f"{arch}: mlx-lm vs transformers on the base: {diff:.3g}"


# --------------------------------------------------------------------------- loratool -> mlx-lm


def _source(arch, spec, base, dest):
    if (ADAPTERS / spec).is_dir():
        return ADAPTERS / spec
    opts = {"rslora": {}, "dora": {"rslora": False, "dora": True}}[spec]
    return make_adapter(arch, base, dest, **opts)


def _write_for_mlx(route, src, out, base=None):
    """(exit code, reported error, stderr) of ``check --target mlx-lm --fix`` or ``convert --to mlx``."""
    with_base = ("--base", base) if base is not None else ()
    if route == "fix":
        code, stdout, err = invoke("check", src, "--target", "mlx-lm", *with_base, "--fix", out, "--json")
        return code, json.loads(stdout)["max_relative_error"] if code == 0 else None, err
    code, _, err = invoke("convert", src, out, "--to", "mlx", *with_base)
    return code, 0.0, err


CASES = [(arch, spec) for arch in ARCHS for spec in ("rslora", "dora")] + [("llama", "llama-patterns")]


@pytest.mark.parametrize("route", ["fix", "convert"])
@pytest.mark.parametrize("arch,spec", CASES)
def test_mlx_lm_serves_loratool_output_with_peft_logits(arch, spec, route, bases, tmp_path):
    base = bases(arch)
    src = _source(arch, spec, base, tmp_path / "src")
    code, reported, err = _write_for_mlx(route, src, tmp_path / "mlx", base)
    assert code == 0, err
    want, plain = _peft_logits(base, src), _peft_logits(base)
    _assert_within(_mlx_logits(base, tmp_path / "mlx"), want, plain, reported, f"{arch} {spec} {route}")


@pytest.mark.parametrize("route", ["fix", "convert"])
def test_mlx_lm_loads_adapter_on_first_block_only_without_base(route, bases, tmp_path):
    """Without --base the block count is unknown: num_layers must still reach block 0 of a 2-block Phi-3."""
    base = bases("phi3")
    whole = loratool.read_adapter(make_adapter("phi3", base, tmp_path / "whole"))
    first = whole.replace_modules({n: m for n, m in whole.modules.items() if ".layers.0." in n})
    write_adapter(first, tmp_path / "src", format="peft")
    code, reported, err = _write_for_mlx(route, tmp_path / "src", tmp_path / "mlx")
    assert code == 0, err
    want, plain = _peft_logits(base, tmp_path / "src"), _peft_logits(base)
    _assert_within(_mlx_logits(base, tmp_path / "mlx"), want, plain, reported, f"phi3 block 0 only {route}, no --base")


# --------------------------------------------------------------------------- mlx-lm -> loratool


class _Tokens:
    """A dataset as mlx-lm's trainer takes it (CacheDataset calls ``process``): token rows, no prompt."""

    def __init__(self, rows):
        self.rows = rows

    def __getitem__(self, i):
        return self.rows[i]

    def __len__(self):
        return len(self.rows)

    def process(self, row):
        return row, 0


def _mlx_train(base, out, *, fine_tune_type, num_layers):
    """mlx-lm's own LoRA/DoRA training: two Adam steps (lr 1e-2, so the adapter matters) on random tokens."""
    from mlx_lm.lora import CONFIG_DEFAULTS, train_model
    from mlx_lm.utils import load_model

    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 256, 24).tolist() for _ in range(4)]
    args = types.SimpleNamespace(**{
        **CONFIG_DEFAULTS, "model": str(base), "train": True, "fine_tune_type": fine_tune_type, "num_layers": num_layers,
        "batch_size": 2, "iters": 2, "val_batches": 1, "learning_rate": 1e-2, "steps_per_eval": 100,
        "adapter_path": str(out), "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 20.0}})
    model, _ = load_model(Path(base))
    train_model(args, model, _Tokens(rows), _Tokens(rows[:2]))
    return out


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_lm_trained_adapter_converted_to_peft_gives_mlx_lm_logits(arch, fine_tune_type, bases, tmp_path):
    """Llama and Qwen2 train every block (num_layers -1); Phi-3 and Gemma the last one (num_layers 1)."""
    base = bases(arch)
    trained = _mlx_train(base, tmp_path / "mlx", fine_tune_type=fine_tune_type, num_layers=1 if arch in ("phi3", "gemma") else -1)
    code, out, err = invoke("check", trained, "--target", "mlx-lm", "--base", base)
    assert code == 0, out + err
    code, _, err = invoke("convert", trained, tmp_path / "peft", "--to", "peft", "--base", base)
    assert code == 0, err
    got, plain = _peft_logits(base, tmp_path / "peft"), _peft_logits(base)
    _assert_within(got, _mlx_logits(base, trained), plain, 0.0, f"mlx-lm trained {arch} {fine_tune_type} -> PEFT")
