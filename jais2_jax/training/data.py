"""Text -> token store -> packed, shuffled, per-process batches that resume exactly.

Token store (written by `jais2 prepare-data`, read with memory maps, never unpickled):
    index.json                    format, shards, splits, tokenizer ids
    tokens-00000.bin ...          uint32 token ids, documents back to back (bos + text + eos)
    mask-00000.bin ...            uint8 per token, 1 = a training target (only for prompt/completion
                                  data; absent means every token is a target)
    {train,eval}_documents.npy    int64 [documents, 3]: (shard, first token, length)
    tokenizer/                    copy of the tokenizer used, so a store says how to decode it

Loader: documents are put in a seeded order, concatenated and cut into rows of `seq_len + 1`
tokens (`PackedRows`, random access). grain shuffles the rows per epoch, gives process p the rows
p, p+P, ..., batches them and prefetches in threads; its iterator state (one integer) goes into the
checkpoint, so a resumed run sees exactly the batches it would have seen. grain fits because the
rows are a random-access source: shuffling, sharding and resuming need no hand-written code.

A row carries `segment_ids` (1, 2, ... per document piece) and `positions` (restarting at every
document start), so packed documents do not attend to each other, and a `loss_mask` that drops the
one target that would cross from a document into the next.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterator, Sequence

import numpy as np

from jais2_jax.inference.tokenizer import Tokenizer
from jais2_jax.model.config import parse_json_object
from jais2_jax.utils.fsutil import check_output, staged_output

FORMAT = "jais2-token-store"
VERSION = 1
INPUT_SUFFIXES = (".txt", ".jsonl")


# ------------------------------------------------------------------------------------- reading text
def _input_files(inputs: Sequence[str]) -> list[str]:
    """The files of `inputs` (files, or folders of them), each once: a file named twice (itself
    and its folder) would otherwise be read twice, and its documents could land in both splits."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path)
                           if f.endswith(INPUT_SUFFIXES))
            if not found:
                raise ValueError(f"{path}: no {'/'.join(INPUT_SUFFIXES)} files in this directory")
            files += found
        elif os.path.isfile(path):
            if not path.endswith(INPUT_SUFFIXES):
                raise ValueError(f"{path}: unsupported input type; use {' or '.join(INPUT_SUFFIXES)}")
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    first = {}  # real path -> the first name it was given by
    for f in files:
        first.setdefault(os.path.realpath(f), f)
    return list(first.values())


def _documents(path: str, text_key: str, progress) -> Iterator[tuple[str, str | None]]:
    """(text, None) or (completion, prompt) per document. `.txt`: blank lines separate documents;
    `.jsonl`: one object per line with `text_key`, or `prompt` and `completion`."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".txt"):
                block: list[str] = []
                for line in f:
                    progress.update(len(line.encode("utf-8")))
                    if line.strip():
                        block.append(line.rstrip("\n"))
                    elif block:
                        yield "\n".join(block), None
                        block = []
                if block:
                    yield "\n".join(block), None
                return
            for n, line in enumerate(f, 1):
                progress.update(len(line.encode("utf-8")))
                if not line.strip():
                    continue
                record = parse_json_object(line, f"{path}:{n}")
                keys = (("completion", "prompt") if "prompt" in record and "completion" in record
                        else (text_key,) if text_key in record else None)
                if keys is None:
                    raise ValueError(f"{path}:{n}: no {text_key!r} (or prompt + completion) field")
                for key in keys:
                    if not isinstance(record[key], str):
                        raise ValueError(f"{path}:{n}: {key!r} must be a string, got "
                                         f"{type(record[key]).__name__} {record[key]!r:.40}")
                yield record[keys[0]], (record[keys[1]] if len(keys) > 1 else None)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _tokenizer_files(directory: str) -> list[str]:
    """The files of a tokenizer folder worth copying into a store (not model weights)."""
    keep = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja")
    return [os.path.join(directory, f) for f in sorted(os.listdir(directory))
            if f in keep or f.endswith(".model")]


# --------------------------------------------------------------------------------------- writing
def prepare_data(inputs: Sequence[str], tokenizer: str, output: str, *, eval_fraction: float = 0.0,
                 seed: int = 0, text_key: str = "text", add_bos: bool = True, add_eos: bool = True,
                 shard_tokens: int = 1 << 28, overwrite: bool = False,
                 show_progress: bool = True) -> dict:
    """Tokenizes text/jsonl `inputs` into a token store at `output`; returns its index.

    The store is built in a temporary directory beside `output` and renamed when complete; with
    `overwrite`, an existing store (only a store, and never one holding an input) is replaced once
    the new one is complete.
    """
    from tqdm import tqdm
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    check_output(output, overwrite, inputs, "--overwrite", "the token store")
    if os.path.lexists(output) and (os.path.islink(output) or not os.path.isfile(
            os.path.join(output, "index.json"))):
        raise ValueError(f"{output} is not a token store (a folder with index.json); --overwrite "
                         "replaces only a token store")
    files = _input_files(inputs)
    tok = Tokenizer.from_pretrained(tokenizer)
    bos = tok.bos_token_id if add_bos else None
    eos = tok.eos_token_id if add_eos else None
    with staged_output(output, overwrite, "--overwrite") as tmp:
        writer = _ShardWriter(tmp, shard_tokens)
        total = sum(os.path.getsize(f) for f in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="prepare-data",
                  disable=not show_progress) as bar:
            for path in files:
                for text, prompt in _documents(path, text_key, bar):
                    _encode_into(writer, tok, text, prompt, bos, eos)
        documents = writer.close()
        if len(documents) == 0 or documents[:, 2].sum() == 0:
            raise ValueError(f"no text found in {', '.join(files)}")
        is_eval = np.random.default_rng(seed).random(len(documents)) < eval_fraction
        if eval_fraction > 0 and not is_eval.any():
            if len(documents) == 1:
                raise ValueError(f"eval_fraction {eval_fraction} asks for an eval split, but the "
                                 "input holds one document; give more documents or --eval-fraction 0")
            is_eval[-1] = True  # a requested eval split gets at least one document
        if is_eval.all():
            raise ValueError("eval_fraction leaves no training documents")
        splits = {}
        for name, chosen in (("train", ~is_eval), ("eval", is_eval)):
            docs = documents[chosen]
            np.save(os.path.join(tmp, f"{name}_documents.npy"), docs, allow_pickle=False)
            splits[name] = {"documents": f"{name}_documents.npy", "num_documents": int(len(docs)),
                            "num_tokens": int(docs[:, 2].sum())}
        os.makedirs(os.path.join(tmp, "tokenizer"))
        for f in _tokenizer_files(tokenizer):
            shutil.copy(f, os.path.join(tmp, "tokenizer", os.path.basename(f)))
        index = {"format": FORMAT, "version": VERSION, "dtype": "uint32",
                 "num_tokens": int(documents[:, 2].sum()), "shards": writer.shards,
                 "splits": splits, "inputs": [os.path.abspath(f) for f in files],
                 "tokenizer": {"vocab_size": tok.vocab_size, "bos_token_id": bos,
                               "eos_token_id": eos}}
        with open(os.path.join(tmp, "index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    return index


def _encode_into(writer, tok, text, prompt, bos, eos):
    head = [] if bos is None else [bos]
    if prompt is not None:
        head = head + tok.encode(prompt, add_special_tokens=False)
    tail = tok.encode(text, add_special_tokens=False) + ([] if eos is None else [eos])
    # The prompt (and bos) are context, never targets; the completion and eos are.
    mask = None if prompt is None else [0] * len(head) + [1] * len(tail)
    writer.add(head + tail, mask)


class _ShardWriter:
    """Appends documents to uint32 shards (and uint8 mask shards, kept only if some document has a
    prompt); a document never spans two shards."""

    def __init__(self, directory: str, shard_tokens: int):
        self.directory, self.shard_tokens = directory, shard_tokens
        self.shards: list[dict] = []
        self.docs: list[tuple[int, int, int]] = []
        self.any_mask = False
        self._files = None

    def _open(self):
        n = len(self.shards)
        self.shards.append({"tokens": f"tokens-{n:05d}.bin", "mask": f"mask-{n:05d}.bin",
                            "num_tokens": 0})
        self._files = [open(os.path.join(self.directory, self.shards[-1][k]), "wb")
                       for k in ("tokens", "mask")]

    def add(self, ids: list[int], mask: list[int] | None):
        if self._files is None or (self.shards[-1]["num_tokens"] + len(ids) > self.shard_tokens
                                   and self.shards[-1]["num_tokens"] > 0):
            self._close_files()
            self._open()
        shard = self.shards[-1]
        np.asarray(ids, np.uint32).tofile(self._files[0])
        np.asarray(mask if mask is not None else [1] * len(ids), np.uint8).tofile(self._files[1])
        self.any_mask |= mask is not None
        self.docs.append((len(self.shards) - 1, shard["num_tokens"], len(ids)))
        shard["num_tokens"] += len(ids)

    def _close_files(self):
        for f in self._files or ():
            f.close()

    def close(self) -> np.ndarray:
        self._close_files()
        if not self.any_mask:  # every token is a target: the masks say nothing
            for shard in self.shards:
                os.remove(os.path.join(self.directory, shard.pop("mask")))
        return np.asarray(self.docs, np.int64).reshape(-1, 3)


# --------------------------------------------------------------------------------------- reading
class TokenStore:
    """Memory-mapped view of a token store directory."""

    def __init__(self, path: str):
        self.path = path
        index_file = os.path.join(path, "index.json")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"token store {path} does not exist (run `jais2 prepare-data`)")
        if not os.path.isfile(index_file):
            raise ValueError(f"{path} is not a token store: no index.json (run `jais2 prepare-data`)")
        try:
            with open(index_file, encoding="utf-8") as f:
                self.index = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index_file} is unreadable: {e}") from None
        if not isinstance(self.index, dict) or self.index.get("format") != FORMAT:
            raise ValueError(f"{index_file} is not a {FORMAT} index")
        if self.index.get("version") != VERSION:
            raise ValueError(f"{index_file}: version {self.index.get('version')}, expected {VERSION}")
        self.tokens, self.masks = [], []
        for shard in self.index["shards"]:
            file = os.path.join(path, shard["tokens"])
            if not os.path.isfile(file) or os.path.getsize(file) != 4 * shard["num_tokens"]:
                raise ValueError(f"{file} is missing or does not hold {shard['num_tokens']} tokens")
            self.tokens.append(np.memmap(file, np.uint32, mode="r")
                               if shard["num_tokens"] else np.zeros(0, np.uint32))
            mask = shard.get("mask")
            if mask is not None:
                mask = os.path.join(path, mask)
                if not os.path.isfile(mask) or os.path.getsize(mask) != shard["num_tokens"]:
                    raise ValueError(f"{mask} is missing or does not hold {shard['num_tokens']} "
                                     "mask bytes")
            self.masks.append(None if mask is None else
                              np.memmap(mask, np.uint8, mode="r") if shard["num_tokens"] else
                              np.zeros(0, np.uint8))

    def num_tokens(self, split: str) -> int:
        """Tokens in `split` (0 when the store has no such split)."""
        return self.index["splits"].get(split, {}).get("num_tokens", 0)

    @property
    def vocab_size(self) -> int:
        return int(self.index["tokenizer"]["vocab_size"])

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.path, "tokenizer")

    def documents(self, split: str) -> np.ndarray:
        """int64 [documents, 3]: (shard, first token, length)."""
        info = self.index["splits"].get(split)
        if info is None:
            raise ValueError(f"{self.path} has no {split!r} split")
        docs = np.load(os.path.join(self.path, info["documents"]), allow_pickle=False)
        where = f"{self.path}/{info['documents']}"
        if docs.ndim != 2 or docs.shape[1] != 3 or docs.dtype != np.int64:
            raise ValueError(f"{where} is not an int64 [n, 3] array")
        sizes = np.array([s["num_tokens"] for s in self.index["shards"]] + [0], np.int64)
        shard, first, length = docs.T
        bad = ((shard < 0) | (shard >= len(sizes) - 1) | (first < 0) | (length < 0)
               | (first + length > sizes[np.clip(shard, 0, len(sizes) - 1)]))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}: document {i} (shard {shard[i]}, tokens {first[i]}.."
                             f"{first[i] + length[i]}) lies outside the store's shards: a corrupt "
                             "store; prepare it again")
        return docs


class PackedRows:
    """Random-access rows of `seq_len` inputs (+ shifted targets) cut from the documents of one
    split, concatenated in a seeded order. Row r covers stream tokens [r*L, r*L + L] inclusive."""

    def __init__(self, store: TokenStore, split: str, seq_len: int, seed: int):
        self.store, self.seq_len = store, seq_len
        docs = store.documents(split)
        self.docs = docs[np.random.default_rng(seed).permutation(len(docs))]
        self.starts = np.concatenate([[0], np.cumsum(self.docs[:, 2])])  # [documents + 1]
        total = int(self.starts[-1])
        self.num_rows = max(total - 1, 0) // seq_len
        if self.num_rows == 0:
            raise ValueError(f"the {split!r} split of {store.path} has {total} tokens; one row of "
                             f"seq_len {seq_len} needs {seq_len + 1}")

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        L = self.seq_len
        start, stop = r * L, r * L + L + 1
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop - 1, side="right")) - 1
        tokens, masks, doc, pos = [], [], [], []
        for k in range(first, last + 1):
            shard, offset, _ = self.docs[k]
            a = max(start, self.starts[k]) - self.starts[k]
            b = min(stop, self.starts[k + 1]) - self.starts[k]
            tokens.append(self.store.tokens[shard][offset + a: offset + b])
            m = self.store.masks[shard]
            masks.append(np.ones(b - a, np.uint8) if m is None else m[offset + a: offset + b])
            doc.append(np.full(b - a, k - first + 1, np.int32))
            pos.append(np.arange(b - a, dtype=np.int32))  # restarts at each document start
        tokens, masks = np.concatenate(tokens), np.concatenate(masks)  # [L + 1]
        doc, pos = np.concatenate(doc), np.concatenate(pos)
        return {
            "input_ids": tokens[:L].astype(np.int32),  # [L]
            "targets": tokens[1:].astype(np.int32),  # [L]
            "segment_ids": doc[:L],
            "positions": pos[:L],
            # A target counts when it continues the same document and is marked trainable.
            "loss_mask": ((doc[:L] == doc[1:]) & (masks[1:] > 0)).astype(np.float32),
        }


def _dataset(store, split, seq_len, batch_size, seed, process_index, process_count, shuffle):
    import grain
    if batch_size % process_count:
        raise ValueError(f"batch_size ({batch_size}) is not divisible by the {process_count} "
                         f"processes")
    ds = grain.MapDataset.source(PackedRows(store, split, seq_len, seed))
    if shuffle:
        ds = ds.shuffle(seed=seed)  # a fresh permutation each epoch (shuffle before repeat)
    ds = ds.repeat(None)
    return ds[process_index::process_count].batch(batch_size // process_count, drop_remainder=True)


def train_iterator(store: TokenStore, *, seq_len: int, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1, threads: int = 2):
    """Endless iterator of this process's share of each global batch ([batch_size / processes, L]
    arrays). `get_state()` / `set_state()` save and restore its position."""
    import grain
    ds = _dataset(store, "train", seq_len, batch_size, seed, process_index, process_count, True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                     prefetch_buffer_size=2 * threads)))


def eval_batches(store: TokenStore, *, seq_len: int, batch_size: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` batches of the eval split in a fixed order (the split repeats if it
    is shorter). Empty when the store has no eval documents."""
    if store.num_tokens("eval") <= seq_len:
        return []
    ds = _dataset(store, "eval", seq_len, batch_size, 0, process_index, process_count, False)
    return [ds[i] for i in range(num_batches)]
