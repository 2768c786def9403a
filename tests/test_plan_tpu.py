"""`jais2 plan --topology`: the real train step and prefill + decode steps AOT-compiled by XLA:TPU
(libtpu, the `tpu` extra) for pod topologies, on this CPU machine.

Reference for the bytes: the exact per-chip size of parameters and optimizer state under the
shardings (`sharding.bytes_per_device`, checked against real sharded arrays in test_plan.py); the
compiled program must hold at least those as arguments.
"""

import os

import pytest

pytest.importorskip("libtpu")

from jais2_jax.parallel import sharding as S  # noqa: E402
from jais2_jax.model.options import ModelOptions
from jais2_jax.planning import tpu as tpu_plan  # noqa: E402
from jais2_jax.cli import main  # noqa: E402
from jais2_jax.model.config import Jais2Config  # noqa: E402
from jais2_jax.training.run_config import RunConfig  # noqa: E402
from jais2_jax.training.step import make_optimizer  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
TINY = os.path.join(CONFIGS, "jais2-tiny.json")


@pytest.fixture(scope="module")
def tiny_train():
    """The tiny config's train step compiled for v5e:2x2 (4 chips, fsdp=4), batch 8 x 128."""
    config = Jais2Config.from_json_file(TINY)
    topology = tpu_plan.parse_topology("v5e:2x2")
    setting = tpu_plan.Setting(mesh=(1, 4, 1), batch=8, seq=128, remat="dots")
    return config, tpu_plan.plan_topology(config, topology, setting)


def test_train_step_compiles_for_v5e_2x2(tiny_train):
    import jax
    import flax.linen as nn
    config, result = tiny_train
    assert result.fits and len(result.programs) == 1
    assert "train step: compiled" in tpu_plan.format_result(result)
    step = result.programs[0]
    assert step.oom is None and step.temp > 0 and step.flops > 0
    # Parameters + AdamW moments of one chip: float32, sharded over fsdp=4.
    mesh = S.abstract_mesh((1, 4, 1), 4)
    abstract = nn.meta.unbox(S.abstract_params(config))
    params_sh = S.param_shardings(config, mesh)
    optimizer = make_optimizer(RunConfig(model="-", data="-", output_dir="-"))
    state = (S.bytes_per_device(abstract, params_sh)
             + S.bytes_per_device(jax.eval_shape(optimizer.init, abstract),
                                  S.opt_state_shardings(optimizer, params_sh, abstract)))
    assert step.argument >= state
    assert step.total >= step.argument
    # The donated state comes back in place: its outputs alias the arguments.
    assert step.alias >= state


def test_splash_kernel_in_the_compiled_step():
    """plan_topology builds the model with attention_impl="splash": the Mosaic kernel is a TPU
    custom call in the compiled program (and the compile sits inside shard_map, or it fails)."""
    import jax.numpy as jnp
    from jais2_jax.inference.program import build_inference_program
    config = Jais2Config.from_json_file(TINY)
    mesh = S.make_mesh((1, 4, 1), devices=tpu_plan.topology_devices(
        tpu_plan.parse_topology("v5e:2x2")))
    program = build_inference_program(config, batch_size=4, max_length=128, mesh=mesh,
                                      dtype="float32",
                                      options=ModelOptions(attention_impl="splash"))
    model, params = program.model, program.abstract_params()
    import jax
    ids = jax.ShapeDtypeStruct((4, 128), jnp.int32, sharding=S.batch_sharding(mesh, (4, 128)))
    with S.use_mesh(mesh):
        text = jax.jit(model.apply).lower({"params": params}, ids).compile().as_text()
    assert "tpu_custom_call" in text


def test_70b_on_one_v5e_chip_does_not_fit(capsys):
    rc = main(["plan", "--model", os.path.join(CONFIGS, "jais2-70b.json"), "--topology", "v5e:1x1",
               "--batch", "1", "--seq", "2048"])
    out = capsys.readouterr().out
    assert rc == tpu_plan.EXIT_DOES_NOT_FIT, out
    assert "does NOT fit" in out
    # 72B x (4 params + 8 Adam) bytes = 1073 GiB on one chip; the suggestion is a larger v5e pod.
    assert "1073.48 GiB" in out
    assert "nearest change that fits: topology v5e:" in out


def test_compile_oom_is_does_not_fit_with_a_suggestion(tmp_path, capsys):
    """A small model with long rows on one v5e chip: its state fits, the activations of 128 x 2048
    tokens without remat do not (XLA:TPU compiles 64 rows at 19.4 GiB of temporaries and reports
    it, 128 rows it refuses at 30.9). XLA's RESOURCE_EXHAUSTED becomes the does-not-fit exit code, and
    the analytic search names a change (not compiled here: a compile close to the HBM limit takes
    a minute; the docs' table shows compiled suggestions)."""
    config = Jais2Config.from_json_file(TINY).replace(
        max_position_embeddings=2048, vocab_size=32768, hidden_size=512, intermediate_size=2048)
    path = config.save(tmp_path)
    rc = main(["plan", "--model", path, "--topology", "v5e:1x1", "--batch", "128", "--seq",
               "2048", "--remat", "none", "--verify", "0"])
    out = capsys.readouterr().out
    assert rc == tpu_plan.EXIT_DOES_NOT_FIT, out
    assert "compile failed" in out and "RESOURCE_EXHAUSTED" in out
    assert "verdict: does NOT fit" in out
    assert "nearest change that fits: remat" in out or "grad_accum_steps" in out, out


def test_decode_compiles(capsys):
    rc = main(["plan", "--model", TINY, "--topology", "v5e:2x2", "--mesh", "2,1,2", "--mode",
               "decode", "--batch", "4", "--seq", "256", "--prefill", "128"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "prefill (128 tokens per row): compiled" in out and "decode step: compiled" in out


def test_suggest_keeps_the_dcn_mesh(monkeypatch):
    """Suggestions for a multi-slice run are estimated and compiled with the run's DCN mesh
    (here fsdp across 2 slices), not data-over-slices."""
    config = Jais2Config.from_json_file(TINY)
    topo = tpu_plan.parse_topology("v5e:2x2", num_slices=2)
    failed = tpu_plan.Result(topo, "train", tpu_plan.Setting(mesh=(1, 4, 1), batch=8, seq=128,
                                                             remat="none"),
                             [], skipped="pretend", estimate=10 ** 12, state=10 ** 12)
    used, compiled = set(), []
    real_global = tpu_plan._global
    monkeypatch.setattr(tpu_plan, "_global", lambda s, dcn: (used.add(dcn), real_global(s, dcn))[1])
    monkeypatch.setattr(tpu_plan, "plan_topology", lambda config, topology, setting, **kw: (
        compiled.append(kw.get("dcn_mesh")),
        tpu_plan.Result(topology, "train", setting, [tpu_plan.Compiled("x", 0.0)]))[1])
    tpu_plan.suggest(config, failed, verify=1, dcn_mesh=(1, 2, 1))
    assert used == {(1, 2, 1)} and compiled == [(1, 2, 1)]


def test_bad_topology_is_a_clear_error():
    with pytest.raises(ValueError, match="v5p takes 3 positive dimensions"):
        tpu_plan.parse_topology("v5p:4x4")
    with pytest.raises(ValueError, match="expected GENERATION:DIMS"):
        tpu_plan.parse_topology("v5p-128")
