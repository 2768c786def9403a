"""The int8 KV cache (`init_cache(..., dtype=jnp.int8)`): per-head-per-token scales, decoding
close to the float cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import hf_model, our_config, our_params, rel_err
from jais2_jax import Jais2ForCausalLM, ModelOptions, generate, init_cache, unstack_layers
from jais2_jax.model.cache import dequantize_kv, quantize_kv


def test_quantize_kv_formula():
    x = jnp.asarray([[[0.5, -1.27, 0.0, 0.01]], [[0.0, 0.0, 0.0, 0.0]]], jnp.float32)
    q, s = quantize_kv(x)
    np.testing.assert_allclose(np.asarray(s), [[1.27 / 127], [1.0]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q), [[[50, -127, 0, 1]], [[0, 0, 0, 0]]])
    y = np.random.RandomState(0).normal(size=(3, 5, 2, 16)).astype(np.float32)
    q, s = quantize_kv(jnp.asarray(y))
    err = np.abs(np.asarray(dequantize_kv(q, s, jnp.float32)) - y)
    assert np.all(err <= np.asarray(s)[..., None] / 2 + 1e-7)


@pytest.mark.parametrize("scan", [True, False])
def test_int8_cache_decodes_like_the_float_cache(scan):
    hf = hf_model(seed=11, num_key_value_heads=2)
    config = our_config(hf)
    params = our_params(hf, config)
    model = Jais2ForCausalLM(config, options=ModelOptions(scan_layers=scan))
    p = params if scan else unstack_layers(params)
    ids = np.random.RandomState(4).randint(3, config.vocab_size, (2, 6))
    cache = init_cache(config, 2, 32, jnp.int8, per_layer=not scan)
    assert cache.quantized and (cache.k[0] if not scan else cache.k).dtype == jnp.int8
    # Prefill then one decode step with each cache: the logits differ by int8 rounding only.
    outs = {}
    for name, dt in (("float", jnp.float32), ("int8", jnp.int8)):
        c = init_cache(config, 2, 32, dt, per_layer=not scan)
        _, c = model.apply({"params": p}, jnp.asarray(ids), cache=c)
        logits, c = model.apply({"params": p}, jnp.asarray(ids[:, :1]), cache=c)
        outs[name] = np.asarray(logits)
        assert int(c.lengths[0]) == 7
    err = rel_err(outs["int8"], outs["float"])
    assert 0 < err < 2e-2, err
    # Greedy generation with the int8 cache follows the float cache's tokens on this model.
    ref = generate(model, p, ids, max_new_tokens=10, eos_token_id=[])
    got = generate(model, p, ids, max_new_tokens=10, eos_token_id=[], cache_dtype=jnp.int8)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_int8_cache_on_a_mesh():
    from jais2_jax import build_inference_program
    from jais2_jax.parallel import make_mesh
    hf = hf_model(seed=12, num_key_value_heads=2)
    config = our_config(hf)
    program = build_inference_program(config, batch_size=4, max_length=32,
                                      mesh=make_mesh((2, 2, 2)),
                                      dtype="float32", cache_dtype="int8")
    cache = program.init_cache()
    assert cache.k.dtype == jnp.int8 and cache.k_scale.dtype == jnp.float32
    assert cache.k_scale.sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None, "tensor")
    params = program.place(our_params(hf, config))
    ids = np.random.RandomState(5).randint(3, config.vocab_size, (4, 8))
    logits, cache = program.prefill(params, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)),
                                    cache)
    step, cache = program.decode_step(params, jnp.argmax(logits, -1).astype(jnp.int32), cache)
    # The same steps on one device (the jitted prefill / decode_step the program wraps).
    from jais2_jax.inference import decode_step, prefill
    model, one = Jais2ForCausalLM(config), our_params(hf, config)
    ref_logits, ref_cache = prefill(model, one, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)),
                                    init_cache(config, 4, 32, jnp.int8))
    ref, _ = decode_step(model, one, jnp.argmax(ref_logits, -1).astype(jnp.int32), ref_cache)
    np.testing.assert_allclose(np.asarray(step), np.asarray(ref), rtol=1e-5, atol=1e-6)
