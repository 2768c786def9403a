"""`jais2 plan`: per-device bytes equal those of real sharded arrays on 8 fake devices; the
activation count follows the remat policy; the command prints a plan or a one-line error."""

import os

import jax
import jax.numpy as jnp
import pytest

from helpers import TINY
from jais2_jax import Jais2Config, init_cache
from jais2_jax.planning import memory as P
from jais2_jax.parallel import sharding as S
from jais2_jax.cli import main
from jais2_jax.training.run_config import RunConfig
from jais2_jax.training.step import make_optimizer

SHAPE = (2, 2, 2)
CONFIG_8B = os.path.join(os.path.dirname(__file__), "..", "configs", "jais2-8b.json")
CONFIG = Jais2Config(**{**TINY, "max_position_embeddings": 128})


def _device0_bytes(tree) -> int:
    """Bytes the first device really holds of a tree of sharded arrays."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree)
               for s in x.addressable_shards if s.device == dev)


def test_counts_equal_real_sharded_arrays():
    mesh = S.make_mesh(SHAPE)
    abstract = S.abstract_mesh(SHAPE, 8)
    train = P.make_plan(CONFIG, abstract, batch=8, seq=128, mode="train", remat="full")
    params = S.init_params_sharded(CONFIG, mesh, jax.random.key(0))
    assert train.params == _device0_bytes(params) == train.grads
    optimizer = make_optimizer(RunConfig(model="-", data="-", output_dir="-"))
    opt_sh = S.opt_state_shardings(optimizer, S.param_shardings(CONFIG, mesh), params)
    assert train.opt_state == _device0_bytes(jax.jit(optimizer.init, out_shardings=opt_sh)(params))

    decode = P.make_plan(CONFIG, abstract, batch=8, seq=64, mode="decode", param_dtype="bfloat16")
    cache = jax.device_put(init_cache(CONFIG, 8, 64, dtype=jnp.bfloat16),
                           S.cache_shardings(CONFIG, mesh, 8, 64))
    assert decode.kv_cache == _device0_bytes(cache)
    assert decode.params * 2 == train.params  # bfloat16 vs float32


def test_one_device_counts_compute_dtype_kernel_gradients():
    """On one device the train step keeps the layers' kernel gradients in bf16
    (training.compute_copies); on a mesh every gradient is float32, as its parameter."""
    one = P.make_plan(CONFIG, S.abstract_mesh((1, 1, 1), 1), batch=2, seq=128, mode="train")
    layers = S.unboxed_shapes(S.abstract_params(CONFIG, param_dtype=jnp.float32))["layers"]
    kernels = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(layers)[0]
                  if jax.tree_util.keystr(path).endswith("['kernel']"))
    assert one.grads == one.params - 2 * kernels  # 4 -> 2 bytes each
    mesh = P.make_plan(CONFIG, S.abstract_mesh((2, 1, 1), 2), batch=2, seq=128, mode="train")
    assert mesh.grads == mesh.params


def test_activations_follow_remat_policy():
    mesh = S.abstract_mesh(SHAPE, 8)  # 8 rows over data*fsdp = 4: 2 rows per device

    def saved(layers, remat):
        config = CONFIG.replace(num_hidden_layers=layers)
        return P.make_plan(config, mesh, batch=8, seq=128, remat=remat).activations_saved

    # Full remat keeps exactly each layer's input: [2 rows, 128, hidden 64] in bfloat16.
    assert saved(3, "full") - saved(2, "full") == 2 * 128 * 64 * 2
    assert saved(2, "none") > saved(2, "dots") > saved(2, "full")
    # Without remat nothing is rebuilt in the backward pass; with it, one layer at a time is.
    assert P.make_plan(CONFIG, mesh, batch=8, seq=128, remat="none").activations_layer == 0
    assert P.make_plan(CONFIG, mesh, batch=8, seq=128, remat="full").activations_layer > 0


def test_lm_head_gradient_counted_at_its_fsdp_share():
    """The fused loss holds the float32 lm_head gradient from forward to backward, sharded like the
    lm_head (embed over fsdp, vocab over tensor): two meshes with the same rows per device and the
    same tensor split differ only by that share."""
    def saved(shape):
        return P.make_plan(CONFIG, S.abstract_mesh(shape, 8), batch=8, seq=128,
                           remat="full").activations_saved
    whole_over_tensor = CONFIG.hidden_size * (CONFIG.vocab_size // 2) * 4  # fsdp=1
    assert saved((4, 1, 2)) - saved((2, 2, 2)) == whole_over_tensor // 2


def test_hardware_names():
    assert P.hardware("v5p-32") == P.Hardware("v5p-32", 16, 95e9, 4)  # 32 TensorCores, 16 chips
    assert P.hardware("v5e-256").devices == 256
    assert P.hardware("8xH100") == P.Hardware("8xH100", 8, 80e9, 8)
    with pytest.raises(ValueError, match="unknown hardware 'v9-1'"):
        P.hardware("v9-1")


def test_plan_command(capsys):
    rc = main(["plan", "--model", CONFIG_8B, "--hardware", "v5p-32", "--batch", "16",
               "--seq", "2048", "--remat", "full"])
    out = capsys.readouterr().out
    assert rc == 0 and "fsdp=16" in out and "of 95 GB: fits" in out
    # 8B's 26 heads over tensor=16: one line naming the rule and the nearest choice.
    rc = main(["plan", "--model", "jais2-8b", "--devices", "16", "--mesh", "tp", "--batch", "16",
               "--seq", "2048"])
    err = capsys.readouterr().err
    assert rc == 1 and "size 26" in err and "tensor=2" in err and len(err.strip().splitlines()) == 1
    rc = main(["plan", "--model", "jais2-8b", "--devices", "16", "--batch", "12", "--seq", "2048"])
    assert rc == 1 and "a batch of 16" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [(["--devices", "0"], "--devices must be at least 1"),
                                           (["--devices", "-4"], "--devices must be at least 1"),
                                           (["--devices", "2", "--grad-accum", "0"],
                                            "--grad-accum must be at least 1")])
def test_plan_counts_below_one_are_errors(capsys, flags, message):
    rc = main(["plan", "--model", "jais2-tiny", "--batch", "8", "--seq", "64", *flags])
    assert rc == 1 and message in capsys.readouterr().err


def test_plan_dtype_flag_beats_the_run_config(capsys, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("model: jais2-tiny\ndata: x\noutput_dir: y\nbatch_size: 8\nseq_len: 64\n"
                   "dtype: float32\nparam_dtype: float32\n")
    assert main(["plan", "--run", str(run), "--devices", "1"]) == 0
    assert "compute float32" in capsys.readouterr().out  # the run's
    assert main(["plan", "--run", str(run), "--devices", "1", "--dtype", "bfloat16"]) == 0
    assert "compute bfloat16" in capsys.readouterr().out  # asked for, though it is the default


def test_cli_grad_accum_keeps_one_micro_batch_of_activations(capsys):
    from jais2_jax.cli import main

    def saved(*extra):
        # The 8B shape so that the figures (printed in GB) are large; nothing is compiled.
        assert main(["plan", "--model", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "jais2-8b.json"),
                     "--hardware", "8xh100", "--mesh", "fsdp", "--batch", "32", "--seq", "4096",
                     "--remat", "dots", *extra]) == 0
        line = next(l for l in capsys.readouterr().out.splitlines() if "activations saved" in l)
        return float(line.split()[-2])
    # saved = constant (the fused loss's lm_head gradient) + per-row residuals x micro-batch rows:
    # halving the micro-batch twice must remove half, then a quarter, of the per-row part.
    whole, half, quarter = saved(), saved("--grad-accum", "2"), saved("--grad-accum", "4")
    assert abs((whole - half) / (half - quarter) - 2.0) < 0.02, (whole, half, quarter)
    assert whole - half > 0.4 * whole, (whole, half)  # the per-row part dominates at this size
