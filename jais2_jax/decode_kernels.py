"""Batch-1 decode projections as one CUDA kernel each (experimental, Hopper GPUs).

A decode layer at batch 1 is four weight reads (q/k/v, o, up, down) and, in XLA, about a dozen
small kernels between them (LayerNorm passes, bias + relu^2, residual adds). `cuda/decode_proj.cu`
does a projection's LayerNorm prologue, GEMV and bias / relu^2 / residual epilogue in one kernel,
streaming the weight with Hopper's bulk copies from a blocked layout; it is called through XLA's
FFI. `prepare_decode_params` adds the blocked copies (`kernel_blocked`) beside the ordinary
weights, which prefill and every other shape keep using; `Jais2ForCausalLM(decode_kernels=True)`
then runs batch-1 decode steps through `fused_proj`.

The kernel is built with nvcc on first use (cached under ~/.cache/jais2_jax). Off a Hopper GPU, or
for a dtype other than bfloat16, `fused_proj` computes the same function with XLA (the model's own
ops and roundings), which is what the CPU tests exercise.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda", "decode_proj.cu")
TARGET = "jais2_decode_proj"
WARPS, STEP = 8, 256  # the kernel's warps a block and K a step
# (rows a warp, ring stages) per projection: the best of `benchmarks/probe_cuda_gemv.py` on the H100
SETTINGS = {"qkv": (4, 6), "o": (2, 3), "up": (2, 6), "down": (4, 6)}
SMS, SMEM = 132, 227 * 1024


def blocked(w: Array, rows: int) -> Array:
    """W [K, N] as the kernel's step-major blocked layout [K / 256, N / G, G, 256], G = 8 rows."""
    k, n = w.shape
    g = WARPS * rows
    if k % STEP or n % g:
        raise ValueError(f"a [{k}, {n}] weight does not block into {STEP} x {g} tiles")
    return w.T.reshape(n // g, g, k // STEP, STEP).transpose(2, 0, 1, 3)


def unblocked(wb: Array) -> Array:
    """The inverse of `blocked`: [K / 256, N / G, G, 256] -> W [K, N]."""
    s, groups, g, step = wb.shape
    return wb.transpose(0, 3, 1, 2).reshape(s * step, groups * g)


def fits(k: int, n: int, rows: int) -> bool:
    return k % STEP == 0 and n % (WARPS * rows) == 0


def _grid(k: int, n: int, rows: int, stages: int, norm: bool) -> int:
    """The largest grid that gives every block the same number of row groups with every block
    resident at once (shared memory and threads permitting)."""
    g = WARPS * rows
    smem = stages * g * 512 + k * (4 if norm else 2)
    resident = SMS * min(2048 // (32 * WARPS), SMEM // (smem + 1024))
    groups = n // g
    return max(d for d in range(1, min(groups, resident) + 1) if groups % d == 0)


@functools.cache
def _built() -> bool:
    """Build (once, cached on disk) and register the kernel; False where it cannot run here."""
    if jax.default_backend() != "gpu" or shutil.which("nvcc") is None:
        return False
    if not str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9"):
        return False
    with open(SOURCE, "rb") as f:
        tag = hashlib.sha256(f.read() + jax.__version__.encode()).hexdigest()[:16]
    cache = os.path.join(os.path.expanduser("~"), ".cache", "jais2_jax")
    lib = os.path.join(cache, f"decode_proj-{tag}.so")
    if not os.path.exists(lib):
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            subprocess.run(["nvcc", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
                            "-gencode=arch=compute_90a,code=sm_90a", f"-I{jax.ffi.include_dir()}",
                            "-diag-suppress", "940,2473", "-o", tmp, SOURCE],
                           check=True, capture_output=True)
            os.replace(tmp, lib)  # complete or absent
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    handler = ctypes.cdll.LoadLibrary(lib).Jais2DecodeProj
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="CUDA")
    return True


def fused_proj(name: str, x: Array, wb: Array, bias: Array, *, norm=None, eps: float = 1e-5,
               act: str | None = None, residual: Array | None = None) -> Array:
    """act(LayerNorm(x) W + bias) + residual for one row, in x's dtype, with the model's roundings.

    x [K]; wb: `blocked(W, SETTINGS[name][0])`; bias, residual [N]; norm: (scale, shift) [K] or
    None; act: None or "relu2"."""
    rows, stages = SETTINGS[name]
    k, n = wb.shape[0] * STEP, wb.shape[1] * wb.shape[2]
    if x.dtype == jnp.bfloat16 and _built():
        zero = jnp.zeros((1,), jnp.bfloat16)
        scale, shift = (zero, zero) if norm is None else norm
        call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((n,), jnp.bfloat16))
        as_bf16 = lambda a: a.astype(jnp.bfloat16)
        return call(x, wb.astype(jnp.bfloat16), as_bf16(bias), as_bf16(scale), as_bf16(shift),
                    zero if residual is None else residual,
                    norm=np.int64(norm is not None), relu2=np.int64(act == "relu2"),
                    resid=np.int64(residual is not None), rows=np.int64(rows),
                    stages=np.int64(stages), grid=np.int64(_grid(k, n, rows, stages, norm is not None)),
                    step_major=np.int64(1), eps=np.float32(eps))
    return _reference(x, unblocked(wb), bias, norm, eps, act, residual)


def _reference(x, w, bias, norm, eps, act, residual):
    """The model's ops for the same function (model.LayerNorm, Linear, relu2, the residual add)."""
    from jais2_jax.layernorm import layer_norm
    f32, dtype = jnp.float32, x.dtype
    if norm is not None:
        x = layer_norm(x[None], norm[0], norm[1], eps=eps, dtype=dtype, impl="xla")[0]
    y = jax.lax.dot_general(x, w.astype(dtype), (((0,), (0,)), ((), ())),
                            preferred_element_type=dtype)
    y = (y.astype(f32) + bias.astype(f32)).astype(dtype)
    if act == "relu2":
        y = jnp.square(jax.nn.relu(y))
    return y if residual is None else residual + y


_LAYER = {  # projection: (path in a layer's params, its K / N from the config)
    "qkv": (("self_attn", "qkv_proj"), lambda c: (c.hidden_size,
                                                  (c.num_attention_heads + 2 * c.num_key_value_heads)
                                                  * c.head_dim)),
    "o": (("self_attn", "o_proj"), lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size)),
    "up": (("mlp", "up_proj"), lambda c: (c.hidden_size, c.intermediate_size)),
    "down": (("mlp", "down_proj"), lambda c: (c.intermediate_size, c.hidden_size)),
}


def supported(config) -> str | None:
    """Why this config cannot take the decode kernels, or None."""
    if config.hidden_act != "relu2":
        return f"hidden_act {config.hidden_act!r} (the kernels fuse relu^2 only)"
    for name, (_, shape) in _LAYER.items():
        k, n = shape(config)
        if not fits(k, n, SETTINGS[name][0]):
            return f"{name} is [{k}, {n}]: K must be a multiple of {STEP}, N of {WARPS * SETTINGS[name][0]}"
    return None


def prepare_decode_params(params: dict, config) -> dict:
    """Per-layer params with fused q/k/v (`unstack_layers(params, fuse_qkv=True)`) plus each
    projection's `kernel_blocked`, for Jais2ForCausalLM(decode_kernels=True)."""
    why = supported(config)
    if why:
        raise ValueError(f"decode kernels: {why}")
    params = dict(params)
    names = [k for k in params if k.startswith("layers_")]
    if not names or "qkv_proj" not in params[names[0]]["self_attn"]:
        raise ValueError("decode kernels want per-layer params with fused q/k/v: "
                         "unstack_layers(params, fuse_qkv=True)")
    for layer_name in names:
        layer = jax.tree_util.tree_map(lambda a: a, params[layer_name])  # copy the dict levels
        for name, ((part, proj), shape) in _LAYER.items():
            k, n = shape(config)
            p = dict(layer[part][proj])
            p["kernel_blocked"] = blocked(p["kernel"].reshape(k, n), SETTINGS[name][0])
            layer[part] = {**layer[part], proj: p}
        params[layer_name] = layer
    return params
