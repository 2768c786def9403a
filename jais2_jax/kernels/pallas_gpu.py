"""What the GPU kernels (layernorm.py, logsumexp.py, bias_relu2.py) share: the choice between XLA
and Pallas, one `pallas_call` with Triton settings, and running a kernel on each device's block of
a sharded array.

`impl=None` picks Pallas on a GPU backend where the kernel takes the shape (each device's block of
it), XLA otherwise; `impl="pallas"` off GPU runs the kernel in Pallas' interpreter (the tests).
XLA does not partition a Pallas call, so under a mesh of several devices (`sharding.use_mesh`) the
kernels run inside `jax.shard_map`, each on its device's rows: the activations' logical axis names
under the rules in context say how they are split, and per-device partial sums (LayerNorm's scale
and bias gradients, the MLP bias's) come back as a [devices, ...] array that XLA sums.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec

IMPLS = (None, "xla", "pallas")


def check(impl: str | None, what: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{what} impl {impl!r}: choose one of {IMPLS}")


def resolve(impl: str | None, fits: bool) -> str:
    """"xla" or "pallas" for `impl` (checked); `fits`: the kernel takes this shape."""
    if impl is not None:
        return impl
    return "pallas" if fits and jax.default_backend() == "gpu" else "xla"


def call(kernel, *, grid, in_specs, out_specs, out_shape, warps: int):
    """pl.pallas_call through Triton with `warps` warps a program; interpreted off GPU."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=jax.default_backend() != "gpu",
                          compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1))


# ------------------------------------------------------------------------ one device's block
def activation_spec(shape: tuple[int, ...], last: str) -> PartitionSpec | None:
    """How the mesh in context splits an activation [batch, (length, ...,) last] under the logical
    axis rules in context (a dimension its mesh axes do not divide, e.g. the batch of 1 that
    initialises a model, whole on each device); None without a mesh of several devices."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    ndim = len(shape)
    names = ("batch",) + ("length",) * (ndim > 2) + (None,) * max(ndim - 3, 0) + (last,)
    spec = nn.logical_to_mesh_axes(names)
    return PartitionSpec(*(entry if n % math.prod(mesh.shape[a] for a in _axes(entry)) == 0
                           else None for n, entry in zip(shape, spec)))


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def local_width(spec: PartitionSpec | None, width: int) -> int:
    """The last dimension's size on each device."""
    if spec is None:
        return width
    mesh = jax.sharding.get_abstract_mesh()
    return width // math.prod(mesh.shape[a] for a in _axes(spec[-1]))


def rows_spec(spec: PartitionSpec | None) -> PartitionSpec | None:
    """Spec of per-row results (statistics) of an array split as `spec`."""
    return None if spec is None else PartitionSpec(*spec[:-1])


def partial_spec(spec: PartitionSpec | None) -> PartitionSpec | None:
    """Spec of per-device partial sums [devices, last] of an array split as `spec`: the first
    dimension over every mesh axis that splits the array's leading dimensions."""
    if spec is None:
        return None
    rows = tuple(a for entry in spec[:-1] for a in _axes(entry))
    return PartitionSpec(rows or None, spec[-1])


def per_shard(local, spec: PartitionSpec | None, in_specs, out_specs):
    """`local` on each device's blocks (jax.shard_map over the mesh in context with these specs),
    or `local` itself where `spec` (the activation's) is None: one device."""
    if spec is None:
        return local
    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs,
                         out_specs=out_specs, check_vma=False)
