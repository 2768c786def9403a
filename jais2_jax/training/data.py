"""Text -> token store -> packed, shuffled, per-process batches that resume exactly.

Token store (written by `jais2 prepare-data`, read with memory maps, never unpickled):
    index.json                    format, shards, splits, tokenizer ids
    tokens-00000.bin ...          uint32 token ids, documents back to back (bos + text + eos)
    mask-00000.bin ...            uint8 per token, 1 = a training target (only for prompt/completion
                                  or chat data; absent means every token is a target)
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

Chat SFT data: a jsonl record `{"messages": [{"role": ..., "content": ...}, ...]}` is rendered
with the tokenizer's chat template (no bos/eos added: the template writes its own) and only the
assistant turns are targets: the tokens of the template's `{% generation %}` blocks where it has
them, else each assistant message's content located in the rendered text (plus the special tokens
that follow it there, e.g. `<|im_end|>` or eos: the end of the turn is learnt too).
"""

from __future__ import annotations

import errno
import io
import json
import os
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from jais2_jax.inference.tokenizer import Tokenizer
from jais2_jax.model.config import parse_json_object
from jais2_jax.utils.fsutil import check_output, staged_output

# The most reader threads train_iterator starts (RunConfig.data_threads is checked against it):
# each prefetches two batches, and 100000 of them hung the run before its first step.
MAX_DATA_THREADS = 256
FORMAT = "jais2-token-store"
VERSION = 1
INPUT_SUFFIXES = (".txt", ".jsonl")
CHAT_ROLES = ("system", "user", "assistant", "tool")


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
    `.jsonl`: one object per line with `text_key`, or `prompt` and `completion`. A leading UTF-8
    byte order mark is not text; bytes that are not UTF-8 and strings that are not valid Unicode
    (a lone surrogate from a JSON escape) are errors naming the line."""
    try:
        with open(path, encoding="utf-8-sig") as f:
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
                if "messages" in record:
                    yield Chat(_check_messages(record["messages"], f"{path}:{n}"),
                               f"{path}:{n}"), None
                    continue
                keys = (("completion", "prompt") if "prompt" in record and "completion" in record
                        else (text_key,) if text_key in record else None)
                if keys is None:
                    raise ValueError(f"{path}:{n}: no {text_key!r} (or prompt + completion) field")
                for key in keys:
                    if not isinstance(record[key], str):
                        raise ValueError(f"{path}:{n}: {key!r} must be a string, got "
                                         f"{type(record[key]).__name__} {record[key]!r:.40}")
                    try:
                        record[key].encode("utf-8")
                    except UnicodeEncodeError as e:  # "\ud800": JSON allows it, Unicode does not
                        bad = ord(record[key][e.start])
                        raise ValueError(f"{path}:{n}: {key!r} holds a lone surrogate (\\u{bad:04x} "
                                         f"at character {e.start}), which is not valid Unicode "
                                         "text") from None
                yield record[keys[0]], (record[keys[1]] if len(keys) > 1 else None)
    except UnicodeDecodeError:
        line, offset, reason = _utf8_error(path)
        raise ValueError(f"{path}:{line}: not UTF-8 text ({reason} at byte {offset})") from None


class Chat(NamedTuple):
    """A conversation of a jsonl `messages` record, and where it was read (file:line)."""
    messages: list
    where: str


def _check_messages(messages, where: str) -> list:
    """The `messages` of a chat record, checked: a non-empty list of {"role", "content"} objects
    with known roles and string contents, at least one of them the assistant's."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role': ..., "
                         f"'content': ...}} objects, got {json.dumps(messages)[:60]}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: message {i} is {type(m).__name__} {json.dumps(m)[:40]}, "
                             "not an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"{where}: message {i} has no {key!r}")
            if not isinstance(m[key], str):
                raise ValueError(f"{where}: message {i}: {key!r} must be a string, got "
                                 f"{json.dumps(m[key])[:40]}")
            try:
                m[key].encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{where}: message {i}: {key!r} holds a lone surrogate at "
                                 f"character {e.start}, which is not valid Unicode text") from None
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"{where}: message {i} has the unknown role {m['role']!r} (roles: "
                             f"{', '.join(CHAT_ROLES)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn: nothing to train on")
    return messages


def chat_tokens(tok: Tokenizer, messages: list, where: str = "chat") -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation rendered with the tokenizer's chat template; mask 1 on the
    assistant's tokens (see the module docstring)."""
    if tok.chat_template is None:
        raise ValueError(f"{where}: a chat record, but the tokenizer has no chat template to "
                         "render it with")
    try:
        text, spans = tok.render_chat(messages)
        if spans is None:
            spans = _assistant_spans(text, messages, tok.special_strings(), where)
        ids, mask = tok.encode_spans(text, spans)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None
    if not any(mask):
        raise ValueError(f"{where}: the chat template marks no assistant tokens in this "
                         "conversation (empty assistant turns?)")
    return ids, mask


def _assistant_spans(text: str, messages: list, specials: list[str], where: str):
    """Character spans of the assistant contents in the rendered `text`, found in message order
    (each search starts after the previous message's content), each extended over the special
    tokens right after it."""
    spans, at = [], 0
    for i, m in enumerate(messages):
        content = m["content"]
        for c in (content, content.strip()):
            start = text.find(c, at) if c else -1
            if start >= 0:
                break
        else:
            if m["role"] == "assistant" and content.strip():
                raise ValueError(f"{where}: message {i} (assistant): its content is not in the "
                                 "text the chat template renders, so its tokens cannot be found; "
                                 "mark the assistant text with {% generation %} in the template")
            continue
        end = start + len(c)
        if m["role"] == "assistant":
            while True:
                nxt = next((t for t in specials if text.startswith(t, end)), None)
                if nxt is None:
                    break
                end += len(nxt)
            spans.append((start, end))
        at = end
    return spans


def _utf8_error(path: str) -> tuple[int, int, str]:
    """(line, byte offset in the file, reason) of the first bytes of `path` that are not UTF-8.
    The text reader decodes in chunks, so its error's offset is the chunk's, not the file's."""
    offset, line = 0, 1
    with open(path, "rb") as f:
        for raw in f:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return line, offset + e.start, e.reason
            offset, line = offset + len(raw), line + 1
    return line, offset, "a truncated character"


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
    the new one is complete. Every file is written through `_OutputFile` (each write checked,
    fsynced, its size on disk checked), so a full disk is an error naming the file, and neither a
    partial store nor the loss of the old one.
    """
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
    if add_eos and eos is None:
        raise ValueError(f"tokenizer {tokenizer} has no eos token (tokenizer_config.json names "
                         "none, or one not in its vocabulary): documents would be packed with "
                         "nothing marking where each ends; name its eos_token, or pass --no-eos "
                         "(add_eos=False) to pack them without one")
    existed = os.path.lexists(output)
    try:
        with staged_output(output, overwrite, "--overwrite") as tmp:
            index = _write_store(tmp, output, files, tok, tokenizer, bos, eos, text_key=text_key,
                                 eval_fraction=eval_fraction, seed=seed, shard_tokens=shard_tokens,
                                 show_progress=show_progress)
    except _WriteError as e:
        kept = "the existing store is unchanged" if existed else "no store was written"
        raise _WriteError(f"{e}; {kept}", e.errno) from None
    return index


def _write_store(tmp, output, files, tok, tokenizer, bos, eos, *, text_key, eval_fraction, seed,
                 shard_tokens, show_progress) -> dict:
    """Writes the store's files into the staging folder `tmp` (named as in `output` in errors)
    and returns its index."""
    from tqdm import tqdm
    writer = _ShardWriter(tmp, shard_tokens, output)
    try:
        total = sum(os.path.getsize(f) for f in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="prepare-data",
                  disable=not show_progress) as bar:
            for path in files:
                for text, prompt in _documents(path, text_key, bar):
                    _encode_into(writer, tok, text, prompt, bos, eos)
        documents = writer.close()
    finally:
        writer.abort()  # a no-op once closed; otherwise its files are closed, unwritten
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
        buffer = io.BytesIO()  # np.save to a file would write with ndarray.tofile (see _OutputFile)
        np.save(buffer, docs, allow_pickle=False)
        _write_file(tmp, output, f"{name}_documents.npy", buffer.getvalue())
        splits[name] = {"documents": f"{name}_documents.npy", "num_documents": int(len(docs)),
                        "num_tokens": int(docs[:, 2].sum())}
    try:
        os.makedirs(os.path.join(tmp, "tokenizer"))
    except OSError as e:
        raise _WriteError(f"cannot write {os.path.join(output, 'tokenizer')}: {e.strerror or e}",
                          e.errno) from None
    for f in _tokenizer_files(tokenizer):
        with open(f, "rb") as source:
            _write_file(tmp, output, os.path.join("tokenizer", os.path.basename(f)), source.read())
    index = {"format": FORMAT, "version": VERSION, "dtype": "uint32",
             "num_tokens": int(documents[:, 2].sum()), "shards": writer.shards,
             "splits": splits, "inputs": [os.path.abspath(f) for f in files],
             "tokenizer": {"vocab_size": tok.vocab_size, "bos_token_id": bos,
                           "eos_token_id": eos},
             "max_token_id": writer.max_token_id}
    _write_file(tmp, output, "index.json", json.dumps(index, indent=2).encode("utf-8"))
    return index


def _encode_into(writer, tok, text, prompt, bos, eos):
    if isinstance(text, Chat):  # the template writes the special tokens
        writer.add(*chat_tokens(tok, text.messages, text.where))
        return
    head = [] if bos is None else [bos]
    if prompt is not None:
        head = head + tok.encode(prompt, add_special_tokens=False)
    tail = tok.encode(text, add_special_tokens=False) + ([] if eos is None else [eos])
    # The prompt (and bos) are context, never targets; the completion and eos are.
    mask = None if prompt is None else [0] * len(head) + [1] * len(tail)
    writer.add(head + tail, mask)


class _WriteError(OSError):
    """A store file could not be written completely (a full disk, a quota, an I/O error)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)  # one argument: str() is the message alone
        self.errno = code


# The writer's low-level calls, one place to see (and, in tests, to fail) every byte written.
_write_fd = os.write
_fsync = os.fsync
_FLUSH_BYTES = 1 << 20


class _OutputFile:
    """A store file written through os.write, never through ndarray.tofile: tofile writes small
    arrays through a C stdio buffer whose failed flush (ENOSPC) it ignores, which left truncated
    stores behind. Every write here is checked (short writes are retried), `close` flushes, fsyncs
    and checks that the file on disk holds exactly the bytes written; any failure is a
    `_WriteError` naming the file as `shown` (its name in the finished store)."""

    def __init__(self, path: str, shown: str):
        self.path, self.shown = path, shown
        self.size = 0  # bytes handed to the kernel
        self._buffer = bytearray()
        self._fd = self._call(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise _WriteError(f"cannot write {self.shown}: {e.strerror or e}", e.errno) from None

    def write(self, data) -> None:
        self._buffer += data
        if len(self._buffer) >= _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        view = memoryview(self._buffer)
        try:
            while len(view):
                n = self._call(_write_fd, self._fd, view)
                if n <= 0:
                    raise _WriteError(f"cannot write {self.shown}: the write wrote nothing",
                                      errno.EIO)
                view = view[n:]
                self.size += n
        finally:
            view.release()
        self._buffer.clear()

    def close(self) -> None:
        """Flushes, fsyncs and closes; an error unless the file holds every byte written."""
        try:
            self._flush()
            try:
                _fsync(self._fd)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # no fsync here
                    raise _WriteError(f"cannot write {self.shown}: {e.strerror or e}",
                                      e.errno) from None
            on_disk = self._call(os.fstat, self._fd).st_size
            if on_disk != self.size:
                raise _WriteError(f"cannot write {self.shown}: it holds {on_disk} bytes on disk, "
                                  f"not the {self.size} written (a full disk?)", errno.EIO)
            fd, self._fd = self._fd, None
            self._call(os.close, fd)  # some file systems report write errors only here
        finally:
            self.abort()

    def abort(self) -> None:
        """Closes the file without flushing (after a failure); it is left incomplete."""
        fd, self._fd = self._fd, None
        self._buffer.clear()
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass  # the file is being given up; the error that led here is the one to report


def _write_file(directory: str, shown: str, name: str, data: bytes) -> None:
    """`data` as the file `name` of `directory` (`shown` is the store's name in errors)."""
    f = _OutputFile(os.path.join(directory, name), os.path.join(shown, name))
    try:
        f.write(data)
    except BaseException:
        f.abort()
        raise
    f.close()


class _ShardWriter:
    """Appends documents to uint32 shards (and uint8 mask shards, kept only if some document has a
    prompt); a document never spans two shards. Tracks the largest id written."""

    def __init__(self, directory: str, shard_tokens: int, shown: str):
        # `shown`: the store's name in errors (the files are written in the staging `directory`)
        self.directory, self.shard_tokens, self.shown = directory, shard_tokens, shown
        self.shards: list[dict] = []
        self.docs: list[tuple[int, int, int]] = []
        self.any_mask = False
        self.max_token_id = -1
        self._files: list[_OutputFile] | None = None

    def _open(self):
        n = len(self.shards)
        self.shards.append({"tokens": f"tokens-{n:05d}.bin", "mask": f"mask-{n:05d}.bin",
                            "num_tokens": 0})
        self._files = []
        for k in ("tokens", "mask"):
            name = self.shards[-1][k]
            self._files.append(_OutputFile(os.path.join(self.directory, name),
                                           os.path.join(self.shown, name)))

    def add(self, ids: list[int], mask: list[int] | None):
        if self._files is None or (self.shards[-1]["num_tokens"] + len(ids) > self.shard_tokens
                                   and self.shards[-1]["num_tokens"] > 0):
            self._close_files()
            self._open()
        shard = self.shards[-1]
        tokens = np.asarray(ids, np.uint32)
        self._files[0].write(tokens.tobytes())
        self._files[1].write(np.asarray(mask if mask is not None else [1] * len(ids),
                                        np.uint8).tobytes())
        if len(tokens):
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
        self.any_mask |= mask is not None
        self.docs.append((len(self.shards) - 1, shard["num_tokens"], len(ids)))
        shard["num_tokens"] += len(ids)

    def _close_files(self):
        files, self._files = self._files or [], None
        try:
            for f in files:
                f.close()
        finally:
            for f in files:
                f.abort()

    def abort(self):
        """Closes any open shard files without finishing them (the store is being dropped)."""
        files, self._files = self._files or [], None
        for f in files:
            f.abort()

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
        _check_index(self.index, index_file)
        self._max_token_id = self.index.get("max_token_id")
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
    def max_token_id(self) -> int:
        """The largest token id in the store's shards (-1 when they hold no tokens): a model
        trains on the store only if this is below its vocab_size. Recorded in index.json by
        prepare-data; for a store written before that, found once by a pass over the memory-mapped
        shards, `_MAX_ID_CHUNK` tokens at a time."""
        if self._max_token_id is None:
            largest = -1
            for tokens in self.tokens:
                for i in range(0, len(tokens), _MAX_ID_CHUNK):
                    largest = max(largest, int(tokens[i:i + _MAX_ID_CHUNK].max()))
            self._max_token_id = largest
        return self._max_token_id

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


_MAX_ID_CHUNK = 1 << 24  # tokens (64 MiB) per step of TokenStore.max_token_id's pass


def _check_index(index: dict, where: str) -> None:
    """A ValueError naming `where` (index.json) and the key, unless every key the reader uses is
    present with the right type: shards, splits, tokenizer (and max_token_id when recorded)."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def name(v):  # a file of the store itself: never a path out of it
        return isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and \
            os.sep not in v and "\0" not in v

    def bad(label, wanted, value):
        raise ValueError(f"{where}: {label!r} must be {wanted}, got {value!r:.60}: a corrupt "
                         "store; prepare it again")

    def need(obj, key, label, ok, wanted, required=True):
        if key not in obj:
            if required:
                raise ValueError(f"{where}: no {label!r} key: a corrupt or foreign store; "
                                 "prepare it again")
        elif not ok(obj[key]):
            bad(label, wanted, obj[key])

    need(index, "shards", "shards", lambda v: isinstance(v, list), "a list")
    for i, shard in enumerate(index["shards"]):
        label = f"shards[{i}]"
        if not isinstance(shard, dict):
            bad(label, "an object", shard)
        need(shard, "tokens", f"{label}.tokens", name, "a file name in the store")
        need(shard, "num_tokens", f"{label}.num_tokens", count, "an integer >= 0")
        need(shard, "mask", f"{label}.mask", lambda v: v is None or name(v),
             "a file name in the store or null", required=False)
    need(index, "splits", "splits", lambda v: isinstance(v, dict), "an object")
    for split, info in index["splits"].items():
        label = f"splits.{split}"
        if not isinstance(info, dict):
            bad(label, "an object", info)
        need(info, "documents", f"{label}.documents", name, "a file name in the store")
        need(info, "num_tokens", f"{label}.num_tokens", count, "an integer >= 0")
        need(info, "num_documents", f"{label}.num_documents", count, "an integer >= 0",
             required=False)
    need(index, "tokenizer", "tokenizer", lambda v: isinstance(v, dict), "an object")
    need(index["tokenizer"], "vocab_size", "tokenizer.vocab_size", lambda v: count(v) and v > 0,
         "a positive integer")
    for key in ("bos_token_id", "eos_token_id"):
        need(index["tokenizer"], key, f"tokenizer.{key}", lambda v: v is None or count(v),
             "an integer >= 0 or null", required=False)
    need(index, "max_token_id", "max_token_id", lambda v: count(v) or v == -1,
         "an integer >= -1", required=False)


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
    arrays). `get_state()` / `set_state()` save and restore its position. `threads` (reader
    threads; twice as many batches are prefetched) is capped at MAX_DATA_THREADS."""
    import grain
    threads = max(1, min(int(threads), MAX_DATA_THREADS))
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
