"""The Pallas LayerNorm kernels (interpreted on CPU) against the XLA formula: values and gradients,
row counts that do not fill a program, and the choice of implementation."""

import jax
import jax.numpy as jnp
import pytest

from helpers import rel_err
from jais2_jax.layernorm import layer_norm


@pytest.mark.parametrize("dtype,rows,width", [(jnp.float32, 128, 64), (jnp.bfloat16, 96, 128),
                                              (jnp.float32, 3, 32), (jnp.float32, 200, 16)])
def test_pallas_equals_xla(dtype, rows, width):
    k = jax.random.split(jax.random.key(rows), 4)
    x = (3.0 * jax.random.normal(k[0], (2, rows // 2 if rows % 2 == 0 else rows, width)) + 1.0)
    x = x.astype(dtype)
    scale, bias = jax.random.normal(k[1], (width,)), jax.random.normal(k[2], (width,))
    dy = jax.random.normal(k[3], x.shape)

    def run(impl):
        def loss(x, scale, bias):
            y = layer_norm(x, scale, bias, eps=1e-5, impl=impl)
            return jnp.sum(y.astype(jnp.float32) * dy)
        y = layer_norm(x, scale, bias, eps=1e-5, impl=impl)
        return y, jax.grad(loss, (0, 1, 2))(x, scale, bias)

    (y, grads), (y_ref, grads_ref) = run("pallas"), run("xla")
    assert y.dtype == y_ref.dtype == dtype
    # bf16 outputs may round the other way where float32 sums differ in the last bit
    assert rel_err(y, y_ref) <= (1e-6 if dtype == jnp.float32 else 4e-3)
    for g, r in zip(grads, grads_ref):
        assert g.dtype == r.dtype and rel_err(g, r) <= 1e-6


def test_impl_choice_and_errors():
    x, ones = jnp.ones((4, 24)), jnp.ones((24,))
    with pytest.raises(ValueError, match="power-of-two width, got 24"):
        layer_norm(x, ones, ones, eps=1e-5, impl="pallas")
    with pytest.raises(ValueError, match="layer norm impl 'triton'"):
        layer_norm(x, ones, ones, eps=1e-5, impl="triton")
    # On CPU the default is XLA: no pallas_call in the program
    text = jax.jit(lambda x: layer_norm(x, ones, ones, eps=1e-5)).lower(x).as_text()
    assert "pallas" not in text.lower() and "triton" not in text.lower()
