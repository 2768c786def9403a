"""Token-level perplexity of text files or a token store: exp(total NLL / tokens predicted).

A text file is one document, tokenized as the checkpoint's tokenizer does (with its BOS when it
adds one). A token store (`jais2 prepare-data`'s folder) gives its documents (bos + text + eos)
of one split. Each document's tokens are predicted left to right, each from up to the model's
context of tokens before it (lm-eval's disjoint rolling windows); a document's first token is
given when it is the BOS (the prefix token), else predicted from the BOS.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

import numpy as np

from jais2_jax.evaluation.lm import Jais2LM

STORE_FORMAT = "jais2-token-store"  # index.json "format" of `jais2 prepare-data`'s folders


def _store_documents(path: str, split: str | None) -> tuple[str, Iterator[np.ndarray]]:
    """(split, its documents) of a token store; `split` default: "eval" if it has documents,
    else "train". Read directly (index.json, uint32 shards, int64 [n, 3] document tables)."""
    index_file = os.path.join(path, "index.json")
    try:
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index_file} is unreadable: {e}") from None
    if not isinstance(index, dict) or index.get("format") != STORE_FORMAT:
        raise ValueError(f"{index_file} is not a {STORE_FORMAT} index")
    splits = index.get("splits") or {}
    if split is None:
        split = "eval" if splits.get("eval", {}).get("num_tokens", 0) else "train"
    if split not in splits:
        raise ValueError(f"{path} has no {split!r} split (it has {sorted(splits)})")
    docs = np.load(os.path.join(path, os.path.basename(splits[split]["documents"])),
                   allow_pickle=False)
    if docs.ndim != 2 or docs.shape[1] != 3 or docs.dtype != np.int64:
        raise ValueError(f"{path}: the {split} documents table is not an int64 [n, 3] array")
    shards = []
    for shard in index["shards"]:
        file = os.path.join(path, os.path.basename(shard["tokens"]))
        n = int(shard["num_tokens"])
        if not os.path.isfile(file) or os.path.getsize(file) != 4 * n:
            raise ValueError(f"{file} is missing or does not hold {n} tokens")
        shards.append(np.memmap(file, np.uint32, mode="r") if n else np.zeros(0, np.uint32))

    def documents():
        for shard, first, length in docs:
            if not 0 <= shard < len(shards) or first < 0 or first + length > len(shards[shard]):
                raise ValueError(f"{path}: a {split} document lies outside the store's shards")
            yield np.asarray(shards[shard][first:first + length], np.int64)
    return split, documents()


def perplexity(lm: Jais2LM, sources: list[str], *, split: str | None = None) -> dict:
    """{"perplexity", "nll" (mean per token), "tokens", "documents", "sources"} over all sources."""
    if not sources:
        raise ValueError("no files given for --perplexity")
    documents: list[list[int]] = []
    for src in sources:
        if os.path.isdir(src):
            if not os.path.isfile(os.path.join(src, "index.json")):
                raise ValueError(f"{src}: a folder that is not a token store (no index.json)")
            _, docs = _store_documents(src, split)
            documents += [d.tolist() for d in docs if len(d)]
        elif os.path.isfile(src):
            try:
                with open(src, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                raise ValueError(f"{src} is not UTF-8 text (byte {e.start})") from None
            if text.strip():
                documents.append(lm.tok_encode(text))
        else:
            raise FileNotFoundError(f"{src}: no such file or token store")
    documents = [d for d in documents if d]
    vocab = lm.config.vocab_size
    for d in documents:
        bad = [t for t in d if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
    prefix = lm.prefix_token_id
    # A leading BOS is given, not predicted; other documents are predicted from the BOS.
    scored = [d[1:] if d[0] == prefix else d for d in documents]
    scored_docs = [(d, s) for d, s in zip(documents, scored) if s]
    if not scored_docs:
        raise ValueError(f"{', '.join(sources)}: no tokens to score (empty text)")
    logps = lm.rolling_logprobs([s for _, s in scored_docs], prefix=prefix)
    tokens = sum(len(s) for _, s in scored_docs)
    nll = -sum(logps) / tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens,
            "documents": len(scored_docs), "sources": list(sources)}
