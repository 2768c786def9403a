"""Token store and loader: prepare-data round trip, packing (segments, positions, masks),
deterministic shuffling, per-process slices, exact resume, and bad input."""

import json
import os

import numpy as np
import pytest

from jais2_jax.training import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "data", "corpus")
TOKENIZER = os.path.join(ROOT, "data", "tokenizer")
BOS, EOS = 1, 2  # data/tokenizer/tokenizer_config.json


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "corpus"
    data.prepare_data([CORPUS], TOKENIZER, str(out), eval_fraction=0.1, show_progress=False)
    return data.TokenStore(str(out))


def _paragraphs():
    """The bundled documents, split as the README says (blank lines), in file order."""
    docs = []
    for name in sorted(os.listdir(CORPUS)):
        with open(os.path.join(CORPUS, name), encoding="utf-8") as f:
            docs += [p.strip("\n") for p in f.read().split("\n\n") if p.strip()]
    return docs


def _store_docs(store, split):
    return [store.tokens[s][o:o + n].tolist() for s, o, n in store.documents(split)]


def test_prepare_data_round_trip(store):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(TOKENIZER, "tokenizer.json"))
    expected = [[BOS] + tok.encode(p, add_special_tokens=False).ids + [EOS] for p in _paragraphs()]
    train, held_out = _store_docs(store, "train"), _store_docs(store, "eval")
    assert len(held_out) >= 1 and len(train) + len(held_out) == len(expected)
    # Every document is stored once, intact, in its split; the splits are disjoint.
    assert sorted(map(tuple, train + held_out)) == sorted(map(tuple, expected))
    assert store.vocab_size == tok.get_vocab_size()
    assert os.path.isfile(os.path.join(store.tokenizer_path, "tokenizer.json"))


def test_packed_rows_segments_positions_and_mask(store):
    rows = data.PackedRows(store, "train", seq_len=64, seed=3)
    docs = {tuple(d) for d in _store_docs(store, "train")}
    stream = np.concatenate([rows[r]["input_ids"] for r in range(len(rows))]
                            + [rows[len(rows) - 1]["targets"][-1:]])
    # The stream is the documents back to back, each once (the cut-off tail aside).
    starts = np.flatnonzero(stream == BOS)
    pieces = [tuple(p) for p in np.split(stream, starts)[1:]]
    assert all(p in docs for p in pieces[:-1]) and len(set(pieces[:-1])) == len(pieces) - 1
    for r in range(len(rows)):
        row = rows[r]
        ids, seg, pos, mask = row["input_ids"], row["segment_ids"], row["positions"], row["loss_mask"]
        np.testing.assert_array_equal(row["targets"][:-1], ids[1:])
        new_doc = ids == BOS
        # A new segment (and position 0) exactly where a document starts, and at the row start.
        np.testing.assert_array_equal(np.diff(seg) == 1, new_doc[1:])
        assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
        np.testing.assert_array_equal(pos == 0, new_doc | (np.arange(64) == 0))
        np.testing.assert_array_equal(pos[1:][~new_doc[1:]], pos[:-1][~new_doc[1:]] + 1)
        # No target crosses into the next document.
        np.testing.assert_array_equal(mask == 0, row["targets"] == BOS)


def test_prompt_completion_masks_the_prompt(tmp_path):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(TOKENIZER, "tokenizer.json"))
    src = tmp_path / "sft.jsonl"
    records = [{"prompt": "What is the desert like at dawn?", "completion": " Quiet and cold."},
               {"text": "The sea has always been a road."}] * 4
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    data.prepare_data([str(src)], TOKENIZER, str(tmp_path / "store"), show_progress=False)
    store = data.TokenStore(str(tmp_path / "store"))
    prompt = tok.encode(records[0]["prompt"], add_special_tokens=False).ids
    completion = tok.encode(records[0]["completion"], add_special_tokens=False).ids
    shard, offset, length = store.documents("train")[0]
    assert length == 1 + len(prompt) + len(completion) + 1
    mask = store.masks[shard][offset:offset + length]
    np.testing.assert_array_equal(mask, [0] * (1 + len(prompt)) + [1] * (len(completion) + 1))
    _, offset2, length2 = store.documents("train")[1]
    assert store.masks[shard][offset2:offset2 + length2].all()  # plain text: every token trains
    row = data.PackedRows(store, "train", seq_len=16, seed=0)[0]
    # In a row, targets inside the prompt are masked.
    doc_targets = row["targets"][row["segment_ids"] == 1]
    assert set(doc_targets[row["loss_mask"][row["segment_ids"] == 1] == 0]) <= set(prompt) | {BOS}


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_shuffle_is_deterministic_and_resumes_exactly(store):
    kw = dict(seq_len=32, batch_size=4, threads=1)
    a = _take(data.train_iterator(store, seed=5, **kw), 6)
    b = _take(data.train_iterator(store, seed=5, **kw), 6)
    c = _take(data.train_iterator(store, seed=6, **kw), 6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    assert any(not np.array_equal(x["input_ids"], z["input_ids"]) for x, z in zip(a, c))
    it = data.train_iterator(store, seed=5, **kw)
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
    resumed = data.train_iterator(store, seed=5, **kw)
    resumed.set_state(state)
    for x, y in zip(a[2:], _take(resumed, 4)):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_processes_split_each_global_batch(store):
    kw = dict(seq_len=32, batch_size=4, seed=1, threads=1)
    whole = _take(data.train_iterator(store, **kw), 3)
    parts = [_take(data.train_iterator(store, process_index=p, process_count=2, **kw), 3)
             for p in range(2)]
    for step in range(3):
        got = np.concatenate([parts[0][step]["input_ids"], parts[1][step]["input_ids"]])
        assert got.shape == (4, 32)
        assert sorted(map(tuple, got)) == sorted(map(tuple, whole[step]["input_ids"]))
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data.train_iterator(store, process_index=0, process_count=3, **kw)


def test_eval_batches_are_fixed(store):
    a = data.eval_batches(store, seq_len=32, batch_size=2, num_batches=2)
    b = data.eval_batches(store, seq_len=32, batch_size=2, num_batches=2)
    assert len(a) == 2
    np.testing.assert_array_equal(a[1]["input_ids"], b[1]["input_ids"])


# ------------------------------------------------------------------------------------ bad input
def test_empty_input_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text found"):
        data.prepare_data([str(tmp_path / "empty.txt")], TOKENIZER, str(tmp_path / "out"),
                          show_progress=False)
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["empty.txt"]


def test_unreadable_inputs_are_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        data.prepare_data([str(bad)], TOKENIZER, str(tmp_path / "out"), show_progress=False)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        data.prepare_data([str(latin)], TOKENIZER, str(tmp_path / "out"), show_progress=False)
    with pytest.raises(FileNotFoundError):
        data.prepare_data([str(tmp_path / "missing.txt")], TOKENIZER, str(tmp_path / "out"))


def test_overwrite_never_replaces_a_file(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("not a token store", encoding="utf-8")
    with pytest.raises(ValueError, match="is not a token store"):
        data.prepare_data([CORPUS], TOKENIZER, str(file), overwrite=True, show_progress=False)
    assert file.read_text(encoding="utf-8") == "not a token store"


def test_overwrite_replaces_only_a_store_and_never_an_input(tmp_path):
    """--overwrite is refused for a folder that is not a token store (it deleted any folder) and
    for an output that is, or holds, one of the inputs; nothing is touched."""
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.txt").write_text("precious", encoding="utf-8")
    with pytest.raises(ValueError, match="is not a token store"):
        data.prepare_data([CORPUS], TOKENIZER, str(folder), overwrite=True, show_progress=False)
    with pytest.raises(ValueError, match="would replace its input"):
        data.prepare_data([str(folder)], TOKENIZER, str(folder), overwrite=True,
                          show_progress=False)
    with pytest.raises(ValueError, match="would replace its input"):
        data.prepare_data([str(folder / "chapter1.txt")], TOKENIZER, str(tmp_path), overwrite=True,
                          show_progress=False)
    assert (folder / "chapter1.txt").read_text(encoding="utf-8") == "precious"


def test_failed_overwrite_keeps_the_old_store(tmp_path, monkeypatch):
    """The old store is replaced only once the new one is complete; when the final rename fails,
    the old store is back in place and no temporary folder is left."""
    from jais2_jax.utils import fsutil
    out = tmp_path / "store"
    data.prepare_data([CORPUS], TOKENIZER, str(out), show_progress=False)
    before = (out / "index.json").read_text(encoding="utf-8")
    real = os.replace

    def failing(src, dst):
        if os.path.basename(str(src)).startswith(".store.tmp-"):
            raise OSError("disk went away")
        return real(src, dst)
    monkeypatch.setattr(fsutil.os, "replace", failing)
    with pytest.raises(OSError, match="disk went away"):
        data.prepare_data([CORPUS], TOKENIZER, str(out), eval_fraction=0.5, overwrite=True,
                          show_progress=False)
    monkeypatch.undo()
    assert (out / "index.json").read_text(encoding="utf-8") == before
    assert data.TokenStore(str(out)).index["num_tokens"] > 0
    assert sorted(os.listdir(tmp_path)) == ["store"]


def test_existing_output_is_kept(store, tmp_path):
    with pytest.raises(FileExistsError, match="--overwrite"):
        data.prepare_data([CORPUS], TOKENIZER, store.path, show_progress=False)
    assert data.TokenStore(store.path).index["num_tokens"] > 0


def test_broken_stores_are_errors(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        data.TokenStore(str(tmp_path / "nothing"))
    (tmp_path / "no_index").mkdir()
    with pytest.raises(ValueError, match="no index.json"):
        data.TokenStore(str(tmp_path / "no_index"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "index.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(ValueError, match="unreadable"):
        data.TokenStore(str(corrupt))
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    index = dict(store.index)
    (truncated / "index.json").write_text(json.dumps(index), encoding="utf-8")
    shard = index["shards"][0]["tokens"]
    (truncated / shard).write_bytes(open(os.path.join(store.path, shard), "rb").read()[:100])
    with pytest.raises(ValueError, match="does not hold"):
        data.TokenStore(str(truncated))


def test_too_little_data_for_a_row_is_an_error(store):
    with pytest.raises(ValueError, match="needs 100001"):
        data.PackedRows(store, "train", seq_len=100_000, seed=0)


@pytest.mark.parametrize("line, field", [('{"text": null}', "'text' must be a string"),
                                         ('{"text": ["a", "b"]}', "'text' must be a string"),
                                         ('{"prompt": 42, "completion": "x"}', "'prompt' must be")])
def test_jsonl_fields_must_be_strings(tmp_path, line, field):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: {field}"):
        data.prepare_data([str(bad)], TOKENIZER, str(tmp_path / "out"), show_progress=False)
    assert not (tmp_path / "out").exists()


def test_an_input_named_twice_is_read_once(store, tmp_path):
    """A file given itself and through its folder: read once, so no document sits in both splits."""
    out = tmp_path / "twice"
    data.prepare_data([CORPUS, os.path.join(CORPUS, "english.txt")], TOKENIZER, str(out),
                      eval_fraction=0.1, show_progress=False)
    twice = data.TokenStore(str(out))
    count = lambda st: sum(v["num_documents"] for v in st.index["splits"].values())  # noqa: E731
    assert count(twice) == count(store) == len(_paragraphs())
    assert twice.index["num_tokens"] == store.index["num_tokens"]
    train = {tuple(d) for d in _store_docs(twice, "train")}
    assert not train & {tuple(d) for d in _store_docs(twice, "eval")}


def test_eval_split_of_one_document_is_an_error(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a single paragraph of text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="asks for an eval split, but the input holds one document"):
        data.prepare_data([str(one)], TOKENIZER, str(tmp_path / "out"), eval_fraction=0.5,
                          show_progress=False)


def test_corrupt_masks_and_documents_are_errors(store, tmp_path):
    import shutil
    pairs = tmp_path / "pairs.jsonl"  # prompt + completion: a store with a loss mask
    pairs.write_text("".join(json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"})
                             + "\n" for i in range(5)), encoding="utf-8")
    masked = tmp_path / "mask"
    data.prepare_data([str(pairs)], TOKENIZER, str(masked), show_progress=False)
    mask = masked / data.TokenStore(str(masked)).index["shards"][0]["mask"]
    mask.write_bytes(mask.read_bytes()[:-10])
    with pytest.raises(ValueError, match="does not hold .* mask bytes"):
        data.TokenStore(str(masked))
    outside = tmp_path / "docs"
    shutil.copytree(store.path, outside)
    docs = store.documents("train").copy()
    docs[3, 2] += 10 ** 6  # a length past its shard
    np.save(outside / store.index["splits"]["train"]["documents"], docs, allow_pickle=False)
    with pytest.raises(ValueError, match="document 3 .* lies outside the store's shards"):
        data.TokenStore(str(outside)).documents("train")
