"""Sharding on 8 fake CPU devices: the table, sharded init, and sharded forward / train step /
generation equal to one device; bad meshes get clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import TINY, rel_err
from jais2_jax import Jais2Config, Jais2ForCausalLM, init_cache
from jais2_jax.parallel import sharding as S
from jais2_jax.training import step as training
from jais2_jax.inference.generate import decode_step, generate, prefill
from jais2_jax.model.layout import init_params
from jais2_jax.training.run_config import RunConfig

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
BATCH, LENGTH = 8, 13  # batch divides data * fsdp of every mesh above

# What each parameter's sharding must be, written out by hand from the table in the docs
# (vocab, heads, kv_heads, mlp -> tensor; embed -> fsdp; layers, head_dim, norm -> whole).
EXPECTED_SPECS = {
    "embed_tokens/embedding": P("tensor", "fsdp"),
    "layers/input_layernorm/scale": P(None, None),
    "layers/post_attention_layernorm/bias": P(None, None),
    "layers/self_attn/q_proj/kernel": P(None, "fsdp", "tensor", None),
    "layers/self_attn/q_proj/bias": P(None, "tensor", None),
    "layers/self_attn/k_proj/kernel": P(None, "fsdp", "tensor", None),
    "layers/self_attn/v_proj/bias": P(None, "tensor", None),
    "layers/self_attn/o_proj/kernel": P(None, "tensor", None, "fsdp"),
    "layers/self_attn/o_proj/bias": P(None, "fsdp"),
    "layers/mlp/up_proj/kernel": P(None, "fsdp", "tensor"),
    "layers/mlp/up_proj/bias": P(None, "tensor"),
    "layers/mlp/down_proj/kernel": P(None, "tensor", "fsdp"),
    "layers/mlp/down_proj/bias": P(None, "fsdp"),
    "norm/scale": P(None),
    "lm_head/kernel": P("fsdp", "tensor"),
}


def _leaf(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


@pytest.fixture(scope="module")
def setup():
    config = Jais2Config(**{**TINY, "max_position_embeddings": 32})  # 4 heads, 4 kv heads
    model = Jais2ForCausalLM(config)
    params = init_params(config, jax.random.key(0))
    # Randomise biases and norms (init makes them 0/1, which would hide a misplaced shard).
    rng = np.random.RandomState(0)
    params = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32), params)
    ids = rng.randint(0, config.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding on some rows
    mask[6, :2] = 0
    return config, model, params, ids, mask


def _loss(model, params, ids, mask):
    logits = model.apply({"params": params}, ids, attention_mask=mask)  # [B, T, V]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    weights = mask[:, 1:].astype(jnp.float32)
    return (ce * weights).sum() / weights.sum()


# The training helper's step (clipping, AdamW with weight decay, chunked loss). Adam's first step
# is lr * g / (|g| + eps): with the usual eps = 1e-8 it is sign(g), so an entry whose gradient is
# rounding noise (a dead ReLU^2 unit: 1e-7 left by cancellation) moves by +-lr either way. eps=1e-3
# keeps the step smooth in the gradient, so equal new params mean equal sharded gradients.
RUN = RunConfig(model="unused", data="unused", output_dir="unused", seq_len=LENGTH - 1,
                batch_size=BATCH, dtype="float32", remat_policy="none", lr=1e-2, warmup_steps=0,
                schedule="constant", eps=1e-3, loss_chunk=4)
OPTIMIZER = training.make_optimizer(RUN)


def _batch(ids, mask):
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask[:, 1:]}


@pytest.fixture(scope="module")
def reference(setup):
    """Single-device forward logits, one train step and greedy tokens."""
    config, model, params, ids, mask = setup
    logits = jax.jit(model.apply)({"params": params}, ids, attention_mask=mask)
    step = jax.jit(training.make_train_step(model, OPTIMIZER, RUN))
    state, metrics = step(training.init_state(params, OPTIMIZER, 0), _batch(ids, mask))
    tokens = generate(model, params, ids, mask, max_new_tokens=6, eos_token_id=())
    return np.asarray(logits), state.params, metrics, np.asarray(tokens)


# ------------------------------------------------------------------------------------- the table
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_init_follows_table(setup, shape):
    config = setup[0]
    mesh = S.make_mesh(shape)
    params = S.init_params_sharded(config, mesh, jax.random.key(0))
    sizes = dict(mesh.shape)
    for path, spec in EXPECTED_SPECS.items():
        leaf = _leaf(params, path)
        assert leaf.sharding.spec == spec, path
        # Each device holds only its shard: dims divided by the sizes of their mesh axes.
        want = tuple(d // (sizes[a] if a else 1) for d, a in zip(leaf.shape, tuple(spec) + (None,) * 4))
        assert leaf.addressable_shards[0].data.shape == want, path
    # Same values as one-device init (partitionable threefry): the same random bits; the normal's
    # erf_inv may round differently once fused per shard (seen: 7e-9 on values of std 0.02).
    single = init_params(config, jax.random.key(0))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(single)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)


def test_presets_and_specs():
    assert S.make_mesh().shape == {"data": 1, "fsdp": 8, "tensor": 1}  # fsdp is the default
    assert S.mesh_shape("dp", 8) == (8, 1, 1)
    assert S.mesh_shape("tp", 8) == (1, 1, 8)
    assert S.mesh_shape("fsdp+tp", 64, devices_per_host=4) == (1, 16, 4)
    assert S.mesh_shape("data=2,tensor=2,fsdp=-1", 8) == (2, 2, 2)
    assert S.mesh_shape("2,-1,1", 8) == (2, 4, 1)
    assert S.abstract_mesh("fsdp", 256).shape == {"data": 1, "fsdp": 256, "tensor": 1}


def test_bad_mesh_errors():
    with pytest.raises(ValueError, match=r"\(2, 2, 4\) has 16 devices, but 8 are available"):
        S.make_mesh((2, 2, 4))
    with pytest.raises(ValueError, match="not divisible"):
        S.make_mesh((3, -1, 1))
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        S.parse_mesh("model=2")
    with pytest.raises(ValueError, match="preset"):
        S.parse_mesh("lots")
    for sizes in ((2.5, -1, 1), (True, -1, 1)):  # not rounded or read as 1
        with pytest.raises(ValueError, match="sizes must be integers"):
            S.parse_mesh(sizes)
    with pytest.raises(ValueError, match="names the axis 'data' twice"):
        S.parse_mesh("data=2,data=4")
    for n in (0, -4):
        with pytest.raises(ValueError, match="at least one device"):
            S.mesh_shape("fsdp", n)


def test_indivisible_heads_error():
    # 26 heads over tensor=4 (the 8B shape): names both numbers, the rule, and tensor=2.
    config = Jais2Config(vocab_size=128, hidden_size=208, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=26)
    with pytest.raises(ValueError) as e:
        S.param_shardings(config, S.make_mesh((1, 2, 4)))
    msg = str(e.value)
    assert "size 26" in msg and "total size 4" in msg and "heads' -> 'tensor'" in msg
    assert "nearest workable choice: tensor=2" in msg


def test_kv_heads_over_tensor_4_is_an_error():
    config = Jais2Config(**{**TINY, "num_key_value_heads": 2})
    with pytest.raises(ValueError, match=r"size 2 \(rule 'kv_heads' -> 'tensor'.*tensor=2"):
        S.param_shardings(config, S.make_mesh((1, 2, 4)))
    with pytest.raises(ValueError, match="KV cache: .*'kv_heads'"):
        S.cache_shardings(config, S.make_mesh((1, 2, 4)), batch_size=2, max_length=8)
    with pytest.raises(ValueError, match=r"batch: dimension 0 of size 6 .*'batch'"):
        S.batch_sharding(S.make_mesh((2, 2, 2)), (6, 4))


def test_opt_state_shardings(setup):
    config, _, params, _, _ = setup
    mesh = S.make_mesh((2, 2, 2))
    ps = S.param_shardings(config, mesh)
    shardings = S.opt_state_shardings(OPTIMIZER, ps, params)  # clip, then AdamW
    adam = shardings[1][0]
    assert adam.count.spec == P()
    for path, spec in EXPECTED_SPECS.items():
        assert _leaf(adam.mu, path).spec == spec and _leaf(adam.nu, path).spec == spec
    # Factored second moments are not param-shaped: replicated, never a mismatched sharding.
    fac = S.opt_state_shardings(optax.adafactor(1e-3), ps, params)
    for s, leaf in zip(jax.tree_util.tree_leaves(fac, is_leaf=lambda x: isinstance(x, NamedSharding)),
                       jax.tree_util.tree_leaves(jax.eval_shape(optax.adafactor(1e-3).init, params))):
        assert len(s.spec) <= len(leaf.shape)


# ------------------------------------------------------------------ numerics equal one device
@pytest.mark.parametrize("shape", MESHES)
def test_forward_and_train_step_match_single_device(setup, reference, shape):
    config, model, params, ids, mask = setup
    ref_logits, ref_params, ref_metrics, _ = reference
    mesh = S.make_mesh(shape)
    ps = S.param_shardings(config, mesh)
    state_sh = training.state_shardings(OPTIMIZER, ps, params)
    bs = S.batch_sharding(mesh, ids.shape)
    sharded = S.shard_params(params, ps)
    ids_, mask_ = jax.device_put(ids, bs), jax.device_put(mask, bs)
    batch = jax.device_put(_batch(ids, mask), S.batch_sharding(mesh, (BATCH, LENGTH - 1)))
    with S.use_mesh(mesh):
        forward = lambda p, i, m: model.apply({"params": p}, i, attention_mask=m)  # noqa: E731
        logits = jax.jit(forward, in_shardings=(ps, bs, bs))(sharded, ids_, mask_)
        step = training.jit_train_step(training.make_train_step(model, OPTIMIZER, RUN), state_sh,
                                       batch["input_ids"].sharding)
        # Made inside jit (distinct buffers: the step donates the state).
        state = jax.jit(lambda p: training.init_state(p, OPTIMIZER, 0), out_shardings=state_sh)(
            sharded)
        state, metrics = step(state, batch)
    assert rel_err(logits, ref_logits) <= 1e-5
    for key in ("loss", "grad_norm"):
        assert abs(float(metrics[key]) - float(ref_metrics[key])) <= 1e-5 * abs(float(ref_metrics[key]))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state.params),
                            jax.tree_util.tree_leaves(ref_params)):
        assert rel_err(a, b) <= 1e-5, jax.tree_util.keystr(path)
    assert _leaf(state.params, "layers/mlp/up_proj/kernel").sharding.spec == P(None, "fsdp", "tensor")
    adam = state.opt_state[1][0]
    assert adam.mu["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")


@pytest.mark.parametrize("shape", MESHES)
def test_greedy_generation_with_sharded_cache(setup, reference, shape):
    config, model, params, ids, mask = setup
    ref_tokens = reference[3]
    mesh = S.make_mesh(shape)
    ps = S.param_shardings(config, mesh)
    sharded = S.shard_params(params, ps)
    cs = S.cache_shardings(config, mesh, BATCH, 32)
    # generate() takes transformers' left padding; prefill wants each row's tokens first.
    order = np.argsort(1 - mask, axis=1, kind="stable")
    r_ids, r_mask = np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1)
    cache = jax.device_put(init_cache(config, BATCH, 32, dtype=jnp.float32), cs)
    tokens = []
    with S.use_mesh(mesh):
        logits, cache = prefill(model, sharded, r_ids, r_mask, cache)
        for _ in range(ref_tokens.shape[1]):
            tokens.append(np.asarray(jnp.argmax(logits, -1)))
            logits, cache = decode_step(model, sharded, jnp.asarray(tokens[-1]), cache)
    assert cache.k.sharding.is_equivalent_to(cs.k, 5)  # the cache stayed sharded through the steps
    np.testing.assert_array_equal(np.stack(tokens, 1), ref_tokens)


# ------------------------------------------------------------------------- collectives in HLO
def test_xla_inserts_fsdp_and_tensor_collectives(setup):
    """FSDP gathers weights and reduce-scatters gradients; tensor parallelism all-reduces."""
    config, model, params, ids, mask = setup

    def hlo(shape):
        mesh = S.make_mesh(shape)
        ps, bs = S.param_shardings(config, mesh), S.batch_sharding(mesh, ids.shape)
        grad = jax.grad(lambda p, i, m: _loss(model, p, i, m))
        with S.use_mesh(mesh):
            return jax.jit(grad, in_shardings=(ps, bs, bs), out_shardings=ps).lower(
                params, ids, mask).compile().as_text()

    fsdp = hlo((1, 8, 1))
    assert "all-gather" in fsdp and ("reduce-scatter" in fsdp or "all-reduce" in fsdp)
    tensor = hlo((1, 2, 4))
    assert "all-reduce" in tensor
    dp = hlo((8, 1, 1))  # pure data parallel: gradients all-reduced, no weight gathering
    assert "all-reduce" in dp and "all-gather" not in dp
