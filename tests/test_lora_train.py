"""LoRA / QLoRA training (`training/lora.py`): the train step's adapter gradients against torch
autograd through transformers + PEFT, a frozen base, optimizer state over the adapters only,
bitwise resume, a changed lora block refused, QLoRA's int8 and nf4 bases, and bad input refused by
name."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import hf_model, our_config, our_params, rel_err

from jais2_jax.model.linear import QUANTIZED_DTYPES, LoraSpec
from jais2_jax.model.modules import LORA_TARGETS, Jais2ForCausalLM
from jais2_jax.model.options import ModelOptions
from jais2_jax.model.quantize import dequantize, quantize, quantize_embedding
from jais2_jax.training import data
from jais2_jax.training.lora import is_lora_run, read_run_adapter
from jais2_jax.training.run_config import RunConfig
from jais2_jax.training.step import init_state, make_train_step
from jais2_jax.training.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK, ALPHA = 4, 8.0


def _peft_names(i, name):
    block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return block, f"base_model.model.model.layers.{i}.{block}.{name}"


def _our_adapters(tensors, config, targets):
    """PEFT's lora_A / lora_B tensors (by PEFT name) in our stacked layout: lora_a [L, in..., r],
    lora_b [L, r, out...]."""
    h, kv, hd, d = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                    config.hidden_size)
    out_shape = {"q_proj": (h, hd), "k_proj": (kv, hd), "v_proj": (kv, hd), "o_proj": (d,),
                 "up_proj": (config.intermediate_size,), "down_proj": (d,)}
    tree = {}
    for name in targets:
        a_l, b_l = [], []
        for i in range(config.num_hidden_layers):
            block, prefix = _peft_names(i, name)
            a = np.asarray(tensors[f"{prefix}.lora_A.default.weight"]).T  # [in, r]
            if name == "o_proj":
                a = a.reshape(h, hd, -1)
            a_l.append(a)
            b = np.asarray(tensors[f"{prefix}.lora_B.default.weight"]).T  # [r, out]
            b_l.append(b.reshape((-1,) + out_shape[name]))
        tree.setdefault(block, {})[name] = {"lora_a": np.stack(a_l), "lora_b": np.stack(b_l)}
    return {"layers": tree}


def _peft_model(targets, seed=0, base_weights=None, **overrides):
    """transformers + PEFT with random A and B; `base_weights(params) -> params` replaces the
    base's weights first (in our layout)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from jais2_jax.checkpoint.hf_mapping import state_dict_from_params
    base = hf_model(seed, **overrides)
    config = our_config(base)
    params = our_params(base, config)  # before PEFT wraps it (its base weights are the same)
    if base_weights is not None:
        params = base_weights(params)
        sd = state_dict_from_params(config, jax.tree_util.tree_map(np.asarray, params))
        # a tied lm_head is the embedding table: the state dict has no lm_head.weight
        base.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in sd.items()},
                             strict=not config.tie_word_embeddings)
    peft_model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules=list(targets)))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # B non-zero, so that A has a gradient; A and B both random
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return peft_model, config, params


def _shifted_batch(ids):
    targets = np.pad(ids[:, 1:], ((0, 0), (0, 1)))
    mask = np.pad(np.ones((ids.shape[0], ids.shape[1] - 1), np.float32), ((0, 0), (0, 1)))
    return {"input_ids": jnp.asarray(ids), "targets": jnp.asarray(targets),
            "loss_mask": jnp.asarray(mask)}


def _grad_catcher():
    """An 'optimizer' that applies nothing and keeps the gradient it was given as its state."""
    return optax.GradientTransformation(
        lambda p: jax.tree_util.tree_map(jnp.zeros_like, p),
        lambda g, s, p=None: (jax.tree_util.tree_map(jnp.zeros_like, g), g))


def _step_run(targets, **kw):
    return RunConfig(**{"model": "jais2-tiny", "data": "", "output_dir": "", "seq_len": 16,
                        "batch_size": 4, "loss_chunk": 4, "dtype": "float32",
                        "remat_policy": "none", "warmup_steps": 0, "clip_grad_norm": None,
                        "lora": {"rank": RANK, "alpha": ALPHA, "target_modules": list(targets)},
                        **kw})


@pytest.mark.parametrize("targets,kw", [
    (LORA_TARGETS, {}),
    (("q_proj", "v_proj", "down_proj"), {"grad_accum_steps": 2, "scan_layers": False,
                                         "remat_policy": "dots"}),
    (("k_proj", "o_proj", "up_proj", "down_proj"), {"remat_policy": "full"}),
])
def test_adapter_gradients_equal_torch_autograd_through_peft(targets, kw):
    """The train step's gradients for every A and B (kept by an optimizer that applies nothing)
    equal torch autograd's through transformers + PEFT on the same batch and the same A, B."""
    peft_model, config, params = _peft_model(targets)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (4, 16))
    loss, ref, adapters = _torch_loss_and_adapter_grads(peft_model, config, targets, ids)

    run = _step_run(targets, **kw)
    model = Jais2ForCausalLM(config, lora=LoraSpec(RANK, ALPHA), lora_targets=tuple(targets),
                             options=ModelOptions(remat_policy=run.remat_policy))
    catcher = _grad_catcher()
    step = jax.jit(make_train_step(model, catcher, run, frozen=True))
    state, metrics = step(init_state(adapters, catcher, 0), _shifted_batch(ids), params)
    assert abs(float(metrics["loss"]) - loss) < 1e-5 * loss
    grads = state.opt_state
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(ref)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        r = ref
        for k in path:
            r = r[k.key]
        assert np.abs(r).max() > 0
        assert rel_err(g, r) < 1e-5, (jax.tree_util.keystr(path), rel_err(g, r))


def _torch_loss_and_adapter_grads(peft_model, config, targets, ids):
    import torch
    peft_model.zero_grad()
    loss = peft_model(input_ids=torch.tensor(ids), labels=torch.tensor(ids)).loss
    loss.backward()
    named = dict(peft_model.named_parameters())
    grads = _our_adapters({k: p.grad.numpy() for k, p in named.items() if "lora_" in k}, config,
                          targets)
    adapters = jax.tree_util.tree_map(jnp.asarray, _our_adapters(
        {k: p.detach().numpy() for k, p in named.items() if "lora_" in k}, config, targets))
    return loss.item(), grads, adapters


@pytest.mark.parametrize("scheme,tied,tiles", [("int8", False, 1), ("int8", False, 4),
                                               ("int8", True, 4), ("nf4", False, 4)])
def test_qlora_int8_head_and_embedding_equal_torch_autograd_on_dequantized_weights(
        scheme, tied, tiles, monkeypatch):
    """QLoRA's base holds the lm_head and the embedding table in int8 too (per vocab entry
    scales): the train step's loss and every adapter gradient, and the eval step's loss, equal
    torch autograd through transformers + PEFT whose base weights are those int8 values
    dequantized in float32. The fused loss uses the int8 head in 1 or 4 vocabulary tiles.
    nf4: the projections as NF4 codes + block scales (the tables int8), the same way."""
    from jais2_jax.model.quantize import quantize_embedding
    from jais2_jax.training import step as step_lib
    from jais2_jax.training.step import make_eval_step
    quantized = {}

    def dequantized(params):
        quantized["q"] = quantize_embedding(
            quantize(jax.tree_util.tree_map(jnp.asarray, params), scheme), scheme)
        return dequantize(quantized["q"])

    shape = {"intermediate_size": 128} if scheme == "nf4" else {}  # nf4: 64 | contracted sizes
    peft_model, config, _ = _peft_model(LORA_TARGETS, seed=6, base_weights=dequantized,
                                        tie_word_embeddings=tied, **shape)
    q = quantized["q"]
    assert q["embed_tokens"]["embedding"].dtype == jnp.int8
    assert tied == ("lm_head" not in q) and (tied or q["lm_head"]["kernel"].dtype == jnp.int8)
    assert q["layers"]["mlp"]["up_proj"]["kernel"].dtype == QUANTIZED_DTYPES[scheme]
    d, v = config.hidden_size, config.vocab_size
    monkeypatch.setattr(step_lib, "HEAD_TILE_BYTES", d * v * 4 // tiles)
    assert step_lib.head_tiles(d, v, 4) == tiles
    ids = np.random.default_rng(6).integers(0, config.vocab_size, (4, 16))
    loss, ref, adapters = _torch_loss_and_adapter_grads(peft_model, config, LORA_TARGETS, ids)

    run = _step_run(LORA_TARGETS)
    model = Jais2ForCausalLM(config, lora=LoraSpec(RANK, ALPHA))
    catcher = _grad_catcher()
    step = jax.jit(make_train_step(model, catcher, run, frozen=True))
    batch = _shifted_batch(ids)
    state, metrics = step(init_state(adapters, catcher, 0), batch, q)
    assert abs(float(metrics["loss"]) - loss) < 1e-5 * loss
    for path, g in jax.tree_util.tree_leaves_with_path(state.opt_state):
        r = ref
        for k in path:
            r = r[k.key]
        assert np.abs(r).max() > 0
        assert rel_err(g, r) < 1e-5, (jax.tree_util.keystr(path), rel_err(g, r))
    sums = jax.jit(make_eval_step(model, run))(adapters, batch, q)
    assert abs(float(sums["ce_sum"] / sums["targets"]) - loss) < 1e-5 * loss


@pytest.mark.parametrize("scheme", ["int8", None])
def test_lora_program_on_tensor_parallel_meshes_equals_one_device(monkeypatch, scheme):
    """The real QLoRA program (int8 head in 4 vocabulary tiles, int8 embedding), and the LoRA
    program on a dense base, on meshes with the vocabulary sharded over `tensor` (1x4x2, 2x2x2)
    give the loss, gradient norm, updated adapters and eval sums of one device."""
    from jais2_jax.model.quantize import quantize_embedding
    from jais2_jax.parallel import sharding
    from jais2_jax.training import step as step_lib
    from jais2_jax.training.program import build_train_program, clear_cache
    peft_model, config, params = _peft_model(LORA_TARGETS, seed=9)
    named = dict(peft_model.named_parameters())
    adapters = _our_adapters({k: p.detach().numpy() for k, p in named.items() if "lora_" in k},
                             config, LORA_TARGETS)
    q = quantize_embedding(quantize(params, scheme), scheme) if scheme else params
    monkeypatch.setattr(step_lib, "HEAD_TILE_BYTES",
                        config.hidden_size * config.vocab_size * 4 // 4)
    run = _step_run(LORA_TARGETS, lr=1e-2, clip_grad_norm=1.0).replace(
        lora={"rank": RANK, "alpha": ALPHA, "base_quantization": scheme})
    batch = _shifted_batch(np.random.default_rng(9).integers(0, config.vocab_size, (4, 16)))
    out = {}
    for shape in ((1, 1, 1), (1, 4, 2), (2, 2, 2)):
        clear_cache()
        mesh = sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
        program = build_train_program(config, run, mesh)
        base = jax.device_put(q, program.base_shardings)
        state = program.state_from_params(jax.device_put(
            jax.tree_util.tree_map(jnp.asarray, adapters), program.param_shardings))
        data = jax.device_put(batch, program.batch_sharding)
        with sharding.use_mesh(mesh):
            state, metrics = program.train_step(state, data, base)
            sums = program.eval_step(state.params, data, base)
        out[shape] = (float(metrics["loss"]), float(metrics["grad_norm"]),
                      float(sums["ce_sum"]), _leaves(state.params))
    clear_cache()
    ref = out[(1, 1, 1)]
    for shape in ((1, 4, 2), (2, 2, 2)):
        got = out[shape]
        for a, b in zip(got[:3], ref[:3]):
            assert abs(a - b) < 1e-5 * abs(b), (shape, got[:3], ref[:3])
        for a, b in zip(got[3], ref[3], strict=True):
            assert rel_err(a, b) < 1e-5, shape


def test_adapter_gradients_are_taken_at_compute_dtype_copies():
    """On one device a bf16 step differentiates with respect to bf16 copies of the adapters (the
    projections cast them before their GEMMs anyway): upcast, that gradient is bitwise the
    float32 adapters' gradient, at half the bytes held through the backward pass."""
    from jais2_jax.training.step import compute_copies, merge_params, train_loss_sums
    peft_model, config, params = _peft_model(LORA_TARGETS, seed=7)
    named = dict(peft_model.named_parameters())
    adapters = jax.tree_util.tree_map(jnp.asarray, _our_adapters(
        {k: p.detach().numpy() for k, p in named.items() if "lora_" in k}, config, LORA_TARGETS))
    model = Jais2ForCausalLM(config, dtype=jnp.bfloat16, lora=LoraSpec(RANK, ALPHA))
    base = quantize(params, "int8")
    batch = _shifted_batch(np.random.default_rng(7).integers(0, config.vocab_size, (2, 16)))

    def loss(a):
        return train_loss_sums(model, merge_params(base, a), batch, chunk=4, z_loss=0.0,
                               head_grad=False)[0]

    ref = jax.jit(jax.grad(loss))(adapters)
    copies = compute_copies(adapters, jnp.bfloat16, adapters=True)
    assert {x.dtype for x in jax.tree_util.tree_leaves(copies)} == {jnp.dtype(jnp.bfloat16)}
    assert compute_copies(params, jnp.bfloat16, adapters=True) is not params  # a new tree ...
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(
        compute_copies(params, jnp.bfloat16, adapters=True)))  # ... without any cast kernel
    got = jax.jit(jax.grad(loss))(copies)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got),
                            jax.tree_util.tree_leaves(ref), strict=True):
        assert g.dtype == jnp.bfloat16 and np.abs(np.asarray(r)).max() > 0
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(r),
                                      err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------- runs and the loop
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "store"
    data.prepare_data([os.path.join(ROOT, "data", "corpus")],
                      os.path.join(ROOT, "data", "tokenizer"), str(out), eval_fraction=0.1,
                      show_progress=False)
    return str(out)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random transformers model of the jais2-tiny shape (vocab 1024 = the bundled tokenizer),
    saved as an HF folder: the frozen base of the runs below."""
    with open(os.path.join(ROOT, "configs", "jais2-tiny.json"), encoding="utf-8") as f:
        tiny = json.load(f)
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
    model = hf_model(3, **{k: tiny[k] for k in keep})
    out = tmp_path_factory.mktemp("base") / "hf"
    model.save_pretrained(out)
    return str(out)


def _lora_run(store, base_dir, out, lora=None, **kw):
    # 8 fake CPU devices (conftest): the default "fsdp" mesh shards over all of them.
    run = dict(model=base_dir, init_from=base_dir, data=store, output_dir=str(out), seq_len=32,
               batch_size=8, loss_chunk=16, dtype="float32", remat_policy="none", lr=1e-2,
               warmup_steps=0, total_steps=6, log_every=1, eval_every=0, checkpoint_every=2,
               data_threads=1, lora={"rank": 4, "alpha": 8, "dropout": 0.1, **(lora or {})})
    run.update(kw)
    return RunConfig(**run)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_the_base_stays_frozen_and_the_optimizer_holds_only_adapters(store, base_dir, tmp_path):
    """Steps of the real program on the 8-device mesh: the base arrays (a separate argument) are
    bit for bit what was loaded and still alive (not donated); the state's params and the
    optimizer's moments are the adapters alone; the adapters move and the loss falls."""
    from jais2_jax.model.config import load_model_config
    from jais2_jax.parallel import sharding
    from jais2_jax.parallel.distributed import global_batch
    from jais2_jax.training.lora import load_base
    from jais2_jax.training.program import build_train_program
    run = _lora_run(store, base_dir, tmp_path / "run", lora={"dropout": 0.0},
                    grad_accum_steps=2, remat_policy="dots")
    config = load_model_config(base_dir)
    mesh = sharding.make_mesh(run.mesh)
    program = build_train_program(config, run, mesh)
    base = load_base(run, config, mesh, program.base_shardings)
    before = _leaves(base)
    state = program.init_state(jax.random.PRNGKey(0))
    adapters0 = _leaves(state.params)
    # only lora_a / lora_b leaves, in the state and in the optimizer's moments
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    param_like = [p for p in paths if p.startswith(".params") or "mu" in p or "nu" in p]
    assert param_like and all(p.endswith(("['lora_a']", "['lora_b']")) for p in param_like), paths
    n_adapter = sum(a.size for a in adapters0)
    n_state = sum(np.size(x) for x in jax.tree_util.tree_leaves(state))
    assert n_state < 3 * n_adapter + 16  # params, mu, nu and scalars: nothing of the base
    assert n_adapter < sum(b.size for b in before) / 10
    train_iter = data.train_iterator(data.TokenStore(store), seq_len=run.seq_len,
                                     batch_size=run.batch_size, seed=0)
    losses = []
    with sharding.use_mesh(mesh):
        for _ in range(8):
            batch = global_batch(next(train_iter), program.batch_sharding, run.batch_size)
            state, metrics = program.train_step(state, batch, base)
            losses.append(float(metrics["loss"]))
    after = _leaves(base)
    for x, y in zip(before, after, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(adapters0, _leaves(state.params)))
    assert losses[-1] < losses[0] - 0.05, losses


def test_resume_is_bitwise_and_checkpoints_hold_only_adapters(store, base_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(_lora_run(store, base_dir, straight), show_progress=False)["status"] == "done"
    first = train(_lora_run(store, base_dir, split), until_step=3, show_progress=False)
    assert first["status"] == "stopped" and first["step"] == 3
    second = train(_lora_run(store, base_dir, split), show_progress=False)
    assert second["status"] == "done" and second["step"] == 6
    a, b = _losses(straight), _losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(a[s] == b[s] for s in a), (a, b)
    ra, rb = read_run_adapter(straight), read_run_adapter(split)
    assert ra.step == rb.step == 6
    for x, y in zip(_leaves(ra.adapters), _leaves(rb.adapters), strict=True):
        np.testing.assert_array_equal(x, y)
    # the read-back adapter: per-layer layout, lora leaves only, the run's block and base
    assert is_lora_run(straight) and ra.base == base_dir and ra.base_quantization is None
    assert (ra.spec.rank, ra.spec.alpha, ra.spec.dropout) == (4, 8.0, 0.1)
    assert ra.target_modules == LORA_TARGETS
    assert sorted(ra.adapters) == [f"layers_{i}" for i in range(ra.model_config.num_hidden_layers)]
    q = ra.adapters["layers_0"]["self_attn"]["q_proj"]
    assert sorted(q) == ["lora_a", "lora_b"] and q["lora_a"].dtype == np.float32
    assert q["lora_a"].shape == (ra.model_config.hidden_size, 4)
    assert np.abs(q["lora_b"]).max() > 0  # trained (B starts at zero)
    # the checkpoint holds the adapters, their moments and scalars: no array of the base
    import orbax.checkpoint as ocp
    meta = ocp.StandardCheckpointer().metadata(str(straight / "checkpoints" / "6" / "state"))
    stored = [jax.tree_util.keystr(p)
              for p, _ in jax.tree_util.tree_leaves_with_path(meta.item_metadata)]
    arrays = [p for p in stored if "layers" in p or "embed" in p or "lm_head" in p]
    assert len(arrays) == 3 * 12 and all(p.endswith(("['lora_a']", "['lora_b']"))
                                         for p in arrays), stored
    assert sorted(set(stored) - set(arrays)) == [
        "['nonfinite_in_a_row']", "['nonfinite_total']", "['opt_state'][1][0]['count']",
        "['opt_state'][1][2]['count']", "['rng']", "['step']"], stored


def test_resuming_with_a_changed_lora_block_is_refused(store, base_dir, tmp_path):
    out = tmp_path / "run"
    train(_lora_run(store, base_dir, out), until_step=2, show_progress=False)
    with pytest.raises(ValueError, match=r"changed lora block: lora\.rank: 4 \(checkpoint\) vs 8"):
        train(_lora_run(store, base_dir, out, lora={"rank": 8}), show_progress=False)
    with pytest.raises(ValueError, match=r"lora\.target_modules"):
        train(_lora_run(store, base_dir, out, lora={"target_modules": ["q_proj"]}),
              show_progress=False)
    with pytest.raises(ValueError, match="has no lora block"):
        train(_lora_run(store, base_dir, out).replace(lora=None), show_progress=False)
    assert sorted(os.listdir(out / "checkpoints")) == ["2"]  # nothing was written


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_qlora_base_trains(store, base_dir, tmp_path, scheme):
    result = train(_lora_run(store, base_dir, tmp_path / "q", total_steps=12, checkpoint_every=12,
                             eval_every=12, lora={"base_quantization": scheme, "dropout": 0.0}),
                   show_progress=False)
    losses = _losses(tmp_path / "q")
    assert result["status"] == "done" and np.isfinite(result["eval_loss"])
    assert np.mean([losses[s] for s in (10, 11, 12)]) < losses[1] - 0.05, losses
    assert read_run_adapter(tmp_path / "q").base_quantization == scheme


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_qlora_forward_equals_transformers_peft_on_the_dequantized_weights(scheme):
    """Our model on the int8 / nf4 base (values + scales, as QLoRA holds it) with adapters gives
    the float32 logits of transformers + PEFT whose base weights are those values dequantized."""
    import torch
    quantized = {}

    def dequantized(params):  # the quantized tree, and (for transformers) the weights it applies
        quantized["q"] = quantize(jax.tree_util.tree_map(jnp.asarray, params), scheme)
        return dequantize(quantized["q"])

    shape = {"intermediate_size": 128} if scheme == "nf4" else {}
    peft_model, config, _ = _peft_model(LORA_TARGETS, seed=5, base_weights=dequantized, **shape)
    q = quantized["q"]
    named = dict(peft_model.named_parameters())
    adapters = _our_adapters({k: p.detach().numpy() for k, p in named.items() if "lora_" in k},
                             config, LORA_TARGETS)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
    model = Jais2ForCausalLM(config, lora=LoraSpec(RANK, ALPHA))
    from jais2_jax.training.step import merge_params
    ours = model.apply({"params": merge_params(q, adapters)}, jnp.asarray(ids))
    assert q["layers"]["self_attn"]["q_proj"]["kernel"].dtype == QUANTIZED_DTYPES[scheme]
    assert rel_err(ours, ref) < 1e-5
    # and the adapters matter: without them the logits differ
    assert rel_err(Jais2ForCausalLM(config).apply({"params": q}, jnp.asarray(ids)), ref) > 1e-3


def test_adapter_dropout_acts_only_with_a_dropout_rng():
    peft_model, config, params = _peft_model(("q_proj",), seed=2)
    named = dict(peft_model.named_parameters())
    adapters = _our_adapters({k: p.detach().numpy() for k, p in named.items() if "lora_" in k},
                             config, ("q_proj",))
    from jais2_jax.training.step import merge_params
    tree = merge_params(params, adapters)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, (2, 8)))
    plain = Jais2ForCausalLM(config, lora=LoraSpec(RANK, ALPHA), lora_targets=("q_proj",))
    drop = Jais2ForCausalLM(config, lora=LoraSpec(RANK, ALPHA, 0.5), lora_targets=("q_proj",))
    ref = plain.apply({"params": tree}, ids)
    np.testing.assert_array_equal(drop.apply({"params": tree}, ids), ref)  # eval: no dropout
    dropped = drop.apply({"params": tree}, ids, rngs={"dropout": jax.random.key(0)})
    assert rel_err(dropped, ref) > 1e-4


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("lora,message", [
    ({"rank": 0}, "lora.rank must be positive"),
    ({"rank": -2}, "lora.rank must be positive"),
    ({"rank": 2.5}, "lora.rank must be an integer"),
    ({"target_modules": ["q_proj", "gate_proj"]}, r"unknown module\(s\) \['gate_proj'\]"),
    ({"target_modules": []}, "non-empty list"),
    ({"ranks": 4}, r"unknown keys in the lora block: \['ranks'\]"),
    ({"base_quantization": "fp8"}, "lora.base_quantization 'fp8'"),
    ({"dropout": 1.0}, r"lora.dropout must be in \[0, 1\)"),
    ({"alpha": 0}, "lora.alpha must be positive"),
    ({"mu_dtype": "float16"}, "lora.mu_dtype 'float16'"),
])
def test_bad_lora_blocks_are_refused_by_name(lora, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(model="jais2-tiny", data="", output_dir="", lora=lora)


def test_rank_larger_than_a_layer_and_a_missing_base_are_refused_before_any_write(
        store, base_dir, tmp_path):
    # jais2-tiny: k_proj / v_proj are 128 -> 64, so rank 65 fits q/o/up/down but not k/v
    with pytest.raises(ValueError, match=r"lora.rank 65 is larger than k_proj \(128 -> 64\)"):
        train(_lora_run(store, base_dir, tmp_path / "a", lora={"rank": 65}), show_progress=False)
    train_ok = _lora_run(store, base_dir, tmp_path / "b", lora={"rank": 65,
                                                                "target_modules": ["q_proj"]})
    assert train_ok.lora.rank == 65  # a valid block for q_proj alone
    with pytest.raises(ValueError, match="set init_from to the base checkpoint"):
        train(_lora_run(store, base_dir, tmp_path / "c", init_from=None), show_progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_set_overrides_one_key_of_the_lora_block():
    run = RunConfig.from_dict({"model": "jais2-tiny", "data": "", "output_dir": "",
                               "lora": {"rank": 4}},
                              ["lora.alpha=32", "lora.target_modules=[v_proj]"])
    assert (run.lora.rank, run.lora.alpha, run.lora.target_modules) == (4, 32.0, ("v_proj",))
    assert RunConfig.from_dict(run.to_dict()) == run
    with pytest.raises(ValueError, match=r"unknown keys in the lora block: \['rnk'\]"):
        RunConfig.from_dict({"model": "m", "data": "", "output_dir": ""}, ["lora.rnk=4"])


# --------------------------------------------------------------------------------------- plan
def _device0_bytes(tree) -> int:
    """Bytes the first device holds of a tree of sharded arrays: the real shards' element counts
    and dtypes; 4-bit codes counted packed, as GPUs and TPUs hold them (XLA:CPU keeps a byte
    each: numpy's nbytes)."""
    from jais2_jax.parallel.sharding import array_bytes
    d0 = jax.devices()[0]
    return sum(array_bytes(s.data.size, s.data.dtype) for a in jax.tree_util.tree_leaves(tree)
               for s in a.addressable_shards if s.device == d0)


@pytest.mark.parametrize("quantization", [None, "int8", "nf4"])
def test_plan_bytes_equal_the_real_arrays(store, base_dir, tmp_path, quantization):
    """`make_plan(lora=...)` on a device-free mesh: the frozen base, the adapters and the
    optimizer state per device equal the bytes the program's real arrays hold on device 0."""
    from jais2_jax.model.config import load_model_config
    from jais2_jax.parallel import sharding
    from jais2_jax.planning.memory import format_plan, make_plan
    from jais2_jax.training.lora import load_base
    from jais2_jax.training.program import build_train_program
    run = _lora_run(store, base_dir, tmp_path / "p", dtype="bfloat16",
                    lora={"base_quantization": quantization})
    config = load_model_config(base_dir)
    mesh = sharding.make_mesh(run.mesh)
    program = build_train_program(config, run, mesh)
    base = load_base(run, config, mesh, program.base_shardings)
    state = program.init_state(jax.random.PRNGKey(0))
    plan = make_plan(config, sharding.abstract_mesh("fsdp", 8), batch=8, seq=32,
                     remat="dots", param_dtype="float32", dtype="bfloat16", loss_chunk=16,
                     lora=run.lora)
    assert plan.params == _device0_bytes(base)
    assert plan.adapters == plan.grads == _device0_bytes(state.params)
    assert plan.opt_state == _device0_bytes(state.opt_state)
    kernel = base["layers"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.dtype == (QUANTIZED_DTYPES[quantization] if quantization else jnp.bfloat16)
    assert plan.activations_saved > 0
    text = format_plan(plan)
    assert f"frozen base ({quantization or 'bfloat16'})" in text and "LoRA adapters" in text


def test_lora_plan_is_smaller_than_the_full_fine_tune():
    """The 8B shape on one H100: a full fine-tune's state alone does not fit, LoRA's does, and
    QLoRA's base is about half of the bf16 base (int8 projections)."""
    from jais2_jax.model.config import load_model_config
    from jais2_jax.parallel import sharding
    from jais2_jax.planning.memory import lora_state_bytes
    from jais2_jax.training.run_config import LoraConfig
    config = load_model_config("jais2-8b")
    mesh = sharding.abstract_mesh("fsdp", 1)
    lora = lora_state_bytes(config, mesh, LoraConfig(rank=16))
    qlora = lora_state_bytes(config, mesh, LoraConfig(rank=16, base_quantization="int8"))
    n = config.num_parameters()
    assert abs(lora["base"] - 2 * n) < 0.001 * 2 * n  # bf16
    # rank 16 on q, k, v, o, up, down of 32 layers: 16 x (in + out) each, float32
    d, f, kv = config.hidden_size, config.intermediate_size, (config.num_key_value_heads
                                                              * config.head_dim)
    per_layer = 16 * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 2)
    assert lora["adapters"] == 4 * config.num_hidden_layers * per_layer
    assert lora["grads"] == lora["adapters"] // 2  # one device: bf16 (compute_copies)
    assert lora["opt_state"] >= 2 * lora["adapters"]
    # QLoRA: every weight matrix int8 (projections, lm_head, embedding table) + float32 scales
    # (per output channel; per vocab entry for the two tables), norms and biases bf16
    h, hd, v, layers = (config.num_attention_heads, config.head_dim, config.vocab_size,
                        config.num_hidden_layers)
    proj = layers * (2 * d * h * hd + 2 * d * kv + 2 * d * f)
    scales = layers * (h * hd + 2 * kv + d + f + d) + 2 * v
    assert qlora["base"] == proj + 2 * v * d + 4 * scales + 2 * (n - proj - 2 * v * d)
    # nf4: the projections at half a byte a weight + a float32 scale per 64 of them; the two
    # vocabulary tables int8 as above
    nf4 = lora_state_bytes(config, mesh, LoraConfig(rank=16, base_quantization="nf4"))
    assert nf4["base"] == (proj // 2 + 4 * proj // 64 + 2 * v * d + 4 * 2 * v
                           + 2 * (n - proj - 2 * v * d))


def test_mu_dtype_bfloat16_holds_the_first_moment_in_bf16():
    """`lora.mu_dtype: bfloat16`: the optimizer's first moment of every adapter is bf16 (the
    second stays float32), after a real step too, and the plan counts half its bytes."""
    from jais2_jax.model.config import load_model_config
    from jais2_jax.parallel import sharding
    from jais2_jax.planning.memory import lora_state_bytes
    from jais2_jax.training.run_config import LoraConfig
    from jais2_jax.training.step import make_optimizer
    config = load_model_config("jais2-8b")
    mesh = sharding.abstract_mesh("fsdp", 1)
    f32 = lora_state_bytes(config, mesh, LoraConfig(rank=16))
    bf16 = lora_state_bytes(config, mesh, LoraConfig(rank=16, mu_dtype="bfloat16"))
    assert f32["opt_state"] - bf16["opt_state"] == f32["adapters"] // 2
    peft_model, tiny, params = _peft_model(("q_proj", "down_proj"), seed=8)
    named = dict(peft_model.named_parameters())
    adapters = jax.tree_util.tree_map(jnp.asarray, _our_adapters(
        {k: p.detach().numpy() for k, p in named.items() if "lora_" in k}, tiny,
        ("q_proj", "down_proj")))
    run = _step_run(("q_proj", "down_proj")).replace(lora=LoraConfig(
        rank=RANK, alpha=ALPHA, target_modules=("q_proj", "down_proj"), mu_dtype="bfloat16"))
    optimizer = make_optimizer(run)
    model = Jais2ForCausalLM(tiny, lora=LoraSpec(RANK, ALPHA),
                             lora_targets=("q_proj", "down_proj"))
    step = jax.jit(make_train_step(model, optimizer, run, frozen=True))
    batch = _shifted_batch(np.random.default_rng(8).integers(0, tiny.vocab_size, (4, 16)))
    state, _ = step(init_state(adapters, optimizer, 0), batch, params)
    adam = state.opt_state[-1][0]  # adamw's chain: (ScaleByAdamState, ...)
    assert {x.dtype for x in jax.tree_util.tree_leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree_util.tree_leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
    assert any(np.abs(np.asarray(x, np.float32)).max() > 0
               for x in jax.tree_util.tree_leaves(adam.mu))


def test_topology_plan_compiles_the_lora_step():
    """`plan_topology` with a lora run compiles the real LoRA step for TPU v5e:2x2 (libtpu, AOT,
    on this CPU): its arguments hold the frozen base and the adapters' state (the plan's exact
    bytes), and only the adapters' state is donated back (the base is not an output)."""
    from jais2_jax.model.config import Jais2Config
    from jais2_jax.parallel import sharding
    from jais2_jax.planning import tpu as tpu_plan
    from jais2_jax.planning.memory import lora_state_bytes
    config = Jais2Config.from_json_file(os.path.join(ROOT, "configs", "jais2-tiny.json"))
    run = RunConfig(model="-", data="-", output_dir="-", lora={"rank": 8, "alpha": 16,
                                                               "base_quantization": "int8"})
    setting = tpu_plan.Setting(mesh=(1, 4, 1), batch=8, seq=128, remat="dots")
    result = tpu_plan.plan_topology(config, tpu_plan.parse_topology("v5e:2x2"), setting, run=run)
    assert result.fits and len(result.programs) == 1, tpu_plan.format_result(result)
    step = result.programs[0]
    st = lora_state_bytes(config, sharding.abstract_mesh((1, 4, 1), 4), run.lora,
                          dtype="bfloat16")
    assert result.state == sum(st.values())
    donated = st["adapters"] + st["opt_state"]
    assert step.argument >= st["base"] + donated
    # the adapters' state comes back in place; the base is an argument never aliased to an
    # output (TPU tiles pad small arrays, so the compiled sizes exceed the exact ones)
    assert donated <= step.alias <= step.argument - st["base"]


def _ppl_task(folder):
    """A local rolling-perplexity task (continuous metrics: any change of the weights shows)."""
    rng = np.random.default_rng(1)
    words = "the sea is blue and the desert is wide at dawn coffee in the morning".split()
    with open(folder / "ppl.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": " ".join(rng.choice(words, 12))}) + "\n"
                     for _ in range(6))
    (folder / "lora_ppl.yaml").write_text(
        f"task: lora_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        f"{folder / 'ppl.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"
        "  - metric: bits_per_byte\n")
    return str(folder)


@pytest.mark.parametrize("scheme", [None, "int8", "nf4"])
def test_eval_tasks_on_a_lora_run_score_its_live_adapters(store, base_dir, tmp_path, scheme):
    """`eval_tasks` in a LoRA (QLoRA) run scores the base with the adapters of that step: the
    logged metrics equal `jais2 eval`'s path on the base plus that step's adapter exported to a
    PEFT folder (merged on load; QLoRA: kept apart over the int8 base as it was trained, the
    embedding table int8 too), and differ from the base's own."""
    from jais2_jax.checkpoint import load_checkpoint
    from jais2_jax.checkpoint.peft import read_adapter_config
    from jais2_jax.evaluation.harness import evaluate_tasks
    from jais2_jax.training.export import export_run_adapter
    tasks = _ppl_task(tmp_path)
    out = tmp_path / "run"
    train(_lora_run(store, base_dir, out, total_steps=4, checkpoint_every=2, keep_checkpoints=3,
                    eval_tasks="lora_ppl", eval_tasks_every=2, eval_tasks_include_path=tasks,
                    lora={"dropout": 0.0, "base_quantization": scheme}), show_progress=False)
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        logged = {r["step"]: r for r in map(json.loads, f) if "eval/lora_ppl/bits_per_byte" in r}
    assert sorted(logged) == [2, 4]
    tokenizer = os.path.join(store, "tokenizer")

    def scores(adapter=None):
        apart = adapter is not None and scheme is not None  # QLoRA: over the quantized base
        config, params = load_checkpoint(base_dir, dtype="float32", quantize=scheme,
                                         adapter=adapter, merge_adapter=not apart)
        lora = {}
        if apart:
            params = quantize_embedding(params, scheme)  # QLoRA's base: the table int8 as well
            ac = read_adapter_config(adapter)
            lora = dict(lora=ac.spec, lora_targets=ac.target_modules)
        return evaluate_tasks(config, params, tokenizer, ["lora_ppl"], include_path=tasks,
                              dtype="float32", quantize=scheme, **lora)

    for step in (2, 4):
        folder = tmp_path / f"adapter{step}"
        export_run_adapter(str(out), str(folder), step=step)
        want = scores(str(folder))
        for metric in ("word_perplexity", "bits_per_byte"):
            assert logged[step][f"eval/lora_ppl/{metric}"] == pytest.approx(
                want[f"lora_ppl/{metric}"], rel=1e-5), (step, metric)
    base = scores()
    assert abs(logged[4]["eval/lora_ppl/bits_per_byte"] - base["lora_ppl/bits_per_byte"]) > 1e-3
