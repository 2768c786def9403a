"""Probe: the MLP's bias + relu^2 backward (dy and db in one pass), Pallas against XLA, on the GPU.

out, g [rows, width] bf16 (default the 2B step's up_proj: 16 x 2048 rows, 16384 wide): both agree,
each side's median time, and the floor at the measured copy bandwidth (read out and g, write dy).

  python benchmarks/probe_bias_relu2.py [--sweep]
"""

import argparse

from probe_common import BW, bench

import jax
import jax.numpy as jnp

from jais2_jax.kernels import bias_relu2 as mod


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--sweep", action="store_true")
    a = p.parse_args()
    k = jax.random.split(jax.random.key(0), 3)
    y = jax.random.normal(k[0], (a.rows, a.width), jnp.bfloat16)
    b = 0.1 * jax.random.normal(k[1], (a.width,))
    g = jax.random.normal(k[2], (a.rows, a.width), jnp.bfloat16)
    out = mod._forward(y, b)

    def backward(impl):  # the custom_vjp's backward rule alone, from the saved output
        return jax.jit(lambda out, g: mod._bwd(impl, (out, b), g))
    floor = 3 * out.size * 2 / BW * 1e6
    res = {}
    for impl in ("xla", "pallas"):
        f = backward(impl)
        res[impl] = f(out, g)
        print(f"{impl:>7}: {bench(f, out, g) * 1e6:8.1f} us (floor {floor:.1f} us)", flush=True)
    (dy0, db0), (dy1, db1) = res["xla"], res["pallas"]
    print(f"pallas vs xla: dy equal {bool(jnp.all(dy0 == dy1))}, "
          f"db max rel diff {float(jnp.max(jnp.abs(db1 - db0)) / jnp.max(jnp.abs(db0))):.2e}")
    if a.sweep:
        shipped = (mod._ROWS, mod._SUB, mod._COLS, mod._WARPS)
        for rows in (16, 32, 64, 128):
            for sub in (1, 2):
                for cols in (512, 1024, 2048):
                    for warps in (4, 8):
                        mod._ROWS, mod._SUB, mod._COLS, mod._WARPS = rows, sub, cols, warps
                        t = bench(backward("pallas"), out, g, reps=10)
                        print(f"rows {rows:>3} sub {sub} cols {cols:>4} warps {warps}: "
                              f"{t * 1e6:8.1f} us", flush=True)
        mod._ROWS, mod._SUB, mod._COLS, mod._WARPS = shipped


if __name__ == "__main__":
    print(jax.devices()[0].device_kind, jax.__version__)
    main()
