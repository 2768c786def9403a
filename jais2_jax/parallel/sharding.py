"""Meshes, the one logical-axis rules table, and the shardings of everything placed on a mesh.

Parameters and activations carry logical axis names; `LOGICAL_AXIS_RULES` maps each onto mesh
axes (`data`, `fsdp`, `tensor`). Changing parallelism means changing the mesh or this table,
never the model. Shardings are derived from `jax.eval_shape` results (abstract first, then place):
parameters, optimizer state, KV cache and batches. `init_params_sharded` creates parameters
inside `jit` with `out_shardings`, so no device ever holds the whole model.

Typical use:
    mesh = make_mesh("fsdp")                               # or (2, -1, 4), "data=2,fsdp=-1,tensor=4"
    params = init_params_sharded(config, mesh, jax.random.key(0))
    with use_mesh(mesh):
        logits = jax.jit(model.apply)({"params": params}, ids)
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from jais2_jax.model.cache import KVCache, cache_layout
from jais2_jax.model.config import Jais2Config
from jais2_jax.model.modules import Jais2ForCausalLM
from jais2_jax.model.options import ModelOptions

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (a tuple shards over several axes; None replicates). A mesh axis used
# by an earlier dimension of the same array is skipped (flax's rule), so activations
# ("batch", "length", "embed") shard batch over data*fsdp and keep embed whole.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv_heads", None),  # fused q/k/v of the inference view: replicated (see model.fuse_qkv)
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),  # a LoRA adapter's rank: small, replicated
    ("quant_blocks", None),  # nf4 scales' input blocks (any count, 1/16 of the codes' bytes)
)

# Preset -> (data, fsdp, tensor); -1 is "the rest". `fsdp+tp` is resolved in `mesh_shape`:
# tensor parallelism inside a host (fast links), FSDP across hosts.
MESH_PRESETS: dict[str, tuple[int, int, int] | None] = {
    "fsdp": (1, -1, 1),
    "dp": (-1, 1, 1),
    "tp": (1, 1, -1),
    "fsdp+tp": None,
}


# ---------------------------------------------------------------------------------------- meshes
def parse_mesh(spec: str | Sequence[int]) -> tuple[int, ...] | str:
    """A mesh spec -> sizes (data, fsdp, tensor) with possibly one -1, or a preset name.

    Accepts a preset (`fsdp`, `dp`, `tp`, `fsdp+tp`), `"2,-1,4"`, `"data=2,fsdp=-1,tensor=4"`
    (unnamed axes default to 1) or a sequence of three ints.
    """
    if not isinstance(spec, str):
        spec = tuple(spec)
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in spec):
            raise ValueError(f"mesh {spec}: sizes must be integers")
        return tuple(int(s) for s in spec)
    spec = spec.strip()
    if spec in MESH_PRESETS:
        return spec
    malformed = ValueError(f"mesh {spec!r}: expected a preset {tuple(MESH_PRESETS)}, sizes like "
                           f"'2,-1,4' or 'data=2,fsdp=-1,tensor=4'")

    def size(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise malformed from None

    if "=" not in spec:
        return tuple(size(s) for s in spec.split(","))
    sizes, named = dict.fromkeys(MESH_AXES, 1), set()
    for part in spec.split(","):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq:
            raise malformed
        if name not in sizes:
            raise ValueError(f"unknown mesh axis {name!r}; axes are {MESH_AXES}")
        if name in named:
            raise ValueError(f"mesh {spec!r} names the axis {name!r} twice")
        named.add(name)
        sizes[name] = size(value)
    return tuple(sizes.values())


def mesh_shape(spec: str | Sequence[int], num_devices: int,
               devices_per_host: int | None = None) -> tuple[int, int, int]:
    """Resolve a mesh spec (preset, sizes with one -1) against a device count; checks the product."""
    if not isinstance(num_devices, numbers.Integral) or num_devices < 1:
        raise ValueError(f"a mesh needs at least one device, got {num_devices}")
    parsed = parse_mesh(spec)
    if parsed == "fsdp+tp":
        per_host = devices_per_host or jax.local_device_count()
        tensor = math.gcd(per_host, num_devices)
        parsed = (1, -1, tensor)
    elif isinstance(parsed, str):
        parsed = MESH_PRESETS[parsed]
    shape = list(parsed)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {tuple(shape)} does not match axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {tuple(shape)}: sizes must be positive (or one -1)")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {tuple(shape)}: {num_devices} devices are not divisible "
                             f"by the fixed axes' product {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        hint = ""
        rest = shape[0] * shape[2]
        if num_devices % rest == 0:
            hint = f"; nearest workable: {(shape[0], num_devices // rest, shape[2])} (or fsdp=-1)"
        raise ValueError(f"mesh shape {tuple(shape)} has {math.prod(shape)} devices, but "
                         f"{num_devices} are available{hint}")
    return tuple(shape)


def make_mesh(shape: str | Sequence[int] = "fsdp", axis_names: Sequence[str] = MESH_AXES,
              devices=None, *, dcn_shape: str | Sequence[int] | None = None) -> Mesh:
    """A mesh of `shape` over `devices` (default: all); one entry may be -1 for "the rest".

    `dcn_shape` (multi-slice TPU, or several GPU hosts) gives how many slices each axis spans:
    the mesh is then `shape * dcn_shape`, with `shape` inside a slice (ICI) and `dcn_shape`
    across slices (data-center network); usually only `data` (or `fsdp`) crosses slices.
    Axes are `AxisType.Auto` so that linen's logical partitioning (pjit style) applies.
    """
    devices = list(jax.devices() if devices is None else devices)
    axis_types = (AxisType.Auto,) * len(axis_names)
    if tuple(axis_names) != MESH_AXES:
        raise ValueError(f"mesh axes must be {MESH_AXES} (the names LOGICAL_AXIS_RULES maps to), "
                         f"got {tuple(axis_names)}")
    if dcn_shape is None or all(s == 1 for s in parse_mesh(dcn_shape)):
        shape = mesh_shape(shape, len(devices))
        try:
            return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=axis_types)
        except NotImplementedError:
            # An axis that is no product of TPU torus axes (tensor=8 on a 4x4x4 v5p) splits one.
            from jax.experimental import mesh_utils
            array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
            return Mesh(array, MESH_AXES, axis_types=axis_types)

    # Multi-slice: each granule (a TPU slice; a process where there is a single slice, as on GPU
    # hosts) holds an ICI mesh; granules are laid out over the DCN mesh.
    from jax.experimental import mesh_utils
    by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
    granules = {getattr(d, "slice_index" if by_slice else "process_index") for d in devices}
    dcn = mesh_shape(dcn_shape, len(granules))
    ici = mesh_shape(shape, len(devices) // len(granules))
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice)
    return Mesh(array, MESH_AXES, axis_types=axis_types)


def abstract_mesh(shape: str | Sequence[int], num_devices: int,
                  devices_per_host: int | None = None) -> AbstractMesh:
    """A device-free mesh of the given shape: shardings and per-device sizes without the devices."""
    sizes = mesh_shape(shape, num_devices, devices_per_host)
    return AbstractMesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """The mesh and the rules table, for jit calls whose model constrains activations."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


def on_one_device() -> bool:
    """True while tracing without a mesh or under a one-device mesh (`use_mesh`): the train
    step's compute-dtype gradients (whose cross-device sums would be in bf16) apply only there."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


# ----------------------------------------------------------------------------- logical -> mesh
def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh, what: str,
                    logical: Sequence[str | None] | None = None) -> None:
    """ValueError naming the dimension, the rule, the mesh axes and the nearest workable size."""
    logical = tuple(logical or ()) + (None,) * len(shape)
    for i, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in names)
        if dim % size == 0:
            continue
        # A size that divides both the dimension and the device count keeps the mesh complete.
        divisors = [d for d in range(1, dim + 1) if dim % d == 0]
        fits = [d for d in divisors if mesh.size % d == 0] or divisors
        nearest = min(fits, key=lambda d: (abs(d - size), -d))
        rule = f" (rule {logical[i]!r} -> {axes!r} in LOGICAL_AXIS_RULES)" if logical[i] else ""
        axis_hint = f"{names[0]}={nearest}" if len(names) == 1 else f"a product of {nearest}"
        if logical[i] == "batch":  # the data, not the mesh, is what usually changes
            axis_hint = f"a batch of {-(-dim // size) * size} (a multiple of {size})"
        raise ValueError(
            f"{what}: dimension {i} of size {dim}{rule} is sharded over mesh axes {names} of total "
            f"size {size}, which does not divide {dim}; nearest workable choice: {axis_hint}")


def _sharding(mesh, logical, shape, what, rules) -> NamedSharding:
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    check_divisible(shape, spec, mesh, what, logical)
    return NamedSharding(mesh, spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules=LOGICAL_AXIS_RULES):
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical_axes), rules))


# ------------------------------------------------------------------------------------ parameters
def abstract_params(config: Jais2Config, *, param_dtype=jnp.float32, scan_layers: bool = True):
    """eval_shape of the model's init: the boxed (logically partitioned) params, no memory used."""
    model = Jais2ForCausalLM(config, param_dtype=param_dtype,
                             options=ModelOptions(scan_layers=scan_layers))
    return model_abstract_params(model)


def model_abstract_params(model: Jais2ForCausalLM):
    """The boxed abstract params of this model instance (its layout, quantization, adapters).
    Traced with XLA attention: the tree does not depend on it, and TPU kernels want long inputs."""
    model = model.with_options(attention_impl="xla")
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


def unboxed_shapes(abstract):
    """ShapeDtypeStructs of a boxed abstract tree. (`nn.meta.unbox` would add sharding constraints
    when called under a mesh with rules, which fails on abstract values.)"""
    return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
                                  abstract, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def param_shardings(config: Jais2Config, mesh, scan_layers: bool = True, rules=LOGICAL_AXIS_RULES):
    """NamedSharding of every parameter (same tree as the params), checked for divisibility."""
    return _shardings_of(abstract_params(config, scan_layers=scan_layers), mesh, rules)


def model_param_shardings(model: Jais2ForCausalLM, mesh, rules=LOGICAL_AXIS_RULES):
    """As `param_shardings`, for this model instance's tree (per-layer view, int8 values and their
    scales, adapters): each array by its logical axes."""
    return _shardings_of(model_abstract_params(model), mesh, rules)


def _shardings_of(abstract, mesh, rules):
    logical = nn.get_partition_spec(abstract)
    shapes = unboxed_shapes(abstract)
    return jax.tree_util.tree_map_with_path(
        lambda path, spec, leaf: _sharding(mesh, tuple(spec), leaf.shape,
                                           "parameter " + jax.tree_util.keystr(path), rules),
        logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_params_sharded(config: Jais2Config, mesh: Mesh, rng: jax.Array, *,
                        param_dtype=jnp.float32, scan_layers: bool = True,
                        rules=LOGICAL_AXIS_RULES) -> dict:
    """Random parameters created directly in their shards (jit with out_shardings).

    With JAX's partitionable threefry (the default) the values equal `model.init` on one device.
    """
    model = Jais2ForCausalLM(config, param_dtype=param_dtype,
                             options=ModelOptions(scan_layers=scan_layers))
    shardings = param_shardings(config, mesh, scan_layers, rules)

    def init(key):
        return nn.meta.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32))["params"])

    with use_mesh(mesh, rules):
        return jax.jit(init, out_shardings=shardings)(rng)


def shard_params(params, shardings):
    """Place an existing (host or single-device) tree onto its shardings."""
    return jax.device_put(params, shardings)


# ----------------------------------------------------------------------------- optimizer state
def opt_state_shardings(optimizer, params_shardings, abstract_params_):
    """NamedShardings of `optimizer.init(params)`, from its `jax.eval_shape`: each param-shaped
    leaf (Adam's mu and nu, ...) takes its parameter's sharding; counts, scalars and leaves of
    another shape (factored statistics) are replicated.

    `abstract_params_`: the (unboxed) params or their ShapeDtypeStructs, same tree as the shardings.
    """
    import optax
    state = jax.eval_shape(optimizer.init, abstract_params_)
    mesh = jax.tree_util.tree_leaves(params_shardings)[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())

    def match(leaf, sharding, param):
        if not hasattr(leaf, "shape") or leaf.shape != param.shape:
            return replicated
        return sharding

    return optax.tree_map_params(
        optimizer, match, state, params_shardings, abstract_params_,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (NamedSharding, jax.ShapeDtypeStruct)))


# ---------------------------------------------------------------------------- cache and batches
def cache_shardings(config: Jais2Config, mesh, batch_size: int, max_length: int,
                    rules=LOGICAL_AXIS_RULES, *, per_layer: bool = False,
                    quantized: bool = False) -> KVCache:
    """A KVCache of NamedShardings for `init_cache(config, batch_size, max_length, per_layer=...)`:
    the cache's logical layout (`model.cache.cache_layout`) through the rules table, checked for
    divisibility."""
    axes, shapes = cache_layout(config, batch_size, max_length, per_layer=per_layer,
                                quantized=quantized)
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)  # noqa: E731
    return jax.tree_util.tree_map(
        lambda logical, shape: _sharding(mesh, logical, shape, "KV cache", rules), axes, shapes,
        is_leaf=is_axes)


def batch_sharding(mesh, shape: Sequence[int], rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding of a [batch, length, ...] input (ids, masks, positions, segment ids, targets)."""
    logical = ("batch", "length") + (None,) * (len(shape) - 2)
    return _sharding(mesh, logical[:len(shape)], tuple(shape), "batch", rules)


PACKED_4BIT = (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4))


def array_bytes(count: int, dtype) -> int:
    """Bytes of `count` elements of `dtype` on an accelerator: 4-bit types (nf4's codes) packed two
    to a byte, as XLA's GPU and TPU backends store them (numpy's itemsize says 1)."""
    dtype = jnp.dtype(dtype)
    return -(-count // 2) if dtype in PACKED_4BIT else count * dtype.itemsize


def bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds of a tree of arrays/ShapeDtypeStructs under the given shardings."""
    leaves = jax.tree_util.tree_leaves(tree)
    shards = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return sum(array_bytes(int(np.prod(s.shard_shape(a.shape))), a.dtype)
               for a, s in zip(leaves, shards, strict=True))
