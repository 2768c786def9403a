"""Probe: the one-pass Pallas logsumexp against XLA's two passes, the loss's chunk on the GPU.

x [rows, vocab] (default one loss chunk of the 2B benchmark: 16 x 512 rows, vocab 150272), bf16 or
float32: both agree, each side's median time, and the read floor at the measured copy bandwidth.

  python benchmarks/probe_logsumexp.py [--dtype bfloat16] [--sweep]
"""

import argparse

from probe_common import BW, bench

import jax
import jax.numpy as jnp

from jais2_jax.kernels import logsumexp as lse_mod


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=150272)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--sweep", action="store_true")
    a = p.parse_args()
    x = (4 * jax.random.normal(jax.random.key(0), (a.rows, a.vocab))).astype(a.dtype)
    floor = x.size * x.dtype.itemsize / BW * 1e6
    res = {}
    for impl in ("xla", "pallas"):
        f = jax.jit(lambda x, impl=impl: lse_mod.logsumexp(x, impl=impl))
        res[impl] = f(x)
        print(f"{impl:>7}: {bench(f, x) * 1e6:8.1f} us (one read: {floor:.1f} us)", flush=True)
    err = float(jnp.max(jnp.abs(res["pallas"] - res["xla"]) / jnp.abs(res["xla"])))
    print(f"pallas vs xla: max rel diff {err:.2e}")
    if a.sweep:
        shipped = (lse_mod._ROWS, lse_mod._MAX_BLOCK, lse_mod._WARPS)
        for rows in (4, 8, 16, 32, 64):  # (the block is the vocabulary's: 256 for 150272)
            for warps in (2, 4, 8):
                lse_mod._ROWS, lse_mod._WARPS = rows, warps
                f = jax.jit(lambda x: lse_mod.logsumexp(x, impl="pallas"))  # traced anew
                print(f"rows {rows:>2} warps {warps}: {bench(f, x, reps=10) * 1e6:8.1f} us",
                      flush=True)
        lse_mod._ROWS, lse_mod._MAX_BLOCK, lse_mod._WARPS = shipped


if __name__ == "__main__":
    print(jax.devices()[0].device_kind, jax.__version__)
    main()
