"""Either checkpoint format loaded straight into a mesh: each process reads only what its
devices own."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jais2_jax.checkpoint import hf_mapping
from jais2_jax.checkpoint.common import PARAMS_DIR, check_folder
from jais2_jax.checkpoint.hf import HFCheckpoint
from jais2_jax.checkpoint.hf_mapping import tensor_specs
from jais2_jax.checkpoint.orbax_io import OrbaxCheckpoint
from jais2_jax.checkpoint.peft import AdapterConfig, adapter_delta, module_path, read_adapter
from jais2_jax.model.config import Jais2Config
from jais2_jax.model.linear import QUANTIZED_DTYPES
from jais2_jax.model.modules import Jais2ForCausalLM
from jais2_jax.model.options import as_dtype
from jais2_jax.model.quantize import (
    PROJECTIONS,
    check_scheme,
    contracted_dims,
    projection_scheme,
    quantize_array,
)
from jais2_jax.parallel.sharding import (
    model_abstract_params,
    model_param_shardings,
    param_shardings,
    unboxed_shapes,
)


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


class _Merge:
    """A LoRA adapter merged into the kernels as they are read: W + scale * A . B computed in
    float32, then cast to the loaded dtype (or, with quantize=, quantized)."""

    def __init__(self, ac: AdapterConfig, adapter: dict):
        self.ac, self.adapter = ac, adapter

    def targets(self, spec) -> bool:
        return (spec.path[-1] == "kernel" and len(spec.path) == 4
                and spec.path[-2] in self.ac.target_modules)

    def __call__(self, spec, x: np.ndarray, box: tuple[slice, ...], dtype=None) -> np.ndarray:
        """`x`: the `box` of the stacked kernel `spec` (or, with an int `box`, that layer)."""
        if not self.targets(spec):
            return x
        if isinstance(box, int):  # one layer, without the layers axis
            full = (slice(box, box + 1),) + tuple(slice(0, d) for d in x.shape)
            d = adapter_delta(self.adapter, spec.path[-2], full, self.ac.scale)[0]
        else:
            d = adapter_delta(self.adapter, spec.path[-2], box, self.ac.scale)
        return (x.astype(np.float32) + d).astype(dtype or x.dtype, copy=False)


def _load_boxes(specs, num_layers, read_box, dtype, shardings, merge) -> dict:
    """Each parameter read as the box of it this process's devices own (`read_box(spec, box)`,
    in our layout), an adapter merged into it, cast, and placed with its sharding."""
    params: dict = {}
    for spec in specs:
        shape = spec.full_shape(num_layers)
        sharding = hf_mapping.tree_get(shardings, spec.path)
        box = _process_box(sharding, shape)
        part = read_box(spec, box)
        if merge is not None:
            part = merge(spec, part, box, dtype)
        if dtype is not None:
            part = part.astype(dtype, copy=False)

        hf_mapping.tree_set(params, spec.path, jax.make_array_from_callback(
            shape, sharding, lambda index, part=part, box=box, shape=shape:
            _local_part(part, box, index, shape)))
        del part
    return params


def _load_hf(path, dtype, shardings, merge=None) -> tuple[Jais2Config, dict]:
    ckpt = HFCheckpoint(path)
    return ckpt.config, _load_boxes(ckpt.specs, ckpt.config.num_hidden_layers, ckpt.read, dtype,
                                    shardings, merge)


def _load_orbax_boxes(path, dtype, shardings, merge) -> tuple[Jais2Config, dict]:
    """An Orbax folder read a box at a time (as `_load_hf` reads): for merging an adapter in
    float32 before the cast."""
    ckpt = OrbaxCheckpoint(path)
    stores = {s.path: ckpt.open(s) for s in ckpt.specs}

    def read_box(spec, box):
        return np.asarray(stores[spec.path][box].read().result())
    return ckpt.config, _load_boxes(ckpt.specs, ckpt.config.num_hidden_layers, read_box, dtype,
                                    shardings, merge)


def _layer_sharding(sharding):
    """The sharding of one layer's slice of a stacked array."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def _put(host: np.ndarray, sharding):
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _load_quantized(folder, config, scheme, dtype, mesh, merge=None):
    """Every parameter read a layer at a time; projections quantized on the host as they are read
    and written into their (donated) device buffers in place: neither the host nor the devices
    ever hold the model in its stored dtype, only one layer's tensor of it. Each process reads
    whole layers (not only the part its devices own, as the unquantized load does): on many hosts
    that multiplies the reads."""
    model = Jais2ForCausalLM(config, quantization=scheme)
    if mesh is not None:
        shardings = model_param_shardings(model, mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's
        shardings = jax.tree_util.tree_map(lambda _: device, unboxed_shapes(
            model_abstract_params(model)))
    if is_orbax_folder(folder):
        ckpt = OrbaxCheckpoint(folder)
        stores = {s.path: ckpt.open(s) for s in ckpt.specs}

        def read(spec, layer):
            store = stores[spec.path]
            return np.asarray((store if layer is None else store[layer]).read().result())
    else:
        ckpt = HFCheckpoint(folder)

        def read(spec, layer):
            if layer is None:
                return ckpt.read(spec)
            full = spec.full_shape(config.num_hidden_layers)
            box = (slice(layer, layer + 1),) + tuple(slice(0, d) for d in full[1:])
            return ckpt.read(spec, box)[0]
    write = jax.jit(lambda buf, x, i: jax.lax.dynamic_update_index_in_dim(buf, x, i, 0),
                    donate_argnums=0)
    params: dict = {}
    n = config.num_hidden_layers
    for spec in ckpt.specs:
        name = spec.path[-2] if len(spec.path) >= 2 else ""
        quantized = spec.path[-1] == "kernel" and name in PROJECTIONS
        node = hf_mapping.tree_get(shardings, spec.path[:-1])
        leaf_dtype = dtype
        if quantized:
            parts = {"kernel": node["kernel"], "scale": node["scale"]}
            dtypes = {"kernel": QUANTIZED_DTYPES[projection_scheme(name, scheme)],
                      "scale": np.dtype(np.float32)}
        else:
            parts = {spec.path[-1]: node[spec.path[-1]]}
            dtypes = {spec.path[-1]: None}

        def convert(x, layer, spec=spec, name=name, quantized=quantized, leaf_dtype=leaf_dtype):
            if merge is not None and layer is not None:
                x = merge(spec, x, layer, np.float32)  # quantized from float32
            if quantized:
                q, s = quantize_array(x, projection_scheme(name, scheme),
                                      n_in=contracted_dims(name))
                return {"kernel": q, "scale": s}
            return {spec.path[-1]: x if leaf_dtype is None else x.astype(leaf_dtype, copy=False)}
        if not spec.stacked:
            arrays = {k: _put(v, parts[k]) for k, v in convert(read(spec, None), None).items()}
        else:
            arrays = {}
            for i in range(n):
                for k, v in convert(read(spec, i), i).items():
                    if k not in arrays:
                        dt = dtypes[k] or v.dtype
                        arrays[k] = jax.jit(lambda shape=(n,) + v.shape, dt=dt: jnp.zeros(shape, dt),
                                            out_shardings=parts[k])()
                    arrays[k] = write(arrays[k], _put(v, _layer_sharding(parts[k])), i)
        for k, v in arrays.items():
            hf_mapping.tree_set(params, spec.path[:-1] + (k,), v)
    return ckpt.config, params


def load_checkpoint(path, *, dtype=None, mesh=None, quantize: str | None = None,
                    adapter=None, merge_adapter: bool = True) -> tuple[Jais2Config, dict]:
    """(config, params) from an HF folder or one of our Orbax folders (detected).

    `quantize` ("int8", "fp8"): the projections come back as values + per-channel scales
    (`jais2_jax.quantize`); "nf4": the decoder projections as NF4 codes + block scales, an untied
    lm_head int8. Quantized a layer at a time while reading, so the model in its stored
    dtype never has to fit (for `Jais2ForCausalLM(config, quantization=quantize)`).

    `dtype`: a name ("float32", "bfloat16") or a jnp dtype; default: as stored. `mesh`: a
    `jax.sharding.Mesh` with axes (data, fsdp, tensor); each parameter is then created with its
    NamedSharding from the logical rules, and this process reads only the part its devices own.
    Without a mesh the parameters go to this process's first device.

    `adapter`: a PEFT LoRA adapter folder (made by PEFT or by us; `checkpoint/peft.py` says what
    is refused). By default it is merged into the kernels as they are read (W + scale * A . B in
    float32, then cast to the loaded dtype; with `quantize`, merged before quantizing), so the
    plain `Jais2ForCausalLM(config)` applies it. `merge_adapter=False` keeps it apart as
    `lora_a` / `lora_b` leaves (float32 unless `dtype` is given) beside the kernels; the model
    then needs the adapter's settings: `ac = read_adapter_config(adapter)`,
    `Jais2ForCausalLM(config, lora=ac.spec, lora_targets=ac.target_modules)`.
    """
    dtype = None if dtype is None else np.dtype(as_dtype(dtype))
    folder = check_folder(path)
    config = Jais2Config.from_json_file(folder)
    merge = ac = tree = None
    if adapter is not None:
        ac, tree = read_adapter(adapter, config, base=folder)  # checked before the base is read
        merge = _Merge(ac, tree) if merge_adapter else None
    if quantize is not None:
        config, params = _load_quantized(folder, config, check_scheme(quantize), dtype, mesh, merge)
    else:
        if mesh is not None:
            shardings = param_shardings(config, mesh)
        else:
            shardings = {}
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's
            for s in tensor_specs(config):
                hf_mapping.tree_set(shardings, s.path, device)
        if is_orbax_folder(folder) and merge is not None:
            config, params = _load_orbax_boxes(folder, dtype, shardings, merge)
        elif is_orbax_folder(folder):
            ckpt = OrbaxCheckpoint(folder)
            config, params = ckpt.config, ckpt.restore(shardings, dtype)
        else:
            config, params = _load_hf(folder, dtype, shardings, merge)
    if adapter is not None and not merge_adapter:
        _add_adapter(params, config, ac, tree, dtype, mesh, quantize)
    return config, params


def _add_adapter(params, config, ac, tree, dtype, mesh, quantize) -> None:
    """The adapter's lora_a / lora_b leaves put beside the kernels (sharded as the model's rules
    say: replicated over their rank axis)."""
    if mesh is not None:
        model = Jais2ForCausalLM(config, quantization=quantize, lora=ac.spec,
                                 lora_targets=ac.target_modules)
        shardings = model_param_shardings(model, mesh)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for name in ac.target_modules:
        for leaf in ("lora_a", "lora_b"):
            path = module_path(name) + (leaf,)
            host = hf_mapping.tree_get(tree, path).astype(dtype or np.float32, copy=False)
            sharding = device if mesh is None else hf_mapping.tree_get(shardings, path)
            hf_mapping.tree_set(params, path, _put(host, sharding))
