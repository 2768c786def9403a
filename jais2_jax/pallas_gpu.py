"""What the GPU kernels (layernorm.py, logsumexp.py, bias_relu2.py) share: the choice between XLA
and Pallas, and one `pallas_call` with Triton settings.

`impl=None` picks Pallas on a GPU backend when the step is traced on one device (a Pallas call is
not partitioned by XLA; see `sharding.on_one_device`) and the kernel takes the shape, XLA
otherwise; `impl="pallas"` off GPU runs the kernel in Pallas' interpreter (the tests).
"""

from __future__ import annotations

import jax

IMPLS = (None, "xla", "pallas")


def check(impl: str | None, what: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{what} impl {impl!r}: choose one of {IMPLS}")


def resolve(impl: str | None, fits: bool) -> str:
    """"xla" or "pallas" for `impl` (checked); `fits`: the kernel takes this shape."""
    if impl is not None:
        return impl
    from jais2_jax.sharding import on_one_device
    return "pallas" if fits and jax.default_backend() == "gpu" and on_one_device() else "xla"


def call(kernel, *, grid, in_specs, out_specs, out_shape, warps: int):
    """pl.pallas_call through Triton with `warps` warps a program; interpreted off GPU."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=jax.default_backend() != "gpu",
                          compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1))
