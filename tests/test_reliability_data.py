"""Reliability of the token store: write failures (a full disk) never leave a partial store or
lose the old one, ids beyond the vocabulary are visible, bad text and bad indexes are one-line
errors, and the loader's thread count is bounded."""

import errno
import json
import os
import re
import resource
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from jais2_jax.cli.main import main
from jais2_jax.training import data
from jais2_jax.training.run_config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "data", "corpus")
TOKENIZER = os.path.join(ROOT, "data", "tokenizer")


def _tokenize(text):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(TOKENIZER, "tokenizer.json"))
    return tok.encode(text, add_special_tokens=False).ids


def _docs(store, split="train"):
    return [store.tokens[s][o:o + n].tolist() for s, o, n in store.documents(split)]


def _snapshot(folder):
    """Every file of `folder` (relative name -> bytes)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def _cli(capsys, *argv):
    rc = main(["prepare-data", *argv])
    err = re.split(r"[\r\n]+", capsys.readouterr().err)
    return rc, [line for line in err if line.strip() and not line.startswith("prepare-data:")]


# ------------------------------------------------------------------------ 1. write failures
@pytest.fixture
def big_input(tmp_path):
    """The bundled corpus six times over: a tokens file of ~166 KB (more than tokenizer.json)."""
    folder = tmp_path / "in"
    folder.mkdir()
    text = "\n\n".join((Path(CORPUS) / f).read_text(encoding="utf-8")
                       for f in sorted(os.listdir(CORPUS)))
    (folder / "big.txt").write_text((text + "\n\n") * 6, encoding="utf-8")
    return str(folder)


def _with_file_size_limit(limit, fn):
    """Runs `fn` with the kernel refusing writes past `limit` bytes per file (RLIMIT_FSIZE: the
    write fails with EFBIG, as a full disk fails it with ENOSPC)."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        return fn()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_real_write_failure_is_an_error_and_keeps_the_old_store(tmp_path, big_input):
    """The writes of the token file fail in the kernel past 100 KB (the bug: a truncated store,
    'wrote ...' and exit 0). Now an error naming the file; no store, no temporary folder, and an
    existing store replaced with --overwrite is intact."""
    out = tmp_path / "store"

    def run(overwrite):
        return data.prepare_data([big_input], TOKENIZER, str(out), overwrite=overwrite,
                                 show_progress=False)
    with pytest.raises(OSError, match=r"tokens-00000\.bin.*File too large"):
        _with_file_size_limit(100_000, lambda: run(False))
    assert sorted(os.listdir(tmp_path)) == ["in"]

    data.prepare_data([CORPUS], TOKENIZER, str(out), show_progress=False)  # a good, small store
    before = _snapshot(out)
    with pytest.raises(OSError, match=r"tokens-00000\.bin.*the existing store is unchanged"):
        _with_file_size_limit(100_000, lambda: run(True))
    assert sorted(os.listdir(tmp_path)) == ["in", "store"]
    assert _snapshot(out) == before
    assert len(_docs(data.TokenStore(str(out)))) > 0


class _Disk:
    """Stands in for the writer's low-level calls: counts the bytes written, and fails (or
    silently drops bytes, as ndarray.tofile's lost errors did) once `room` bytes are written."""

    def __init__(self, room, mode):
        self.room, self.mode, self.written = room, mode, 0
        self.real_write, self.real_fsync = data._write_fd, data._fsync

    def write(self, fd, buf):
        n = len(buf)
        if self.written + n > self.room:
            if self.mode == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if self.mode == "short":  # claims everything, keeps what fits
                keep = self.room - self.written
                self.written += n
                return self.real_write(fd, bytes(buf)[:keep]) + (n - keep) if keep else n
        self.written += n
        return self.real_write(fd, buf)

    def fsync(self, fd):
        if self.mode == "fsync" and self.written > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real_fsync(fd)


def _bytes_of_a_store(monkeypatch, tmp_path):
    disk = _Disk(float("inf"), "count")
    monkeypatch.setattr(data, "_write_fd", disk.write)
    data.prepare_data([CORPUS], TOKENIZER, str(tmp_path / "count"), show_progress=False)
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "count")
    return disk.written


@pytest.mark.parametrize("mode, message", [("enospc", "No space left on device"),
                                           ("fsync", "No space left on device"),
                                           ("short", r"holds \d+ bytes on disk, not the \d+ written")])
def test_a_full_disk_fails_the_cli_cleanly_at_any_point(tmp_path, monkeypatch, capsys, mode,
                                                        message):
    """ENOSPC from a write, from fsync, or bytes silently lost (caught by the size check), at the
    first byte, mid-way or in the last file (index.json): `jais2 prepare-data` exits 1 with one
    line naming the file; nothing is left, and the store --overwrite would replace is intact."""
    total = _bytes_of_a_store(monkeypatch, tmp_path)
    old = tmp_path / "old"
    data.prepare_data([CORPUS], TOKENIZER, str(old), eval_fraction=0.2, show_progress=False)
    before = _snapshot(old)
    for room in (0, total // 3, total // 2, total - 5):
        disk = _Disk(room, mode)
        monkeypatch.setattr(data, "_write_fd", disk.write)
        monkeypatch.setattr(data, "_fsync", disk.fsync)
        for out, extra in ((tmp_path / "new", []), (old, ["--overwrite"])):
            disk.written = 0
            rc, err = _cli(capsys, CORPUS, "--tokenizer", TOKENIZER, "--output", str(out), *extra)
            assert rc == 1 and len(err) == 1, (room, err)
            assert err[0].startswith("jais2 prepare-data: error: ")
            assert str(out) in err[0] and message and re.search(message, err[0])
            assert re.search(r"(tokens-\d+|mask-\d+)\.bin|_documents\.npy|"
                                           r"index\.json|tokenizer", err[0]), err[0]
            assert sorted(os.listdir(tmp_path)) == ["old"], room
        monkeypatch.undo()
        assert _snapshot(old) == before
        store = data.TokenStore(str(old))
        assert len(_docs(store)) > 0 and len(_docs(store, "eval")) > 0


# ------------------------------------------------------------------ 2. ids beyond the vocabulary
def test_max_token_id_is_recorded_and_computed_for_older_stores(tmp_path):
    out = tmp_path / "store"
    data.prepare_data([CORPUS], TOKENIZER, str(out), eval_fraction=0.1, show_progress=False)
    store = data.TokenStore(str(out))
    true_max = max(int(t.max()) for t in store.tokens)
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert index["max_token_id"] == true_max == store.max_token_id
    assert store.max_token_id < store.vocab_size

    # A store written before max_token_id was recorded, holding an id past the vocabulary.
    older = tmp_path / "older"
    shutil.copytree(out, older)
    del index["max_token_id"]
    (older / "index.json").write_text(json.dumps(index), encoding="utf-8")
    assert data.TokenStore(str(older)).max_token_id == true_max
    tokens = np.fromfile(older / index["shards"][0]["tokens"], np.uint32)
    tokens[len(tokens) // 2] = 70_000
    tokens.tofile(older / index["shards"][0]["tokens"])
    assert data.TokenStore(str(older)).max_token_id == 70_000

    index["max_token_id"] = "big"
    (older / "index.json").write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(ValueError, match=r"index\.json.*'max_token_id'"):
        data.TokenStore(str(older))


# ------------------------------------------------------------------------------ 3. eos missing
def test_a_tokenizer_without_eos_is_refused(tmp_path, capsys):
    tok = tmp_path / "tok"
    shutil.copytree(TOKENIZER, tok)
    config = json.loads((tok / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["eos_token"]
    (tok / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=f"tokenizer {tok} has no eos token.*--no-eos"):
        data.prepare_data([CORPUS], str(tok), str(tmp_path / "out"), show_progress=False)
    assert sorted(os.listdir(tmp_path)) == ["tok"]
    rc, err = _cli(capsys, CORPUS, "--tokenizer", str(tok), "--output", str(tmp_path / "out"))
    assert rc == 1 and len(err) == 1 and "has no eos token" in err[0]
    # Asking for no eos explicitly is allowed (the documents are still kept apart by the packer).
    index = data.prepare_data([CORPUS], str(tok), str(tmp_path / "out"), add_eos=False,
                              show_progress=False)
    assert index["tokenizer"]["eos_token_id"] is None


# ---------------------------------------------------------------------------------- 4. the BOM
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_document(tmp_path, suffix):
    text = "The first document.\n\nThe second one." if suffix == ".txt" else \
        '{"text": "The first document."}\n{"text": "The second one."}\n'
    stores = {}
    for name, bom in (("plain", b""), ("bom", b"\xef\xbb\xbf")):
        src = tmp_path / f"{name}{suffix}"
        src.write_bytes(bom + text.encode("utf-8"))
        data.prepare_data([str(src)], TOKENIZER, str(tmp_path / name), show_progress=False)
        stores[name] = _docs(data.TokenStore(str(tmp_path / name)))
    assert stores["bom"] == stores["plain"]
    assert stores["bom"][0][1:-1] == _tokenize("The first document.")


# ----------------------------------------------------------------------------- 5. bad Unicode
def test_a_lone_surrogate_in_jsonl_is_a_one_line_error(tmp_path, capsys):
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"s\.jsonl:2: 'text' .*surrogate"):
        data.prepare_data([str(src)], TOKENIZER, str(tmp_path / "out"), show_progress=False)
    rc, err = _cli(capsys, str(src), "--tokenizer", TOKENIZER, "--output", str(tmp_path / "out"))
    assert rc == 1 and len(err) == 1 and "s.jsonl:2:" in err[0] and "surrogate" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["s.jsonl"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_invalid_utf8_names_the_line_and_byte_offset(tmp_path, capsys, suffix):
    """The offset is the file's, not that of the decoder's current chunk (past 8 KB it was off)."""
    line = "a line of good text\n" if suffix == ".txt" else '{"text": "good"}\n'
    head = (line * 1000).encode("utf-8")  # ~20 KB: several decoder chunks
    src = tmp_path / f"bad{suffix}"
    src.write_bytes(b"\xef\xbb\xbf" + head + b"caf\xe9\n" + line.encode("utf-8"))
    offset = 3 + len(head) + 3
    with pytest.raises(ValueError, match=rf"bad{suffix}:1001: not UTF-8 text \(.* at byte "
                                         rf"{offset}\)"):
        data.prepare_data([str(src)], TOKENIZER, str(tmp_path / "out"), show_progress=False)
    rc, err = _cli(capsys, str(src), "--tokenizer", TOKENIZER, "--output", str(tmp_path / "out"))
    assert rc == 1 and len(err) == 1 and f"at byte {offset}" in err[0]


# -------------------------------------------------------------------------- 6. broken indexes
@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "store"
    data.prepare_data([CORPUS], TOKENIZER, str(out), eval_fraction=0.1, show_progress=False)
    return out


def _drop(key):
    return lambda index: index.pop(key)


def _set(value, *keys):
    def change(index):
        d = index
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return change


@pytest.mark.parametrize("change, key", [
    (_drop("shards"), "shards"), (_drop("splits"), "splits"), (_drop("tokenizer"), "tokenizer"),
    (_set("x", "shards"), "shards"), (_set([7], "shards"), r"shards\[0\]"),
    (_set(5, "shards", 0, "tokens"), r"shards\[0\]\.tokens"),
    (_set("../index.json", "shards", 0, "tokens"), r"shards\[0\]\.tokens"),
    (_set(-1, "shards", 0, "num_tokens"), r"shards\[0\]\.num_tokens"),
    (_set([], "splits"), "splits"), (_set(3, "splits", "train"), r"splits\.train"),
    (_set(None, "splits", "train", "documents"), r"splits\.train\.documents"),
    (_set("many", "splits", "train", "num_tokens"), r"splits\.train\.num_tokens"),
    (_set(3, "tokenizer"), "tokenizer"), (_set("big", "tokenizer", "vocab_size"),
                                          r"tokenizer\.vocab_size"),
    (lambda index: index["tokenizer"].pop("vocab_size"), r"tokenizer\.vocab_size"),
    (_set("2", "tokenizer", "eos_token_id"), r"tokenizer\.eos_token_id"),
])
def test_an_index_with_missing_or_wrong_keys_is_a_value_error(good_store, tmp_path, change, key):
    broken = tmp_path / "broken"
    shutil.copytree(good_store, broken)
    index = json.loads((broken / "index.json").read_text(encoding="utf-8"))
    change(index)
    (broken / "index.json").write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"index\.json.*'{key}'"):
        store = data.TokenStore(str(broken))
        store.documents("train"), store.vocab_size, store.num_tokens("train")


# ------------------------------------------------------------------------ 7. the data threads
def test_data_threads_is_bounded_in_the_run_config():
    base = {"model": "jais2-tiny", "data": "d", "output_dir": "o"}
    assert RunConfig(**base, data_threads=data.MAX_DATA_THREADS).data_threads == 256
    for bad in (100_000, data.MAX_DATA_THREADS + 1, 0):
        with pytest.raises(ValueError, match=rf"data_threads must be in \[1, 256\], got {bad}"):
            RunConfig(**base, data_threads=bad)


def test_the_loader_caps_the_threads_it_starts(good_store, monkeypatch):
    import grain
    asked = []
    real = grain.ReadOptions

    def recording(num_threads, prefetch_buffer_size):
        asked.append((num_threads, prefetch_buffer_size))
        return real(num_threads=1, prefetch_buffer_size=1)  # what the test itself can afford
    monkeypatch.setattr(grain, "ReadOptions", recording)
    it = data.train_iterator(data.TokenStore(str(good_store)), seq_len=32, batch_size=2, seed=0,
                             threads=100_000)
    assert next(it)["input_ids"].shape == (2, 32)
    assert asked == [(data.MAX_DATA_THREADS, 2 * data.MAX_DATA_THREADS)]
