"""Outputs that would destroy something are refused before any work, with or without --force.

OUT that is empty, the current or home folder or an ancestor, an alias of an input (bind mount,
hard link), a FIFO or a device; report and plot files under the same rules as OUT; base side
files that link outside BASE; repo ids whose revision walks out of the cache; error lines that
would put control characters on the terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ADAPTERS, BASES, assert_one_line_error

ADAPTER = ADAPTERS / "llama-lora"


def loratool(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "loratool", *map(os.fspath, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, errors="surrogateescape", timeout=300)


def refused(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    line = assert_one_line_error(res.stderr)
    for w in words:
        assert w in line, line
    return line


@pytest.fixture
def work(tmp_path):
    """A folder with copies of the base and adapter, and a file that must survive."""
    shutil.copytree(BASES / "llama", tmp_path / "base")
    shutil.copytree(ADAPTER, tmp_path / "adapter")
    (tmp_path / "keep.txt").write_text("precious")
    return tmp_path


def intact(work: Path) -> None:
    assert (work / "keep.txt").read_text() == "precious"
    assert (work / "base" / "model.safetensors").read_bytes() == (BASES / "llama" / "model.safetensors").read_bytes()
    assert not [p for p in work.iterdir() if ".loratool-" in p.name]


@pytest.mark.parametrize("out", ["", ".", "..", "./", "/", "CWD"])
def test_out_that_is_the_current_folder_or_an_ancestor(work, out):
    target = os.fspath(work) if out == "CWD" else out
    res = loratool("merge", "base", "adapter", target, "--force", cwd=work)
    line = refused(res)
    assert "current folder" in line or "empty" in line or "ancestor" in line
    intact(work)


def test_out_that_is_the_home_folder(work, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    (home / "dotfile").write_text("mine")
    res = loratool("merge", work / "base", work / "adapter", home, "--force", cwd=work, env={"HOME": str(home)})
    refused(res, "home folder")
    assert (home / "dotfile").read_text() == "mine"
    intact(work)


def test_out_that_contains_an_input(work):
    nested = work / "models" / "base"
    nested.parent.mkdir()
    shutil.move(work / "base", nested)
    res = loratool("merge", nested, "adapter", work / "models", "--force", cwd=work)
    refused(res, "contains the input")
    assert (nested / "model.safetensors").is_file()


def test_out_aliasing_the_base_through_a_bind_mount(work, tmp_path_factory):
    alias = tmp_path_factory.mktemp("alias") / "base-again"
    alias.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(work / "base"), str(alias)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"bind mounts need CAP_SYS_ADMIN here: {mounted.stderr.strip()}")
    try:
        res = loratool("merge", "base", "adapter", alias, "--force", cwd=work)
        refused(res, "input")
        res = loratool("merge", "base", "adapter", alias / "inside", "--force", cwd=work)
        refused(res, "inside an input")
    finally:
        subprocess.run(["umount", str(alias)], check=True)
    intact(work)


def test_out_that_is_a_hard_link_of_an_input_file(work):
    res = loratool("convert", "adapter", work / "a.gguf", "--to", "gguf", "--base", "base", cwd=work)
    assert res.returncode == 0, res.stderr
    os.link(work / "a.gguf", work / "b.gguf")
    before = (work / "a.gguf").read_bytes()
    res = loratool("convert", work / "a.gguf", work / "b.gguf", "--to", "gguf", "--base", "base", "--force", cwd=work)
    refused(res, "input")
    assert (work / "a.gguf").read_bytes() == before


def test_out_that_is_a_fifo_or_a_device(work):
    fifo = work / "pipe"
    os.mkfifo(fifo)
    res = loratool("merge", "base", "adapter", fifo, "--force", cwd=work)
    refused(res, "not a regular file or folder")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    device = work / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        return  # creating a device node needs root; the FIFO took the same path
    res = loratool("convert", "adapter", device, "--to", "gguf", "--base", "base", "--force", cwd=work)
    refused(res, "not a regular file or folder")
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    intact(work)


def test_report_follows_the_rules_of_out(work):
    report = work / "report.json"
    report.write_text("unrelated")
    res = loratool("merge", "base", "adapter", "merged", "--report", report, cwd=work)
    refused(res, "already exists")
    assert report.read_text() == "unrelated" and not (work / "merged").exists()
    res = loratool("merge", "base", "adapter", "merged", "--report", work / "adapter" / "r.json", cwd=work)
    refused(res, "input")
    assert not (work / "merged").exists() and not (work / "adapter" / "r.json").exists()
    res = loratool("merge", "base", "adapter", "merged", "--report", report, "--force", cwd=work)
    assert res.returncode == 0, res.stderr
    assert json.loads(report.read_text())["modules"]


def test_plot_into_the_adapter_folder_is_refused_before_any_work(work):
    pytest.importorskip("matplotlib")
    res = loratool("rerank", "adapter", "small", "--rank", "2", "--plot", work / "adapter" / "spectra.png", cwd=work)
    refused(res, "input")
    assert not (work / "small").exists() and not (work / "adapter" / "spectra.png").exists()


def test_side_files_linking_outside_the_base_are_not_copied(work, tmp_path_factory):
    secret = tmp_path_factory.mktemp("elsewhere") / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    (work / "base" / "tokenizer.json").symlink_to(secret)
    (work / "base" / "generation_config.json").rename(work / "base" / "gen.json")
    (work / "base" / "generation_config.json").symlink_to("gen.json")  # inside BASE: fine
    res = loratool("merge", "base", "adapter", "merged", cwd=work)
    assert res.returncode == 0, res.stderr
    assert not (work / "merged" / "tokenizer.json").exists()
    assert (work / "merged" / "generation_config.json").read_text() == (work / "base" / "gen.json").read_text()
    assert "tokenizer.json" in res.stderr and "outside the base folder" in res.stderr


def test_side_files_of_a_hub_cache_snapshot_are_copied(work, tmp_path_factory):
    """A cached repo's files link to ../../blobs: inside the cache, so they are copied."""
    repo = tmp_path_factory.mktemp("hub") / "models--org--base"
    snap, blobs = repo / "snapshots" / ("0" * 40), repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in (work / "base").iterdir():
        shutil.copyfile(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f.name)
    res = loratool("merge", snap, "adapter", "merged", cwd=work)
    assert res.returncode == 0, res.stderr
    assert (work / "merged" / "generation_config.json").is_file() and "outside" not in res.stderr


def test_revision_walking_out_of_the_cache_is_not_a_repo_id(work, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    (cache / "models--org--name" / "snapshots").mkdir(parents=True)
    shutil.copytree(ADAPTER, cache / "x")  # what ../../x would reach from snapshots/
    res = loratool("inspect", "org/name@../../x", cwd=work, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    refused(res, "no such file")
    from loratool.hub import looks_like_repo_id

    assert looks_like_repo_id("org/name@refs/pr/3") and looks_like_repo_id("org/name@" + "a" * 40)
    for bad in ("org/..", "org/name@..", "org/name@a/../b", "org/name@", "org/name@/x"):
        assert not looks_like_repo_id(bad), bad


def test_error_lines_escape_control_characters(work):
    res = loratool("inspect", "x\x1b[31mred\x07", cwd=work)
    line = refused(res)
    assert "\x1b" not in res.stderr and "\x07" not in res.stderr
    assert "\\x1b[31mred\\x07" in line


def test_paths_that_are_not_utf8_work(work):
    name = os.fsdecode(b"adapter-\xff")
    shutil.copytree(ADAPTER, work / name)
    res = loratool("inspect", name, "--json", cwd=work)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["lora_params"] > 0
    res = loratool("merge", "base", name, os.fsdecode(b"out-\xfe"), cwd=work)
    assert res.returncode == 0, res.stderr
    res = loratool("inspect", name + "-missing", cwd=work)
    assert "\\xff" in refused(res)
