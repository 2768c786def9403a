"""One decode-step projection as one kernel: y = act(norm(x) W + b) (+ residual).

Decoding a few rows at a time, a projection reads its weight once and does almost no arithmetic,
so its time is the weight read; XLA adds a kernel for each LayerNorm pass, the bias + activation and
the residual add around the GEMV, each a microsecond or two of latency at batch 1 (14 of them a
layer on the 8B shape, `benchmarks/RESULTS.md`). This Pallas (Triton) kernel does the whole
projection in one program per block of output columns:

- prologue: the LayerNorm of the input rows (statistics of the whole row, float32, two-pass, as
  `layernorm.py`), applied to each chunk of x as it is multiplied, rounded to x's dtype as the
  model rounds the LayerNorm's output;
- the product, accumulated in float32 (one row: broadcast multiply and a final sum; 16 or more
  rows: `pl.dot`), rounded to x's dtype as the GEMM's output;
- epilogue: + bias, relu^2, + residual, each rounded to x's dtype as the model's XLA path rounds.

With `split_k` > 1 each program multiplies a part of K and writes float32 partial sums; XLA adds
them up with the epilogue in one fusion (for projections with few output columns, so that enough
programs stream the weight).

x [M, K] with M <= 128 (rows padded to 16 when 1 < M < 16), w [K, N]; off GPU the kernel runs in
Pallas' interpreter (the tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jais2_jax import pallas_gpu

Array = jax.Array
MAX_ROWS = 128
ACTS = (None, "relu2")


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_n: int = 64  # output columns a program
    block_k: int = 128  # K a loop step
    unroll: int = 2  # K steps a loop iteration (unrolled)
    split_k: int = 1  # programs along K
    warps: int = 4
    stages: int = 1


def default_tiles(m: int, k: int, n: int) -> Tiles:
    """Tiles for an [m, k] x [k, n] projection (from `benchmarks/probe_decode_linear.py`)."""
    block_n = _divisor(n, 64)
    split = 1
    while n // block_n * split < 128 and _divisor(k // split, 128) >= 64 and split < 8:
        split *= 2
    block_k = _divisor(k // split, 128)
    unroll = 2 if (k // split // block_k) % 2 == 0 else 1
    return Tiles(block_n=block_n, block_k=block_k, unroll=unroll, split_k=split, warps=4,
                 stages=1 if m == 1 else 3)


def _divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    return min(n & -n, cap)


def fits(x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> bool:
    """The kernel takes this projection: few rows, K and N with power-of-two blocks of >= 16."""
    m, k = x_shape
    return m <= MAX_ROWS and _divisor(k, 128) >= 16 and _divisor(w_shape[1], 64) >= 16


def fused_linear(x: Array, w: Array, bias: Array | None = None, *, norm=None,
                 act: str | None = None, residual: Array | None = None,
                 tiles: Tiles | None = None) -> Array:
    """act(LayerNorm(x) @ w + bias) + residual in x's dtype; x [M, K], w [K, N] (x's dtype),
    bias [N], residual [M, N]; norm: (scale [K], shift [K], eps) or None."""
    if act not in ACTS:
        raise ValueError(f"fused_linear act {act!r}: choose one of {ACTS}")
    m, k = x.shape
    if w.shape[0] != k:
        raise ValueError(f"fused_linear: x {x.shape} and w {w.shape} do not contract")
    if not fits(x.shape, w.shape):
        raise ValueError(f"fused_linear takes at most {MAX_ROWS} rows and K, N with power-of-two "
                         f"blocks of at least 16; got x {x.shape}, w {w.shape}")
    n = w.shape[1]
    t = tiles or default_tiles(m, k, n)
    mp = 1 if m == 1 else max(16, 1 << (m - 1).bit_length())
    if mp != m:
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
        residual = None if residual is None else jnp.pad(residual, ((0, mp - m), (0, 0)))
    w = w.astype(x.dtype)
    split = t.split_k
    fused_epilogue = split == 1
    args = [x, w]
    names = ["x", "w"]
    if bias is not None and fused_epilogue:
        args.append(bias), names.append("bias")
    eps = None
    if norm is not None:
        scale, shift, eps = norm
        args += [scale, shift]
        names += ["scale", "shift"]
    if residual is not None and fused_epilogue:
        args.append(residual), names.append("residual")
    y = _call(tuple(names), mp, k, n, x.dtype, t, None if eps is None else float(eps),
              act if fused_epilogue else None)(*args)
    if not fused_epilogue:  # float32 partial sums [split, mp, n]: the epilogue in XLA
        y = _epilogue(jnp.sum(y, axis=0), bias, act, residual, x.dtype)
    return y[:m] if mp != m else y


def _round(v, dtype):
    return v.astype(dtype).astype(jnp.float32)


def _epilogue(acc, bias, act, residual, dtype):
    """The model's XLA path's roundings after a float32 product: GEMM output, + bias, relu^2,
    + residual, each in `dtype`."""
    y = _round(acc, dtype)
    if bias is not None:
        y = _round(y + bias.astype(jnp.float32), dtype)
    if act == "relu2":
        y = _round(jnp.square(jnp.maximum(y, 0.0)), dtype)
    if residual is not None:
        y = residual.astype(jnp.float32) + y
    return y.astype(dtype)


@functools.lru_cache(maxsize=None)
def _call(names, mp, k, n, dtype, t: Tiles, eps, act):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
    kc = k // t.split_k
    if kc % (t.block_k * t.unroll) or n % t.block_n:
        raise ValueError(f"tiles {t} do not divide K {k} / N {n}")
    whole = lambda shape: pl.BlockSpec(shape, lambda j, s: (0,) * len(shape))
    rows = (k,) if mp == 1 else (mp, k)
    specs = {"x": whole(rows),
             "w": pl.BlockSpec((kc, t.block_n), lambda j, s: (s, j)),
             "bias": pl.BlockSpec((t.block_n,), lambda j, s: (j,)),
             "scale": whole((k,)), "shift": whole((k,)),
             "residual": (pl.BlockSpec((t.block_n,), lambda j, s: (j,)) if mp == 1 else
                          pl.BlockSpec((mp, t.block_n), lambda j, s: (0, j)))}
    if t.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((n,) if mp == 1 else (mp, n), dtype)
        out_spec = specs["residual"]
    else:
        out_shape = jax.ShapeDtypeStruct((t.split_k, mp, n), jnp.float32)
        out_spec = pl.BlockSpec((1, mp, t.block_n), lambda j, s: (s, 0, j))
    kernel = functools.partial(_kernel, names=names, mp=mp, k=k, kc=kc, t=t, eps=eps, act=act,
                               dtype=dtype)
    call = pl.pallas_call(kernel, grid=(n // t.block_n, t.split_k),
                          in_specs=[specs[name] for name in names], out_specs=out_spec,
                          out_shape=out_shape, interpret=jax.default_backend() != "gpu",
                          compiler_params=plt.CompilerParams(num_warps=t.warps,
                                                             num_stages=t.stages))
    if mp == 1:  # the one-row kernel works on vectors
        def one_row(x, *rest):
            res = call(x.reshape(k), *[r.reshape(-1) if name == "residual" else r
                                       for name, r in zip(names[1:], rest)])
            return res.reshape(1, n) if t.split_k == 1 else res
        return one_row
    return call


def _kernel(*refs, names, mp, k, kc, t: Tiles, eps, act, dtype):
    from jax.experimental import pallas as pl
    ref = dict(zip(names, refs))
    out_ref = refs[-1]
    x_ref = ref["x"]
    s = pl.program_id(1)
    f32 = jnp.float32

    def x_chunk(start, size):  # [size] or [mp, size] float32
        return (x_ref[pl.ds(start, size)] if mp == 1 else x_ref[:, pl.ds(start, size)]).astype(f32)

    def row_stat(v):  # sum over the last axis, kept as [1] / [mp, 1] for broadcasting
        return jnp.sum(v, axis=-1, keepdims=True)

    if eps is not None:
        # the whole row's statistics, two-pass, from static chunks (independent loads)
        cs = _divisor(k, 512)
        chunks = range(k // cs)
        mean = sum(row_stat(x_chunk(i * cs, cs)) for i in chunks) / k
        var = sum(row_stat(jnp.square(x_chunk(i * cs, cs) - mean)) for i in chunks) / k
        rstd = jax.lax.rsqrt(var + eps)

    def lhs(start):  # the (normalised) x chunk at absolute K offset `start`, in x's dtype
        v = x_chunk(start, t.block_k)
        if eps is not None:
            cols = pl.ds(start, t.block_k)
            v = (v - mean) * rstd * ref["scale"][cols].astype(f32) + ref["shift"][cols].astype(f32)
        return v.astype(dtype)

    def step(i, acc):  # K chunk i of this program's part
        w = ref["w"][pl.ds(i * t.block_k, t.block_k), :]
        xs = lhs(s * kc + i * t.block_k)
        if mp == 1:
            return acc + xs.astype(f32)[:, None] * w.astype(f32)
        return acc + pl.dot(xs, w.astype(dtype))

    def body(j, acc):
        for u in range(t.unroll):
            acc = step(j * t.unroll + u, acc)
        return acc

    shape = (t.block_k, t.block_n) if mp == 1 else (mp, t.block_n)
    acc = jax.lax.fori_loop(0, kc // t.block_k // t.unroll, body, jnp.zeros(shape, f32))
    if mp == 1:
        acc = jnp.sum(acc, axis=0)
    if t.split_k > 1:
        out_ref[...] = acc.reshape(out_ref.shape)
        return
    bias = ref["bias"][...] if "bias" in ref else None
    if bias is not None and mp > 1:
        bias = bias[None, :]
    residual = ref["residual"][...] if "residual" in ref else None
    out_ref[...] = _epilogue(acc, bias, act, residual, dtype)
