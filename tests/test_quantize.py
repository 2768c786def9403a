"""Weight-only int8 / fp8 / nf4 quantization (`jais2_jax.quantize`): the quantized model is exactly
the dense model on the dequantized weights, checked against transformers run on those weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import hf_model, our_config, our_params, rel_err
from jais2_jax import Jais2ForCausalLM, ModelOptions, dequantize, generate, quantize, unstack_layers
from jais2_jax.checkpoint.hf_mapping import state_dict_from_params
from jais2_jax.model.quantize import dequantize_array, quantize_array

# QLoRA's 4-bit NormalFloat values (Dettmers et al. 2023, "QLoRA", appendix E)
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)

VARIANTS = {
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "head_dim_24": dict(head_dim=24),
    "no_biases": dict(attention_bias=False, mlp_bias=False),
    "tied": dict(tie_word_embeddings=True),
}


def _hf_on(params, config, seed, **overrides):
    """transformers' model carrying our (dense float32) tree."""
    hf = hf_model(seed=seed, **overrides)
    hf.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32).copy())
                        for k, v in state_dict_from_params(config, params).items()}, strict=False)
    return hf


def _ours_and_reference(qparams, config, scheme, seed, ids_seed, **overrides):
    """(our quantized model's float32 logits, transformers' on the dequantized weights, ids)."""
    ref_model = _hf_on(dequantize(qparams), config, seed, **overrides)
    ids = np.random.RandomState(ids_seed).randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    ours = Jais2ForCausalLM(config, quantization=scheme).apply({"params": qparams},
                                                               jnp.asarray(ids))
    return ours, ref, ids


def test_int8_formula_is_the_issue_s():
    """scale[j] = max_i |W[j, i]| / 127 over the input dim, q = round half to even, clipped."""
    w = np.array([[1.0, -2.0], [0.5, 127.0], [63.5, 0.0], [0.0, 0.0]], np.float32)  # [in, out]
    q, scale = quantize_array(w, "int8")
    np.testing.assert_array_equal(scale, [63.5 / 127, 127.0 / 127])
    # 1 / 0.5 = 2; 0.5 / 0.5 = 1; 63.5 / 0.5 = 127; -2 / 1 = -2; 127 / 1 = 127
    np.testing.assert_array_equal(q, [[2, -2], [1, 127], [127, 0], [0, 0]])
    q, _ = quantize_array(np.array([[2.5], [0.5], [1.5], [127.0]], np.float32), "int8")
    np.testing.assert_array_equal(q[:3, 0], [2, 0, 2])  # halves to even
    q, scale = quantize_array(np.zeros((3, 2), np.float32), "int8")
    assert np.all(scale == 1.0) and not np.any(q)  # an all-zero channel


def test_nf4_is_qlora_s_normalfloat_in_blocks_of_64_inputs():
    """scale[b, j] = max |W| over block b (64 consecutive contracted inputs, the contracted dims
    flattened) and output j; code = the nearest NF4 value to W / scale; stacked layers kept."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 4, 32, 3)).astype(np.float32)  # [layers, heads, hd, out]
    codes, scale = quantize_array(w, "nf4", leading=1, n_in=2)  # as o_proj's kernel
    assert codes.dtype == jnp.uint4 and codes.shape == w.shape and scale.shape == (2, 2, 3)
    blocks = w.reshape(2, 2, 64, 3)
    np.testing.assert_array_equal(scale, np.abs(blocks).max(axis=2))
    nearest = np.abs(blocks[..., None] / scale[:, :, None, :, None] - NF4).argmin(-1)
    np.testing.assert_array_equal(codes.astype(np.int32).reshape(nearest.shape), nearest)
    np.testing.assert_allclose(dequantize_array(codes, scale, leading=1, n_in=2),
                               (NF4[nearest] * scale[:, :, None]).reshape(w.shape), rtol=1e-7)
    with pytest.raises(ValueError, match="blocks of 64 inputs, but it contracts 96"):
        quantize_array(np.ones((96, 8), np.float32), "nf4")


def test_nf4_quantizes_a_host_weight_without_a_16x_temporary():
    """Reading a checkpoint quantizes numpy weights: qwix's nearest-code search, run op by op,
    would hold float32 [weights, 16] (2.2 GB for this 67 MB weight); jitted it fuses (~0.25 GB).
    In a fresh process, so that the peak RSS is this call's."""
    import subprocess
    import sys
    code = ("import resource, numpy as np; from jais2_jax.model.quantize import quantize_array; "
            "w = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32); "
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "q, s = quantize_array(w, 'nf4'); "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) // 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth_mb = int(out.stdout.strip().splitlines()[-1])
    assert growth_mb < 800, growth_mb


@pytest.mark.parametrize("name", ["gqa", "tied", "no_biases"])
def test_nf4_logits_equal_transformers_on_dequantized_weights(name):
    """nf4: the decoder projections as 4-bit codes + block scales, an untied lm_head in int8."""
    overrides = dict(VARIANTS[name], intermediate_size=128)  # nf4 blocks: 64 | contracted sizes
    hf = hf_model(seed=7, **overrides)
    config = our_config(hf)
    params = our_params(hf, config)
    qparams = quantize(params, "nf4")
    layers = qparams["layers"]
    for block, proj in (("self_attn", "q_proj"), ("self_attn", "o_proj"), ("mlp", "down_proj")):
        assert layers[block][proj]["kernel"].dtype == jnp.uint4, proj
    assert layers["mlp"]["down_proj"]["scale"].shape == (2, 2, config.hidden_size)  # 128 / 64
    assert ("lm_head" not in qparams) == (name == "tied")
    if name != "tied":
        assert qparams["lm_head"]["kernel"].dtype == jnp.int8
    ours, ref, ids = _ours_and_reference(qparams, config, "nf4", 7, 0, **overrides)
    assert rel_err(ours, ref) <= 1e-5, rel_err(ours, ref)
    # the plain model follows the tree (the codes' dtype says nf4)
    plain = Jais2ForCausalLM(config).apply({"params": qparams}, jnp.asarray(ids))
    assert rel_err(plain, ref) <= 1e-5
    dense = Jais2ForCausalLM(config).apply({"params": params}, jnp.asarray(ids))
    assert rel_err(ours, dense) > 1e-3  # the quantization is real (4 bits: coarser than int8)


def test_nf4_loads_quantized_while_reading_on_a_mesh(tmp_path):
    """load_checkpoint(..., quantize="nf4") equals quantize(dense, "nf4") bit for bit, with the
    nf4 model's shardings on an 8-device mesh (the scales' block axis replicated), and greedy
    generation equals transformers on the dequantized weights."""
    from jais2_jax import load_checkpoint
    from jais2_jax.parallel import make_mesh, model_param_shardings, use_mesh
    hf = hf_model(seed=13, num_key_value_heads=2, intermediate_size=128)
    hf.save_pretrained(tmp_path / "hf")
    mesh = make_mesh((2, 2, 2))
    config, qparams = load_checkpoint(tmp_path / "hf", quantize="nf4", mesh=mesh)
    _, dense = load_checkpoint(tmp_path / "hf")
    expected = quantize(jax.device_get(dense), "nf4")
    flat_want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    for path, got in jax.tree_util.tree_flatten_with_path(qparams)[0]:
        assert got.dtype == flat_want[path].dtype, path
        np.testing.assert_array_equal(np.asarray(got), np.asarray(flat_want[path]),
                                      err_msg=str(path))
    model = Jais2ForCausalLM(config, quantization="nf4")
    for got, want in zip(jax.tree_util.tree_leaves(qparams),
                         jax.tree_util.tree_leaves(model_param_shardings(model, mesh))):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    ref_model = _hf_on(dequantize(jax.device_get(qparams)), config, 13, num_key_value_heads=2,
                       intermediate_size=128)
    ids = np.random.RandomState(1).randint(3, config.vocab_size, (2, 5))
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False,
                                 min_new_tokens=6).numpy()[:, 5:]
    with use_mesh(mesh):
        ours = generate(model, qparams, ids, max_new_tokens=6, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(ours), ref)
    with pytest.raises(ValueError, match="blocks of 64 inputs, but it contracts 96"):
        hf_model(seed=13).save_pretrained(tmp_path / "odd")  # intermediate 96: down_proj's
        load_checkpoint(tmp_path / "odd", quantize="nf4")


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_quantized_logits_equal_transformers_on_dequantized_weights(name, scheme):
    hf = hf_model(seed=7, **VARIANTS[name])
    config = our_config(hf)
    params = our_params(hf, config)
    qparams = quantize(params, scheme)
    up = qparams["layers"]["mlp"]["up_proj"]
    assert up["kernel"].dtype == {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[scheme]
    assert qparams["embed_tokens"]["embedding"].dtype == jnp.float32
    ours, ref, ids = _ours_and_reference(qparams, config, scheme, 7, 0, **VARIANTS[name])
    assert rel_err(ours, ref) <= 1e-5, rel_err(ours, ref)
    dense = Jais2ForCausalLM(config).apply({"params": params}, jnp.asarray(ids))
    assert rel_err(ours, dense) > 1e-4  # the quantization is real


def test_int8_greedy_generation_equals_transformers_and_per_layer_views():
    hf = hf_model(seed=8, num_key_value_heads=2)
    config = our_config(hf)
    qparams = quantize(our_params(hf, config), "int8")
    ref_model = _hf_on(dequantize(qparams), config, 8, num_key_value_heads=2)
    ids = np.random.RandomState(1).randint(3, config.vocab_size, (2, 5))
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor(ids), max_new_tokens=8, do_sample=False,
                                 min_new_tokens=8).numpy()[:, 5:]
    model = Jais2ForCausalLM(config, quantization="int8")
    ours = generate(model, qparams, ids, max_new_tokens=8, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(ours), ref)
    # The GPU decoding layout: per-layer weights with q/k/v fused, quantized after the fusion.
    fused = quantize(unstack_layers(dequantize(qparams), fuse_qkv=True), "int8")
    per_layer = Jais2ForCausalLM(config, quantization="int8",
                                 options=ModelOptions(scan_layers=False, fuse_qkv=True))
    np.testing.assert_array_equal(
        np.asarray(generate(per_layer, fused, ids, max_new_tokens=8, eos_token_id=[])), ref)


def test_int8_on_an_8_device_mesh_equals_one_device():
    from jais2_jax.parallel import make_mesh, model_param_shardings, use_mesh
    hf = hf_model(seed=9, num_key_value_heads=2)
    config = our_config(hf)
    mesh = make_mesh((2, 2, 2))
    model = Jais2ForCausalLM(config, quantization="int8")
    dense_sh = model_param_shardings(Jais2ForCausalLM(config), mesh)
    sharded = quantize(jax.device_put(our_params(hf, config), dense_sh), "int8")
    expected = model_param_shardings(model, mesh)
    for got, want in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(expected)):
        assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
    one = quantize(our_params(hf, config), "int8")
    ids = np.random.RandomState(2).randint(3, config.vocab_size, (4, 6))
    with use_mesh(mesh):
        on_mesh = generate(model, sharded, ids, max_new_tokens=6, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(on_mesh),
                                  np.asarray(generate(model, one, ids, max_new_tokens=6,
                                                      eos_token_id=[])))


@pytest.mark.parametrize("tied", [False, True])
def test_int8_embedding_table_equals_transformers_on_dequantized_weights(tied):
    """`quantize_embedding` (QLoRA's base): one scale per row (token) of the table, max |row| / 127;
    the model gathers int8 rows (and, tied, makes the logits from them) and equals transformers
    on the dequantized table; the tree's sharding on a mesh is the quantized model's own."""
    from jais2_jax.model.quantize import is_embedding_quantized, quantize_embedding
    from jais2_jax.parallel import make_mesh, model_param_shardings
    hf = hf_model(seed=11, tie_word_embeddings=tied)
    config = our_config(hf)
    params = our_params(hf, config)
    qparams = quantize_embedding(quantize(params, "int8"), "int8")
    table = np.asarray(params["embed_tokens"]["embedding"])  # [V, D]
    emb = qparams["embed_tokens"]
    assert emb["embedding"].dtype == jnp.int8 and is_embedding_quantized(qparams)
    amax = np.abs(table).max(axis=1)
    assert amax[0] == 0  # the padding row (zeros): scale 1, as any all-zero channel
    np.testing.assert_array_equal(emb["scale"], np.where(amax > 0, amax / 127, 1.0))
    np.testing.assert_array_equal(emb["embedding"], np.clip(np.round(table / emb["scale"][:, None]),
                                                            -127, 127))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_embedding(qparams, "int8")
    ours, ref, ids = _ours_and_reference(qparams, config, "int8", 11, 4, tie_word_embeddings=tied)
    assert rel_err(ours, ref) <= 1e-5, rel_err(ours, ref)
    dense_emb = quantize(params, "int8")  # the table dense: quantizing it is real
    assert rel_err(Jais2ForCausalLM(config, quantization="int8").apply(
        {"params": dense_emb}, jnp.asarray(ids)), ref) > 1e-4
    # on a mesh: the table keeps its sharding, the scales take its vocab axis's
    model = Jais2ForCausalLM(config, quantization="int8", quantize_embedding=True)
    mesh = make_mesh((2, 2, 2))
    sharded = quantize_embedding(jax.device_put(
        quantize(params, "int8"), model_param_shardings(Jais2ForCausalLM(
            config, quantization="int8"), mesh)), "int8")
    want = model_param_shardings(model, mesh)["embed_tokens"]
    for name in ("embedding", "scale"):
        got = sharded["embed_tokens"][name]
        assert got.sharding.is_equivalent_to(want[name], got.ndim), (name, got.sharding)
        # XLA divides by 127 as a multiply by its reciprocal: the scales within 1 ulp of numpy's
        np.testing.assert_allclose(np.asarray(got), np.asarray(emb[name]), rtol=2e-7, atol=0)


def test_bad_input():
    hf = hf_model(seed=3)
    config = our_config(hf)
    params = our_params(hf, config)
    with pytest.raises(ValueError, match="quantization scheme 'int4'"):
        quantize(params, "int4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantize(params, "int8"), "int8")
    with pytest.raises(ValueError, match="quantize_embedding needs a quantization scheme"):
        Jais2ForCausalLM(config, quantize_embedding=True).init(jax.random.key(0),
                                                               jnp.zeros((1, 1), jnp.int32))


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "int8"])
def test_plan_counts_the_quantized_bytes_of_real_arrays(cache_dtype):
    """`jais2 plan --quantize int8` (and an int8 KV cache): the bytes per device equal those of
    real quantized, sharded arrays on an 8-device mesh."""
    from jais2_jax import build_inference_program
    from jais2_jax.parallel import abstract_mesh, make_mesh, model_param_shardings
    from jais2_jax.planning import memory
    hf = hf_model(seed=10, num_key_value_heads=2)
    config = our_config(hf)
    mesh = make_mesh((1, 4, 2))
    dense = jax.device_put(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16),
                                                  our_params(hf, config)),
                           model_param_shardings(Jais2ForCausalLM(config), mesh))
    q = quantize(dense, "int8")
    per_device = {}
    for a in jax.tree_util.tree_leaves(q):
        for s in a.addressable_shards:
            per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
    plan = memory.make_plan(config, abstract_mesh((1, 4, 2), 8), batch=4, seq=32, mode="decode",
                            param_dtype="bfloat16", cache_dtype=cache_dtype, quantize="int8")
    assert plan.params == max(per_device.values())
    program = build_inference_program(config, batch_size=4, max_length=32, mesh=mesh,
                                      cache_dtype=jnp.int8 if cache_dtype == "int8" else None)
    cache = program.init_cache()
    cache_bytes = {}
    for a in jax.tree_util.tree_leaves(cache):
        for s in a.addressable_shards:
            cache_bytes[s.device] = cache_bytes.get(s.device, 0) + s.data.nbytes
    assert plan.kv_cache == max(cache_bytes.values())
    dense_plan = memory.make_plan(config, abstract_mesh((1, 4, 2), 8), batch=4, seq=32,
                                  mode="decode", param_dtype="bfloat16")
    assert plan.params < dense_plan.params
    with pytest.raises(ValueError, match="is for decoding"):
        memory.make_plan(config, abstract_mesh((1, 4, 2), 8), batch=4, seq=32, mode="train",
                         quantize="int8")


@pytest.mark.parametrize("fmt", ["hf", "orbax"])
@pytest.mark.parametrize("on_mesh", [False, True])
def test_load_checkpoint_quantizes_while_reading(tmp_path, fmt, on_mesh):
    """load_checkpoint(..., quantize="int8") equals quantize() of the loaded tree, bit for bit,
    with the quantized model's shardings on a mesh; non-projections take `dtype`."""
    from jais2_jax import load_checkpoint
    from jais2_jax.checkpoint import convert_hf_to_orbax
    from jais2_jax.parallel import make_mesh, model_param_shardings
    hf = hf_model(seed=13, num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "hf")
    folder = tmp_path / "hf"
    if fmt == "orbax":
        convert_hf_to_orbax(folder, tmp_path / "orbax", progress=False)
        folder = tmp_path / "orbax"
    mesh = make_mesh((2, 2, 2)) if on_mesh else None
    config, qparams = load_checkpoint(folder, quantize="int8", mesh=mesh)
    _, dense = load_checkpoint(folder)
    expected = quantize(jax.device_get(dense), "int8")
    flat_got = jax.tree_util.tree_flatten_with_path(qparams)[0]
    flat_want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    assert len(flat_got) == len(flat_want)
    for path, got in flat_got:
        want = flat_want[path]
        assert got.dtype == want.dtype, path
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
    if on_mesh:
        shardings = model_param_shardings(Jais2ForCausalLM(config, quantization="int8"), mesh)
        for got, want in zip(jax.tree_util.tree_leaves(qparams),
                             jax.tree_util.tree_leaves(shardings)):
            assert got.sharding.is_equivalent_to(want, got.ndim)
    _, bf16 = load_checkpoint(folder, quantize="int8", dtype="bfloat16")
    assert bf16["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    assert bf16["layers"]["mlp"]["up_proj"]["bias"].dtype == jnp.bfloat16
    assert bf16["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.int8
    with pytest.raises(ValueError, match="quantization scheme 'int4'"):
        load_checkpoint(folder, quantize="int4")
