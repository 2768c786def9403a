"""Two processes on localhost (jax.distributed with gloo CPU collectives, 4 devices each) run a
sharded forward and a train step that agree with one process; launch detection.

Run directly (`python tests/test_multihost.py worker OUT_DIR`) this file is one of the workers:
the coordinator address, process count and id come from JAX_* environment variables, as a
launcher would set them.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

BATCH, LENGTH = 8, 9
DEVICES_PER_PROCESS = 4


def _problem():
    """Config, params, train run and batch: the same in every process (seeded numpy)."""
    import jax
    from helpers import TINY
    from jais2_jax import Jais2Config
    from jais2_jax.model.layout import init_params
    from jais2_jax.training.run_config import RunConfig
    config = Jais2Config(**{**TINY, "max_position_embeddings": 16})
    rng = np.random.RandomState(0)
    params = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32),
        init_params(config, jax.random.key(0)))
    ids = rng.randint(0, config.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
             "loss_mask": np.ones((BATCH, LENGTH - 1), np.int32)}
    # eps 1e-3: a smooth Adam step, see tests/test_sharding.py.
    run = RunConfig(model="unused", data="unused", output_dir="unused", seq_len=LENGTH - 1,
                    batch_size=BATCH, dtype="float32", remat_policy="none", lr=1e-2,
                    warmup_steps=0, schedule="constant", eps=1e-3, loss_chunk=4)
    return config, params, run, batch


def _flat(tree):
    import jax
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _worker(out_dir):
    import jax
    from jais2_jax.parallel import distributed
    assert distributed.initialize() is True  # detected from JAX_COORDINATOR_ADDRESS & co.
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jais2_jax import Jais2ForCausalLM
    from jais2_jax.parallel import sharding as S
    from jais2_jax.training import step as training

    config, params, run, batch = _problem()
    assert jax.process_count() == 2 and len(jax.devices()) == 2 * DEVICES_PER_PROCESS
    # data crosses the two processes (DCN); fsdp and tensor stay inside each (ICI).
    mesh = S.make_mesh((1, 2, 2), dcn_shape=(2, 1, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert {d.process_index for d in mesh.devices[jax.process_index()].flat} == {jax.process_index()}
    model = Jais2ForCausalLM(config)
    ps = S.param_shardings(config, mesh)
    sharded = jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), params, ps)
    bs = S.batch_sharding(mesh, (BATCH, LENGTH - 1))
    rows = distributed.local_batch_rows(bs, (BATCH, LENGTH - 1))
    assert rows.stop - rows.start == BATCH // 2  # each process loads only its half
    local = {k: v[rows] for k, v in batch.items()}
    global_ = distributed.global_batch(local, bs)
    replicated = NamedSharding(mesh, P())

    optimizer = training.make_optimizer(run)
    state_sh = training.state_shardings(optimizer, ps, params)
    with S.use_mesh(mesh):
        logits = jax.jit(lambda p, i: model.apply({"params": p}, i), in_shardings=(ps, bs),
                         out_shardings=replicated)(sharded, global_["input_ids"])
        state = jax.jit(lambda p: training.init_state(p, optimizer, 0), out_shardings=state_sh)(
            sharded)
        step = training.jit_train_step(training.make_train_step(model, optimizer, run), state_sh, bs)
        state, metrics = step(state, global_)
        new_params = jax.jit(lambda p: p, out_shardings=replicated)(state.params)
        init = jax.jit(lambda p: p, out_shardings=replicated)(
            S.init_params_sharded(config, mesh, jax.random.key(0)))
    # A mesh with tensor across the processes: each would hold every batch row (an error).
    across = S.make_mesh((2, 1, 2), dcn_shape=(1, 1, 2))
    try:
        distributed.check_batch_split(S.batch_sharding(across, (BATCH, LENGTH - 1)),
                                      (BATCH, LENGTH - 1))
        split_error = ""
    except ValueError as e:
        split_error = str(e)
    distributed.check_batch_split(bs, (BATCH, LENGTH - 1))  # the data-across mesh is fine
    # Without a mesh, every process loads a whole copy onto its own first device.
    from jais2_jax.checkpoint import load_checkpoint
    loaded = {}
    for kind in ("hf", "orbax"):
        _, tree = load_checkpoint(os.path.join(out_dir, kind))
        assert {x.sharding.device_set.pop() for x in jax.tree_util.tree_leaves(tree)} == \
            {jax.local_devices()[0]}, kind
        loaded.update({kind + k: v for k, v in _flat(tree).items()})
    np.savez(os.path.join(out_dir, f"process{jax.process_index()}.npz"),
             logits=np.asarray(logits), loss=np.asarray(metrics["loss"]), **loaded,
             split_error=np.asarray(split_error),
             **{"new" + k: v for k, v in _flat(new_params).items()},
             **{"init" + k: v for k, v in _flat(init).items()})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("multihost"))
    from helpers import hf_model
    from jais2_jax.checkpoint import convert_hf_to_orbax
    hf_model(seed=4).save_pretrained(os.path.join(out, "hf"))  # loaded without a mesh
    convert_hf_to_orbax(os.path.join(out, "hf"), os.path.join(out, "orbax"), progress=False)
    port = _free_port()
    here = os.path.dirname(os.path.abspath(__file__))
    procs = []
    for i in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
                   JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   PYTHONPATH=os.pathsep.join([here, env.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, __file__, "worker", out], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process workers timed out")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-6000:]
    return [dict(np.load(os.path.join(out, f"process{i}.npz"))) for i in range(2)]


def test_two_processes_agree_with_one(two_processes):
    import jax
    from helpers import rel_err
    from jais2_jax import Jais2ForCausalLM
    from jais2_jax.training import step as training
    from jais2_jax.model.layout import init_params
    config, params, run, batch = _problem()
    model = Jais2ForCausalLM(config)
    logits = jax.jit(lambda p, i: model.apply({"params": p}, i))(params, batch["input_ids"])
    optimizer = training.make_optimizer(run)
    state, metrics = jax.jit(training.make_train_step(model, optimizer, run))(
        training.init_state(params, optimizer, 0), batch)
    ref_new, ref_init = _flat(state.params), _flat(init_params(config, jax.random.key(0)))
    for out in two_processes:
        assert rel_err(out["logits"], logits) <= 1e-5
        assert abs(float(out["loss"]) - float(metrics["loss"])) <= 1e-5 * float(metrics["loss"])
        for k, v in ref_new.items():
            assert rel_err(out["new" + k], v) <= 1e-5, k
        for k, v in ref_init.items():  # sharded init across processes: the same random values
            np.testing.assert_allclose(out["init" + k], v, rtol=0, atol=1e-7, err_msg=k)


def test_a_mesh_not_splitting_the_batch_over_processes_is_named(two_processes):
    for i, out in enumerate(two_processes):
        assert f"process {i} holds 8 of the 8 batch rows, not its share 4" in str(out["split_error"])


def test_each_process_loads_a_checkpoint_without_a_mesh(two_processes):
    """load_checkpoint without a mesh in a 2-process job: each process gets the whole tree on its
    own first device (it used the job's first device, process 0's), HF and Orbax folders alike."""
    from helpers import hf_model, our_config, our_params
    hf = hf_model(seed=4)
    want = _flat(our_params(hf, our_config(hf)))
    for out in two_processes:
        for kind in ("hf", "orbax"):
            assert {k[len(kind):] for k in out if k.startswith(kind + "[")} == set(want)
            for k, v in want.items():
                np.testing.assert_array_equal(out[kind + k], v)


def test_launch_detection():
    from jais2_jax.parallel.distributed import detect_launch
    assert detect_launch({}) is None
    assert detect_launch({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "env"
    assert detect_launch({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # one task
    assert detect_launch({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "16"}) == "slurm"
    assert detect_launch({"TPU_WORKER_HOSTNAMES": "t-0"}) is None  # a one-host TPU VM
    assert detect_launch({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}) == "tpu-pod"
    assert detect_launch({"MEGASCALE_COORDINATOR_ADDRESS": "t-0"}) == "tpu-multislice"


def test_initialize_modes(monkeypatch):
    from jais2_jax.parallel import distributed
    for k in list(os.environ):
        if k.startswith(("SLURM_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR")):
            monkeypatch.delenv(k)
    assert distributed.initialize("auto") is False  # one process: nothing started
    assert distributed.initialize("off") is False
    with pytest.raises(ValueError, match="choose 'auto', 'on' or 'off'"):
        distributed.initialize("maybe")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID are not"):
        distributed.initialize("auto")


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2])
