"""Meshes and the one logical-axis rules table.

Parameters and activations carry logical axis names; `LOGICAL_AXIS_RULES` maps each onto mesh
axes (`data`, `fsdp`, `tensor`). Changing parallelism means changing the mesh or this table,
never the model.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jais2_jax.config import Jais2Config

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (a tuple shards over several axes; None replicates).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)


def make_mesh(shape: Sequence[int] = (1, -1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices=None) -> Mesh:
    """A mesh of `shape` over `devices` (default: all); one entry may be -1 for "the rest".

    Axes are `AxisType.Auto` so that linen's logical partitioning (pjit style) applies.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {tuple(shape)} does not match axes {tuple(axis_names)}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {tuple(shape)}: sizes must be positive (or one -1)")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {tuple(shape)}: {len(devices)} devices are not "
                             f"divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} has {math.prod(shape)} devices, but "
                         f"{len(devices)} are available")
    return jax.make_mesh(tuple(shape), tuple(axis_names), devices=devices,
                         axis_types=(AxisType.Auto,) * len(axis_names))


def logical_to_spec(axes: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(axes), rules)


def param_logical_axes(config: Jais2Config, scan_layers: bool = True):
    """The pytree of logical axis names (PartitionSpec of names) of the parameters, from eval_shape."""
    from jais2_jax.model import Jais2ForCausalLM
    model = Jais2ForCausalLM(config, scan_layers=scan_layers)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return nn.get_partition_spec(abstract)["params"]


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, what: str) -> None:
    """ValueError naming the dimension, the mesh axes and the nearest workable size."""
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in names)
        if dim % size:
            divisors = [d for d in range(1, dim + 1) if dim % d == 0]
            nearest = min(divisors, key=lambda d: (abs(d - size), -d))
            raise ValueError(
                f"{what}: dimension {dim} is sharded over mesh axes {names} of total size {size}, "
                f"which does not divide it (rule in LOGICAL_AXIS_RULES); nearest workable size: "
                f"{nearest}")


def param_shardings(config: Jais2Config, mesh: Mesh, scan_layers: bool = True, rules=LOGICAL_AXIS_RULES):
    """NamedSharding of every parameter (same tree as the params), checked for divisibility."""
    from jais2_jax.model import Jais2ForCausalLM
    model = Jais2ForCausalLM(config, scan_layers=scan_layers)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    logical = nn.get_partition_spec(abstract)["params"]
    shapes = nn.meta.unbox(abstract)["params"]

    def to_sharding(path, spec, leaf):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
        check_divisible(leaf.shape, mesh_spec, mesh, "parameter " + jax.tree_util.keystr(path))
        return NamedSharding(mesh, mesh_spec)

    return jax.tree_util.tree_map_with_path(
        to_sharding, logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules=LOGICAL_AXIS_RULES):
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical_axes), rules))

