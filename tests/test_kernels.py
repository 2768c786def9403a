"""The Pallas kernels (interpreted on CPU) against their XLA formulas: LayerNorm's values and
gradients, the one-pass logsumexp, the MLP's bias + relu^2 backward, row counts that do not fill
a program, the choice of implementation and its errors, and each kernel on its device's block
under a mesh of several devices (shard_map)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err
from jais2_jax.kernels.bias_relu2 import bias_relu2
from jais2_jax.model.options import ModelOptions
from jais2_jax.kernels.layernorm import layer_norm
from jais2_jax.kernels.logsumexp import logsumexp


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


@pytest.mark.parametrize("dtype,shape", [(jnp.bfloat16, (2, 64, 256)), (jnp.float32, (3, 96)),
                                         (jnp.bfloat16, (130, 128))])
def test_bias_relu2_backward_pallas_equals_xla(dtype, shape):
    """dy bitwise (the same roundings), db to float32 summation order; the forward is XLA's."""
    k = jax.random.split(jax.random.key(shape[-2]), 3)
    y = jax.random.normal(k[0], shape).astype(dtype)
    bias = 0.3 * jax.random.normal(k[1], shape[-1:])
    g = jax.random.normal(k[2], shape).astype(dtype)

    def grads(impl):
        out, vjp = jax.vjp(lambda y, b: bias_relu2(y, b, impl), y, bias)
        return out, vjp(g)

    (out, (dy, db)), (out_ref, (dy_ref, db_ref)) = grads("pallas"), grads("xla")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(out_ref, np.float32))
    ref = jnp.square(jax.nn.relu((y.astype(jnp.float32) + bias).astype(dtype)))
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    assert dy.dtype == dtype and db.dtype == bias.dtype
    np.testing.assert_array_equal(np.asarray(dy, np.float32), np.asarray(dy_ref, np.float32))
    assert rel_err(db, db_ref) <= 1e-6
    # and the XLA rule is autodiff of the formula (2 relu(z) g), up to its bf16 roundings
    _, vjp = jax.vjp(lambda y, b: jnp.square(jax.nn.relu(y.astype(jnp.float32) + b)), y, bias)
    dy_auto, db_auto = vjp(g.astype(jnp.float32))
    assert rel_err(dy_ref, dy_auto) <= (1e-6 if dtype == jnp.float32 else 1e-2)
    assert rel_err(db_ref, db_auto) <= (1e-6 if dtype == jnp.float32 else 1e-2)


# ------------------------------------------------------------------------- under a device mesh
def _mesh(shape):
    from jais2_jax.parallel.sharding import make_mesh
    return make_mesh(shape, devices=jax.devices()[:4])


@pytest.mark.parametrize("mesh_shape", [(1, 4, 1), (1, 2, 2)])
def test_kernels_per_device_under_a_mesh(mesh_shape):
    """On a mesh (rows over fsdp; the MLP's columns over tensor in (1, 2, 2)) each kernel runs on
    its device's block: values and gradients equal the kernels' on one device (which equal XLA's,
    above), the scale, bias and MLP bias gradients being the sums of every device's partial sums."""
    from jais2_jax.parallel.sharding import use_mesh
    k = jax.random.split(jax.random.key(2), 8)
    x = 2.0 * jax.random.normal(k[0], (4, 8, 128)) + 0.5
    scale, bias = jax.random.normal(k[1], (128,)), jax.random.normal(k[2], (128,))
    y = jax.random.normal(k[3], (4, 8, 512)).astype(jnp.bfloat16)
    b2 = 0.3 * jax.random.normal(k[4], (512,))
    dx, dh = jax.random.normal(k[5], x.shape), jax.random.normal(k[6], y.shape)
    logits = 8.0 * jax.random.normal(k[7], (4, 8, 1024))

    def run(impl, lse_impl):
        def f(x, scale, bias, y, b2):
            a = layer_norm(x, scale, bias, eps=1e-5, impl=impl)
            h = bias_relu2(y, b2, impl).astype(jnp.float32)
            return jnp.sum(a * dx) + jnp.sum(h * dh)
        value, grads = jax.value_and_grad(f, argnums=range(5))(x, scale, bias, y, b2)
        return value, grads, logsumexp(logits, impl=lse_impl)

    want = jax.jit(lambda: run("pallas", "pallas"))()
    vocab_whole = mesh_shape[2] == 1  # the rules split the vocabulary over tensor
    with use_mesh(_mesh(mesh_shape)):
        got = jax.jit(lambda: run("pallas", "pallas" if vocab_whole else "xla"))()
        if not vocab_whole:
            with pytest.raises(ValueError, match="whole rows on each device"):
                logsumexp(logits, impl="pallas")
        # a batch the mesh does not divide (a model's init on [1, 1]) stays whole on each device
        one = jax.jit(lambda x: layer_norm(x, scale, bias, eps=1e-5, impl="pallas"))(x[:1, :3])
    assert rel_err(got[0], want[0]) <= 1e-6
    for g, r in zip(got[1], want[1]):
        assert g.dtype == r.dtype and rel_err(g, r) <= 1e-6
    assert rel_err(got[2], want[2]) <= 1e-6
    assert rel_err(one, layer_norm(x[:1, :3], scale, bias, eps=1e-5, impl="xla")) <= 1e-6


def test_default_on_gpu_under_a_mesh_is_pallas_per_device(monkeypatch):
    """impl=None on a GPU backend picks the kernels under a mesh of several devices too, each
    inside a shard_map (traced only: there is no GPU here)."""
    from jais2_jax.parallel.sharding import use_mesh
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x, ones = jnp.ones((4, 8, 128)), jnp.ones((128,))

    def f(x):
        a = layer_norm(x, ones, ones, eps=1e-5)
        return jax.grad(lambda y: jnp.sum(bias_relu2(y, ones)))(a), logsumexp(a)

    with use_mesh(_mesh((1, 4, 1))):
        text = str(jax.make_jaxpr(f)(x))
    assert text.count("pallas_call") == 3 and text.count("shard_map") == 3, text


def test_model_gradients_on_a_mesh_with_kernels():
    """The tiny model's loss and gradients on a (1, 2, 2) mesh with the kernels per device equal
    one device's with XLA's."""
    from jais2_jax import Jais2ForCausalLM, init_params
    from jais2_jax.model.config import preset
    from jais2_jax.parallel.sharding import use_mesh
    config = preset("jais2-tiny")
    params = init_params(config, jax.random.key(3))
    params = jax.tree_util.tree_map(  # non-trivial norms and biases
        lambda p: p + 0.1 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, config.vocab_size, (4, 16)))

    def loss_and_grads(kernels):
        model = Jais2ForCausalLM(config, options=ModelOptions(kernels=kernels, remat_policy="dots"))

        def loss(p):
            logp = jax.nn.log_softmax(model.apply({"params": p}, ids)[:, :-1], axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))
        return jax.jit(jax.value_and_grad(loss))(params)

    want = loss_and_grads("xla")
    with use_mesh(_mesh((1, 2, 2))):
        got = loss_and_grads("pallas")
    assert rel_err(got[0], want[0]) <= 1e-6
    for g, r in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
        assert rel_err(g, r) <= 1e-5
