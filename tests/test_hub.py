"""Hub: repo ids resolved through a hand-built HF cache (offline), and push without any network."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from conftest import ADAPTERS, BASES, assert_one_line_error, invoke
from realworld import PEFT_REALWORLD, REALWORLD

from loratool import hub
from loratool.errors import InputError

SHA = "0123456789abcdef0123456789abcdef01234567"
SHA2 = "fedcba9876543210fedcba9876543210fedcba98"


def _cache_repo(cache: Path, repo_id: str, src: Path, *, sha: str = SHA, refs=("main",)) -> Path:
    """Lay ``src``'s files out as the HF cache does: models--org--name/snapshots/SHA/, refs/BRANCH."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snap = storage / "snapshots" / sha
    shutil.copytree(src, snap)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF cache in a temporary HF_HOME, offline."""
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection or HfApi call fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import huggingface_hub

    for name in ("create_repo", "create_branch", "create_commit", "upload_folder", "upload_file", "repo_info", "list_repo_files"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, refuse)


def _inspect(*args):
    code, out, err = invoke("inspect", *args, "--json")
    return code, (json.loads(out) if code == 0 else None), err


def _strip_path(report):
    return {k: v for k, v in report.items() if k not in ("path", "base", "file_size")}


# ------------------------------------------------------------------------------------------
# resolution


def test_repo_id_resolves_from_offline_cache(hf_cache, no_network):
    snap = _cache_repo(hf_cache, "org/llama-lora", ADAPTERS / "llama-lora")
    code, report, err = _inspect("org/llama-lora")
    assert code == 0, err
    assert Path(report["path"]).resolve() == snap.resolve()
    _, local, _ = _inspect(ADAPTERS / "llama-lora")
    assert _strip_path(report) == _strip_path(local)
    assert report["lora_params"] == 16384


def test_repo_id_at_commit_and_branch(hf_cache, no_network):
    _cache_repo(hf_cache, "org/llama-lora", ADAPTERS / "llama-lora", sha=SHA, refs=("main",))
    snap2 = _cache_repo(hf_cache, "org/llama-lora", ADAPTERS / "llama-rslora", sha=SHA2, refs=("dev",))
    code, report, err = _inspect(f"org/llama-lora@{SHA}")
    assert code == 0, err
    assert report["rslora"] is False
    code, report, err = _inspect(f"org/llama-lora@{SHA2}")
    assert code == 0, err
    assert report["rslora"] is True
    code, report, err = _inspect("org/llama-lora@dev")
    assert code == 0, err
    assert Path(report["path"]).resolve() == snap2.resolve()
    assert report["rslora"] is True


def test_base_repo_id_from_cache(hf_cache, no_network):
    _cache_repo(hf_cache, "org/llama-lora", ADAPTERS / "llama-lora")
    _cache_repo(hf_cache, "org/tiny-llama", BASES / "llama")
    code, report, err = _inspect("org/llama-lora", "--base", "org/tiny-llama")
    assert code == 0, err
    _, local, _ = _inspect(ADAPTERS / "llama-lora", "--base", BASES / "llama")
    assert report["base_params"] == local["base_params"] == 106816
    assert report["percent_of_base"] == pytest.approx(local["percent_of_base"])


def test_sub_adapter_from_cache(hf_cache, no_network):
    _cache_repo(hf_cache, "org/multi", ADAPTERS / "llama-multi")
    code, report, err = _inspect("org/multi", "--adapter-name", "second")
    assert code == 0, err
    _, local, _ = _inspect(ADAPTERS / "llama-multi", "--adapter-name", "second")
    assert _strip_path(report) == _strip_path(local)


def test_missing_repo_says_not_cached(hf_cache, no_network):
    code, out, err = invoke("inspect", "org/absent")
    assert code == 2
    line = assert_one_line_error(err)
    assert "not in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE" in line


def test_missing_revision_names_cached_ones(hf_cache, no_network):
    _cache_repo(hf_cache, "org/llama-lora", ADAPTERS / "llama-lora")
    code, out, err = invoke("inspect", "org/llama-lora@v2")
    assert code == 2
    line = assert_one_line_error(err)
    assert "'v2'" in line and "not in the Hugging Face cache" in line
    assert "main" in line and SHA[:12] in line


def test_local_path_wins_over_repo_id(hf_cache, no_network, tmp_path, monkeypatch):
    _cache_repo(hf_cache, "org/name", ADAPTERS / "llama-lora")
    work = tmp_path / "work"
    shutil.copytree(ADAPTERS / "llama-rslora", work / "org" / "name")
    monkeypatch.chdir(work)
    code, report, err = _inspect("org/name")
    assert code == 0, err
    assert report["rslora"] is True
    assert Path(report["path"]) == Path("org/name")


def test_not_a_path_nor_repo_id():
    code, out, err = invoke("inspect", "no/such/adapter/here")
    assert code == 2
    assert "no such file or folder" in assert_one_line_error(err)


def test_online_download_is_limited_to_needed_files(tmp_path, monkeypatch):
    """Online: snapshot_download gets the revision, the token, top-level adapter files only."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    calls = []
    snap = tmp_path / "snap"
    shutil.copytree(ADAPTERS / "llama-lora", snap)

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(dict(kwargs, repo_id=repo_id))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    code, out, err = invoke("inspect", "org/llama-lora@v1", "--token", "hf_secret", "--json")
    assert code == 0, err
    (call,) = calls
    assert call["repo_id"] == "org/llama-lora"
    assert call["revision"] == "v1"
    assert call["token"] == "hf_secret"
    assert call["local_files_only"] is False
    assert Path(call["cache_dir"]) == tmp_path / "cache"
    assert "adapter_config.json" in call["allow_patterns"]
    assert not any(p.startswith("*") for p in call["allow_patterns"])  # no blanket *.safetensors
    assert "*/*" in call["ignore_patterns"] and "optimizer.pt" in call["ignore_patterns"]
    assert "model*.safetensors" in call["ignore_patterns"]  # a model repo given as ADAPTER is not fetched whole

    # a model: safetensors first, pickles only when the repo has no safetensors
    calls.clear()
    base_snap = tmp_path / "base"
    shutil.copytree(BASES / "llama", base_snap)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(kw) or str(base_snap))
    hub.resolve_path("org/base", kind="model")
    assert len(calls) == 1
    assert "*.safetensors" in calls[0]["allow_patterns"] and "config.json" in calls[0]["allow_patterns"]
    assert not any(p.endswith(".bin") for p in calls[0]["allow_patterns"])


def test_online_errors_are_one_line(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))

    def unreachable(repo_id, **kwargs):
        raise LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(InputError, match="not in the Hugging Face cache.*could not be reached"):
        hub.resolve_path("org/x")

    def broken(repo_id, **kwargs):
        raise ConnectionError("boom\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    code, out, err = invoke("inspect", "org/x")
    assert code == 2
    assert "could not download from the Hub (ConnectionError: boom)" in assert_one_line_error(err)


# ------------------------------------------------------------------------------------------
# push


def _training_folder(tmp_path: Path, src: Path = ADAPTERS / "llama-lora", *, base_model: str | None = None) -> Path:
    """An adapter folder as a Trainer leaves it: leftovers and a checkpoint next to the adapter."""
    folder = tmp_path / "run"
    shutil.copytree(src, folder)
    if base_model is not None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base_model
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pth", "trainer_state.json", "training_args.bin"):
        (folder / name).write_bytes(b"x" * 10)
    (folder / "checkpoint-10").mkdir()
    shutil.copy(src / "adapter_config.json", folder / "checkpoint-10" / "adapter_config.json")
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"y")
    (folder / "tokenizer.json").write_text("{}")
    (folder / ".hidden").write_text("z")
    return folder


LEFTOVERS = {
    ".hidden",
    "checkpoint-10/adapter_config.json",
    "checkpoint-10/optimizer.pt",
    "optimizer.pt",
    "rng_state_0.pth",
    "scheduler.pt",
    "trainer_state.json",
    "training_args.bin",
}


def _card(text: str):
    from huggingface_hub import ModelCard

    return ModelCard(text)


def test_push_dry_run_touches_no_network(tmp_path, hf_cache, no_network):
    _cache_repo(hf_cache, "org/tiny-llama", BASES / "llama")
    folder = _training_folder(tmp_path, base_model="org/tiny-llama")
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    code, out, err = invoke("push", folder, "me/my-lora", "--dry-run", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["dry_run"] is True
    assert [f["path"] for f in result["files"]] == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"]
    sizes = {f["path"]: f["size"] for f in result["files"]}
    assert sizes["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").stat().st_size
    assert set(result["left_out"]) == LEFTOVERS
    card = _card(result["card"])
    assert card.data.base_model == "org/tiny-llama"
    assert card.data.library_name == "peft"
    assert {"lora", "peft", "llama"} <= set(card.data.tags)
    assert "| rank | 8 |" in card.text and "| alpha | 16 |" in card.text
    assert "`q_proj`" in card.text and "`down_proj`" in card.text
    assert "16,384 (15.34% of the base's 106,816)" in card.text
    assert 'PeftModel.from_pretrained(base, "me/my-lora")' in card.text
    assert 'AutoModelForCausalLM.from_pretrained("org/tiny-llama")' in card.text
    assert "loratool merge org/tiny-llama me/my-lora merged/" in card.text
    # nothing written into the input
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before

    # human output: files with sizes, what is left out, the card
    code, out, err = invoke("push", folder, "me/my-lora", "--dry-run")
    assert code == 0, err
    assert "would push adapter" in out and "adapter_model.safetensors" in out and "kB" in out
    assert "left out (add with --include GLOB)" in out and "optimizer.pt" in out
    assert "library_name: peft" in out


def test_push_include_globs(tmp_path, no_network):
    folder = _training_folder(tmp_path)
    result = hub.push(folder, "me/x", dry_run=True, include=["*.pt", "checkpoint-10"])
    paths = {f["path"] for f in result["files"]}
    assert {"optimizer.pt", "scheduler.pt", "checkpoint-10/adapter_config.json", "checkpoint-10/optimizer.pt"} <= paths
    assert set(result["left_out"]) == LEFTOVERS - paths


class FakeApi:
    """Stands in for HfApi: records calls at the API boundary."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        ops = {op.path_in_repo: op for op in operations}
        self.calls.append(("create_commit", repo_id, dict(kwargs, operations=ops)))

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc"
            pr_url = f"https://huggingface.co/{repo_id}/discussions/1" if kwargs.get("create_pr") else None

        return Info()


def _op_bytes(op) -> bytes:
    src = op.path_or_fileobj
    return src if isinstance(src, bytes) else Path(src).read_bytes()


def test_push_calls_the_api(tmp_path, hf_cache):
    _cache_repo(hf_cache, "org/tiny-llama", BASES / "llama")
    folder = _training_folder(tmp_path, base_model="org/tiny-llama")
    api = FakeApi()
    result = hub.push(folder, "me/my-lora", private=True, revision="dev", commit_message="first", api=api, token="hf_t")
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "create_branch", "create_commit"]
    _, repo, kw = api.calls[0]
    assert repo == "me/my-lora" and kw["private"] is True and kw["exist_ok"] is True and kw["token"] == "hf_t"
    _, repo, kw = api.calls[1]
    assert kw["branch"] == "dev" and kw["exist_ok"] is True
    _, repo, kw = api.calls[2]
    assert repo == "me/my-lora"
    assert kw["revision"] == "dev" and kw["commit_message"] == "first" and not kw["create_pr"]
    ops = kw["operations"]
    assert set(ops) == {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"}
    assert _op_bytes(ops["adapter_model.safetensors"]) == (folder / "adapter_model.safetensors").read_bytes()
    card = _card(_op_bytes(ops["README.md"]).decode())
    assert card.data.base_model == "org/tiny-llama" and card.data.library_name == "peft"
    assert {"lora", "peft", "llama"} <= set(card.data.tags)
    assert "| rank | 8 |" in card.text and "16,384" in card.text
    assert 'revision="dev"' in card.text and "me/my-lora@dev" in card.text
    assert result["commit_url"].endswith("/commit/abc")
    assert not (folder / "README.md").exists()


def test_push_cli_with_patched_hfapi(tmp_path, monkeypatch):
    """The CLI builds its own HfApi: patch its methods and check --private/--create-pr/--token."""
    import huggingface_hub

    api = FakeApi()
    tokens = []
    real_init = huggingface_hub.HfApi.__init__

    def init(self, *args, **kwargs):
        tokens.append(kwargs.get("token"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(huggingface_hub.HfApi, "__init__", init)
    for name in ("create_repo", "create_branch", "create_commit"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, lambda self, *a, _n=name, **k: getattr(api, _n)(*a, **k))
    folder = _training_folder(tmp_path)
    code, out, err = invoke("push", folder, "me/x", "--create-pr", "--revision", "main", "--token", "hf_cli", "--commit-message", "m")
    assert code == 0, err
    assert tokens == ["hf_cli"]
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]  # no branch creation for a PR
    assert api.calls[0][2]["private"] is None
    kw = api.calls[1][2]
    assert kw["create_pr"] is True and kw["revision"] == "main" and kw["commit_message"] == "m"
    assert "discussions/1" in out


def test_push_keeps_existing_readme(tmp_path, no_network):
    folder = _training_folder(tmp_path)
    (folder / "README.md").write_bytes(COMPLETE_README)
    result = hub.push(folder, "me/x", dry_run=True)
    assert result["card_source"] == "kept"
    assert result["card"].encode() == COMPLETE_README
    readme = [f for f in result["files"] if f["path"] == "README.md"]
    assert readme == [{"path": "README.md", "size": len(COMPLETE_README)}]
    api = FakeApi()
    hub.push(folder, "me/x", api=api)
    ops = api.calls[-1][2]["operations"]
    assert _op_bytes(ops["README.md"]) == COMPLETE_README
    assert "optimizer.pt" not in ops


# ------------------------------------------------------------------------------------------
# push: the README.md PEFT's save_pretrained writes, and the user's own

PLACEHOLDER = "[More Information Needed]"
# metadata with a valid base_model, in an order and a style the YAML dumper would change
COMPLETE_README = (
    b"---\r\ntags: [lora, mine]   # my tags\r\nbase_model: org/tiny-llama\r\nlicense: mit\r\n---\r\n"
    b"# My adapter\r\n\r\nTrained by me. Caf\xc3\xa9.\r\n"
)


@pytest.fixture(scope="module")
def peft_saved(tmp_path_factory):
    """Real PEFT adapters saved by ``save_pretrained`` (so with PEFT's template README.md):
    "local" names its base by a local path everywhere; "named" has a base whose name_or_path is
    ``org/tiny-llama``, which PEFT puts in the README's base_model but not in adapter_config."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft-saved")
    for name in ("local", "named"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(BASES / "llama"))
        if name == "named":
            model.config.name_or_path = "org/tiny-llama"
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
        get_peft_model(model, config).save_pretrained(str(root / name))
    return root


def _peft_folder(tmp_path: Path, peft_saved: Path, name: str = "local") -> Path:
    folder = tmp_path / "peft-run"
    shutil.copytree(peft_saved / name, folder)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_loratool_card(card, base_model: str = "org/tiny-llama"):
    assert card.data.base_model == base_model
    assert card.data.library_name == "peft"
    assert {"lora", "peft", "llama", "loratool"} <= set(card.data.tags)
    assert "| rank | 4 |" in card.text and "| alpha | 8 |" in card.text
    assert "| target modules | `q_proj`, `v_proj` |" in card.text
    assert "1,792 (1.678% of the base's 106,816)" in card.text
    assert f'AutoModelForCausalLM.from_pretrained("{base_model}")' in card.text
    assert 'PeftModel.from_pretrained(base, "me/my-lora")' in card.text


def test_peft_save_pretrained_writes_its_template(peft_saved):
    """The premise: PEFT writes a README.md, its template, without a usable base_model."""
    text = (peft_saved / "local" / "README.md").read_text()
    assert text.count(PLACEHOLDER) > 10 and "### Framework versions" in text
    assert hub.is_untouched_peft_template(text)
    meta = _card(text).data
    assert not hub.is_valid_base_model(meta.get("base_model"))  # a local path
    assert hub.is_valid_base_model(_card((peft_saved / "named" / "README.md").read_text()).data.base_model)


def test_push_replaces_peft_template(tmp_path, peft_saved, hf_cache, monkeypatch):
    _cache_repo(hf_cache, "org/tiny-llama", BASES / "llama")
    folder = _peft_folder(tmp_path, peft_saved)
    before = _snapshot(folder)
    code, out, err = invoke("push", folder, "me/my-lora", "--base", "org/tiny-llama", "--dry-run", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["card_source"] == "replaced-template"
    assert [f["path"] for f in result["files"]] == ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    assert result["files"][-1] == {"path": "README.md", "size": len(result["card"].encode()), "generated": True}
    card = _card(result["card"])
    _assert_loratool_card(card)
    assert PLACEHOLDER not in result["card"] and "Model Card for Model ID" not in result["card"]

    # the dry run prints that card
    code, out, err = invoke("push", folder, "me/my-lora", "--base", "org/tiny-llama", "--dry-run")
    assert code == 0, err
    assert "README.md (generated, replacing PEFT's template README.md)" in out
    assert result["card"].strip() in out and PLACEHOLDER not in out

    # the upload commits the same card, from memory
    api = FakeApi()
    _patch_hfapi(monkeypatch, api)
    code, out, err = invoke("push", folder, "me/my-lora", "--base", "org/tiny-llama")
    assert code == 0, err
    ops = api.calls[-1][2]["operations"]
    assert _op_bytes(ops["README.md"]).decode() == result["card"]
    assert _snapshot(folder) == before


def test_push_replaces_template_naming_its_base(tmp_path, peft_saved, no_network):
    """PEFT's template naming a Hub base (adapter_config names a local path): still replaced,
    and its base_model kept; metadata the user added to the template (license) is kept too."""
    folder = _peft_folder(tmp_path, peft_saved, "named")
    readme = folder / "README.md"
    readme.write_text(readme.read_text().replace("library_name: peft", "library_name: peft\nlicense: apache-2.0", 1))
    before = _snapshot(folder)
    code, out, err = invoke("push", folder, "me/my-lora", "--dry-run", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["card_source"] == "replaced-template"
    card = _card(result["card"])
    _assert_loratool_card(card)
    assert card.data.license == "apache-2.0"
    assert not any(t.startswith("base_model:") for t in card.data.tags)
    assert PLACEHOLDER not in result["card"]
    assert _snapshot(folder) == before


@pytest.mark.parametrize(
    "front_matter",
    ["", "---\nlicense: mit\n---\n", "---\nbase_model: ''\nlicense: mit\ntags:\n- mine\n---\n", "---\nbase_model: /data/llama\nlicense: mit\n---\n"],
    ids=["none", "no-base-model", "empty-base-model", "local-path"],
)
def test_push_completes_user_readme(tmp_path, peft_saved, hf_cache, monkeypatch, front_matter):
    _cache_repo(hf_cache, "org/tiny-llama", BASES / "llama")
    folder = _peft_folder(tmp_path, peft_saved)
    body = "# My adapter\n\nTrained on my data; see [the paper](https://example.org).\n"
    (folder / "README.md").write_text(front_matter + body)
    before = _snapshot(folder)
    code, out, err = invoke("push", folder, "me/my-lora", "--base", "org/tiny-llama", "--dry-run", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["card_source"] == "completed"
    card = _card(result["card"])
    _assert_loratool_card(card)
    assert card.text.lstrip("\n").startswith(body)  # the user's text first, as written
    assert PLACEHOLDER not in result["card"]
    if front_matter:
        assert card.data.license == "mit"
    if "mine" in front_matter:
        assert card.data.tags[0] == "mine"

    code, out, err = invoke("push", folder, "me/my-lora", "--base", "org/tiny-llama", "--dry-run")
    assert code == 0, err
    assert "README.md (the folder's README.md, metadata and loratool section added)" in out
    assert "Trained on my data" in out and "base_model: org/tiny-llama" in out

    api = FakeApi()
    _patch_hfapi(monkeypatch, api)
    code, out, err = invoke("push", folder, "me/my-lora", "--base", "org/tiny-llama")
    assert code == 0, err
    assert _op_bytes(api.calls[-1][2]["operations"]["README.md"]).decode() == result["card"]
    assert _snapshot(folder) == before


def test_completing_twice_adds_nothing(tmp_path, peft_saved, hf_cache):
    """A README loratool already completed (its section there) only gains metadata."""
    _cache_repo(hf_cache, "org/tiny-llama", BASES / "llama")
    folder = _peft_folder(tmp_path, peft_saved)
    (folder / "README.md").write_text("# Mine\n")
    first = hub.push(folder, "me/my-lora", dry_run=True, base="org/tiny-llama")["card"]
    without_base = first.replace("base_model: org/tiny-llama\n", "")
    (folder / "README.md").write_text(without_base)
    again = hub.push(folder, "me/my-lora", dry_run=True, base="org/tiny-llama")
    assert again["card_source"] == "completed"
    assert again["card"].count("## Adapter") == 1 and _card(again["card"]).data.base_model == "org/tiny-llama"


def test_push_keeps_complete_user_readme_byte_identical(tmp_path, peft_saved, monkeypatch):
    folder = _peft_folder(tmp_path, peft_saved)
    (folder / "README.md").write_bytes(COMPLETE_README)
    before = _snapshot(folder)
    code, out, err = invoke("push", folder, "me/my-lora", "--dry-run", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["card_source"] == "kept" and result["card"].encode() == COMPLETE_README
    assert not any(f.get("generated") for f in result["files"])
    code, out, err = invoke("push", folder, "me/my-lora", "--dry-run")
    assert code == 0, err
    assert "README.md (the folder's own, unchanged)" in out and "Trained by me" in out
    api = FakeApi()
    _patch_hfapi(monkeypatch, api)
    code, out, err = invoke("push", folder, "me/my-lora")
    assert code == 0, err
    op = api.calls[-1][2]["operations"]["README.md"]
    assert Path(op.path_or_fileobj) == folder / "README.md"  # the file itself, not a rewrite
    assert _op_bytes(op) == COMPLETE_README
    assert _snapshot(folder) == before


def test_edited_template_is_the_users(tmp_path, peft_saved, hf_cache):
    """One line of the template filled in makes the README the user's: it is kept and completed."""
    _cache_repo(hf_cache, "org/tiny-llama", BASES / "llama")
    folder = _peft_folder(tmp_path, peft_saved)
    readme = folder / "README.md"
    text = readme.read_text().replace(f"- **Developed by:** {PLACEHOLDER}", "- **Developed by:** Ada", 1)
    assert not hub.is_untouched_peft_template(text)
    readme.write_text(text)
    result = hub.push(folder, "me/my-lora", dry_run=True, base="org/tiny-llama")
    assert result["card_source"] == "completed"
    assert "- **Developed by:** Ada" in result["card"] and "| rank | 4 |" in result["card"]
    assert _card(result["card"]).data.base_model == "org/tiny-llama"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("# Model Card for Model ID\n\n## Uses\n\n[More Information Needed]\n", False),  # too few placeholders
        ("# Notes\n\n" + "\n\n".join([PLACEHOLDER] * 3) + "\n\nMy own words.\n", False),
        ("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n\n- **License:** [More Information Needed]\n\n"
         "## Uses\n\n<!-- a comment -->\n\n[More Information Needed]\n\n**BibTeX:**\n\n[More Information Needed]\n\n"
         "## Training procedure\n\nThe following `bitsandbytes` quantization config was used during training:\n"
         "- load_in_4bit: True\n\n### Framework versions\n\n- PEFT 0.13.0\n", True),
        ("# Mine\n\nAll about it.\n", False),
    ],
)
def test_is_untouched_peft_template(text, expected):
    assert hub.is_untouched_peft_template(text) is expected


def test_push_unreadable_readme_is_one_line(tmp_path, peft_saved, no_network):
    folder = _peft_folder(tmp_path, peft_saved)
    (folder / "README.md").write_text("---\nbase_model: [unclosed\n---\n# Mine\n")
    code, out, err = invoke("push", folder, "me/my-lora", "--dry-run")
    assert code == 2
    assert "front matter cannot be read" in assert_one_line_error(err)
    (folder / "README.md").write_bytes(b"# Caf\xe9\n")
    code, out, err = invoke("push", folder, "me/my-lora", "--dry-run")
    assert code == 2
    assert "not UTF-8" in assert_one_line_error(err)


def test_push_merged_model_card(tmp_path, no_network):
    folder = tmp_path / "merged"
    shutil.copytree(BASES / "llama", folder)
    (folder / "optimizer.pt").write_bytes(b"x")
    (folder / "pytorch_model.bin").write_bytes(b"x")  # a stale pickle next to safetensors
    result = hub.push(folder, "me/merged", dry_run=True, base="org/tiny-llama", adapter="org/llama-lora")
    assert result["kind"] == "model"
    assert [f["path"] for f in result["files"]] == ["config.json", "generation_config.json", "model.safetensors", "README.md"]
    assert set(result["left_out"]) == {"optimizer.pt", "pytorch_model.bin"}
    card = _card(result["card"])
    assert card.data.library_name == "transformers"
    assert card.data.base_model == "org/tiny-llama"
    assert "llama" in card.data.tags
    assert "merged into its weights by loratool" in card.text
    assert "org/llama-lora" in card.text and "106,816" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("me/merged")' in card.text


def test_push_sharded_model_keeps_index(tmp_path, no_network):
    result = hub.push(BASES / "llama-sharded", "me/sharded", dry_run=True)
    paths = [f["path"] for f in result["files"]]
    assert "model.safetensors.index.json" in paths
    assert sum(p.endswith(".safetensors") for p in paths) >= 2


def test_push_multi_adapter_card(tmp_path, no_network):
    result = hub.push(ADAPTERS / "llama-multi", "me/multi", dry_run=True)
    paths = [f["path"] for f in result["files"]]
    assert "second/adapter_config.json" in paths and "second/adapter_model.safetensors" in paths
    assert "## Adapter `second`" in result["card"]


@pytest.mark.realworld
@pytest.mark.parametrize("name", PEFT_REALWORLD)
def test_push_dry_run_realworld(name, no_network):
    result = hub.push(REALWORLD / name, "me/x", dry_run=True)
    cfg = json.loads((REALWORLD / name / "adapter_config.json").read_text())
    card = _card(result["card"])
    assert card.data.base_model == cfg["base_model_name_or_path"]
    assert card.data.library_name == "peft"
    assert f"| rank | {cfg['r']} |" in card.text
    assert "SOURCE.txt" in result["left_out"]
    weights = [f["path"] for f in result["files"] if f["path"].startswith("adapter_model")]
    assert len(weights) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["push", "{folder}", "me/x@dev", "--dry-run"], "--revision"),
        (["push", "{folder}", "not a repo", "--dry-run"], "not a Hugging Face repo id"),
        (["push", "{empty}", "me/x", "--dry-run"], "neither an adapter"),
        (["push", "{missing}", "me/x", "--dry-run"], "does not exist"),
    ],
)
def test_push_refusals(tmp_path, no_network, args, message):
    (tmp_path / "empty").mkdir()
    subs = {"folder": ADAPTERS / "llama-lora", "empty": tmp_path / "empty", "missing": tmp_path / "missing"}
    code, out, err = invoke(*[a.format(**subs) for a in args])
    assert code == 2
    assert message in assert_one_line_error(err)


def test_push_upload_failure_is_one_line(tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    class Failing(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            import httpx2

            response = httpx2.Response(403, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
            raise HfHubHTTPError("403 Forbidden: you cannot write to me\nmore", response=response)

    with pytest.raises(InputError, match=r"me/x: upload failed \(403 Forbidden: you cannot write to me\)"):
        hub.push(ADAPTERS / "llama-lora", "me/x", api=Failing())


# ------------------------------------------------------------------------------------------
# merge --push


def _patch_hfapi(monkeypatch, api: FakeApi):
    import huggingface_hub

    for name in ("create_repo", "create_branch", "create_commit"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, lambda self, *a, _n=name, **k: getattr(api, _n)(*a, **k))


def test_merge_push_uploads_merged_model(tmp_path, monkeypatch):
    api = FakeApi()
    _patch_hfapi(monkeypatch, api)
    out = tmp_path / "merged"
    code, stdout, err = invoke("merge", BASES / "llama", ADAPTERS / "llama-lora", out, "--push", "me/merged", "--private", "--json")
    assert code == 0, err
    result = json.loads(stdout)  # one object: the merge report with the push result inside
    assert "modules" in result and result["push"]["repo_id"] == "me/merged"
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0][2]["private"] is True
    ops = api.calls[1][2]["operations"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(ops)
    assert _op_bytes(ops["model.safetensors"]) == (out / "model.safetensors").read_bytes()
    card = _card(_op_bytes(ops["README.md"]).decode())
    assert card.data.library_name == "transformers"
    assert "merged into its weights by loratool" in card.text


def test_merge_push_bad_repo_id_refused_before_merging(tmp_path, no_network):
    out = tmp_path / "merged"
    code, stdout, err = invoke("merge", BASES / "llama", ADAPTERS / "llama-lora", out, "--push", "me/merged@dev")
    assert code == 2
    assert "--revision" in assert_one_line_error(err)
    assert not out.exists()
