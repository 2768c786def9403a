"""HF safetensors <-> Orbax checkpoints, streamed; either format loaded straight into a mesh.

Layouts on disk:
- HF folder: `config.json`, `model.safetensors` or shards named by `model.safetensors.index.json`,
  tokenizer files. Tensor names and the [out, in] <-> ours reshapes live in `hf_mapping` only.
- Orbax folder (ours): `config.json`, tokenizer files, and `params/`: one Orbax PyTree checkpoint
  (OCDBT, zarr, uncompressed: zstd on weights costs more time than the ~10% it saves) of our scanned
  parameter tree; `ocp.StandardCheckpointer().restore(dir / "params")` reads it. Stacked
  `[layers, ...]` arrays are stored in chunks of one layer, the embedding and lm_head in ~64 MB
  chunks, so either can be read (and exported) a block at a time.

Memory stays bounded (about 2.5 GB for the 8B model, whatever its size): safetensors files are
read with `preadv` at the offsets of their header (not mmap-ed: pages of a mapped file count in the
resident set until unmapped, so a 4 GB shard would show 4 GB), a block of whole chunks at a time
(linear weights a slab of rows at a time, transposed into the block), and a custom Orbax type
handler writes every array block by block, all arrays at once, under one byte budget for the blocks
in flight (each also holds TensorStore's encoded copy until its commit: about 2x the budget). The
blocks' reads and transposes run in threads while earlier blocks are written; OCDBT flushes each
large chunk to its own data file, so the (fsync-ed) file writes run in parallel too. Outputs go to
a temporary folder beside the target and are renamed into place when complete.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_dtypes
import numpy as np

from jais2_jax import hf_mapping
from jais2_jax.config import Jais2Config
from jais2_jax.fsutil import check_output, staged_output
from jais2_jax.hf_mapping import TensorSpec, tensor_specs
from jais2_jax.model import as_dtype

PARAMS_DIR = "params"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Copied beside the weights in both directions when present (HF cache symlinks are followed).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
              "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_BLOCK_BUDGET_BYTES = 1 << 30  # blocks read and not yet written (convert)
_SLAB_BYTES = 8 << 20  # rows read at a time before their transpose
_DATA_FILE_BYTES = 16 << 20  # OCDBT target data file size (convert)


# ------------------------------------------------------------------------------ safetensors files
@dataclasses.dataclass(frozen=True)
class _Tensor:
    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


def _read_safetensors_header(path: str) -> dict[str, _Tensor]:
    """Tensor table of a safetensors file, checked against the file size (truncation, garbage)."""
    def corrupt(why):
        return ValueError(f"{path}: not a valid safetensors file ({why}); the file is truncated "
                          "or corrupt, download or write it again")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise corrupt(f"header length {n} does not fit in a file of {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(shape)
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad header entry for {name!r}") from None
        if not all(_is_int(v) and v >= 0 for v in (begin, end, *shape)):
            raise corrupt(f"bad header entry for {name!r}: shape {list(shape)} and data_offsets "
                          f"{[begin, end]} must be non-negative integers")
        if dtype_name not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {dtype_name}; only floating point "
                             f"weights ({', '.join(_ST_DTYPES)}) can be converted")
        dtype = _ST_DTYPES[dtype_name]
        if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
            raise corrupt(f"tensor {name}: data_offsets {begin}..{end} do not match shape {shape}")
        if end > data_size:
            raise corrupt(f"tensor {name} ends at byte {end} of the data, but the file holds only "
                          f"{data_size}")
        tensors[name] = _Tensor(path, dtype, shape, data_start + begin)
    # As the safetensors library demands: the tensors tile the data exactly, none sharing bytes.
    at = 0
    for t in sorted(tensors.values(), key=lambda t: t.offset):
        if t.offset - data_start != at:
            what = "overlaps the tensor before it" if t.offset - data_start < at else "leaves a gap"
            name = next(k for k, v in tensors.items() if v is t)
            raise corrupt(f"tensor {name} starts at byte {t.offset - data_start} of the data and "
                          f"{what} (which ends at {at})")
        at += math.prod(t.shape) * t.dtype.itemsize
    if at != data_size:
        raise corrupt(f"the tensors cover {at} bytes of data, but the file holds {data_size}")
    return tensors


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pread(fd: int, path: str, out: np.ndarray, offset: int) -> None:
    """Fills the contiguous array `out` with the file's bytes from `offset` (GIL released)."""
    buf = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:
            raise ValueError(f"{path}: file ended early (truncated safetensors file)")
        done += got


def _row_bytes(t: _Tensor) -> int:
    return math.prod(t.shape[1:]) * t.dtype.itemsize


def _read_rows(t: _Tensor, r0: int, r1: int) -> np.ndarray:
    """Rows r0..r1 of a tensor (contiguous bytes): [r1 - r0, *shape[1:]]."""
    out = np.empty((r1 - r0,) + t.shape[1:], t.dtype)
    fd = os.open(t.path, os.O_RDONLY)
    try:
        _pread(fd, t.path, out, t.offset + r0 * _row_bytes(t))
    finally:
        os.close(fd)
    return out


def _read_rows_transposed(t: _Tensor, r0: int, r1: int) -> np.ndarray:
    """Rows r0..r1 of a 2-D tensor, transposed: [shape[1], r1 - r0], as unsigned-integer bits.
    Read a slab of rows at a time into one small buffer, so the untransposed rows are never
    all in memory: one full-size array per call instead of two."""
    bits = np.dtype(_UINT[t.dtype.itemsize])
    out = np.empty((t.shape[1], r1 - r0), bits)
    step = max(64, _SLAB_BYTES // _row_bytes(t) // 64 * 64)  # whole 64-row transpose slabs
    slab = np.empty((min(step, r1 - r0), t.shape[1]), bits)
    fd = os.open(t.path, os.O_RDONLY)
    try:
        for a in range(r0, r1, step):
            part = slab[:min(step, r1 - a)]
            _pread(fd, t.path, part, t.offset + a * _row_bytes(t))
            _transpose(part, out[:, a - r0:a - r0 + len(part)])
    finally:
        os.close(fd)
    return out


def _as_bits(x: np.ndarray) -> np.ndarray:
    # Transposes of bfloat16 (an ml_dtypes user type) go through slow per-element copies; the
    # same bits as unsigned integers take numpy's fast paths. Reshapes/transposes only.
    return x.view(_UINT[x.dtype.itemsize])


def _map_bits(fn: Callable, x: np.ndarray) -> np.ndarray:
    return fn(_as_bits(x)).view(x.dtype)


def _transpose(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """[R, C] -> [C, R] (into `out` if given), copied in slabs of 64 rows: ~10x faster than numpy's
    strided copy of a large matrix (0.07 s vs 0.9 s for [26624, 3328] uint16 on one core)."""
    out = np.empty(x.shape[::-1], x.dtype) if out is None else out
    for r in range(0, x.shape[0], 64):
        out[:, r:r + 64] = x[r:r + 64].T
    return out


def _hf_row_axis(spec: TensorSpec) -> int:
    """The axis of our (one-layer) array that runs along HF rows: cheap to read in blocks."""
    hf, ours = spec.hf_shape, spec.our_shape
    if len(hf) == 1 or spec.to_ours is hf_mapping._identity:
        return 0
    # A linear weight, ours [*in, *out]: the first `out` axis. Size-1 dims make the split point
    # ambiguous, but they do not change any flat index.
    return next(k for k in range(1, len(ours))
                if math.prod(ours[:k]) == hf[1] and math.prod(ours[k:]) == hf[0])


def _is_linear(spec: TensorSpec) -> bool:
    return len(spec.hf_shape) == 2 and spec.to_ours is not hf_mapping._identity


def _to_hf(spec: TensorSpec, x: np.ndarray) -> np.ndarray:
    """spec.to_hf (one whole tensor of ours), with the fast transpose for linear weights."""
    if _is_linear(spec):
        k = _hf_row_axis(spec)
        flat = _as_bits(x).reshape(math.prod(x.shape[:k]), -1)  # [prod(in), prod(out)]
        return _transpose(flat).view(x.dtype)
    return _map_bits(spec.to_hf, x)


def _flat_indices(box: Sequence[slice], shape: Sequence[int]) -> np.ndarray:
    """Row-major flat index in `shape` of every element of `box`: an int array of the box's shape."""
    grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    return np.ravel_multi_index(grids, tuple(shape)) if grids else np.zeros((), np.int64)


def _one_to_ours(spec: TensorSpec, t: _Tensor, box: tuple[slice, ...]) -> np.ndarray:
    """One HF tensor (one layer) in our layout, restricted to `box` (slices of spec.our_shape),
    reading only the HF rows the box needs."""
    hf, ours = spec.hf_shape, spec.our_shape
    if not _is_linear(spec):
        if all((s.start, s.stop) == (0, n) for s, n in zip(box, ours)) or len(hf) == 1:
            return _map_bits(spec.to_ours, _read_rows(t, 0, hf[0]))[box]
        return _read_rows(t, box[0].start, box[0].stop)[:, box[1]]  # identity (embedding)
    # A linear weight: HF [prod(out), prod(in)] <-> ours [*in, *out] (hf_mapping._linear).
    k = _hf_row_axis(spec)
    rows, cols = _flat_indices(box[k:], ours[k:]), _flat_indices(box[:k], ours[:k])
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    if rows.size == r1 - r0 and cols.size == hf[1]:  # whole HF rows: the whole tensor, lm_head
        return _read_rows_transposed(t, r0, r1).reshape(cols.shape + rows.shape).view(t.dtype)
    block = _as_bits(_read_rows(t, r0, r1))  # [r1 - r0, prod(in)]
    if rows.size != r1 - r0:  # rows are contiguous unless the box cuts an inner `out` axis
        block = block[(rows - r0).reshape(-1)]
    sub = block if cols.size == hf[1] else block[:, cols.reshape(-1)]  # [n_out, n_in]
    return _transpose(sub).reshape(cols.shape + rows.shape).view(t.dtype)


# ------------------------------------------------------------------------------- HF checkpoints
def _check_folder(path) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in {path}: a checkpoint folder needs one")
    return os.path.abspath(path)  # Orbax reads no metadata from a relative path


def _weight_files(folder: str) -> list[str]:
    """The safetensors files of an HF folder, from index.json if there is one."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index_path} is not a valid index ({e!r}); it needs a "
                             "'weight_map' of tensor name -> file name") from None
        for name in files:
            norm = os.path.normpath(str(name))
            if os.path.isabs(norm) or norm.split(os.sep)[0] == ".." or not norm.endswith(
                    ".safetensors"):
                raise ValueError(f"{index_path} names {name!r}, which is not a .safetensors file "
                                 f"inside {folder}")
            if not os.path.isfile(os.path.join(folder, norm)):
                raise FileNotFoundError(f"{index_path} names {name!r}, which does not exist in "
                                        f"{folder}")
        return [os.path.join(folder, os.path.normpath(n)) for n in files]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if files:
        return [os.path.join(folder, f) for f in files]
    pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); they are never unpickled "
            "here (loading a pickle can run arbitrary code). Get safetensors weights instead: "
            "download the model's *.safetensors files from the Hub (most models have them), or, "
            "in a trusted environment, `Jais2ForCausalLM.from_pretrained(folder)"
            ".save_pretrained(new_folder)` with transformers, which writes safetensors")
    raise FileNotFoundError(f"no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}) in {folder}")


class HFCheckpoint:
    """An HF checkpoint folder, fully checked on opening: config, files, names and shapes."""

    def __init__(self, path):
        self.folder = _check_folder(path)
        self.config = Jais2Config.from_json_file(self.folder)
        self.tensors: dict[str, _Tensor] = {}
        for file in _weight_files(self.folder):
            for name, t in _read_safetensors_header(file).items():
                if name in self.tensors:
                    raise ValueError(f"tensor {name} is stored twice: in {self.tensors[name].path} "
                                     f"and {file}")
                self.tensors[name] = t
        hf_mapping.check_hf_names(self.config, self.tensors)
        n = self.config.num_hidden_layers
        self.specs = tensor_specs(self.config)
        for spec in self.specs:
            for name in spec.hf_names(n):
                hf_mapping.check_hf_shape(spec, name, self.tensors[name].shape)
        dtypes = {self.tensors[name].dtype for s in self.specs for name in s.hf_names(n)}
        # The checkpoint's dtype (the widest if mixed; float32 for float16 with bfloat16, which
        # neither holds): what convert keeps by default.
        widest = max(d.itemsize for d in dtypes)
        wide = [d for d in dtypes if d.itemsize == widest]
        self.dtype = wide[0] if len(wide) == 1 else np.dtype(np.float32)
        if self.config.tie_word_embeddings and hf_mapping.TIED_HEAD in self.tensors:
            self._check_tied_head()

    def _check_tied_head(self) -> None:
        """A tied checkpoint's stored lm_head must equal the embedding (read a slab at a time)."""
        head, embed = self.tensors[hf_mapping.TIED_HEAD], self.tensors["model.embed_tokens.weight"]
        if head.shape != embed.shape or head.dtype != embed.dtype:
            raise hf_mapping.tied_head_differs()
        rows = max(1, _SLAB_BYTES // max(1, _row_bytes(head)))
        for r0 in range(0, head.shape[0], rows):
            r1 = min(r0 + rows, head.shape[0])
            if not np.array_equal(_as_bits(_read_rows(head, r0, r1)),
                                  _as_bits(_read_rows(embed, r0, r1))):
                raise hf_mapping.tied_head_differs()

    def read(self, spec: TensorSpec, box: tuple[slice, ...] | None = None) -> np.ndarray:
        """`spec`'s parameter in our layout (stored dtype), restricted to `box` of its full shape."""
        n = self.config.num_hidden_layers
        full = spec.full_shape(n)
        box = tuple(slice(0, d) for d in full) if box is None else box
        if not spec.stacked:
            return _one_to_ours(spec, self.tensors[spec.hf_name], box)
        layers = range(box[0].start, box[0].stop)
        if len(layers) == 1:  # no copy into a stacked array
            return _one_to_ours(spec, self.tensors[spec.hf_name.format(i=layers[0])], box[1:])[None]
        out = None
        for j, i in enumerate(layers):
            part = _one_to_ours(spec, self.tensors[spec.hf_name.format(i=i)], box[1:])
            if out is None:
                out = np.empty((len(layers),) + part.shape, part.dtype)
            out[j] = part
        return out


# ----------------------------------------------------------------------------- staged outputs
def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """Serve every allocation >= `threshold` bytes from mmap, so that freeing it returns it to the OS.

    glibc keeps freed heap blocks in per-thread arenas (up to 8 per core) for reuse; streaming
    many-MB blocks through a pool of reader threads leaves that retained memory in RSS. Measured on
    2 cores (`benchmarks/bench_convert.py --layers 6 --methods ours`): peak RSS 1.97-2.24 GB
    without, 1.44-1.48 GB with, same wall time. Process-wide and permanent, so the `jais2 convert`
    and `jais2 export` commands call it; library functions do not. False where it is unavailable.
    """
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD; setting it also stops its dynamic growth
    return bool(libc.mallopt(m_mmap_threshold, threshold))


def _copy_tokenizer_files(src: str, dst: str) -> None:
    for name in sorted(os.listdir(src)):
        if name in TOKENIZER_FILES or name.endswith(".model"):
            path = os.path.join(src, name)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(dst, name))


def _config_with_dtype(config: Jais2Config, dtype: np.dtype) -> Jais2Config:
    """`config` with its recorded weight dtype (HF's `dtype` / `torch_dtype`) set to `dtype`."""
    meta = dict(config.hf_metadata)
    keys = [k for k in ("dtype", "torch_dtype") if k in meta] or ["dtype"]
    for k in keys:
        meta[k] = np.dtype(dtype).name
    return config.replace(hf_metadata=meta)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled)


# ------------------------------------------------------------------------- Orbax (write side)
@dataclasses.dataclass(eq=False)
class _Streamed:
    """An array Orbax writes in blocks along `axis`: `read(box)` gives any box of it."""
    shape: tuple[int, ...]
    dtype: np.dtype
    axis: int  # blocks split this axis; reading along it is cheap (layers, or HF rows)
    read: Callable[[tuple[slice, ...]], np.ndarray]
    chunk_bytes: int | None  # Orbax chunk size (None: one chunk per index of `axis`)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __deepcopy__(self, memo):  # Orbax copies host arrays before writing; nothing to copy here
        return self

    def blocks(self, chunk: Sequence[int], target_bytes: int) -> list[tuple[slice, ...]]:
        """Boxes of whole chunks along `axis`, about `target_bytes` each."""
        step = chunk[self.axis]
        per_index = self.nbytes // self.shape[self.axis]
        step *= max(1, target_bytes // (per_index * step))
        full = [slice(0, n) for n in self.shape]
        return [tuple(full[:self.axis] + [slice(a, min(a + step, self.shape[self.axis]))]
                      + full[self.axis + 1:]) for a in range(0, self.shape[self.axis], step)]


class _ByteBudget:
    """At most `limit` bytes of blocks in flight (a single larger block is let through alone);
    also counts the holders, so a failure can wait until nothing is in flight any more."""

    def __init__(self, limit: int):
        self.limit, self.used, self.holders = limit, 0, 0
        self.cond = asyncio.Condition()

    async def acquire(self, n: int):
        async with self.cond:
            await self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
            self.holders += 1

    async def release(self, n: int):
        async with self.cond:
            self.used -= n
            self.holders -= 1
            self.cond.notify_all()

    async def drained(self):
        async with self.cond:
            await self.cond.wait_for(lambda: self.holders == 0)


def _streaming_handler(budget_bytes: int, on_block: Callable[[int], None]):
    import orbax.checkpoint as ocp
    import tensorstore as ts

    class StreamingNumpyHandler(ocp.type_handlers.NumpyHandler):
        """Writes a `_Streamed` value block by block into the array Orbax's NumpyHandler would
        write (same spec, same 'np.ndarray' type in the metadata: restored by the stock handler)."""

        budget: _ByteBudget | None = None
        failed: list[BaseException]  # shared by all arrays: after a failure nothing starts

        async def _open_and_write(self, value: _Streamed, tspec: dict, ts_context):
            if self.budget is None:  # made inside Orbax's event loop
                self.budget, self.failed = _ByteBudget(budget_bytes), []
            # Orbax starts every array at once: their blocks (read + transpose in a thread, then
            # the TensorStore write) share the byte budget, so reading, transposing and writing
            # of several arrays overlap. After a failure no block starts, and the error leaves
            # only once nothing is in flight, so nothing writes into a folder being removed.
            budget, failed = self.budget, self.failed

            async def guarded(nbytes: int, work: Callable):
                await budget.acquire(nbytes)
                try:
                    if not failed:
                        await work()
                except BaseException as e:
                    failed.append(e)
                finally:
                    await budget.release(nbytes)

            store = []

            async def open_store():
                store.append(await ts.open(ts.Spec(tspec), create=True, open=True,
                                           context=ts_context))
            await guarded(0, open_store)
            if store:
                # Blocks of whole chunks: a partly written chunk would be read back and rewritten.
                chunk = store[0].chunk_layout.write_chunk.shape
                blocks = value.blocks(chunk, min(budget_bytes // 16, 64 << 20))

                def write(box):
                    nbytes = math.prod(b.stop - b.start for b in box) * value.dtype.itemsize

                    async def work():
                        block = await asyncio.to_thread(value.read, box)
                        written = store[0][box].write(block,
                                                      can_reference_source_data_indefinitely=True)
                        del block
                        await written
                        on_block(nbytes)
                    return guarded(nbytes, work)

                await asyncio.gather(*(write(box) for box in blocks))
            if failed:
                await budget.drained()
                raise failed[0]

    return StreamingNumpyHandler()


def _save_streamed(directory: str, tree: dict, progress_desc: str, progress: bool,
                   budget_bytes: int = _BLOCK_BUDGET_BYTES) -> None:
    """An Orbax PyTree checkpoint of a tree of `_Streamed` leaves, written block by block."""
    import orbax.checkpoint as ocp
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, _Streamed))
    with _progress(sum(x.nbytes for x in leaves), progress_desc, progress) as bar:
        handler = _streaming_handler(budget_bytes, bar.update)
        registry = ocp.type_handlers.create_type_handler_registry(
            (_Streamed, handler), (jax.Array, ocp.type_handlers.ArrayHandler()))
        save_args = jax.tree.map(
            lambda x: ocp.SaveArgs(chunk_byte_size=x.chunk_bytes) if x.chunk_bytes
            else ocp.SaveArgs(shard_axes=(x.axis,)), tree,
            is_leaf=lambda x: isinstance(x, _Streamed))
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
                type_handler_registry=registry, use_compression=False)) as ck:
            # Small OCDBT data files: each large chunk is flushed to its own file as soon as it is
            # written, in parallel (with Orbax's 2 GB target, one flush at a time, all serial).
            ck.save(directory, args=ocp.args.PyTreeSave(
                tree, save_args=save_args, ocdbt_target_data_file_size=_DATA_FILE_BYTES))


def _hf_to_streamed(ckpt: HFCheckpoint, dtype: np.dtype) -> dict:
    n = ckpt.config.num_hidden_layers
    tree: dict = {}
    for spec in ckpt.specs:
        def read(box, spec=spec):
            return ckpt.read(spec, box).astype(dtype, copy=False)

        # Stacked: one chunk per layer. Others (embedding, lm_head): chunks of ~64 MB.
        leaf = (_Streamed(spec.full_shape(n), dtype, 0, read, None) if spec.stacked else
                _Streamed(spec.our_shape, dtype, _hf_row_axis(spec), read, 64 << 20))
        hf_mapping.tree_set(tree, spec.path, leaf)
    return tree


def convert_hf_to_orbax(hf_dir, orbax_dir, *, dtype=None, force: bool = False,
                        progress: bool = True) -> None:
    """HF safetensors folder -> our Orbax folder (params + config + tokenizer), streaming."""
    target = check_output(orbax_dir, force, [hf_dir])
    ckpt = HFCheckpoint(hf_dir)  # every check happens before anything is written
    dtype = ckpt.dtype if dtype is None else np.dtype(as_dtype(dtype))
    tree = _hf_to_streamed(ckpt, dtype)
    with staged_output(target, force) as tmp:
        _config_with_dtype(ckpt.config, dtype).save(tmp)
        _copy_tokenizer_files(ckpt.folder, tmp)
        _save_streamed(os.path.join(tmp, PARAMS_DIR), tree, "convert", progress)


# -------------------------------------------------------------------------- Orbax (read side)
class OrbaxCheckpoint:
    """Our Orbax folder: config and the stored parameter metadata, checked against each other."""

    def __init__(self, path):
        import orbax.checkpoint as ocp
        self.folder = _check_folder(path)
        self.params_dir = os.path.join(self.folder, PARAMS_DIR)
        self.config = Jais2Config.from_json_file(self.folder)
        try:
            meta = ocp.PyTreeCheckpointer().metadata(self.params_dir)
        except Exception as e:  # noqa: BLE001  (orbax raises many kinds for a damaged folder)
            raise ValueError(f"{self.params_dir} is not a readable Orbax checkpoint: {e}") from None
        self.meta = getattr(meta, "item_metadata", meta)
        self.meta = getattr(self.meta, "tree", self.meta)
        if self.meta is None:
            raise ValueError(f"{self.params_dir}: Orbax found no parameter metadata there")
        n = self.config.num_hidden_layers
        self.specs = tensor_specs(self.config)
        expected = {"/".join(s.path): s.full_shape(n) for s in self.specs}
        stored = {"/".join(str(getattr(k, "key", k)) for k in p): tuple(m.shape)
                  for p, m in jax.tree_util.tree_flatten_with_path(self.meta)[0]}
        missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{self.params_dir} does not match config.json: missing parameters "
                             f"{missing}, unexpected parameters {unexpected}")
        for name, shape in expected.items():
            if stored[name] != shape:
                raise ValueError(f"parameter {name} has shape {stored[name]} in {self.params_dir}, "
                                 f"but config.json implies {shape}")

    def metadata(self, spec: TensorSpec):
        node = self.meta
        for key in spec.path:
            node = node[key]
        return node

    def open(self, spec: TensorSpec):
        """The stored array as a TensorStore (read lazily, a layer at a time)."""
        import orbax.checkpoint as ocp
        import tensorstore as ts
        from etils import epath
        m = self.metadata(spec)
        info = ocp.type_handlers.ParamInfo(name=m.name, parent_dir=epath.Path(self.params_dir),
                                           is_ocdbt_checkpoint=True, use_zarr3=False)
        return ts.open(ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True), open=True,
                       context=ocp.type_handlers.get_ts_context()).result()

    def restore(self, shardings, dtype=None) -> dict:
        """The whole tree, each array created with its sharding (read only where it is needed)."""
        import orbax.checkpoint as ocp
        target = {}
        for spec in self.specs:
            m = self.metadata(spec)
            hf_mapping.tree_set(target, spec.path, jax.ShapeDtypeStruct(
                tuple(m.shape), m.dtype if dtype is None else dtype,
                sharding=hf_mapping.tree_get(shardings, spec.path)))
        with ocp.StandardCheckpointer() as ck:
            try:
                return ck.restore(self.params_dir, target)
            except Exception as e:  # TensorStore's errors are bare Exceptions
                raise ValueError(f"{self.params_dir}: could not read the Orbax checkpoint (damaged "
                                 f"or incomplete files?): {e}") from None


# ------------------------------------------------------------------------------ HF (write side)
def parse_size(size) -> int:
    """Bytes from an int or '5GB' / '500MB' / '20KB' / '1GiB' (transformers' convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"size {size!r}: expected e.g. 5GB, 500MB, 1GiB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def _hf_tensor_order(config: Jais2Config) -> list[tuple[str, TensorSpec, int | None]]:
    """(HF name, spec, layer) in transformers' order: embeddings, layer by layer, norm, head."""
    specs = tensor_specs(config)
    stacked = [s for s in specs if s.stacked]
    top = [(s.hf_name, s, None) for s in specs if not s.stacked]
    layers = [(s.hf_name.format(i=i), s, i) for i in range(config.num_hidden_layers)
              for s in stacked]
    return top[:1] + layers + top[1:]


def _write_safetensors(path: str, entries: list[tuple[str, tuple, np.dtype]],
                       arrays: Iterator[np.ndarray], on_bytes: Callable[[int], None]) -> None:
    """A safetensors file written tensor by tensor: header from the known shapes, then data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, shape, dtype), arr in zip(entries, arrays, strict=True):
            if arr.shape != tuple(shape) or arr.dtype != dtype:
                raise AssertionError(f"{name}: {arr.shape} {arr.dtype} != {shape} {dtype}")
            f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
            on_bytes(arr.nbytes)


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
    """Our Orbax folder -> HF safetensors shards + index + config (+ tokenizer), streaming."""
    target = check_output(hf_dir, force, [orbax_dir])
    limit = parse_size(max_shard_size)
    ckpt = OrbaxCheckpoint(orbax_dir)
    config = ckpt.config
    stored = {s.path: np.dtype(ckpt.metadata(s).dtype) for s in ckpt.specs}
    out_dtype = lambda s: stored[s.path] if dtype is None else np.dtype(as_dtype(dtype))  # noqa
    order = _hf_tensor_order(config)
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
        return _to_hf(spec, np.asarray(ours)).astype(entries[i][2], copy=False)

    written_dtypes = {dt for _, _, dt in entries}
    with staged_output(target, force) as tmp, _progress(sum(sizes), "export", progress) as bar:
        _config_with_dtype(config, max(written_dtypes, key=lambda d: d.itemsize)).save(tmp)
        _copy_tokenizer_files(ckpt.folder, tmp)
        arrays = _ordered_map(read, range(len(order)))
        for name, members in zip(names, shards):
            _write_safetensors(os.path.join(tmp, name), [entries[i] for i in members],
                               (next(arrays) for _ in members), bar.update)
        if len(shards) > 1:
            weight_map = {entries[i][0]: name for name, ms in zip(names, shards) for i in ms}
            with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f,
                          indent=2)
                f.write("\n")


def save_model(folder, config: Jais2Config, params, *, tokenizer_dir=None,
               force: bool = False) -> None:
    """In-memory params (our scanned tree) -> our Orbax model folder (what `jais2 convert` writes):
    config.json, params/ and the tokenizer files of `tokenizer_dir`. One process; the whole tree is
    written at once (for models that fit a host)."""
    import orbax.checkpoint as ocp
    hf_mapping.check_params(config, params)
    with staged_output(folder, force) as tmp:
        config.save(tmp)
        if tokenizer_dir is not None:
            _copy_tokenizer_files(os.fspath(tokenizer_dir), tmp)
        with ocp.StandardCheckpointer() as ck:
            ck.save(os.path.join(tmp, PARAMS_DIR), params)


def export_run_to_hf(run_dir, hf_dir, *, step=None, max_shard_size="5GB", dtype=None,
                     force: bool = False, progress: bool = True) -> int:
    """A training run's checkpoint (default: the latest step) -> HF folder, through a temporary
    Orbax model folder. Returns the exported step."""
    from jais2_jax.trainer import load_trained, run_tokenizer_dir
    target = check_output(hf_dir, force, [run_dir])  # before the load, not after it
    config, params, step = load_trained(os.fspath(run_dir), step)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tokenizer_dir, places = run_tokenizer_dir(os.fspath(run_dir))
    if tokenizer_dir is None:
        print(f"note: no tokenizer/ folder in the run's token store (looked in "
              f"{' and '.join(places)}); {target} gets no tokenizer files", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=f".{os.path.basename(target)}.export-",
                                     dir=os.path.dirname(target)) as t:
        model_dir = os.path.join(t, "model")
        save_model(model_dir, config, jax.device_get(params), tokenizer_dir=tokenizer_dir)
        export_orbax_to_hf(model_dir, hf_dir, max_shard_size=max_shard_size, dtype=dtype,
                           force=force, progress=progress)
    return step


def is_training_run(path) -> bool:
    return os.path.isdir(os.path.join(os.fspath(path), "checkpoints"))


# --------------------------------------------------------------------------------- load either
def is_orbax_folder(path) -> bool:
    return os.path.isdir(os.path.join(os.fspath(path), PARAMS_DIR))


def _process_box(sharding, shape) -> tuple[slice, ...]:
    """The smallest box holding every part of an array this process's devices own."""
    indices = sharding.addressable_devices_indices_map(shape).values()
    box = []
    for dim, n in enumerate(shape):
        ranges = [idx[dim].indices(n)[:2] if dim < len(idx) else (0, n) for idx in indices]
        box.append(slice(min(r[0] for r in ranges), max(r[1] for r in ranges)))
    return tuple(box)


def _local_part(part: np.ndarray, box: tuple[slice, ...], index: tuple[slice, ...], shape):
    """A device's `index` of the whole array, cut from `part` (the process's `box` of it)."""
    return part[tuple(slice(s.indices(n)[0] - b.start, s.indices(n)[1] - b.start)
                      for s, b, n in zip(index, box, shape))]


def _load_hf(path, dtype, shardings) -> tuple[Jais2Config, dict]:
    ckpt = HFCheckpoint(path)
    n = ckpt.config.num_hidden_layers
    params: dict = {}
    for spec in ckpt.specs:
        shape = spec.full_shape(n)
        sharding = hf_mapping.tree_get(shardings, spec.path)
        box = _process_box(sharding, shape)
        part = ckpt.read(spec, box)
        if dtype is not None:
            part = part.astype(dtype, copy=False)

        hf_mapping.tree_set(params, spec.path, jax.make_array_from_callback(
            shape, sharding, lambda index, part=part, box=box, shape=shape:
            _local_part(part, box, index, shape)))
        del part
    return ckpt.config, params


def load_checkpoint(path, *, dtype=None, mesh=None) -> tuple[Jais2Config, dict]:
    """(config, params) from an HF folder or one of our Orbax folders (detected).

    `dtype`: a name ("float32", "bfloat16") or a jnp dtype; default: as stored. `mesh`: a
    `jax.sharding.Mesh` with axes (data, fsdp, tensor); each parameter is then created with its
    NamedSharding from the logical rules, and this process reads only the part its devices own.
    Without a mesh the parameters go to this process's first device.
    """
    dtype = None if dtype is None else np.dtype(as_dtype(dtype))
    folder = _check_folder(path)
    config = Jais2Config.from_json_file(folder)
    if mesh is not None:
        from jais2_jax.sharding import param_shardings
        shardings = param_shardings(config, mesh)
    else:
        shardings = {}
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's
        for s in tensor_specs(config):
            hf_mapping.tree_set(shardings, s.path, device)
    if is_orbax_folder(folder):
        ckpt = OrbaxCheckpoint(folder)
        return ckpt.config, ckpt.restore(shardings, dtype)
    return _load_hf(folder, dtype, shardings)
