"""Training: loss and gradients against transformers, chunked loss, packing, non-finite steps, the
run loop (loss falls, bitwise resume, SIGTERM), and bad input reported before any step."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import hf_model, our_config, our_params, rel_err
from jais2_jax import Jais2ForCausalLM
from jais2_jax.model.options import ModelOptions
from jais2_jax.training import data
from jais2_jax.training.export import export_run_to_hf
from jais2_jax.training.run_config import RunConfig
from jais2_jax.training.trainer import load_trained, train
from jais2_jax.training.step import (compute_copies, init_state, loss_sums, make_optimizer,
                                make_train_step, target_count, train_loss_sums)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf():
    model = hf_model(0)
    config = our_config(model)
    return model, config, our_params(model, config)


def _shifted_batch(ids):
    """Our batch for transformers' `labels=ids`: targets are the next tokens, the last masked."""
    targets = np.pad(ids[:, 1:], ((0, 0), (0, 1)))
    mask = np.pad(np.ones((ids.shape[0], ids.shape[1] - 1), np.float32), ((0, 0), (0, 1)))
    return {"input_ids": jnp.asarray(ids), "targets": jnp.asarray(targets),
            "loss_mask": jnp.asarray(mask)}


def _run(tmp_path, **kw):
    return RunConfig(**{"model": "jais2-tiny", "data": "", "output_dir": str(tmp_path / "out"),
                        "seq_len": 16, "batch_size": 4, "loss_chunk": 4, "dtype": "float32",
                        "remat_policy": "none", "warmup_steps": 0, **kw})


def test_train_step_loss_equals_transformers(hf, tmp_path):
    import torch
    model_hf, config, params = hf
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (4, 16))
    with torch.no_grad():
        ref = model_hf(torch.tensor(ids), labels=torch.tensor(ids)).loss.item()
    run = _run(tmp_path, grad_accum_steps=2)  # two micro-batches: the loss is still the batch mean
    optimizer = make_optimizer(run)
    step = jax.jit(make_train_step(Jais2ForCausalLM(config), optimizer, run))
    _, metrics = step(init_state(params, optimizer, 0), _shifted_batch(ids))
    assert abs(float(metrics["loss"]) - ref) / ref <= 1e-6


def _ce(kind, model, p, batch, chunk, z_loss=0.0):
    """sum CE + z_loss * sum lse^2 by `loss_sums` (backward recomputes chunks) or by
    `train_loss_sums` (gradient made in the forward pass, the train step's; "fused_pallas" with
    the one-pass logsumexp kernel, interpreted on CPU)."""
    if kind.startswith("fused"):
        return train_loss_sums(model, p, batch, chunk=chunk, z_loss=z_loss,
                               lse_impl="pallas" if kind == "fused_pallas" else "xla")[0]
    ce, z = loss_sums(model, p, batch, chunk=chunk)
    return ce + z_loss * z


@pytest.mark.parametrize("kind", ["checkpointed", "fused"])
def test_loss_gradient_matches_torch_autograd(hf, kind):
    import torch
    from jais2_jax.checkpoint.hf_mapping import params_from_state_dict
    model_hf, config, params = hf
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 12))
    model_hf.zero_grad()
    model_hf(torch.tensor(ids), labels=torch.tensor(ids)).loss.backward()
    ref = params_from_state_dict(config, {n: p.grad.numpy() for n, p in model_hf.named_parameters()})
    batch = _shifted_batch(ids)

    def loss(p):
        return _ce(kind, Jais2ForCausalLM(config), p, batch, 4) / target_count(batch)

    grads = jax.grad(loss)(params)
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert rel_err(g, flat_ref[path]) <= 1e-5, (jax.tree_util.keystr(path),
                                                    rel_err(g, flat_ref[path]))


@pytest.mark.parametrize("kind,tied", [("checkpointed", False), ("fused", False),
                                       ("fused", True), ("fused_pallas", False)])
def test_chunked_loss_equals_unchunked(hf, kind, tied):
    _, config, params = hf
    if tied:  # the lm_head is the embedding table: its gradient has both contributions
        config = config.replace(tie_word_embeddings=True)
        params = {k: v for k, v in params.items() if k != "lm_head"}
    rng = np.random.default_rng(2)
    batch = _shifted_batch(rng.integers(0, config.vocab_size, (2, 16)))
    batch["loss_mask"] = batch["loss_mask"] * jnp.asarray(rng.random((2, 16)) > 0.3)
    model = Jais2ForCausalLM(config)

    def loss(p, chunk):
        return _ce(kind, model, p, batch, chunk, z_loss=1e-2)

    # Reference: the full [B, T, V] logits in one go, no scan, no checkpoint.
    def full(p):
        logits = model.apply({"params": p}, batch["input_ids"])
        lse = jax.nn.logsumexp(logits, -1)
        tgt = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        return jnp.sum((lse - tgt) * batch["loss_mask"]) + 1e-2 * jnp.sum(lse ** 2 * batch["loss_mask"])

    ref_value, ref_grads = jax.jit(jax.value_and_grad(full))(params)
    value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 4)  # 4 chunks
    assert abs(float(value - ref_value)) / float(ref_value) <= 1e-6
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        assert rel_err(g, r) <= 1e-6


@pytest.mark.parametrize("kind", ["checkpointed", "fused"])
def test_loss_on_compute_dtype_logits(hf, kind):
    """`logits_dot_in_fp32=False` (bf16 compute): the loss is the float32 cross-entropy of logits
    rounded to bf16 by the GEMM (transformers under autocast), not of float32 logits; both loss
    paths agree on its value and gradient."""
    _, config, params = hf
    # logits of a trained model's size (the random ones are ~0.02, where bf16 rounds little)
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["lm_head"] = jax.tree_util.tree_map(lambda w: 100.0 * w, params["lm_head"])
    model = Jais2ForCausalLM(config, dtype=jnp.bfloat16)
    batch = _shifted_batch(np.random.default_rng(3).integers(0, config.vocab_size, (2, 16)))

    def reference(p, logits_dtype):  # no scan, no chunks: all logits at once
        h = model.apply({"params": p}, batch["input_ids"], method="hidden_states")[0]
        w = model.apply({"params": p}, method="lm_head_weight").astype(jnp.bfloat16)
        logits = jnp.einsum("btd,dv->btv", h.astype(jnp.bfloat16), w,
                            preferred_element_type=logits_dtype).astype(jnp.float32)
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, batch["targets"][..., None], -1)[..., 0]
        return jnp.sum(ce * batch["loss_mask"])

    def ours(p, logits_f32):
        if kind == "fused":
            return train_loss_sums(model, p, batch, chunk=4, z_loss=0.0, logits_f32=logits_f32)[0]
        return loss_sums(model, p, batch, chunk=4, logits_f32=logits_f32)[0]

    ref16, ref32 = (float(jax.jit(reference, static_argnums=1)(params, d))
                    for d in (jnp.bfloat16, jnp.float32))
    assert abs(ref16 - ref32) / ref32 > 1e-5  # the rounding shows (2.6e-5)
    for logits_f32, ref in ((False, ref16), (True, ref32)):
        got = float(jax.jit(ours, static_argnums=1)(params, logits_f32))
        assert abs(got - ref) / ref <= 1e-6, (logits_f32, got, ref)
    # The gradient: the fused path's (made in the forward pass) against autodiff of the reference.
    grads = jax.jit(jax.grad(ours), static_argnums=1)(params, False)
    ref_grads = jax.jit(jax.grad(reference), static_argnums=1)(params, jnp.bfloat16)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        assert rel_err(g, r) <= 2e-2


def test_compute_dtype_copies_give_the_same_gradient(hf):
    """The train step differentiates with respect to bf16 copies of the layers' kernels: the
    gradient, upcast, is bitwise the float32 params' gradient, and is stored in bf16."""
    _, config, params = hf
    model = Jais2ForCausalLM(config, dtype=jnp.bfloat16)
    batch = _shifted_batch(np.random.default_rng(4).integers(0, config.vocab_size, (2, 16)))

    def loss(p):
        return train_loss_sums(model, p, batch, chunk=4, z_loss=1e-3)[0]

    ref = jax.jit(jax.grad(loss))(params)
    copies = compute_copies(params, jnp.bfloat16)
    got = jax.jit(jax.grad(loss))(copies)
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref)[0])
    kernels = 0
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        key = jax.tree_util.keystr(path)
        if key.startswith("['layers']") and key.endswith("['kernel']"):
            assert g.dtype == jnp.bfloat16, key
            kernels += 1
        else:
            assert g.dtype == jnp.float32, key
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(flat_ref[path]),
                                      err_msg=key)
    assert kernels == 6  # q, k, v, o, up, down


def test_compute_dtype_copies_only_on_one_device(hf):
    """On a mesh of several devices the gradients stay float32: their cross-device sums would
    otherwise run in bf16."""
    from jais2_jax.parallel.sharding import make_mesh, on_one_device, use_mesh
    _, _, params = hf

    def kernel_dtypes():
        out = jax.eval_shape(lambda p: compute_copies(p, jnp.bfloat16), params)
        return {x.dtype for x in jax.tree_util.tree_leaves(out["layers"])}

    with use_mesh(make_mesh("fsdp", devices=jax.devices()[:1])):
        assert on_one_device() and jnp.dtype(jnp.bfloat16) in kernel_dtypes()
    with use_mesh(make_mesh("fsdp")):  # the 8 CPU devices of conftest
        assert not on_one_device() and kernel_dtypes() == {jnp.dtype(jnp.float32)}


def test_unrolled_step_equals_scanned_step(hf, tmp_path):
    """run.scan_layers=False runs the layers unrolled over slices of the stacked params: the
    same loss and the same updated (still stacked) params as the scanned step."""
    _, config, params = hf
    ids = np.random.default_rng(3).integers(0, config.vocab_size, (4, 16))
    out = {}
    for scan in (True, False):
        run = _run(tmp_path, scan_layers=scan, remat_policy="dots", z_loss=1e-3)
        optimizer = make_optimizer(run)
        step = jax.jit(make_train_step(Jais2ForCausalLM(config,
                                                        options=ModelOptions(remat_policy="dots")), optimizer, run))
        out[scan] = step(init_state(params, optimizer, 0), _shifted_batch(ids))
    (s1, m1), (s0, m0) = out[True], out[False]
    assert abs(float(m1["loss"]) - float(m0["loss"])) <= 1e-6 * float(m1["loss"])
    assert rel_err(m1["grad_norm"], m0["grad_norm"]) <= 1e-5
    # Adam's first moment after one step is (1 - beta1) * gradient: compare every gradient.
    assert jax.tree_util.tree_structure(s1.opt_state) == jax.tree_util.tree_structure(s0.opt_state)
    for a, b in zip(jax.tree_util.tree_leaves(s1.opt_state), jax.tree_util.tree_leaves(s0.opt_state)):
        assert rel_err(a, b) <= 1e-5


def test_packed_documents_do_not_attend_across_boundaries(hf):
    _, config, params = hf
    model = Jais2ForCausalLM(config)
    rng = np.random.default_rng(3)
    lengths = (5, 7, 4)
    docs = [rng.integers(0, config.vocab_size, (1, n)) for n in lengths]
    packed = np.concatenate(docs, axis=1)
    segment_ids = np.concatenate([np.full((1, n), i + 1) for i, n in enumerate(lengths)], axis=1)
    positions = np.concatenate([np.arange(n)[None] for n in lengths], axis=1)
    logits = model.apply({"params": params}, jnp.asarray(packed), positions=jnp.asarray(positions),
                         segment_ids=jnp.asarray(segment_ids))
    alone = np.concatenate([model.apply({"params": params}, jnp.asarray(d)) for d in docs], axis=1)
    assert rel_err(logits, alone) <= 1e-5
    # Without segment ids the later documents do see the earlier ones (the test can fail).
    mixed = model.apply({"params": params}, jnp.asarray(packed), positions=jnp.asarray(positions))
    assert rel_err(mixed[:, 5:], alone[:, 5:]) > 1e-2


def test_nonfinite_step_is_skipped(hf, tmp_path):
    _, config, params = hf
    run = _run(tmp_path)
    optimizer = make_optimizer(run)
    step = jax.jit(make_train_step(Jais2ForCausalLM(config), optimizer, run))
    good = _shifted_batch(np.random.default_rng(4).integers(0, config.vocab_size, (4, 16)))
    bad = dict(good, loss_mask=good["loss_mask"].at[0, 0].set(jnp.nan))
    state = init_state(params, optimizer, 0)
    before = jax.tree_util.tree_map(np.asarray, state.params)
    state, m = step(state, bad)
    assert bool(m["skipped"]) and int(state.nonfinite_in_a_row) == 1 and int(state.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(a, b)
    assert int(state.opt_state[1][0].count) == 0  # Adam's moments untouched
    state, m = step(state, good)
    assert not bool(m["skipped"]) and int(state.nonfinite_in_a_row) == 0
    assert int(state.nonfinite_total) == 1
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                       jax.tree_util.tree_leaves(before))]
    assert all(changed)


# ------------------------------------------------------------------------------------ the loop
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "store"
    data.prepare_data([os.path.join(ROOT, "data", "corpus")], os.path.join(ROOT, "data", "tokenizer"),
                      str(out), eval_fraction=0.1, show_progress=False)
    return str(out)


def _loop_run(store, out, **kw):
    # 8 fake CPU devices (conftest): the default "fsdp" mesh shards over all of them.
    base = dict(model="jais2-tiny", data=store, output_dir=str(out), seq_len=32, batch_size=8,
                loss_chunk=16, dtype="float32", remat_policy="none", lr=3e-3, warmup_steps=2,
                total_steps=6, log_every=1, eval_every=0, checkpoint_every=2,
                data_threads=1)  # async checkpoints while stepping (state donated)
    base.update(kw)
    return RunConfig(**base)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_loss_falls_on_the_bundled_text(store, tmp_path):
    result = train(_loop_run(store, tmp_path / "run", total_steps=40, eval_every=40,
                             checkpoint_every=40),
                   show_progress=False)
    losses = _losses(tmp_path / "run")
    assert result["status"] == "done" and result["step"] == 40
    # From a uniform guess (ln 1024 = 6.93) to well below it.
    assert abs(losses[1] - np.log(1024)) < 0.1
    assert np.mean([losses[s] for s in range(36, 41)]) < losses[1] - 1.0, losses
    assert result["eval_loss"] is not None and np.isfinite(result["eval_loss"])


@pytest.fixture(scope="module")
def straight_run(store, tmp_path_factory):
    """Six steps in one go (shared by the resume tests; they do not change it)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(_loop_run(store, out), show_progress=False)
    return out


def _tensorboard_events(folder):
    """Every event of the TFRecord files in `folder` (length, crc, payload, crc records)."""
    import struct
    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        raw, i = path.read_bytes(), 0
        while i + 12 <= len(raw):
            n = struct.unpack("<Q", raw[i:i + 8])[0]
            events.append(event_pb2.Event.FromString(raw[i + 12:i + 12 + n]))
            i += 12 + n + 4
    return events


def test_tensorboard_rerun_from_step_0_hides_the_first_attempt(tmp_path):
    """A run killed before its first checkpoint starts again at step 0: its TensorBoard events
    purge the first attempt's from step 1 on (metrics.jsonl drops them too)."""
    from tensorboardX.proto import event_pb2
    from jais2_jax.training.trainer import _Metrics
    for loss in (9.0, 4.0):  # two attempts, each from step 0
        metrics = _Metrics(str(tmp_path), 0)
        metrics.write(1, {"loss": loss})
        metrics.close()
    events = _tensorboard_events(tmp_path / "tensorboard")
    purges = [e.step for e in events if e.HasField("session_log")
              and e.session_log.status == event_pb2.SessionLog.START]
    assert purges == [1, 1] and len(list((tmp_path / "tensorboard").iterdir())) == 2
    assert [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")] == [4.0]


def test_resume_is_bitwise_identical(store, straight_run, tmp_path):
    straight, split = straight_run, tmp_path / "split"
    first = train(_loop_run(store, split), until_step=3, show_progress=False)
    assert first["status"] == "stopped" and first["step"] == 3
    with open(split / "metrics.jsonl", "a", encoding="utf-8") as f:  # as if killed in step 5
        f.write(json.dumps({"step": 4, "loss": -1.0}) + "\n" + '{"step": 5, "lo')  # cut short
    second = train(_loop_run(store, split), show_progress=False)
    assert second["status"] == "done" and second["step"] == 6
    with open(split / "metrics.jsonl", encoding="utf-8") as f:
        logged = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert logged == sorted(set(logged)), logged  # the resumed steps are not logged twice
    a, b = _losses(straight), _losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(a[s] == b[s] for s in a), (a, b)
    # TensorBoard: the resumed writer purges the steps after the checkpoint (TensorBoard hides
    # the first run's events from step 4 on; the first run's own purge at 1 finds nothing), and
    # every step's loss is there.
    events = _tensorboard_events(split / "tensorboard")
    from tensorboardX.proto import event_pb2
    purges = [e.step for e in events if e.HasField("session_log")
              and e.session_log.status == event_pb2.SessionLog.START]
    assert sorted(purges) == [1, 4], purges
    assert {e.step for e in events for v in e.summary.value if v.tag == "loss"} == set(range(1, 7))
    _, pa, _ = load_trained(str(straight))
    _, pb, step = load_trained(str(split))
    assert step == 6
    for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
        np.testing.assert_array_equal(x, y)


def test_sigterm_leaves_a_checkpoint_to_resume_from(store, tmp_path):
    out = tmp_path / "preempted"
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(_loop_run(store, out, total_steps=10_000).to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "jais2_jax.cli", "train", str(config),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    assert "SIGTERM, checkpoint saved" in output
    step = int(output.split("preempted at step ")[1].split(";")[0])
    assert (out / "checkpoints" / str(step)).is_dir()
    resumed = train(_loop_run(store, out, total_steps=10_000), until_step=step + 2,
                    show_progress=False)
    assert resumed["step"] == step + 2
    assert max(_losses(out)) == step + 2


def test_nonfinite_steps_in_a_row_stop_the_run(store, tmp_path):
    # a finite z_loss weight whose loss term overflows float32
    result = train(_loop_run(store, tmp_path / "nan", z_loss=1e38, total_steps=20,
                             max_nonfinite_in_a_row=3), show_progress=False)
    assert result["status"] == "nonfinite" and result["step"] <= 5


# ------------------------------------------------------------------------ bad input, before a step
def test_unknown_run_config_keys_are_listed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: jais2-tiny\ndata: x\noutput_dir: y\nlearning_rate: 1\nbatchsize: 2\n")
    with pytest.raises(ValueError, match=r"unknown run config keys: \['batchsize', 'learning_rate'\]"):
        RunConfig.from_yaml(path)
    path.write_text("model: jais2-tiny\ndata: x\noutput_dir: y\n")
    with pytest.raises(ValueError, match=r"unknown run config keys: \['nope'\]"):
        RunConfig.from_yaml(path, ["nope=1"])


def test_set_overrides_parse_as_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: jais2-tiny\ndata: x\noutput_dir: y\n")
    run = RunConfig.from_yaml(path, ["mesh=[2, -1, 1]", "lr=1e-4", "clip_grad_norm=null"])
    assert run.mesh == (2, -1, 1) and run.lr == 1e-4 and run.clip_grad_norm is None
    assert isinstance(run.lr, float)  # YAML 1.1 reads 1e-4 as a string
    with pytest.raises(ValueError, match="batch_size must be int"):
        RunConfig.from_yaml(path, ["batch_size=big"])


@pytest.mark.parametrize("key, value", [("beta1", 1.5), ("beta2", -1.0), ("eps", -1.0),
                                        ("lr", float("nan")), ("lr", float("inf")),
                                        ("clip_grad_norm", float("nan")),
                                        ("peak_tflops_per_device", -5.0)])
def test_optimizer_values_are_checked(key, value):
    with pytest.raises(ValueError, match=key):
        RunConfig(model="jais2-tiny", data="x", output_dir="y", **{key: value})


def test_clip_grad_norm_null_vs_value_on_resume_is_named(store, straight_run):
    """Clipping on or off changes the optimizer state's structure; say so instead of Orbax's
    tree mismatch (the saved run clipped at 1.0)."""
    with pytest.raises(ValueError, match="checkpoint was made with clip_grad_norm 1.0"):
        train(_loop_run(store, straight_run, clip_grad_norm=None, total_steps=8),
              show_progress=False)


def test_eval_split_shorter_than_a_row(tmp_path, capsys):
    """eval_every with an eval split that cannot make one row is an error; with no eval split at
    all the run says it will not evaluate."""
    text = tmp_path / "short.txt"
    text.write_text("".join(f"note {i}\n\n" for i in range(60)), encoding="utf-8")
    tok = os.path.join(ROOT, "data", "tokenizer")
    data.prepare_data([str(text)], tok, str(tmp_path / "s"), eval_fraction=0.02, show_progress=False)
    eval_tokens = data.TokenStore(str(tmp_path / "s")).index["splits"]["eval"]["num_tokens"]
    assert 0 < eval_tokens <= 32
    with pytest.raises(ValueError, match=f"eval split .* has {eval_tokens} tokens; one row"):
        train(_loop_run(str(tmp_path / "s"), tmp_path / "o", eval_every=2), show_progress=False)
    assert _no_step_ran(tmp_path / "o")
    data.prepare_data([str(text)], tok, str(tmp_path / "n"), show_progress=False)
    train(_loop_run(str(tmp_path / "n"), tmp_path / "o2", eval_every=2, total_steps=2),
          show_progress=False)
    assert "has no eval split" in capsys.readouterr().out


def test_until_step_and_demo_counts_are_checked_first(tmp_path, capsys):
    from jais2_jax.cli import main
    with pytest.raises(ValueError, match="until_step must be at least 1"):
        train(RunConfig(model="jais2-tiny", data="x", output_dir=str(tmp_path / "o")),
              until_step=0, show_progress=False)
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--max-new-tokens", "0"]) == 1
    assert "--max-new-tokens must be positive" in capsys.readouterr().err
    assert not out.exists()  # nothing prepared or trained first


def _no_step_ran(out):
    return not os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_batch_not_divisible_by_data_parallel_devices(store, tmp_path):
    with pytest.raises(ValueError, match="not divisible by the 8 data-parallel devices"):
        train(_loop_run(store, tmp_path / "o", batch_size=4), show_progress=False)
    assert _no_step_ran(tmp_path / "o")


def test_seq_len_beyond_max_position_embeddings(store, tmp_path):
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        train(_loop_run(store, tmp_path / "o", seq_len=1024, loss_chunk=1024), show_progress=False)
    assert _no_step_ran(tmp_path / "o")


def test_attention_dropout_is_refused_not_ignored(store, tmp_path):
    from jais2_jax.model.config import preset
    preset("jais2-tiny").replace(attention_dropout=0.1).save(tmp_path / "model")
    with pytest.raises(ValueError, match="attention_dropout 0.1 is not implemented"):
        train(_loop_run(store, tmp_path / "o", model=str(tmp_path / "model" / "config.json")),
              show_progress=False)
    assert _no_step_ran(tmp_path / "o")


def test_empty_or_unreadable_dataset(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        train(_loop_run(str(tmp_path / "missing"), tmp_path / "o"), show_progress=False)
    small = tmp_path / "small.txt"
    small.write_text("one short line\n", encoding="utf-8")
    data.prepare_data([str(small)], os.path.join(ROOT, "data", "tokenizer"),
                      str(tmp_path / "small"), show_progress=False)
    with pytest.raises(ValueError, match="one row of seq_len 32 needs 33"):
        train(_loop_run(str(tmp_path / "small"), tmp_path / "o"), show_progress=False)
    assert _no_step_ran(tmp_path / "o")


def test_resuming_with_another_model_config_is_an_error(store, straight_run, tmp_path):
    out = straight_run
    other = json.load(open(os.path.join(ROOT, "configs", "jais2-tiny.json")))
    other["num_hidden_layers"] = 3
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"different model: num_hidden_layers: 4 \(checkpoint\) vs 3"):
        train(_loop_run(store, out, model=str(tmp_path / "other.json"), total_steps=8),
              show_progress=False)
    assert max(_losses(out)) == 6


# Devices each shipped run config is written for.
RUN_CONFIG_DEVICES = {"tiny-cpu": 1, "jais2-8b-h100x8": 8, "jais2-8b-v5p": 32, "jais2-70b-pod": 512}


@pytest.mark.parametrize("name", sorted(RUN_CONFIG_DEVICES))
def test_shipped_run_configs_fit_their_meshes(name):
    from jais2_jax.parallel import sharding
    from jais2_jax.model.config import load_model_config
    run = RunConfig.from_yaml(os.path.join(ROOT, "configs", f"{name}.yaml"))
    config = load_model_config(run.model)
    assert run.seq_len <= config.max_position_embeddings
    mesh = sharding.abstract_mesh(run.mesh, RUN_CONFIG_DEVICES[name])
    sharding.param_shardings(config, mesh)  # raises if a sharded dimension does not divide
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    assert (run.batch_size // run.grad_accum_steps) % dp == 0


def test_demo_runs_end_to_end(tmp_path):
    from jais2_jax.cli import main
    out = tmp_path / "demo"
    rc = main(["demo", "--output-dir", str(out), "--set", "total_steps=3", "--set", "warmup_steps=1",
               "--set", "eval_every=3", "--max-new-tokens", "3", "--no-progress"])
    assert rc == 0
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "samples.txt").read_text(encoding="utf-8").count("\n\n") == 4
    assert (out / "train" / "checkpoints" / "3").is_dir()


def test_demo_eval_note_reads_the_held_out_curve(tmp_path):
    """The demo explains a rising held-out loss from the run's own metrics (step and value of its
    minimum, passes over the training tokens) and says nothing while it is still near its lowest."""
    from jais2_jax.cli.demo import eval_note
    metrics = tmp_path / "metrics.jsonl"

    def write(evals):
        with open(metrics, "w", encoding="utf-8") as f:
            for step, loss in evals:
                f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
                f.write(json.dumps({"step": step, "eval_loss": loss}) + "\n")

    write([(20, 6.0), (40, 5.5), (60, 7.0), (400, 11.5)])
    note = eval_note(str(metrics), train_tokens=6000, tokens_per_step=2048)
    assert "lowest at step 40 (5.500)" in note and "rose to 11.500" in note
    assert "6,000 training tokens 137 times" in note  # 400 * 2048 / 6000
    write([(20, 6.0), (40, 5.5), (60, 5.6)])  # within 5% of the lowest
    assert eval_note(str(metrics), 6000, 2048) is None
    write([(20, 6.0)])
    assert eval_note(str(metrics), 6000, 2048) is None


def test_fresh_state_can_be_donated():
    """Each scalar field owns its buffer: a state built outside jit is donated to the train step,
    and one buffer shared by several fields would be 'donated twice'."""
    import optax
    from jais2_jax.training.step import init_state
    state = jax.device_put(init_state({"w": jnp.ones(3)}, optax.adamw(1e-3), 0))
    leaves = jax.tree_util.tree_leaves(state)
    assert len({x.unsafe_buffer_pointer() for x in leaves}) == len(leaves)
    out = jax.jit(lambda s: s.replace(step=s.step + 1), donate_argnums=0)(state)
    assert int(out.step) == 1


def test_export_a_training_run_to_transformers(straight_run, tmp_path):
    """`jais2 export RUN_DIR HF_DIR`: transformers loads the trained model (with the run's
    tokenizer) and its float32 logits equal ours from the run's checkpoint."""
    import torch
    from transformers import AutoTokenizer
    from transformers import Jais2ForCausalLM as HFModel
    from jais2_jax.cli import main
    out = tmp_path / "new" / "folders" / "hf"  # parents made as needed
    assert main(["export", str(straight_run), str(out), "--quiet"]) == 0
    with pytest.raises(FileExistsError, match="--force"):
        export_run_to_hf(straight_run / "absent-run", out)  # the output is checked first
    config, params, step = load_trained(str(straight_run))
    assert step == 6
    hf = HFModel.from_pretrained(out).eval()
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = Jais2ForCausalLM(config).apply({"params": params}, jnp.asarray(ids))
    assert rel_err(ours, ref) <= 1e-5
    text = "The desert at dawn. الصحراء عند الفجر"
    assert (AutoTokenizer.from_pretrained(out)(text).input_ids ==
            AutoTokenizer.from_pretrained(os.path.join(ROOT, "data", "tokenizer"))(text).input_ids)


def test_export_finds_the_tokenizer_of_a_run_started_elsewhere(store, tmp_path, monkeypatch,
                                                                capsys):
    """A run given its token store by a relative path, exported from another folder, still gets
    the store's tokenizer; a store that is gone is named and the export goes on without it."""
    from jais2_jax.cli import main
    start = tmp_path / "start"
    shutil.copytree(store, start / "store")
    monkeypatch.chdir(start)
    train(_loop_run("store", tmp_path / "run", total_steps=2, checkpoint_every=2),
          show_progress=False)
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(tmp_path / "run"), "hf", "--quiet"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (
        start / "store" / "tokenizer" / "tokenizer.json").read_bytes()
    shutil.rmtree(start / "store")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "hf2", "--quiet"]) == 0
    assert not (tmp_path / "hf2" / "tokenizer.json").exists()
    err = capsys.readouterr().err
    assert "no tokenizer/ folder" in err and str(start / "store") in err, err


def test_token_ids_beyond_the_model_vocabulary_are_refused(store, tmp_path):
    """A store whose ids reach the model's vocab_size (its tokenizer may be smaller: a store
    written by another tool) is refused before any step; it trained on NaN and reported "done"."""
    from jais2_jax.model.config import load_model_config
    bad = tmp_path / "store"
    shutil.copytree(store, bad)
    index = json.loads((bad / "index.json").read_text())
    index.pop("max_token_id", None)  # as a store written before it was recorded
    (bad / "index.json").write_text(json.dumps(index))
    tokens = np.memmap(bad / index["shards"][0]["tokens"], np.uint32, mode="r+")
    vocab = load_model_config("jais2-tiny").vocab_size
    tokens[5] = vocab + 3
    tokens.flush()
    del tokens
    with pytest.raises(ValueError, match=f"holds token id {vocab + 3}.*vocab_size is {vocab}"):
        train(_loop_run(str(bad), tmp_path / "out"), show_progress=False)
    assert not (tmp_path / "out").exists()


def test_an_impossible_mesh_is_refused_before_output_dir_is_made(store, tmp_path):
    """tensor=8 does not divide jais2-tiny's 4 heads: named before anything is written."""
    with pytest.raises(ValueError, match="does not divide"):
        train(_loop_run(store, tmp_path / "out", mesh=[1, 1, 8]), show_progress=False)
    assert not (tmp_path / "out").exists()
