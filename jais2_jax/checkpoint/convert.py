"""HF safetensors <-> Orbax, streamed, in bounded memory."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from jais2_jax.checkpoint import hf_mapping
from jais2_jax.checkpoint.common import (
    INDEX_FILE,
    PARAMS_DIR,
    SINGLE_FILE,
    config_with_dtype,
    copy_tokenizer_files,
    parse_size,
    progress_bar,
)
from jais2_jax.checkpoint.hf import HFCheckpoint
from jais2_jax.checkpoint.hf_mapping import TensorSpec, tensor_specs
from jais2_jax.checkpoint.orbax_io import OrbaxCheckpoint, StreamedArray, save_streamed
from jais2_jax.checkpoint.safetensors_io import hf_row_axis, to_hf, write_safetensors
from jais2_jax.model.config import Jais2Config
from jais2_jax.model.options import as_dtype
from jais2_jax.utils.fsutil import (
    check_output,
    deferred_interrupts,
    raise_if_interrupted,
    staged_output,
)


def is_orbax_model_folder(path) -> bool:
    """A folder as `jais2 convert` writes it: config.json and params/ (not a link)."""
    path = os.fspath(path)
    return (os.path.isdir(path) and not os.path.islink(path)
            and os.path.isfile(os.path.join(path, "config.json"))
            and os.path.isdir(os.path.join(path, PARAMS_DIR)))


def is_hf_folder(path) -> bool:
    """A folder as `jais2 export` writes it: config.json and *.safetensors (not a link)."""
    path = os.fspath(path)
    return (os.path.isdir(path) and not os.path.islink(path)
            and os.path.isfile(os.path.join(path, "config.json"))
            and any(f.endswith(".safetensors") for f in os.listdir(path)))


# What --force may replace (fsutil.check_output's `kind`): only what these tools write.
ORBAX_MODEL = (f"an Orbax model folder (config.json and {PARAMS_DIR}/)", is_orbax_model_folder)
HF_FOLDER = ("an HF checkpoint folder (config.json and *.safetensors)", is_hf_folder)


def _hf_to_streamed(ckpt: HFCheckpoint, dtype: np.dtype) -> dict:
    n = ckpt.config.num_hidden_layers
    tree: dict = {}
    for spec in ckpt.specs:
        def read(box, spec=spec):
            raise_if_interrupted()  # after SIGINT/SIGTERM no block starts (the save then fails)
            return ckpt.read(spec, box).astype(dtype, copy=False)

        # Stacked: one chunk per layer. Others (embedding, lm_head): chunks of ~64 MB.
        leaf = (StreamedArray(spec.full_shape(n), dtype, 0, read, None) if spec.stacked else
                StreamedArray(spec.our_shape, dtype, hf_row_axis(spec), read, 64 << 20))
        hf_mapping.tree_set(tree, spec.path, leaf)
    return tree


def convert_hf_to_orbax(hf_dir, orbax_dir, *, dtype=None, force: bool = False,
                        progress: bool = True) -> None:
    """HF safetensors folder -> our Orbax folder (params + config + tokenizer), streaming.

    `force` replaces only an Orbax model folder (or an empty folder), never the current
    directory. Interrupted (fsutil.interrupt_on_signals), the writers stop after their current
    block, and the temporary folder is removed once they have."""
    target = check_output(orbax_dir, force, [hf_dir], kind=ORBAX_MODEL)
    ckpt = HFCheckpoint(hf_dir)  # every check happens before anything is written
    dtype = ckpt.dtype if dtype is None else np.dtype(as_dtype(dtype))
    tree = _hf_to_streamed(ckpt, dtype)
    with staged_output(target, force, kind=ORBAX_MODEL) as tmp:
        config_with_dtype(ckpt.config, dtype).save(tmp)
        copy_tokenizer_files(ckpt.folder, tmp)
        # Orbax's writer threads do not stop on a main-thread error: an interrupt stops the
        # reads (raise_if_interrupted), the save fails once no block is in flight, then it raises.
        with deferred_interrupts():
            save_streamed(os.path.join(tmp, PARAMS_DIR), tree, "convert", progress)



def hf_tensor_order(config: Jais2Config) -> list[tuple[str, TensorSpec, int | None]]:
    """(HF name, spec, layer) in transformers' order: embeddings, layer by layer, norm, head."""
    specs = tensor_specs(config)
    stacked = [s for s in specs if s.stacked]
    top = [(s.hf_name, s, None) for s in specs if not s.stacked]
    layers = [(s.hf_name.format(i=i), s, i) for i in range(config.num_hidden_layers)
              for s in stacked]
    return top[:1] + layers + top[1:]



def _ordered_map(fn: Callable, items: Sequence, workers: int = 4) -> Iterator:
    """fn over items on a thread pool, results in order, at most `workers` ahead (bounded memory)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def export_orbax_to_hf(orbax_dir, hf_dir, *, max_shard_size="5GB", dtype=None,
                       force: bool = False, progress: bool = True) -> None:
    """Our Orbax folder -> HF safetensors shards + index + config (+ tokenizer), streaming.
    `force` replaces only an HF checkpoint folder (or an empty folder), never the current
    directory. The files are written by the calling thread (an interrupt stops it at once)."""
    target = check_output(hf_dir, force, [orbax_dir], kind=HF_FOLDER)
    limit = parse_size(max_shard_size)
    ckpt = OrbaxCheckpoint(orbax_dir)
    config = ckpt.config
    stored = {s.path: np.dtype(ckpt.metadata(s).dtype) for s in ckpt.specs}
    out_dtype = lambda s: stored[s.path] if dtype is None else np.dtype(as_dtype(dtype))  # noqa
    order = hf_tensor_order(config)
    entries = [(name, spec.hf_shape, out_dtype(spec)) for name, spec, _ in order]
    sizes = [math.prod(shape) * dt.itemsize for _, shape, dt in entries]
    shards: list[list[int]] = [[]]
    shard_bytes = 0
    for i, nbytes in enumerate(sizes):
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(i)
        shard_bytes += nbytes
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    stores = {s.path: ckpt.open(s) for s in ckpt.specs}

    def read(i):
        _, spec, layer = order[i]
        store = stores[spec.path]
        ours = (store if layer is None else store[layer]).read().result()
        return to_hf(spec, np.asarray(ours)).astype(entries[i][2], copy=False)

    written_dtypes = {dt for _, _, dt in entries}
    with staged_output(target, force, kind=HF_FOLDER) as tmp, progress_bar(sum(sizes), "export", progress) as bar:
        config_with_dtype(config, max(written_dtypes, key=lambda d: d.itemsize)).save(tmp)
        copy_tokenizer_files(ckpt.folder, tmp)
        arrays = _ordered_map(read, range(len(order)))
        for name, members in zip(names, shards):
            write_safetensors(os.path.join(tmp, name), [entries[i] for i in members],
                               (next(arrays) for _ in members), bar.update)
        if len(shards) > 1:
            weight_map = {entries[i][0]: name for name, ms in zip(names, shards) for i in ms}
            with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f,
                          indent=2)
                f.write("\n")

