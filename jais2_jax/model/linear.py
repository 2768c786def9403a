"""The matmul seam: every projection of the model is one `Linear`, whatever its weight holds.

A `Linear` computes `y = epilogue(x . W, b)`. What `W` is comes from the parameter tree (and, for
`init` / `eval_shape`, from the module's `quantization` setting), never from the model code:

| the Linear's params              | the product                                      |
|----------------------------------|--------------------------------------------------|
| `kernel` (float)                 | `x . kernel`                                     |
| `kernel` (int8 / fp8) + `scale`  | `(x . kernel) * scale` (per output channel)      |
| `kernel` (nf4 codes) + `scale`   | `x . (NF4[kernel] * scale)` (per 64-block of inputs and output channel) |
| either, + `lora_a` + `lora_b`    | the above + `lora_scale * (drop(x) . lora_a) . lora_b` |

`drop` is the adapter's dropout (`LoraSpec.dropout`, PEFT's lora_dropout): applied only when the
model is applied with a "dropout" rng (`rngs={"dropout": key}`, the train step); without one (eval,
inference) it is the identity.

All products accumulate in float32. The epilogue adds the bias in float32 and, for the MLP's up
projection, applies relu^2 (with the Pallas bias + relu^2 backward on GPU); outputs are tagged
with the Linear's name for the remat policies, or returned in float32 (the logits).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jais2_jax.kernels.bias_relu2 import bias_relu2
from jais2_jax.kernels.bias_relu2 import slope as relu2_slope

Array = jax.Array

# The dtype of `kernel` in a quantized tree, by scheme name: int8 / fp8 values, or nf4's 4-bit
# codes (indices into qwix's NormalFloat-4 table, QLoRA's data type).
QUANTIZED_DTYPES = {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn),
                    "nf4": jnp.dtype(jnp.uint4)}
# nf4's scales: one absmax per NF4_BLOCK consecutive inputs (the contracted dims flattened) and
# output channel, bitsandbytes' QLoRA block size.
NF4_BLOCK = 64
# The scheme of the vocabulary-sized tables (an untied lm_head, a quantized embedding table):
# per-channel int8 under nf4 (bitsandbytes' QLoRA leaves them out; int8 keeps the 70B base small
# and the fused loss's vocabulary tiles as they are).
TABLE_SCHEME = {"int8": "int8", "fp8": "fp8", "nf4": "int8"}


def nf4_blocks(in_shape, what: str = "the projection") -> int:
    """How many NF4_BLOCK blocks the contracted dims `in_shape` hold (ValueError if they do not
    divide: the block would straddle channels)."""
    n = math.prod(in_shape)
    if n % NF4_BLOCK:
        raise ValueError(f"nf4 quantizes {what} in blocks of {NF4_BLOCK} inputs, but it contracts "
                         f"{n} (shape {tuple(in_shape)}), not a multiple of {NF4_BLOCK}")
    return n // NF4_BLOCK


def nf4_dequantize(codes: Array, scale: Array, *, leading: int = 0, n_in: int = 1) -> Array:
    """The float32 weight [lead..., in..., out...] of nf4 codes (same shape) and their scales
    [lead..., blocks, out...]: qwix's NF4 table value of each code times its block's scale."""
    import qwix
    from qwix._src.core.qarray import QArray
    shape = codes.shape
    flat = codes.reshape(shape[:leading] + (-1,) + shape[leading + n_in:])
    w = qwix.dequantize(QArray(flat, scale.astype(jnp.float32), None, "nf4"))
    return w.reshape(shape)


@jax.custom_vjp
def relu2(x: Array) -> Array:
    """relu(x)^2, Jais2's MLP activation, differentiated from its output: d/dx = 2 relu(x) =
    2 sqrt(relu(x)^2). The output (tagged "mlp_act") is what down_proj's weight gradient needs
    anyway, so a remat policy that saves it keeps one [tokens, intermediate] tensor per layer, and
    the backward pass neither keeps nor re-reads the up_proj output. On the H100 train step that is
    2 of the 7 GB a layer moves through the activation and its backward at batch 16.
    Reverse mode only (a custom_vjp: the output is its only residual)."""
    return jnp.square(jax.nn.relu(x))


def _relu2_fwd(x):
    y = checkpoint_name(relu2(x), "mlp_act")
    return y, y


def _relu2_bwd(y, g):
    # In the activation's dtype, as autodiff of the formula would compute 2 relu(x) g.
    return ((relu2_slope(y) * g.astype(y.dtype)).astype(g.dtype),)


relu2.defvjp(_relu2_fwd, _relu2_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dot_f32(x: Array, w: Array, contract) -> Array:
    """dot_general of x and w (same dtype) accumulated and returned in float32.

    The backward pass runs its two GEMMs in the inputs' dtype (the cotangent is cast down first):
    differentiating the float32 output naively would hand XLA float32 x bf16 products, which it
    runs as float32 GEMMs, several times slower than bf16 on GPU and TPU. The GEMM units still
    accumulate in float32; only dx and dw are rounded to the input dtype, as in torch autocast.
    """
    return jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=jnp.float32)


def _dot_f32_fwd(x, w, contract):
    return dot_f32(x, w, contract), (x, w)


def _dot_f32_bwd(contract, res, g):
    x, w = res
    _, vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, (contract, ((), ())),
                                                      preferred_element_type=x.dtype), x, w)
    return vjp(g.astype(x.dtype))


dot_f32.defvjp(_dot_f32_fwd, _dot_f32_bwd)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """A low-rank adapter on a projection: `W x + (alpha / rank) * B(A(dropout(x)))`, PEFT's LoRA.
    A is initialised as PEFT does (kaiming-uniform with a = sqrt(5)), B with zeros. `dropout`
    (PEFT's lora_dropout) acts only under a "dropout" rng (training)."""
    rank: int
    alpha: float
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """What follows the product: bias (in float32), an activation, the output's tag and dtype.

    - `activation`: None, or "relu2" fused with the bias add (`kernels/bias_relu2.py`: its backward
      makes dy and db in one pass; the activation is tagged "mlp_act" for the remat policies and
      returned instead of y, which the backward pass then never needs).
    - `float32_output`: the result in float32 (the logits), untagged.
    - `tag`: tag the output with the Linear's name (q and k: the attention tags them after RoPE).
    - `kernels`: bias_relu2's backward: Pallas on GPU (None), "xla" or "pallas".
    """
    activation: str | None = None
    float32_output: bool = False
    tag: bool = True
    kernels: str | None = None


def _kaiming_uniform_a_sqrt5(key, shape, dtype):
    """torch.nn.init.kaiming_uniform_(w, a=sqrt(5)) on an [in..., rank] weight (fan_in = prod(in)):
    uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), PEFT's initialisation of lora_A."""
    fan_in = 1
    for d in shape[:-1]:
        fan_in *= d
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
    """y = epilogue(x . W (+ b)), contracting the trailing `len(in_axes)` dims of x.

    The weight's kind (dense, quantized, + low-rank adapter) is read from the parameter tree; the
    `quantization` and `lora` settings say which parameters `init` creates."""
    features: tuple[int, ...]
    in_axes: tuple[str, ...]  # logical names of the contracted input dims
    out_axes: tuple[str, ...]  # logical names of the output dims
    use_bias: bool
    dtype: Any
    param_dtype: Any
    init_std: float
    epilogue: Epilogue = Epilogue()
    quantization: str | None = None  # None, "int8", "fp8" or "nf4": the kind `init` creates
    lora: LoraSpec | None = None

    def _product(self, x: Array, contract) -> Array:
        in_shape = x.shape[-len(self.in_axes):]
        axes = self.in_axes + self.out_axes
        quantized = self.quantization is not None or self.has_variable("params", "scale")
        if quantized:
            scheme = self.quantization or self._stored_scheme()
            kind = QUANTIZED_DTYPES.get(scheme)
            if kind is None:
                raise ValueError(f"quantization {self.quantization!r}: choose one of "
                                 f"{sorted(QUANTIZED_DTYPES)} or None")
            values = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros, axes),
                                in_shape + self.features, kind)
            if scheme == "nf4":
                blocks = nf4_blocks(in_shape, self.name)
                scale = self.param("scale", nn.with_logical_partitioning(
                    nn.initializers.ones, ("quant_blocks",) + self.out_axes),
                    (blocks,) + self.features, jnp.float32)
                # The codes become their table values times the block scale (one fusion), in
                # the compute dtype; the GEMM accumulates in float32.
                w = nf4_dequantize(values, scale, n_in=len(in_shape)).astype(self.dtype)
                y = jax.lax.dot_general(x, w, (contract, ((), ())),
                                        preferred_element_type=jnp.float32)
            else:
                scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                         self.out_axes),
                                   self.features, jnp.float32)
                # The int8 / fp8 values convert exactly to the compute dtype; the GEMM
                # accumulates in float32 and the per-channel scale is applied to its float32
                # result.
                y = jax.lax.dot_general(x, values.astype(self.dtype), (contract, ((), ())),
                                        preferred_element_type=jnp.float32)
                y = y * scale.astype(jnp.float32)
            if not self.epilogue.float32_output:
                y = y.astype(self.dtype)
        else:
            kernel = self.param("kernel", nn.with_logical_partitioning(
                nn.initializers.normal(self.init_std), axes), in_shape + self.features,
                self.param_dtype).astype(self.dtype)
            if self.epilogue.float32_output:
                y = dot_f32(x, kernel, contract)
            else:
                # Output in the compute dtype; the GEMM still accumulates in float32 (cuBLAS, the
                # TPU MXU and XLA:CPU all do). Measured on an H200, the float32 output plus a
                # separate cast cost up to 15% on the decode GEMVs and 10% on prefill GEMMs.
                y = jax.lax.dot_general(x, kernel, (contract, ((), ())),
                                        preferred_element_type=self.dtype)
        if self.lora is not None or self.has_variable("params", "lora_a"):
            y = y + self._adapter(x, in_shape, contract).astype(y.dtype)
        return y

    def _stored_scheme(self) -> str:
        """The scheme of a quantized tree this Linear was given (no `quantization` setting)."""
        kernel = self.get_variable("params", "kernel")
        dtype = jnp.dtype(getattr(kernel, "value", kernel).dtype) if kernel is not None else None
        return next((k for k, v in QUANTIZED_DTYPES.items() if v == dtype), "int8")

    def _adapter(self, x: Array, in_shape, contract) -> Array:
        if self.lora is None:
            raise ValueError(f"{self.name} holds a LoRA adapter (lora_a, lora_b) but the model has "
                             "no lora setting to scale it (alpha / rank)")
        r = self.lora.rank
        a = self.param("lora_a", nn.with_logical_partitioning(_kaiming_uniform_a_sqrt5,
                                                              self.in_axes + ("lora_rank",)),
                       in_shape + (r,), self.param_dtype)
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                              ("lora_rank",) + self.out_axes),
                       (r,) + self.features, self.param_dtype)
        if self.lora.dropout > 0.0 and self.has_rng("dropout"):
            keep = 1.0 - self.lora.dropout
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
            x = jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
        h = jax.lax.dot_general(x, a.astype(self.dtype), (contract, ((), ())),
                                preferred_element_type=jnp.float32).astype(self.dtype)
        y = jax.lax.dot_general(h, b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return y * self.lora.scale

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in = len(self.in_axes)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = self._product(x.astype(self.dtype), contract)
        ep = self.epilogue
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   self.out_axes),
                              self.features, self.param_dtype)
            if ep.activation == "relu2":
                return bias_relu2(y, bias, ep.kernels)
            y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)
        if ep.activation == "relu2":
            return relu2(y)
        if ep.activation is not None:
            raise ValueError(f"epilogue activation {ep.activation!r}: only 'relu2' is fused")
        if ep.float32_output:
            return y
        return checkpoint_name(y, self.name) if ep.tag else y  # policies save by name
