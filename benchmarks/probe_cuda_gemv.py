"""Probe (not wired in): one-row decode projections as one CUDA kernel each (XLA FFI).

Triton through Pallas did not stream the weights at cuBLAS's rate (`probe_decode_linear.py`,
`probe_gemv_nk.py`), so this tries the same fusion hand-written: `cuda/decode_proj.cu` does the
LayerNorm prologue, the GEMV and the bias / relu^2 / residual epilogue in one kernel, registered as
an XLA FFI custom call (command-buffer compatible). Built here with nvcc for sm_90a. The weight is
streamed in a blocked layout (`blocked`) by Hopper's bulk copies. Measured on the H100 (seventh
session, `benchmarks/RESULTS.md`): the kernels together take as long as XLA's four GEMVs plus its
LayerNorm / activation / residual kernels (chain kernel time 5.31-5.32 vs 5.32-5.40 ms, floor 4.73),
and the wall time of the chain is no lower, so it was not wired into the model.

Part 1: each projection (8 weight copies a call), the model's XLA path over [K, N] against the
kernel for each (rows a warp, ring stages, grid, step-major) setting, checked against XLA's result.
Part 2: a 32-layer chain of the four projections, XLA vs the kernels with part 1's best settings
(`--profile DIR`: kernel time of each, from a jax.profiler trace).

  python benchmarks/probe_cuda_gemv.py [--profile /tmp/prof] [--save best.json | --load best.json]"""

import argparse
import ctypes
import json
import os
import subprocess
import tempfile

from probe_common import BW
from probe_decode_common import DT, PROJ, layer_with, make, sweep, time_chains, xla_layer

import jax
import jax.numpy as jnp
import numpy as np

PROFILE = ""
SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda", "decode_proj.cu")
RS = ((2, 3), (2, 4), (2, 6), (4, 3), (4, 4), (4, 6), (8, 2), (8, 3), (8, 4))  # rows a warp, stages
SMS, SMEM, WARPS = 132, 227 * 1024, 8


def settings(k, n, norm):
    """(rows a warp, ring stages, grid): grids that give every block the same number of row
    groups, all blocks resident at once (shared memory and threads permitting), the two largest
    for each (rows, stages)."""
    out = []
    for r, s in RS:
        g = WARPS * r
        smem = s * g * 512 + k * (4 if norm else 2)
        if n % g or smem > SMEM:
            continue
        resident = SMS * min(2048 // (32 * WARPS), SMEM // (smem + 1024))
        groups = n // g
        grids = [d for d in range(1, groups + 1) if groups % d == 0 and d <= resident]
        out += [(r, s, d, o) for d in sorted(grids, reverse=True)[:2] for o in (0, 1)]
    return out


def blocked(w, rows, step_major=0):
    """The model's W [K, N] as the kernel's Wb [N / G, K / 256, G, 256], G = 8 rows (step-major:
    [K / 256, N / G, G, 256])."""
    k, n = w.shape
    g = WARPS * rows
    return w.T.reshape(n // g, g, k // 256, 256).transpose((2, 0, 1, 3) if step_major
                                                          else (0, 2, 1, 3)).copy()


def build() -> None:
    out = os.path.join(tempfile.mkdtemp(), "libdecode_proj.so")
    cmd = ["nvcc", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
           "-gencode=arch=compute_90a,code=sm_90a", f"-I{jax.ffi.include_dir()}",
           "-diag-suppress", "940,2473", "-o", out, SRC]
    subprocess.run(cmd, check=True)
    lib = ctypes.cdll.LoadLibrary(out)
    jax.ffi.register_ffi_target("jais2_decode_proj", jax.ffi.pycapsule(lib.Jais2DecodeProj),
                                platform="CUDA")


def cuda_proj(x, wb, bias, norm=None, act=None, residual=None, setting=(4, 4, 0, 0), eps=1e-5):
    n = wb.shape[1 if setting[3] else 0] * wb.shape[2]
    dummy = jnp.zeros((1,), DT)
    scale, shift = norm if norm is not None else (dummy, dummy)
    call = jax.ffi.ffi_call("jais2_decode_proj", jax.ShapeDtypeStruct((n,), DT))
    return call(x, wb, bias, scale, shift, dummy if residual is None else residual,
                norm=np.int64(norm is not None), relu2=np.int64(act == "relu2"),
                resid=np.int64(residual is not None), rows=np.int64(setting[0]),
                stages=np.int64(setting[1]), grid=np.int64(setting[2]),
                step_major=np.int64(setting[3]), eps=np.float32(eps))


def part1(only):
    best = {}
    print(f"{'proj':>5}{'xla us':>9}{'cuda us':>9}{'floor':>7}  best (rows, stages, grid, "
          f"step-major), rel err; top 8")
    for name in PROJ:
        if only and name not in only:
            continue
        k, n = PROJ[name][:2]
        copies = 8
        x, ws, kw = make(name, copies, 7)
        t_xla, results = sweep(x, ws, kw, settings(k, n, "norm" in kw),
                               lambda x, w, s, **kw: cuda_proj(x, w, setting=s, **kw),
                               prepare=lambda w, s: blocked(w, s[0], s[3]), tag=f"{name} ")
        us, s, err = results[0]
        best[name] = s
        print(f"{name:>5}{t_xla:>9.1f}{us:>9.1f}{2 * k * n / BW * 1e6:>7.1f}  {s}, {err:.1e}; "
              + " ".join(f"{r[1]}:{r[0]:.1f}/{r[2]:.0e}" for r in results[:8]), flush=True)
        del ws
    return best


def part2(best):
    x = jax.random.normal(jax.random.key(5), (PROJ["qkv"][0],)).astype(DT)

    def proj(name, x, w, bias, norm=None, act=None, residual=None):
        return cuda_proj(x, w, bias, norm=norm, act=act, residual=residual, setting=best[name])

    def prepare(p):
        return {a: (blocked(v, best[a][0], best[a][3]) if a in PROJ else v) for a, v in p.items()}
    time_chains(x, {"xla": (xla_layer, lambda p: p), "cuda": (layer_with(proj), prepare)},
                profile=PROFILE)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--no-chain", action="store_true")
    ap.add_argument("--profile", default="", help="trace the chains into this folder")
    ap.add_argument("--save", default="", help="write part 1's best settings to this JSON file")
    ap.add_argument("--load", default="", help="skip part 1: the best settings from this file")
    a = ap.parse_args()
    PROFILE = a.profile
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    build()
    if a.load:
        with open(a.load) as fh:
            best = {name: tuple(s) for name, s in json.load(fh).items()}
    else:
        best = part1(a.only.split(",") if a.only else ())
    if a.save:
        with open(a.save, "w") as fh:
            json.dump(best, fh)
    if not a.no_chain and len(best) == len(PROJ):
        part2(best)
