"""safetensors files read at the offsets of their header (preadv, not mmap: pages of a mapped
file count in the resident set) a slab of rows at a time, transposed into our layout; and
written tensor by tensor from known shapes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Any, Callable, Iterator, Sequence

import ml_dtypes
import numpy as np

from jais2_jax.checkpoint import hf_mapping
from jais2_jax.checkpoint.common import regular_file_exists
from jais2_jax.checkpoint.hf_mapping import TensorSpec

_ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
              "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
SLAB_BYTES = 8 << 20  # rows read at a time before their transpose


# ------------------------------------------------------------------------------ safetensors files
@dataclasses.dataclass(frozen=True)
class StoredTensor:
    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


def read_header(path: str) -> dict[str, StoredTensor]:
    """Tensor table of a safetensors file, checked against the file size (truncation, garbage)."""
    def corrupt(why):
        return ValueError(f"{path}: not a valid safetensors file ({why}); the file is truncated "
                          "or corrupt, download or write it again")
    if not regular_file_exists(path):  # a named pipe would be waited on forever
        raise FileNotFoundError(f"{path} does not exist")
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise corrupt(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        # Each field checked for its JSON type first: a number, list or object where a string is
        # due must be named, never reach a dict lookup or unpacking as is.
        if not isinstance(entry, dict):
            raise corrupt(f"the header entry of tensor {name!r} is {_json_type(entry)}, not an "
                          "object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise corrupt(f"the header entry of tensor {name!r} has no {', '.join(missing)}")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype_name, str):
            raise corrupt(f"tensor {name!r} has dtype {json.dumps(dtype_name)[:40]}, "
                          f"{_json_type(dtype_name)}; a dtype is a string such as \"BF16\"")
        if not isinstance(shape, list) or not all(_is_int(v) and v >= 0 for v in shape):
            raise corrupt(f"tensor {name!r} has shape {json.dumps(shape)[:60]}; a shape is a list "
                          "of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise corrupt(f"tensor {name!r} has data_offsets {json.dumps(offsets)[:60]}; they are "
                          "a list [begin, end]")
        begin, end = offsets
        shape = tuple(shape)
        if not all(_is_int(v) and v >= 0 for v in (begin, end)):
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
        tensors[name] = StoredTensor(path, dtype, shape, data_start + begin)
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


def _json_type(v) -> str:
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    return {int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def _pread(fd: int, path: str, out: np.ndarray, offset: int) -> None:
    """Fills the contiguous array `out` with the file's bytes from `offset` (GIL released)."""
    buf = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:
            raise ValueError(f"{path}: file ended early (truncated safetensors file)")
        done += got


def row_bytes(t: StoredTensor) -> int:
    return math.prod(t.shape[1:]) * t.dtype.itemsize


def read_rows(t: StoredTensor, r0: int, r1: int) -> np.ndarray:
    """Rows r0..r1 of a tensor (contiguous bytes): [r1 - r0, *shape[1:]]."""
    out = np.empty((r1 - r0,) + t.shape[1:], t.dtype)
    fd = os.open(t.path, os.O_RDONLY)
    try:
        _pread(fd, t.path, out, t.offset + r0 * row_bytes(t))
    finally:
        os.close(fd)
    return out


def _read_rows_transposed(t: StoredTensor, r0: int, r1: int) -> np.ndarray:
    """Rows r0..r1 of a 2-D tensor, transposed: [shape[1], r1 - r0], as unsigned-integer bits.
    Read a slab of rows at a time into one small buffer, so the untransposed rows are never
    all in memory: one full-size array per call instead of two."""
    bits = np.dtype(_UINT[t.dtype.itemsize])
    out = np.empty((t.shape[1], r1 - r0), bits)
    step = max(64, SLAB_BYTES // row_bytes(t) // 64 * 64)  # whole 64-row transpose slabs
    slab = np.empty((min(step, r1 - r0), t.shape[1]), bits)
    fd = os.open(t.path, os.O_RDONLY)
    try:
        for a in range(r0, r1, step):
            part = slab[:min(step, r1 - a)]
            _pread(fd, t.path, part, t.offset + a * row_bytes(t))
            _transpose(part, out[:, a - r0:a - r0 + len(part)])
    finally:
        os.close(fd)
    return out


def as_bits(x: np.ndarray) -> np.ndarray:
    # Transposes of bfloat16 (an ml_dtypes user type) go through slow per-element copies; the
    # same bits as unsigned integers take numpy's fast paths. Reshapes/transposes only.
    return x.view(_UINT[x.dtype.itemsize])


def _map_bits(fn: Callable, x: np.ndarray) -> np.ndarray:
    return fn(as_bits(x)).view(x.dtype)


def _transpose(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """[R, C] -> [C, R] (into `out` if given), copied in slabs of 64 rows: ~10x faster than numpy's
    strided copy of a large matrix (0.07 s vs 0.9 s for [26624, 3328] uint16 on one core)."""
    out = np.empty(x.shape[::-1], x.dtype) if out is None else out
    for r in range(0, x.shape[0], 64):
        out[:, r:r + 64] = x[r:r + 64].T
    return out


def hf_row_axis(spec: TensorSpec) -> int:
    """The axis of our (one-layer) array that runs along HF rows: cheap to read in blocks."""
    hf, ours = spec.hf_shape, spec.our_shape
    if len(hf) == 1 or spec.to_ours is hf_mapping.identity:
        return 0
    # A linear weight, ours [*in, *out]: the first `out` axis. Size-1 dims make the split point
    # ambiguous, but they do not change any flat index.
    return next(k for k in range(1, len(ours))
                if math.prod(ours[:k]) == hf[1] and math.prod(ours[k:]) == hf[0])


def _is_linear(spec: TensorSpec) -> bool:
    return len(spec.hf_shape) == 2 and spec.to_ours is not hf_mapping.identity


def to_hf(spec: TensorSpec, x: np.ndarray) -> np.ndarray:
    """spec.to_hf (one whole tensor of ours), with the fast transpose for linear weights."""
    if _is_linear(spec):
        k = hf_row_axis(spec)
        flat = as_bits(x).reshape(math.prod(x.shape[:k]), -1)  # [prod(in), prod(out)]
        return _transpose(flat).view(x.dtype)
    return _map_bits(spec.to_hf, x)


def _flat_indices(box: Sequence[slice], shape: Sequence[int]) -> np.ndarray:
    """Row-major flat index in `shape` of every element of `box`: an int array of the box's shape."""
    grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    return np.ravel_multi_index(grids, tuple(shape)) if grids else np.zeros((), np.int64)


def read_ours(spec: TensorSpec, t: StoredTensor, box: tuple[slice, ...]) -> np.ndarray:
    """One HF tensor (one layer) in our layout, restricted to `box` (slices of spec.our_shape),
    reading only the HF rows the box needs."""
    hf, ours = spec.hf_shape, spec.our_shape
    if not _is_linear(spec):
        if all((s.start, s.stop) == (0, n) for s, n in zip(box, ours)) or len(hf) == 1:
            return _map_bits(spec.to_ours, read_rows(t, 0, hf[0]))[box]
        return read_rows(t, box[0].start, box[0].stop)[:, box[1]]  # identity (embedding)
    # A linear weight: HF [prod(out), prod(in)] <-> ours [*in, *out] (hf_mapping._linear).
    k = hf_row_axis(spec)
    rows, cols = _flat_indices(box[k:], ours[k:]), _flat_indices(box[:k], ours[:k])
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    if rows.size == r1 - r0 and cols.size == hf[1]:  # whole HF rows: the whole tensor, lm_head
        return _read_rows_transposed(t, r0, r1).reshape(cols.shape + rows.shape).view(t.dtype)
    block = as_bits(read_rows(t, r0, r1))  # [r1 - r0, prod(in)]
    if rows.size != r1 - r0:  # rows are contiguous unless the box cuts an inner `out` axis
        block = block[(rows - r0).reshape(-1)]
    sub = block if cols.size == hf[1] else block[:, cols.reshape(-1)]  # [n_out, n_in]
    return _transpose(sub).reshape(cols.shape + rows.shape).view(t.dtype)




def write_safetensors(path: str, entries: list[tuple[str, tuple, np.dtype]],
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

