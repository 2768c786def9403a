"""Parity of the linen model with transformers' Jais2ForCausalLM (CPU, float32) and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import hf_model, our_config, our_params, rel_err
from jais2_jax import Jais2ForCausalLM, unstack_layers
from jais2_jax.model.options import ModelOptions
from jais2_jax.checkpoint.hf_mapping import state_dict_from_params

TOL = 1e-5  # float32 logits, relative: ||ours - hf|| / ||hf||

VARIANTS = {
    "mha": {},
    "gqa_2kv": dict(num_key_value_heads=2),
    "mqa_1kv": dict(num_key_value_heads=1),
    "head_dim_24": dict(head_dim=24),  # head_dim != hidden / heads
    "no_attention_bias": dict(attention_bias=False),
    "no_mlp_bias": dict(mlp_bias=False),
    "tied": dict(tie_word_embeddings=True),
    "rope_linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}),
    "rope_yarn": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                       "original_max_position_embeddings": 16}),
    "rope_yarn_mscale": dict(rope_parameters={
        "rope_type": "yarn", "factor": 3.0, "rope_theta": 10000.0, "beta_fast": 16, "beta_slow": 2,
        "mscale": 1.0, "mscale_all_dim": 0.5, "original_max_position_embeddings": 16}),
    "rope_llama3": dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "rope_theta": 500000.0, "original_max_position_embeddings": 8}),
    "rope_longrope": dict(rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
        "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.5 * i for i in range(8)]}),
    # dynamic NTK only differs from default past max_position_embeddings: test at 24 > 16.
    "rope_dynamic": dict(max_position_embeddings=16,
                         rope_parameters={"rope_type": "dynamic", "factor": 8.0, "rope_theta": 10000.0}),
    "silu_act": dict(hidden_act="silu"),
}


def _hf_logits(model, ids, mask=None):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    return out.logits.numpy()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(name):
    hf = hf_model(seed=1, **VARIANTS[name])
    config = our_config(hf)
    params = our_params(hf, config)
    model = Jais2ForCausalLM(config)
    rng = np.random.RandomState(0)
    lengths = (1, 7, 24) if name in ("rope_dynamic", "rope_longrope") else (1, 7)
    for length in lengths:  # 1 and odd; 24 is past the original/max length for dynamic/longrope
        ids = rng.randint(0, config.vocab_size, (2, length))
        ref = _hf_logits(hf, ids)
        ours = model.apply({"params": params}, jnp.asarray(ids))
        assert ours.dtype == jnp.float32
        assert rel_err(ours, ref) <= TOL, (name, length, rel_err(ours, ref))


def test_unscanned_per_layer_view_matches_scanned():
    hf = hf_model(seed=2, num_key_value_heads=2)
    config = our_config(hf)
    params = our_params(hf, config)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, config.vocab_size, (2, 9)))
    ref = _hf_logits(hf, np.asarray(ids))
    ours = Jais2ForCausalLM(config,
                            options=ModelOptions(scan_layers=False)).apply({"params": unstack_layers(params)}, ids)
    assert rel_err(ours, ref) <= TOL


def test_left_padding_with_attention_mask():
    hf = hf_model(seed=3, num_key_value_heads=2)
    config = our_config(hf)
    params = our_params(hf, config)
    rng = np.random.RandomState(2)
    ids = rng.randint(3, config.vocab_size, (3, 11))
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding of different lengths
    mask[1, :9] = 0
    ids[mask == 0] = config.pad_token_id
    ref = _hf_logits(hf, ids, mask)
    ours = np.asarray(Jais2ForCausalLM(config).apply({"params": params}, jnp.asarray(ids),
                                                     attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)  # padded query rows are meaningless in both
    assert rel_err(ours[real], ref[real]) <= TOL
    # The mask matters: without it row 0's real tokens see the padding and change.
    unmasked = np.asarray(Jais2ForCausalLM(config).apply({"params": params}, jnp.asarray(ids)))
    assert rel_err(unmasked[0][real[0]], ref[0][real[0]]) > 1e-3


def test_bf16_compute_close_to_float32_reference():
    """bf16 activations with float32 params. bf16 keeps 8 significant bits (unit roundoff 2^-9 =
    0.2%); each layer rounds its activations a handful of times and the errors add up roughly
    as a random walk, so a two-layer model lands near 1% relative; 3% is the bound."""
    hf = hf_model(seed=4, num_key_value_heads=2)
    config = our_config(hf)
    params = our_params(hf, config)
    ids = np.random.RandomState(3).randint(0, config.vocab_size, (2, 16))
    ref = _hf_logits(hf, ids)
    ours = Jais2ForCausalLM(config, dtype=jnp.bfloat16).apply({"params": params}, jnp.asarray(ids))
    assert ours.dtype == jnp.float32  # logits stay float32
    err = rel_err(ours, ref)
    assert 1e-5 < err <= 3e-2, err  # lower bound: bf16 really ran


@pytest.mark.parametrize("kernels", ["xla", "pallas"])  # pallas: its kernels, interpreted on CPU
def test_gradients_match_torch_autograd(kernels):
    hf = hf_model(seed=5, num_key_value_heads=2, tie_word_embeddings=True)
    config = our_config(hf)
    params = our_params(hf, config)
    ids = np.random.RandomState(4).randint(0, config.vocab_size, (2, 10))
    hf.zero_grad()
    hf(torch.tensor(ids), labels=torch.tensor(ids)).loss.backward()
    ref = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    model = Jais2ForCausalLM(config, options=ModelOptions(kernels=kernels))

    def loss_fn(p):
        logits = model.apply({"params": p}, jnp.asarray(ids))[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], -1))

    grads = state_dict_from_params(config, jax.grad(loss_fn)(params))
    assert set(grads) == set(ref) - {"lm_head.weight"}  # tied: the embedding gets both paths
    for name, g in grads.items():
        assert rel_err(g, ref[name]) <= 1e-5, (name, rel_err(g, ref[name]))


def test_remat_policies_keep_gradients_and_trade_memory():
    """Each policy gives the same gradients; what the backward pass keeps (compiled temp bytes)
    shrinks from none to dots to dots_no_mlp to full. A policy that saved nothing by mistake
    (e.g. looking for dot primitives hidden inside a custom_vjp) would tie with `full`."""
    from jais2_jax import init_params
    from jais2_jax.model.config import preset
    config = preset("jais2-tiny")
    params = init_params(config, jax.random.key(0))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (4, 64)))
    temp, grads = {}, {}
    for policy in ("none", "dots", "dots_no_mlp", "full", "full_offload"):
        model = Jais2ForCausalLM(config, options=ModelOptions(remat_policy=policy))
        f = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, ids) ** 2)))
        temp[policy] = f.lower(params).compile().memory_analysis().temp_size_in_bytes
        grads[policy] = f(params)
    for policy in ("dots", "dots_no_mlp", "full", "full_offload"):  # offload: host copies on GPU
        for a, b in zip(jax.tree_util.tree_leaves(grads[policy]), jax.tree_util.tree_leaves(grads["none"])):
            assert rel_err(a, b) < 1e-6
    assert temp["none"] > temp["dots"] > temp["dots_no_mlp"] > temp["full"], temp


def test_relu2_backward_from_its_output(capsys):
    """relu^2 is differentiated from its output (2 sqrt(y)): the same gradient and second
    derivative as autodiff of the formula at negative, zero and positive inputs, and under the
    `dots` policy the MLP keeps only the activation output ("mlp_act"), never up_proj's GEMM
    output as well; the attention output is kept by name."""
    from jax.ad_checkpoint import print_saved_residuals
    from jais2_jax import init_params
    from jais2_jax.model.config import preset
    from jais2_jax.model.linear import relu2
    x = jnp.asarray(np.linspace(-3, 3, 61), jnp.float32)  # includes 0 exactly
    plain = lambda v: jnp.sum(jnp.square(jax.nn.relu(v)) * jnp.cos(v))  # noqa: E731
    ours = lambda v: jnp.sum(relu2(v) * jnp.cos(v))  # noqa: E731
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-6, atol=1e-6)
    second = lambda f: jax.grad(lambda v: jnp.sum(jax.grad(f)(v) * jnp.sin(v)))(x)  # noqa: E731
    np.testing.assert_allclose(second(ours), second(plain), rtol=1e-5, atol=1e-5)

    config = preset("jais2-tiny")  # unrolled layers: print_saved_residuals does not enter scans
    params = unstack_layers(init_params(config, jax.random.key(0)))
    model = Jais2ForCausalLM(config, options=ModelOptions(remat_policy="dots", scan_layers=False))
    capsys.readouterr()
    print_saved_residuals(lambda p: jnp.sum(model.apply({"params": p}, jnp.zeros((2, 16), jnp.int32))),
                          params)
    saved = capsys.readouterr().out.splitlines()
    assert any("named 'mlp_act'" in line for line in saved), saved
    assert any("named 'attention'" in line for line in saved), saved
    assert not any("named 'up_proj'" in line for line in saved), saved
    # one [batch, length, intermediate] tensor a layer for the MLP
    wide = [line for line in saved if "argument" not in line
            and line.split(" ")[0].endswith(f",{config.intermediate_size}]")]
    assert len(wide) == config.num_hidden_layers, saved


def test_dots_policy_saves_q_and_k_after_rope():
    """Under `dots` the backward pass reads the rotated q and k that attention saw, saved in the
    forward pass, instead of re-running RoPE on saved projections: the vjp's residuals hold
    RoPE(q_proj(x)) and RoPE(k_proj(x)) of the first layer, not the unrotated projections."""
    from jais2_jax import init_params
    from jais2_jax.model.config import preset
    from jais2_jax.model.modules import LayerNorm
    from jais2_jax.model.rope import apply_rope, rope_cos_sin
    config = preset("jais2-tiny")
    params = unstack_layers(init_params(config, jax.random.key(1)))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (2, 16)))
    model = Jais2ForCausalLM(config, options=ModelOptions(remat_policy="dots", scan_layers=False))
    _, vjp = jax.vjp(lambda p: model.apply({"params": p}, ids), params)
    residuals = [np.asarray(r) for r in jax.tree_util.tree_leaves(vjp)]

    layer = params["layers_0"]
    x = params["embed_tokens"]["embedding"][ids]
    h = LayerNorm(config.layer_norm_eps, jnp.float32, jnp.float32).apply(
        {"params": layer["input_layernorm"]}, x)
    cos, sin = rope_cos_sin(config, jnp.broadcast_to(jnp.arange(16), (2, 16)))
    heads = (config.num_attention_heads, config.num_key_value_heads)
    for name, n in zip(("q_proj", "k_proj"), heads):
        w = layer["self_attn"][name]
        proj = (h @ w["kernel"].reshape(config.hidden_size, -1) + w["bias"].reshape(-1)
                ).reshape(2, 16, n, config.head_dim)

        def held(a):
            return any(r.shape == a.shape and np.allclose(r, a, rtol=1e-5, atol=1e-5)
                       for r in residuals)

        assert held(np.asarray(apply_rope(proj, cos, sin))), name
        assert not held(np.asarray(proj)), name


def test_fused_qkv_inference_view():
    """unstack_layers(fuse_qkv=True) + Jais2ForCausalLM(
                                                        options=ModelOptions(fuse_qkv=True)): same logits as transformers,
    same greedy tokens through the KV cache as the unfused view, and stack_layers undoes it."""
    from jais2_jax import generate, stack_layers
    hf = hf_model(seed=7, num_key_value_heads=2)
    config = our_config(hf)
    params = our_params(hf, config)
    fused = unstack_layers(params, fuse_qkv=True)
    assert set(fused["layers_0"]["self_attn"]) == {"qkv_proj", "o_proj"}
    ids = np.random.RandomState(6).randint(3, config.vocab_size, (2, 9))
    model = Jais2ForCausalLM(config, options=ModelOptions(scan_layers=False, fuse_qkv=True))
    assert rel_err(model.apply({"params": fused}, jnp.asarray(ids)), _hf_logits(hf, ids)) <= TOL
    plain = Jais2ForCausalLM(config, options=ModelOptions(scan_layers=False))
    want = generate(plain, unstack_layers(params), ids, max_new_tokens=6, eos_token_id=[])
    got = generate(model, fused, ids, max_new_tokens=6, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    back = stack_layers(fused, config)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="scan_layers=False"):
        Jais2ForCausalLM(config,
                         options=ModelOptions(fuse_qkv=True)).apply({"params": params}, jnp.asarray(ids))


def test_longrope_generation_counts_real_tokens_not_padded_width():
    """generate pads the prompt to a multiple of 64 columns; a 30-token prompt must still use
    longrope's short factors (30 + 6 < original 40), as transformers does, not the long ones."""
    from jais2_jax import generate
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 40,
            "short_factor": [1.0 + 0.3 * i for i in range(8)],
            "long_factor": [4.0 + 2.0 * i for i in range(8)]}
    hf = hf_model(seed=8, max_position_embeddings=128, rope_parameters=rope, initializer_range=0.2)
    config = our_config(hf)
    params = our_params(hf, config)
    ids = np.random.RandomState(7).randint(3, config.vocab_size, (1, 30))
    with torch.no_grad():
        want = hf.generate(torch.tensor(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                           eos_token_id=None, pad_token_id=0).numpy()[:, 30:]
    got = generate(Jais2ForCausalLM(config), params, ids, max_new_tokens=6, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(got), want)


def test_chunk_larger_than_cache_is_an_error():
    from jais2_jax import init_cache
    from jais2_jax.model.config import preset
    config = preset("jais2-tiny")
    model = Jais2ForCausalLM(config)
    cache = init_cache(config, 1, 8, dtype=jnp.float32)
    with pytest.raises(ValueError, match="does not fit a cache of 8 slots"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32),
                                          cache=cache))


def test_query_key_mask_packs_answers_after_a_shared_context():
    """attention_mask [B, T, T] (which keys each query sees, causal on top) with positions: a
    context followed by two answers, each seeing the context and itself, gives each answer's
    logits of transformers on context + that answer alone."""
    hf = hf_model(seed=4, num_key_value_heads=2)
    config = our_config(hf)
    params = our_params(hf, config)
    rng = np.random.RandomState(5)
    context, a, b = (rng.randint(3, config.vocab_size, n).tolist() for n in (7, 3, 4))
    ids = np.array([context + a + b])
    segments = np.array([1] * 7 + [2] * 3 + [3] * 4)
    visible = (segments[:, None] == segments[None, :]) | (segments[None, :] == 1)
    positions = np.array([list(range(7)) + list(range(7, 10)) + list(range(7, 11))])
    model = Jais2ForCausalLM(config)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids),
                                  attention_mask=jnp.asarray(visible[None]),
                                  positions=jnp.asarray(positions)))[0]
    ref_a = _hf_logits(hf, np.array([context + a]))[0]
    ref_b = _hf_logits(hf, np.array([context + b]))[0]
    assert rel_err(ours[:10], ref_a) <= TOL
    assert rel_err(ours[10:], ref_b[7:]) <= TOL and rel_err(ours[:7], ref_b[:7]) <= TOL
    # Without the mask the second answer sees the first and its logits change.
    plain = np.asarray(model.apply({"params": params}, jnp.asarray(ids),
                                   positions=jnp.asarray(positions)))[0]
    assert rel_err(plain[10:], ref_b[7:]) > 1e-3
    # With a KV cache the mask says which tokens are real: [B, T] only.
    from jais2_jax import init_cache
    with pytest.raises(ValueError, match=r"attention_mask is \[batch, length\]"):
        model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(visible[None]),
                    cache=init_cache(config, 1, 16, dtype=jnp.float32))
