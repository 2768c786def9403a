"""Probe: the Pallas LayerNorm kernels against XLA's LayerNorm on the GPU, the 2B training shape.

Checks that both agree, then times forward and forward + backward for x [rows, width] bf16:
each side's median over repeated calls, and the bytes floor at the measured copy bandwidth
(forward reads x and writes y; the backward reads x and dy and writes dx).

  python benchmarks/probe_layernorm.py [--rows 32768 --width 2048]
"""

import argparse

from probe_common import BW, bench

import jax
import jax.numpy as jnp

from jais2_jax.kernels.layernorm import layer_norm


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--sweep", action="store_true", help="also time the kernels' block settings")
    a = p.parse_args()
    k = jax.random.split(jax.random.key(0), 4)
    x = (2 * jax.random.normal(k[0], (a.rows, a.width)) + 0.5).astype(jnp.bfloat16)
    g, b = 1 + 0.1 * jax.random.normal(k[1], (a.width,)), 0.1 * jax.random.normal(k[2], (a.width,))
    dy = jax.random.normal(k[3], x.shape).astype(jnp.bfloat16)
    out = {}
    for impl in ("xla", "pallas"):
        fwd = jax.jit(lambda x, g, b, impl=impl: layer_norm(x, g, b, eps=1e-5, impl=impl))
        both = jax.jit(lambda x, g, b, dy, impl=impl: jax.vjp(
            lambda x, g, b: layer_norm(x, g, b, eps=1e-5, impl=impl), x, g, b)[1](dy))
        out[impl] = (fwd(x, g, b), both(x, g, b, dy))
        tf, tb = bench(fwd, x, g, b), bench(both, x, g, b, dy)
        n = x.size * 2
        print(f"{impl:>7}: forward {tf * 1e6:8.1f} us (floor {2 * n / BW * 1e6:.1f}), "
              f"forward+backward {tb * 1e6:8.1f} us (floor {5 * n / BW * 1e6:.1f})", flush=True)
    (y0, g0), (y1, g1) = out["xla"], out["pallas"]
    if a.sweep:
        sweep(x, g, b, dy)

    def rel(u, v):
        u, v = u.astype(jnp.float32), v.astype(jnp.float32)
        return float(jnp.linalg.norm(u - v) / jnp.linalg.norm(v))
    print(f"pallas vs xla: y {rel(y1, y0):.2e}, dx {rel(g1[0], g0[0]):.2e}, "
          f"dscale {rel(g1[1], g0[1]):.2e}, dbias {rel(g1[2], g0[2]):.2e}")


def sweep(x, g, b, dy):
    """Forward: rows and warps a program; backward: rows a program, rows a step, warps."""
    from jais2_jax.kernels import layernorm as ln
    n = x.size * 2
    shipped = (ln._FWD_ROWS, ln._BWD_ROWS, ln._BWD_SUB, ln._FWD_WARPS, ln._BWD_WARPS)
    for rows in (1, 2, 4, 8, 16):
        for warps in (1, 2, 4, 8):
            ln._FWD_ROWS, ln._FWD_WARPS = rows, warps
            f = jax.jit(lambda x, g, b: layer_norm(x, g, b, eps=1e-5, impl="pallas"))
            t = bench(f, x, g, b, reps=20)
            print(f"fwd rows {rows:>2} warps {warps}: {t * 1e6:7.1f} us ({2 * n / t / 1e12:.2f} TB/s)",
                  flush=True)
    ln._FWD_ROWS, _, _, ln._FWD_WARPS, _ = shipped
    for rows in (16, 32, 64, 128):
        for sub in (1, 2, 4, 8):
            for warps in (2, 4, 8):
                if sub > rows:
                    continue
                ln._BWD_ROWS, ln._BWD_SUB, ln._BWD_WARPS = rows, sub, warps
                f = jax.jit(lambda x, g, b, dy: jax.vjp(
                    lambda x, g, b: layer_norm(x, g, b, eps=1e-5, impl="pallas"), x, g, b)[1](dy))
                t = bench(f, x, g, b, dy, reps=20)
                print(f"fwd+bwd rows {rows:>3} sub {sub} warps {warps}: {t * 1e6:7.1f} us", flush=True)
    ln._FWD_ROWS, ln._BWD_ROWS, ln._BWD_SUB, ln._FWD_WARPS, ln._BWD_WARPS = shipped


if __name__ == "__main__":
    print(jax.devices()[0].device_kind, jax.__version__)
    main()
