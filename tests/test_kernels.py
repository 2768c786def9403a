"""The Pallas kernels (interpreted on CPU) against their XLA formulas: LayerNorm's values and
gradients, the one-pass logsumexp, row counts that do not fill a program, the choice of
implementation and its errors."""

import jax
import jax.numpy as jnp
import pytest

from helpers import rel_err
from jais2_jax.layernorm import layer_norm
from jais2_jax.logsumexp import logsumexp


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


@pytest.mark.parametrize("dtype,shape", [(jnp.float32, (4, 8, 1024)), (jnp.bfloat16, (3, 640)),
                                         (jnp.float32, (5, 384))])
def test_logsumexp_pallas_equals_xla(dtype, shape):
    """One pass with a running max (blocks of up to 2048, here 1024, 128, 128 wide) against
    max-then-sum; logits spread wide enough that a later block raises the max."""
    x = (8.0 * jax.random.normal(jax.random.key(1), shape)).astype(dtype)
    x = x.at[..., -1].set(60.0)  # the max sits in the last block: the rescaling must be right
    got, ref = logsumexp(x, impl="pallas"), logsumexp(x, impl="xla")
    assert got.dtype == jnp.float32 and got.shape == shape[:-1]
    assert rel_err(got, ref) <= 1e-6
    assert rel_err(ref, jax.nn.logsumexp(x.astype(jnp.float32), axis=-1)) <= 1e-6


def test_logsumexp_choice_and_errors():
    x = jnp.ones((2, 100))
    with pytest.raises(ValueError, match="divisible by 128, got 100"):
        logsumexp(x, impl="pallas")
    with pytest.raises(ValueError, match="logsumexp impl 'cuda'"):
        logsumexp(x, impl="cuda")
    text = jax.jit(logsumexp).lower(jnp.ones((2, 256))).as_text()
    assert "pallas" not in text.lower() and "triton" not in text.lower()
