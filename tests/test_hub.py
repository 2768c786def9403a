"""Hugging Face model ids as checkpoint arguments: resolved offline from a hub cache laid out by hand
(huggingface_hub's layout: models--org--name/{refs/main, blobs/<hash>, snapshots/<commit>/<file>
-> ../../blobs/<hash>})."""

from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np
import pytest
from helpers import hf_model

MAIN = "a" * 40
OLD = "b" * 40


def _add_snapshot(hub: pathlib.Path, repo_id: str, commit: str, files: dict[str, bytes],
                  refs: tuple[str, ...] = ()) -> pathlib.Path:
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "org/name" must not be found as a relative folder
    return tmp_path / "hf_home" / "hub"


def test_resolves_an_id_with_and_without_revision(hub):
    from jais2_jax.checkpoint.hub import resolve_checkpoint
    new = _add_snapshot(hub, "org/tiny", MAIN, {"config.json": b'{"v": 2}'}, refs=("main",))
    old = _add_snapshot(hub, "org/tiny", OLD, {"config.json": b'{"v": 1}'}, refs=("v1",))
    assert pathlib.Path(resolve_checkpoint("org/tiny")) == new
    assert pathlib.Path(resolve_checkpoint("org/tiny", revision="main")) == new
    assert pathlib.Path(resolve_checkpoint("org/tiny", revision="v1")) == old
    assert pathlib.Path(resolve_checkpoint("org/tiny", revision=OLD)) == old
    assert (pathlib.Path(resolve_checkpoint("org/tiny", revision="v1")) / "config.json"
            ).read_text() == '{"v": 1}'


def test_a_local_folder_is_returned_as_is(hub, tmp_path):
    from jais2_jax.checkpoint.hub import resolve_checkpoint
    (tmp_path / "org" / "tiny").mkdir(parents=True)  # a folder wins over an id of the same name
    _add_snapshot(hub, "org/tiny", MAIN, {"config.json": b"{}"}, refs=("main",))
    assert resolve_checkpoint("org/tiny") == "org/tiny"
    with pytest.raises(ValueError, match="revision applies to a Hugging Face model id only"):
        resolve_checkpoint("org/tiny", revision="v1")
    assert resolve_checkpoint("not-an-id") == "not-an-id"  # the loader says "not a folder"


def test_missing_id_or_revision_is_an_error_naming_it(hub):
    from jais2_jax.checkpoint.hub import resolve_checkpoint
    with pytest.raises(FileNotFoundError, match=r"org/absent is not a local folder.*"
                                                r"HF_HUB_OFFLINE is set"):
        resolve_checkpoint("org/absent")
    _add_snapshot(hub, "org/tiny", MAIN, {"config.json": b"{}"}, refs=("main",))
    with pytest.raises(FileNotFoundError, match=r"org/tiny \(revision v9\)"):
        resolve_checkpoint("org/tiny", revision="v9")


def test_hf_home_is_read_at_call_time(hub, tmp_path, monkeypatch):
    from jais2_jax.checkpoint.hub import resolve_checkpoint
    _add_snapshot(hub, "org/tiny", MAIN, {"config.json": b"{}"}, refs=("main",))
    resolve_checkpoint("org/tiny")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="org/tiny"):
        resolve_checkpoint("org/tiny")


def test_convert_takes_an_id(hub, tmp_path):
    """`jais2 convert org/name OUT` reads the cached snapshot (files are links into blobs/)."""
    from jais2_jax import load_checkpoint
    from jais2_jax.cli.main import main
    hf = hf_model(seed=3)
    src = tmp_path / "src"
    hf.save_pretrained(src)
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    _add_snapshot(hub, "org/tiny", MAIN, files, refs=("main",))
    assert main(["convert", "org/tiny", str(tmp_path / "out"), "--quiet"]) == 0
    _, ours = load_checkpoint(str(tmp_path / "out"))
    _, ref = load_checkpoint(str(src))
    np.testing.assert_array_equal(np.asarray(ours["embed_tokens"]["embedding"]),
                                  np.asarray(ref["embed_tokens"]["embedding"]))
    assert main(["convert", "org/absent", str(tmp_path / "out2"), "--quiet"]) == 1
    assert not (tmp_path / "out2").exists()
