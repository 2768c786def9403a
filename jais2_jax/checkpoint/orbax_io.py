"""Our Orbax model folder: written block by block under a byte budget (a custom type handler), read
back lazily or straight into shardings."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
import os
import sys
from typing import Callable, Sequence

import jax
import numpy as np

from jais2_jax.checkpoint import hf_mapping
from jais2_jax.checkpoint.common import PARAMS_DIR, check_folder, copy_tokenizer_files, progress_bar
from jais2_jax.checkpoint.hf_mapping import TensorSpec, tensor_specs
from jais2_jax.model.config import Jais2Config
from jais2_jax.utils.fsutil import staged_output

_BLOCK_BUDGET_BYTES = 1 << 30  # blocks read and not yet written (convert)
_DATA_FILE_BYTES = 16 << 20  # OCDBT target data file size (convert)


def _one_line(e: BaseException, limit: int = 400) -> str:
    """The first line of what TensorStore / Orbax say (their messages can hold a whole spec)."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------------- Orbax (write side)
@dataclasses.dataclass(eq=False)
class StreamedArray:
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
        """Writes a `StreamedArray` value block by block into the array Orbax's NumpyHandler would
        write (same spec, same 'np.ndarray' type in the metadata: restored by the stock handler)."""

        budget: _ByteBudget | None = None
        failed: list[BaseException]  # shared by all arrays: after a failure nothing starts
        reported = False  # the failure raised (by one array's write only)

        async def _open_and_write(self, value: StreamedArray, tspec: dict, ts_context):
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
                # One array raises the error; the others end quietly (Orbax gathers them as
                # tasks: every other raise would be a "Task exception was never retrieved" log).
                if not self.reported:
                    self.reported = True
                    raise failed[0]

    return StreamingNumpyHandler()


def save_streamed(directory: str, tree: dict, progress_desc: str, progress: bool,
                   budget_bytes: int = _BLOCK_BUDGET_BYTES) -> None:
    """An Orbax PyTree checkpoint of a tree of `StreamedArray` leaves, written block by block."""
    import orbax.checkpoint as ocp
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, StreamedArray))
    with progress_bar(sum(x.nbytes for x in leaves), progress_desc, progress) as bar:
        handler = _streaming_handler(budget_bytes, bar.update)
        registry = ocp.type_handlers.create_type_handler_registry(
            (StreamedArray, handler), (jax.Array, ocp.type_handlers.ArrayHandler()))
        save_args = jax.tree.map(
            lambda x: ocp.SaveArgs(chunk_byte_size=x.chunk_bytes) if x.chunk_bytes
            else ocp.SaveArgs(shard_axes=(x.axis,)), tree,
            is_leaf=lambda x: isinstance(x, StreamedArray))
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
                type_handler_registry=registry, use_compression=False)) as ck:
            # Small OCDBT data files: each large chunk is flushed to its own file as soon as it is
            # written, in parallel (with Orbax's 2 GB target, one flush at a time, all serial).
            try:
                ck.save(directory, args=ocp.args.PyTreeSave(
                    tree, save_args=save_args, ocdbt_target_data_file_size=_DATA_FILE_BYTES))
            except OSError as e:  # out of space, a read-only place, ...: say where
                error = OSError(f"could not write {directory}: {e.strerror or _one_line(e)}")
                error.errno = e.errno
                raise error from None



# -------------------------------------------------------------------------- Orbax (read side)
# Integrity: nothing checks that the weights read are the bytes written. Our folders are OCDBT
# databases of zarr v2 arrays, uncompressed. OCDBT puts a CRC-32C on its manifest, version-tree
# nodes and B+tree nodes (tensorstore/kvstore/ocdbt/index.rst, "crc32c_checksum" of each), but a
# chunk too large to be inlined is an out-of-line value referenced by (data file, offset, length)
# only, with no checksum; zarr v2 has no checksum codec (only a compressor's own framing, and we
# store uncompressed); zarr v3's "crc32c" codec exists but is a write-time codec, which Orbax
# (orbax/checkpoint/_src/serialization/tensorstore_utils.py, _build_zarr3_metadata) puts only on a
# shard's index, never on the chunk data; TensorStore's "recheck_cached_data" and
# "recheck_cached_metadata" spec options only decide whether cached data is revalidated against
# the storage generation, and do not verify content. So flipped bytes inside a data file load
# silently; what is detected is structure: a missing or truncated data file, a damaged manifest
# or tree node (all ValueErrors naming the folder, see `restore` and `open`).
def _root_cause(e: BaseException) -> BaseException:
    """Orbax wraps TensorStore's error in a bare Exception (read: with the array's spec appended)."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e


def _collect_abandoned_reads() -> None:
    """After a failed restore, Orbax's reads of the other arrays are left as coroutines that raise
    again when collected ("Exception ignored in: <coroutine ...>", a traceback and an array spec
    each, long after the error was reported): collected now, those reports dropped."""
    report = sys.unraisablehook

    def quiet(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is None or "orbax" not in code.co_filename:
            report(unraisable)
    sys.unraisablehook = quiet
    try:
        gc.collect()
    finally:
        sys.unraisablehook = report


class OrbaxCheckpoint:
    """Our Orbax folder: config and the stored parameter metadata, checked against each other."""

    def __init__(self, path):
        import orbax.checkpoint as ocp
        self.folder = check_folder(path)
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
        context = ocp.type_handlers.get_ts_context()
        info = ocp.type_handlers.ParamInfo(name=m.name, parent_dir=epath.Path(self.params_dir),
                                           is_ocdbt_checkpoint=True, use_zarr3=False,
                                           ts_context=context)
        try:
            return ts.open(ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True), open=True,
                           context=context).result()
        except Exception as e:  # noqa: BLE001  (TensorStore raises ValueError and bare Exception)
            raise ValueError(f"{self.params_dir}: could not open parameter {m.name} (damaged or "
                             f"incomplete files?): {_one_line(e)}") from None

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
            except Exception as e:  # noqa: BLE001  (TensorStore's errors are bare Exceptions)
                why = _one_line(_root_cause(e))
        _collect_abandoned_reads()
        raise ValueError(f"{self.params_dir}: could not read the Orbax checkpoint (damaged or "
                         f"incomplete files?): {why}")




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
            copy_tokenizer_files(os.fspath(tokenizer_dir), tmp)
        with ocp.StandardCheckpointer() as ck:
            ck.save(os.path.join(tmp, PARAMS_DIR), params)

