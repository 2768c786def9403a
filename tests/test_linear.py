"""The matmul seam (`model/linear.py`): a projection's weight is dense, quantized (values + per
output channel scales) or carries a low-rank adapter, decided by the parameter tree. Each kind is
checked against transformers run on the equivalent dense weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import hf_model, our_config, our_params, rel_err
from jais2_jax import Jais2ForCausalLM, LoraSpec
from jais2_jax.checkpoint.hf_mapping import state_dict_from_params

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def _n_in(name: str) -> int:
    return 2 if name == "o_proj" else 1  # o_proj contracts (heads, head_dim)


def _map_projections(params, fn):
    """fn(name, {"kernel": ..., ...}, leading) on every decoder projection (leading = 1: the
    stacked layers axis) and an untied lm_head; returns the new tree."""
    params = jax.tree_util.tree_map(lambda x: x, params)  # a copy of the containers
    layers = params["layers"]
    for block in ("self_attn", "mlp"):
        for name in list(layers[block]):
            if name in PROJECTIONS:
                layers[block][name] = fn(name, dict(layers[block][name]), 1)
    if "lm_head" in params:
        params["lm_head"] = fn("lm_head", dict(params["lm_head"]), 0)
    return params


def _hf_logits_of(params, config, hf_seed, ids, **overrides):
    """transformers' logits with our (dense, float32) tree loaded into it."""
    hf = hf_model(seed=hf_seed, **overrides)
    state = {k: torch.from_numpy(np.asarray(v, np.float32).copy())
             for k, v in state_dict_from_params(config, params).items()}
    hf.load_state_dict(state, strict=False)
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(ids))).logits.numpy()


@pytest.mark.parametrize("tied", [False, True])
def test_int8_tree_is_the_dense_model_on_its_dequantized_weights(tied):
    hf = hf_model(seed=3, num_key_value_heads=2, tie_word_embeddings=tied)
    config = our_config(hf)
    params = our_params(hf, config)

    def quantize(name, p, leading):
        w = np.asarray(p["kernel"], np.float32)
        axes = tuple(range(leading, leading + _n_in(name)))
        scale = np.abs(w).max(axis=axes, keepdims=True) / 127.0
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        return {**p, "kernel": jnp.asarray(q), "scale": jnp.asarray(scale.squeeze(axes))}

    def dequantize(name, p, leading):
        axes = tuple(range(leading, leading + _n_in(name)))
        w = np.asarray(p["kernel"], np.float32) * np.expand_dims(np.asarray(p["scale"]), axes)
        return {k: v for k, v in p.items() if k != "scale"} | {"kernel": jnp.asarray(w)}

    qparams = _map_projections(params, quantize)
    assert qparams["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.int8
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 7))
    ref = _hf_logits_of(_map_projections(qparams, dequantize), config, 3, ids,
                        num_key_value_heads=2, tie_word_embeddings=tied)
    # The plain model follows the tree; the quantization setting makes the same tree at init.
    ours = Jais2ForCausalLM(config).apply({"params": qparams}, jnp.asarray(ids))
    assert rel_err(ours, ref) <= 1e-5, rel_err(ours, ref)
    setting = Jais2ForCausalLM(config, quantization="int8").apply({"params": qparams},
                                                                 jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(setting), np.asarray(ours))
    # ... and the quantization is real: the dense model's logits differ by int8 rounding.
    dense = Jais2ForCausalLM(config).apply({"params": params}, jnp.asarray(ids))
    assert 1e-4 < rel_err(ours, dense) < 5e-2, rel_err(ours, dense)


def test_int8_init_makes_int8_values_and_float32_scales():
    hf = hf_model(seed=3)
    config = our_config(hf)
    shapes = jax.eval_shape(Jais2ForCausalLM(config, quantization="int8").init,
                            jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    shapes = jax.tree_util.tree_map(lambda x: x.value if hasattr(x, "value") else x, shapes,
                                    is_leaf=lambda x: hasattr(x, "value"))
    up = shapes["layers"]["mlp"]["up_proj"]
    assert up["kernel"].dtype == jnp.int8 and up["scale"].dtype == jnp.float32
    assert up["scale"].shape == (config.num_hidden_layers, config.intermediate_size)
    assert shapes["layers"]["self_attn"]["o_proj"]["scale"].shape == (config.num_hidden_layers,
                                                                       config.hidden_size)
    assert shapes["lm_head"]["kernel"].dtype == jnp.int8
    assert shapes["embed_tokens"]["embedding"].dtype == jnp.float32  # embeddings stay
    with pytest.raises(ValueError, match="quantization 'int4'"):
        Jais2ForCausalLM(config, quantization="int4").init(jax.random.key(0),
                                                           jnp.zeros((1, 1), jnp.int32))


def test_lora_tree_is_the_dense_model_with_the_merged_update():
    """y = W x + b + (alpha / r) B(A x), PEFT's LoRA, on every targeted projection."""
    hf = hf_model(seed=4, num_key_value_heads=2)
    config = our_config(hf)
    params = our_params(hf, config)
    spec, targets = LoraSpec(rank=3, alpha=6.0), ("q_proj", "v_proj", "o_proj", "down_proj")
    rng = np.random.RandomState(1)

    def add_adapter(name, p, leading):
        if name not in targets:
            return p
        w = np.asarray(p["kernel"])
        n_in = _n_in(name)
        lead, ins, outs = w.shape[:leading], w.shape[leading:leading + n_in], w.shape[leading + n_in:]
        a = rng.normal(0, 0.2, lead + ins + (spec.rank,)).astype(np.float32)
        b = rng.normal(0, 0.2, lead + (spec.rank,) + outs).astype(np.float32)
        return {**p, "lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}

    def merge(name, p, leading):
        if "lora_a" not in p:
            return p
        a, b = np.asarray(p["lora_a"]), np.asarray(p["lora_b"])
        a2 = a.reshape(a.shape[:leading] + (-1, spec.rank))
        b2 = b.reshape(b.shape[:leading] + (spec.rank, -1))
        delta = (a2 @ b2).reshape(p["kernel"].shape) * spec.scale
        return {"kernel": jnp.asarray(np.asarray(p["kernel"]) + delta),
                **{k: v for k, v in p.items() if k in ("bias",)}}

    lparams = _map_projections(params, add_adapter)
    ids = np.random.RandomState(2).randint(0, config.vocab_size, (2, 6))
    ref = _hf_logits_of(_map_projections(lparams, merge), config, 4, ids, num_key_value_heads=2)
    model = Jais2ForCausalLM(config, lora=spec, lora_targets=targets)
    ours = model.apply({"params": lparams}, jnp.asarray(ids))
    assert rel_err(ours, ref) <= 1e-5, rel_err(ours, ref)
    # A tree with adapters and no lora setting to scale them is refused by name.
    with pytest.raises(ValueError, match="q_proj holds a LoRA adapter"):
        Jais2ForCausalLM(config).apply({"params": lparams}, jnp.asarray(ids))


def test_lora_init_is_peft_s():
    """A from kaiming-uniform(a=sqrt(5)) (bound 1/sqrt(fan_in)), B zero: a new adapter leaves
    the model's function unchanged."""
    hf = hf_model(seed=5)
    config = our_config(hf)
    model = Jais2ForCausalLM(config, lora=LoraSpec(rank=4, alpha=8.0))
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    params = jax.tree_util.tree_map(lambda x: x.value if hasattr(x, "value") else x, params,
                                    is_leaf=lambda x: hasattr(x, "value"))
    q = params["layers"]["self_attn"]["q_proj"]
    bound = 1 / np.sqrt(config.hidden_size)
    a = np.asarray(q["lora_a"])
    assert a.shape == (config.num_hidden_layers, config.hidden_size, 4)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert not np.any(np.asarray(q["lora_b"]))
    assert "lora_a" not in params["lm_head"]
    ids = jnp.asarray(np.random.RandomState(3).randint(0, config.vocab_size, (1, 5)))
    base = {k: v for k, v in params.items()}
    strip = lambda t: jax.tree_util.tree_map(lambda x: x, {  # noqa: E731
        k: (strip(v) if isinstance(v, dict) else v) for k, v in t.items()
        if k not in ("lora_a", "lora_b")})
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids)),
                               np.asarray(Jais2ForCausalLM(config).apply({"params": strip(base)},
                                                                         ids)), rtol=1e-6)
