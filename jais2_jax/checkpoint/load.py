"""Either checkpoint format loaded straight into a mesh: each process reads only what its
devices own."""

from __future__ import annotations

import os

import jax
import numpy as np

from jais2_jax.checkpoint import hf_mapping
from jais2_jax.checkpoint.common import PARAMS_DIR, check_folder
from jais2_jax.checkpoint.hf import HFCheckpoint
from jais2_jax.checkpoint.hf_mapping import tensor_specs
from jais2_jax.checkpoint.orbax_io import OrbaxCheckpoint
from jais2_jax.model.config import Jais2Config
from jais2_jax.model.options import as_dtype
from jais2_jax.parallel.sharding import param_shardings


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
    folder = check_folder(path)
    config = Jais2Config.from_json_file(folder)
    if mesh is not None:
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
