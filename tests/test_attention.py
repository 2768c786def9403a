"""The attention dispatch: XLA masks against a plain reference, and the TPU splash kernel (run in
Pallas interpret mode on the CPU) against XLA, alone and under shard_map on 8 fake devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import hf_model, our_config, our_params, rel_err
from jais2_jax import Jais2ForCausalLM
from jais2_jax.model.options import ModelOptions
from jais2_jax.model.attention import dot_product_attention
from jais2_jax.parallel.sharding import LOGICAL_AXIS_RULES, make_mesh

B, T, H, KV, HD = 4, 128, 4, 2, 32


def _qkv(seed):
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(B, T, H, HD), jnp.float32)
    k = jnp.asarray(rng.randn(B, T, KV, HD), jnp.float32)
    v = jnp.asarray(rng.randn(B, T, KV, HD), jnp.float32)
    return q, k, v


def _segments():
    seg = np.zeros((B, T), np.int32)
    seg[:, 40:] = 1
    seg[1, 90:] = 2
    seg[3, :] = 0
    return jnp.asarray(seg)


def _reference(q, k, v, seg):
    """Plain float64 numpy attention with explicit causal + segment masking and repeated kv heads."""
    q, k, v, seg = (np.asarray(x, np.float64) for x in (q, k, v, seg))
    k = np.repeat(k, H // KV, axis=2)
    v = np.repeat(v, H // KV, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(HD)
    mask = np.tril(np.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    logits = np.where(mask[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def test_xla_path_matches_plain_reference_with_segments():
    q, k, v = _qkv(0)
    seg = _segments()
    out = dot_product_attention(q, k, v, segment_ids=seg, implementation="xla")
    assert rel_err(out, _reference(q, k, v, seg)) < 1e-6


def test_cache_offsets_mask_only_filled_slots():
    """One query per row at slot lengths[b]: it must ignore every slot past it (stale values)."""
    q, k, v = _qkv(1)
    lengths = jnp.asarray([5, 17, 64, 128 - 1], jnp.int32)
    out = dot_product_attention(q[:, :1], k, v, q_offset=lengths, kv_lengths=lengths + 1,
                                implementation="xla")
    for b, n in enumerate(np.asarray(lengths) + 1):
        kk = np.repeat(np.asarray(k[b, :n], np.float64), H // KV, axis=1)
        vv = np.repeat(np.asarray(v[b, :n], np.float64), H // KV, axis=1)
        logits = np.einsum("hd,shd->hs", np.asarray(q[b, 0], np.float64), kk) / np.sqrt(HD)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        ref = np.einsum("hs,shd->hd", p / p.sum(-1, keepdims=True), vv)
        assert rel_err(out[b, 0], ref) < 1e-6


def _splash_and_xla_grads(q, k, v, seg, impl):
    def loss(q, k, v, impl):
        out = dot_product_attention(q, k, v, segment_ids=seg, implementation=impl)
        return jnp.sum(out * jnp.cos(out))  # a non-trivial cotangent
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v, impl)


def test_splash_interpret_matches_xla_forward_and_gradient():
    q, k, v = _qkv(2)
    seg = _segments()
    ref = _reference(q, k, v, seg)
    out = dot_product_attention(q, k, v, segment_ids=seg, implementation="splash_interpret")
    assert rel_err(out, ref) < 1e-5
    g_splash = _splash_and_xla_grads(q, k, v, seg, "splash_interpret")
    g_xla = _splash_and_xla_grads(q, k, v, seg, "xla")
    for a, b in zip(g_splash, g_xla):
        assert rel_err(a, b) < 1e-5


def test_splash_under_shard_map_on_8_devices():
    """Batch over data x fsdp, heads over tensor; same outputs and gradients as unsharded XLA."""
    mesh = make_mesh((2, 2, 2))
    q, k, v = _qkv(3)
    seg = _segments()
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        out = jax.jit(lambda q, k, v: dot_product_attention(
            q, k, v, segment_ids=seg, implementation="splash_interpret"))(q, k, v)
        grads = jax.jit(lambda q, k, v: _splash_and_xla_grads(q, k, v, seg, "splash_interpret"))(
            q, k, v)
    assert rel_err(out, _reference(q, k, v, seg)) < 1e-5
    for a, b in zip(grads, _splash_and_xla_grads(q, k, v, seg, "xla")):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("padded", [False, True])
def test_model_logits_with_splash_equal_xla_path(padded):
    hf = hf_model(seed=6, num_key_value_heads=2, max_position_embeddings=128)
    config = our_config(hf)
    params = our_params(hf, config)
    ids = jnp.asarray(np.random.RandomState(5).randint(3, config.vocab_size, (2, 128)))
    mask = np.ones((2, 128), np.int32)
    if padded:
        mask[1, :37] = 0  # left padding becomes its own segment in the splash path
    mask = jnp.asarray(mask)
    xla = Jais2ForCausalLM(config,
                           options=ModelOptions(attention_impl="xla")).apply({"params": params}, ids,
                                                               attention_mask=mask)
    spl = Jais2ForCausalLM(config, options=ModelOptions(attention_impl="splash_interpret")).apply(
        {"params": params}, ids, attention_mask=mask)
    real = np.asarray(mask).astype(bool)
    assert rel_err(np.asarray(spl)[real], np.asarray(xla)[real]) < 1e-5


def test_splash_with_key_lengths_matches_xla_on_real_queries(monkeypatch):
    """Right padding given as key lengths (the prefill of a cache) runs on splash too."""
    import jais2_jax.model.attention as attention
    calls = []
    real_splash = attention.splash_attention
    monkeypatch.setattr(attention, "splash_attention",
                        lambda *a, **kw: calls.append(1) or real_splash(*a, **kw))
    q, k, v = _qkv(4)
    lengths = jnp.asarray([128, 100, 37, 1], jnp.int32)
    xla = dot_product_attention(q, k, v, kv_lengths=lengths, implementation="xla")
    spl = dot_product_attention(q, k, v, kv_lengths=lengths, implementation="splash_interpret")
    assert calls, "the splash kernel was not used"
    for b, n in enumerate(np.asarray(lengths)):
        assert rel_err(spl[b, :n], xla[b, :n]) < 1e-5
