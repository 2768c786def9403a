"""LayerNorm over the last axis: XLA, or one Pallas (Triton) kernel each way on GPU.

XLA runs a LayerNorm as several kernels (the mean, the variance, the normalisation; more in the
backward pass), each a pass over the activations. The Pallas kernels read each row once:

- forward: x [N, D] -> y (x's dtype or `dtype`), mean and 1/std [N] float32; 2 rows a program.
- backward: x, dy, mean, 1/std -> dx, plus d scale / d bias summed over the rows of each program
  (64 rows, one at a time, so the partial sums are 1/64 of x's size), then over programs by XLA.

Both compute in float32 with the two-pass variance of `model.LayerNorm` (mean, then mean of
squared deviations). The Pallas kernels take widths that are powers of two; `impl` as in
`pallas_gpu.py` (None: Pallas on GPU; on a mesh each device normalises its own rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jais2_jax.kernels import pallas_gpu

Array = jax.Array
# rows a program (forward, backward), rows a step of the backward's loop, warps a program
# (the fastest of a sweep on an H100 at 32768 x 2048 bf16: `benchmarks/probe_layernorm.py --sweep`)
_FWD_ROWS, _BWD_ROWS, _BWD_SUB, _FWD_WARPS, _BWD_WARPS = 2, 64, 1, 4, 4


def layer_norm(x: Array, scale: Array, bias: Array, *, eps: float, dtype=None,
               impl: str | None = None) -> Array:
    """torch.nn.LayerNorm(x) * scale + bias over the last axis, statistics in float32, the result
    in `dtype` (default x's)."""
    pallas_gpu.check(impl, "layer norm")
    dtype = jnp.dtype(dtype or x.dtype)
    whole_rows = pallas_gpu.local_width(_spec(x), x.shape[-1]) == x.shape[-1]
    if pallas_gpu.resolve(impl, _pow2(x.shape[-1]) and whole_rows) == "xla":
        return _xla(x, scale, bias, eps, dtype)
    if not _pow2(x.shape[-1]):
        raise ValueError(f"the Pallas layer norm wants a power-of-two width, got {x.shape[-1]}")
    if not whole_rows:
        raise ValueError("the Pallas layer norm wants whole rows on each device; the mesh rules "
                         f"split the normalised dimension ({_spec(x)[-1]!r})")
    return _pallas(x, scale, bias, float(eps), dtype)


def _spec(x):
    """x's split over the mesh in context (None: one device)."""
    return pallas_gpu.activation_spec(x.shape, "embed")


def _xla(x, scale, bias, eps, dtype):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)



def _pow2(n: int) -> bool:
    return n & (n - 1) == 0


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    return min(n & -n, cap)


# ------------------------------------------------------------------------------------ the kernels
def _fwd_kernel(x_ref, g_ref, b_ref, y_ref, mean_ref, rstd_ref, *, eps):
    x = x_ref[...].astype(jnp.float32)  # [R, D]
    mean = jnp.mean(x, axis=1)
    xc = x - mean[:, None]
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=1) + eps)
    y = xc * rstd[:, None] * g_ref[...].astype(jnp.float32)[None, :]
    y_ref[...] = (y + b_ref[...].astype(jnp.float32)[None, :]).astype(y_ref.dtype)
    mean_ref[...] = mean
    rstd_ref[...] = rstd


def _bwd_kernel(x_ref, g_ref, mean_ref, rstd_ref, dy_ref, dx_ref, dg_ref, db_ref, *, sub):
    from jax.experimental import pallas as pl
    g = g_ref[...].astype(jnp.float32)
    d = g.shape[0]

    def step(j, acc):
        dg, db = acc
        rows = pl.ds(j * sub, sub)
        x = x_ref[rows, :].astype(jnp.float32)  # [sub, D]
        dy = dy_ref[rows, :].astype(jnp.float32)
        xhat = (x - mean_ref[rows][:, None]) * rstd_ref[rows][:, None]
        dyg = dy * g[None, :]
        c1 = jnp.mean(xhat * dyg, axis=1)
        c2 = jnp.mean(dyg, axis=1)
        dx = (dyg - c2[:, None] - xhat * c1[:, None]) * rstd_ref[rows][:, None]
        dx_ref[rows, :] = dx.astype(dx_ref.dtype)
        return dg + jnp.sum(dy * xhat, axis=0), db + jnp.sum(dy, axis=0)

    zero = jnp.zeros((d,), jnp.float32)
    dg, db = jax.lax.fori_loop(0, x_ref.shape[0] // sub, step, (zero, zero))
    dg_ref[...] = dg[None, :]
    db_ref[...] = db[None, :]


def _forward(x, scale, bias, eps, dtype):
    from jax.experimental import pallas as pl
    n, d = x.shape
    r = _pow2_divisor(n, _FWD_ROWS)
    rows = pl.BlockSpec((r, d), lambda i: (i, 0))
    vec = pl.BlockSpec((d,), lambda i: (0,))
    stat = pl.BlockSpec((r,), lambda i: (i,))
    return pallas_gpu.call(
        functools.partial(_fwd_kernel, eps=eps), grid=(n // r,), in_specs=[rows, vec, vec],
        out_specs=[rows, stat, stat],
        out_shape=[jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((n,), jnp.float32),
                   jax.ShapeDtypeStruct((n,), jnp.float32)], warps=_FWD_WARPS)(x, scale, bias)


def _backward(x, scale, mean, rstd, dy):
    from jax.experimental import pallas as pl
    n, d = x.shape
    r = _pow2_divisor(n, _BWD_ROWS)
    sub = min(r, _BWD_SUB)
    p = n // r
    rows = pl.BlockSpec((r, d), lambda i: (i, 0))
    stat = pl.BlockSpec((r,), lambda i: (i,))
    part = pl.BlockSpec((1, d), lambda i: (i, 0))
    dx, dg, db = pallas_gpu.call(
        functools.partial(_bwd_kernel, sub=sub), grid=(p,),
        in_specs=[rows, pl.BlockSpec((d,), lambda i: (0,)), stat, stat, rows],
        out_specs=[rows, part, part],
        out_shape=[jax.ShapeDtypeStruct((n, d), x.dtype), jax.ShapeDtypeStruct((p, d), jnp.float32),
                   jax.ShapeDtypeStruct((p, d), jnp.float32)], warps=_BWD_WARPS)(
        x, scale, mean, rstd, dy)
    return dx, jnp.sum(dg, axis=0), jnp.sum(db, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pallas(x, scale, bias, eps, dtype):
    return _pallas_fwd(x, scale, bias, eps, dtype)[0]


def _pallas_fwd(x, scale, bias, eps, dtype):
    """Each device normalises its own rows (x [..., D])."""
    def local(x, scale, bias):
        y, mean, rstd = _forward(x.reshape(-1, x.shape[-1]), scale, bias, eps, dtype)
        return y.reshape(x.shape), mean.reshape(x.shape[:-1]), rstd.reshape(x.shape[:-1])

    spec = _spec(x)
    rows = pallas_gpu.rows_spec(spec)
    y, mean, rstd = pallas_gpu.per_shard(local, spec, (spec, P(), P()), (spec, rows, rows))(
        x, scale, bias)
    return y, (x, scale, bias, mean, rstd)


def _pallas_bwd(eps, dtype, res, dy):
    x, scale, bias, mean, rstd = res

    def local(x, scale, mean, rstd, dy):
        d = x.shape[-1]
        dx, dg, db = _backward(x.reshape(-1, d), scale, mean.reshape(-1), rstd.reshape(-1),
                               dy.reshape(-1, d))
        return dx.reshape(x.shape), dg[None], db[None]  # this device's partial sums

    spec = _spec(x)
    rows, part = pallas_gpu.rows_spec(spec), pallas_gpu.partial_spec(spec)
    dx, dg, db = pallas_gpu.per_shard(local, spec, (spec, P(), rows, rows, spec),
                                      (spec, part, part))(x, scale, mean, rstd, dy)
    return dx, jnp.sum(dg, axis=0).astype(scale.dtype), jnp.sum(db, axis=0).astype(bias.dtype)


_pallas.defvjp(_pallas_fwd, _pallas_bwd)
