"""Bad input is a clear one-line error that names the field and the value, before any work: model
configs (token ids, RoPE numbers, absurd sizes), sampling (a tiny temperature is greedy), hardware
names, seeds, the demo's token count and output folder, `--set` overrides, the run config's
attention_impl."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY
from jais2_jax import Jais2Config
from jais2_jax.cli import main
from jais2_jax.inference.sampling import MIN_TEMPERATURE, Sampler, filter_logits, sample
from jais2_jax.planning import memory as P
from jais2_jax.training.run_config import RunConfig

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY_CPU_YAML = os.path.join(ROOT, "configs", "tiny-cpu.yaml")
HALF = TINY["hidden_size"] // TINY["num_attention_heads"] // 2  # head_dim / 2 = 8


def _config(**changes):
    return Jais2Config.from_dict({**TINY, **changes})


def _one_line_error(capsys, command: str) -> str:
    """The CLI's error line (exactly one, no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"jais2 {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------ 1. model configs
@pytest.mark.parametrize("changes,message", [
    (dict(pad_token_id=128), "pad_token_id 128 is outside the vocabulary"),
    (dict(pad_token_id=5000), "pad_token_id 5000 is outside the vocabulary"),
    (dict(bos_token_id=128), "bos_token_id 128 is outside the vocabulary"),
    (dict(eos_token_id=200), "eos_token_id 200 is outside the vocabulary"),
    (dict(eos_token_id=[2, 128]), "eos_token_id 128 is outside the vocabulary"),
    (dict(pad_token_id=-1), "pad_token_id must be a non-negative integer"),
    (dict(eos_token_id=[2, -3]), "eos_token_id must be a non-negative integer"),
])
def test_token_ids_must_lie_in_the_vocabulary(changes, message):
    with pytest.raises(ValueError, match=message) as e:
        _config(**changes)
    if "outside" in message:
        assert "vocab_size (128)" in str(e.value)


def test_token_ids_may_be_null_or_the_last_id():
    config = _config(pad_token_id=None, bos_token_id=None, eos_token_id=127)
    assert config.eos_token_ids == (127,)
    assert _config(eos_token_id=None).eos_token_ids == ()
    # An id the config does not state keeps transformers' default (that of the 150272-token
    # vocabulary), as transformers does; stating the same id with a small vocabulary is refused.
    unstated = {k: v for k, v in TINY.items() if k not in ("bos_token_id", "eos_token_id")}
    assert Jais2Config.from_dict(unstated).eos_token_id == 150024
    with pytest.raises(ValueError, match="eos_token_id 150024 is outside the vocabulary"):
        Jais2Config.from_dict({**unstated, "eos_token_id": 150024})


def _rope(rope_type="default", **kw):
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": 10000.0, **kw}}


@pytest.mark.parametrize("theta", [float("nan"), float("inf"), -float("inf"), True, 0, -1.0,
                                   "10000", 1e39])
def test_rope_theta_must_be_a_positive_finite_number(theta):
    with pytest.raises(ValueError, match=r"rope_parameters\.rope_theta must be a positive") as e:
        _config(**_rope(rope_theta=theta))
    assert repr(theta) in str(e.value)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
@pytest.mark.parametrize("factor", [float("nan"), float("inf"), True, 0, -2.0, "4"])
def test_rope_factor_must_be_a_positive_finite_number(rope_type, factor):
    with pytest.raises(ValueError, match=r"rope_parameters\.factor must be a positive") as e:
        _config(**_rope(rope_type, factor=factor))
    assert repr(factor) in str(e.value)


def test_nan_infinity_and_true_in_config_json_are_refused(tmp_path):
    """config.json as Python's json writes NaN / Infinity (and `true` where a number belongs)."""
    for text, message in (('"rope_theta": NaN', "rope_theta"), ('"rope_theta": Infinity', "rope_theta"),
                          ('"rope_theta": true', "rope_theta")):
        body = json.dumps({**TINY, "model_type": "jais2"})[:-1] + ", " + text + "}"
        (tmp_path / "config.json").write_text(body)
        with pytest.raises(ValueError, match=message):
            Jais2Config.from_json_file(tmp_path)
    body = json.dumps({**TINY, **_rope("linear", factor=float("nan"))})
    (tmp_path / "config.json").write_text(body)
    with pytest.raises(ValueError, match=r"factor must be a positive finite number, got nan"):
        Jais2Config.from_json_file(tmp_path)


GOOD_LONG = [1.0] * HALF


@pytest.mark.parametrize("rope,message", [
    (dict(long_factor=GOOD_LONG), r"needs \['short_factor'\]"),
    (dict(short_factor=GOOD_LONG), r"needs \['long_factor'\]"),
    (dict(short_factor=[1.0] * (HALF - 1), long_factor=GOOD_LONG),
     rf"short_factor must have head_dim/2 = {HALF} entries, got {HALF - 1}"),
    (dict(short_factor=GOOD_LONG, long_factor=[1.0] * (HALF + 3)),
     rf"long_factor must have head_dim/2 = {HALF} entries, got {HALF + 3}"),
    (dict(short_factor=3.0, long_factor=GOOD_LONG), r"short_factor must be a list"),
    (dict(short_factor="abcdefgh", long_factor=GOOD_LONG), r"short_factor must be a list"),
    (dict(short_factor=GOOD_LONG, long_factor=["x"] * HALF),
     r"long_factor must hold positive finite numbers, got 'x'"),
    (dict(short_factor=[1.0] * (HALF - 1) + [float("nan")], long_factor=GOOD_LONG),
     r"short_factor must hold positive finite numbers, got nan"),
    (dict(short_factor=[1.0] * (HALF - 1) + [True], long_factor=GOOD_LONG),
     r"short_factor must hold positive finite numbers, got True"),
    (dict(short_factor=[0.0] * HALF, long_factor=GOOD_LONG),
     r"short_factor must hold positive finite numbers, got 0.0"),
])
def test_malformed_longrope_is_refused_by_name(rope, message):
    with pytest.raises(ValueError, match=message):
        _config(**_rope("longrope", **rope))


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


@pytest.mark.parametrize("changes,message", [
    (dict(low_freq_factor=None), r"needs \['low_freq_factor'\]"),
    (dict(high_freq_factor=None), r"needs \['high_freq_factor'\]"),
    (dict(low_freq_factor=0.0), r"low_freq_factor must be a positive finite number, got 0.0"),
    (dict(low_freq_factor=-1), r"low_freq_factor must be a positive finite number, got -1"),
    (dict(low_freq_factor="1"), r"low_freq_factor must be a positive finite number, got '1'"),
    (dict(high_freq_factor=float("inf")), r"high_freq_factor must be a positive finite number"),
    (dict(high_freq_factor=1.0), r"high_freq_factor \(1.0\) must exceed low_freq_factor \(1.0\)"),
    (dict(high_freq_factor=0.5), r"high_freq_factor \(0.5\) must exceed low_freq_factor"),
    (dict(original_max_position_embeddings=0), r"original_max_position_embeddings must be a positive"),
    (dict(original_max_position_embeddings=-8), r"original_max_position_embeddings must be a positive"),
    (dict(original_max_position_embeddings=True), r"original_max_position_embeddings must be a positive"),
])
def test_malformed_llama3_is_refused_by_name(changes, message):
    rope = {k: v for k, v in {**LLAMA3, **changes}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        _config(**_rope("llama3", **rope))


def test_well_formed_scaled_rope_still_loads():
    # original_max_position_embeddings may be absent: transformers fills it from
    # max_position_embeddings, and so do we.
    assert _config(**_rope("llama3", **LLAMA3)).rope_original_max_position_embeddings == 64
    _config(**_rope("longrope", short_factor=GOOD_LONG, long_factor=[2] * HALF, factor=2.0,
                    original_max_position_embeddings=32))
    _config(**_rope("yarn", factor=4.0, beta_fast=32, beta_slow=1, attention_factor=1.0,
                    original_max_position_embeddings=16))
    with pytest.raises(ValueError, match=r"rope_parameters\.beta_fast must be a finite number"):
        _config(**_rope("yarn", factor=4.0, beta_fast=float("nan")))


@pytest.mark.parametrize("name,value", [
    ("num_hidden_layers", 100_000_000), ("num_attention_heads", 10**9),
    ("num_key_value_heads", 10**9), ("hidden_size", 10**9), ("vocab_size", 10**10),
    ("intermediate_size", 10**12), ("max_position_embeddings", 10**12), ("head_dim", 10**8),
])
def test_absurd_sizes_are_refused_before_any_work(name, value):
    changes = {name: value}
    if name == "num_attention_heads":
        changes["num_key_value_heads"] = value
    with pytest.raises(ValueError, match=rf"{name} {value} is beyond any real model \(at most \d+\)"):
        _config(**changes)


def test_absurd_layer_count_is_a_one_line_cli_error(tmp_path, capsys):
    """Before the bound, `plan` built 1.6e9 parameter names for this config: MemoryError."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "num_hidden_layers": 100_000_000}))
    assert main(["plan", "--model", str(tmp_path), "--devices", "1", "--batch", "1",
                 "--seq", "8"]) == 1
    assert "num_hidden_layers 100000000 is beyond any real model" in _one_line_error(capsys, "plan")


def test_real_model_configs_are_within_the_bounds():
    from jais2_jax.model.config import preset
    for name in ("jais2-tiny", "jais2-8b", "jais2-70b"):
        preset(name)
    with pytest.raises(ValueError, match=r"unknown config keys: \['not_a_field'\]"):
        _config(not_a_field=1)  # unchanged: unknown keys are listed (bookkeeping keys are kept)
    assert _config(architectures=["Jais2ForCausalLM"], transformers_version="5.0").hf_metadata


def test_plan_of_a_tensor_shard_keeps_working_with_ids_beyond_the_shard():
    """The plan traces one tensor shard's model (vocab / tensor): ids past it are not an error."""
    from jais2_jax.parallel import sharding as S
    config = _config(eos_token_id=127, max_position_embeddings=128)
    plan = P.make_plan(config, S.abstract_mesh((1, 1, 2), 2), batch=2, seq=128, mode="decode")
    assert plan.params > 0


# ----------------------------------------------------------------------------------- 2. sampling
def test_tiny_temperature_is_greedy():
    for t in (1e-45, 5e-324, MIN_TEMPERATURE / 2):
        assert Sampler(t).greedy and Sampler(t).temperature == 0.0
    assert not Sampler(MIN_TEMPERATURE).greedy
    logits = jax.random.normal(jax.random.key(0), (4, 128)) * 5
    best = np.asarray(jnp.argmax(logits, axis=-1))
    kept = np.asarray(filter_logits(logits, 1e-45, None, None))
    assert (np.isfinite(kept).sum(axis=-1) == 1).all()
    assert (np.argmax(kept, axis=-1) == best).all()
    for seed in range(5):  # the draw never depends on the key
        drawn = sample(logits, jax.random.key(seed), Sampler(1e-45, top_k=50, top_p=0.9))
        assert (np.asarray(drawn) == best).all()


def test_generate_with_temperature_1e_45_gives_the_greedy_tokens():
    from jais2_jax import Jais2ForCausalLM
    from jais2_jax.inference.generate import generate
    from jais2_jax.model.layout import init_params
    config = Jais2Config(**TINY)
    params = init_params(config, jax.random.key(0))
    model = Jais2ForCausalLM(config)
    prompt = np.array([[1, 5, 9, 17, 33], [1, 44, 3, 8, 100]])
    greedy = generate(model, params, prompt, max_new_tokens=12, eos_token_id=[])
    tiny = generate(model, params, prompt, max_new_tokens=12, temperature=1e-45,
                    rng=jax.random.key(3), eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(tiny), np.asarray(greedy))


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=float("nan")), "temperature must be >= 0 and finite"),
    (dict(temperature=float("inf")), "temperature must be >= 0 and finite"),
    (dict(temperature=-1e-45), "temperature must be >= 0"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature=True), "temperature must be >= 0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(temperature=1.0, top_p=1.0000001), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
    (dict(temperature=1.0, top_k=-1), "top_k must be a positive integer or None, got -1"),
    (dict(temperature=1.0, top_k=0), "top_k must be a positive integer or None, got 0"),
])
def test_bad_sampling_values_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampler(**kwargs)


@pytest.mark.parametrize("argv,message", [
    (["--temperature", "nan"], "temperature must be >= 0 and finite"),
    (["--temperature", "inf"], "temperature must be >= 0 and finite"),
    (["--temperature", "1", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--temperature", "1", "--top-k", "-5"], "top_k must be a positive integer or None, got -5"),
])
def test_generate_cli_refuses_bad_sampling_before_loading(tmp_path, capsys, argv, message):
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "hi"] + argv) == 1
    assert message in _one_line_error(capsys, "generate")


# ----------------------------------------------------------------------------------- 3. hardware
@pytest.mark.parametrize("name", ["v5p-3", "v5p-1", "v5p-2", "v4-12", "v5e-3", "v6e-2", "0xh100",
                                  "12xh100", "v5p-", "v9-8", "h100", "tpu"])
def test_unknown_or_malformed_hardware_is_refused_listing_the_known(name):
    with pytest.raises(ValueError) as e:
        P.hardware(name)
    msg = str(e.value)
    assert repr(name) in msg and "known: " in msg and "v5p-8" in msg and "8xh100" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("name,devices", [("v5p-8", 4), ("v5p-32", 16), ("v4-64", 32),
                                          ("v5e-1", 1), ("v5litepod-4", 4), ("v6e-16", 16),
                                          ("4xH100", 4), ("8xh200", 8), ("32xa100", 32)])
def test_real_hardware_names_still_work(name, devices):
    assert P.hardware(name).devices == devices


def test_plan_cli_refuses_v5p_3(capsys):
    assert main(["plan", "--model", "jais2-tiny", "--hardware", "v5p-3", "--batch", "1",
                 "--seq", "8"]) == 1
    line = _one_line_error(capsys, "plan")
    assert "'v5p-3'" in line and "known: " in line


# -------------------------------------------------------------------------------------- 4. seeds
@pytest.mark.parametrize("seed", [str(10**23), str(2**63), "-1"])
def test_generate_cli_refuses_seeds_outside_int64(tmp_path, capsys, seed):
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "hi",
                 "--seed", seed]) == 1
    assert f"--seed must be in [0, 2**63), got {seed}" in _one_line_error(capsys, "generate")


def test_run_config_refuses_seeds_outside_int64(tmp_path, capsys):
    for seed in (10**23, 2**63, -1):
        with pytest.raises(ValueError, match=rf"seed must be in \[0, 2\*\*63\), got {seed}"):
            RunConfig(model="jais2-tiny", data="d", output_dir="o", seed=seed)
    assert RunConfig(model="jais2-tiny", data="d", output_dir="o", seed=2**63 - 1).seed == 2**63 - 1
    assert main(["train", TINY_CPU_YAML, "--set", f"seed={10**23}"]) == 1
    assert f"seed must be in [0, 2**63), got {10**23}" in _one_line_error(capsys, "train")
    assert main(["demo", "--set", f"seed={10**23}", "--output-dir", str(tmp_path / "d")]) == 1
    assert "seed must be in [0, 2**63)" in _one_line_error(capsys, "demo")
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------------------- 5. demo
def test_demo_checks_max_new_tokens_against_the_context_first(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--max-new-tokens", "1000"]) == 1
    line = _one_line_error(capsys, "demo")
    assert "--max-new-tokens 1000" in line and "max_position_embeddings is 256" in line
    assert not out.exists()  # no data prepared, nothing trained
    # The largest count that fits is what the message says.
    limit = int(line.rsplit("at most ", 1)[1].split()[0])
    assert 200 < limit < 256
    assert main(["demo", "--output-dir", str(out), "--max-new-tokens", str(limit + 1)]) == 1
    assert f"at most {limit} new tokens" in _one_line_error(capsys, "demo")


def test_demo_onto_a_finished_run_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "train" / "checkpoints" / "400").mkdir(parents=True)
    (out / "samples.txt").write_text("The desert at dawn...\n\n")
    (out / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert main(["demo", "--output-dir", str(out)]) == 1
    assert "already holds a finished demo run" in _one_line_error(capsys, "demo")
    assert (out / "samples.txt").read_text() == "The desert at dawn...\n\n"  # left alone
    partial = tmp_path / "partial"
    partial.mkdir()
    assert main(["demo", "--output-dir", str(partial)]) == 1
    assert "exists; choose another --output-dir" in _one_line_error(capsys, "demo")


# --------------------------------------------------------------------------- 6. --set overrides
@pytest.mark.parametrize("override", ["lr=[1", "mesh={a: [", "seq_len='128", "lr=: :"])
def test_unparsable_override_is_a_one_line_error(capsys, override):
    with pytest.raises(ValueError, match="not valid YAML") as e:
        RunConfig.from_yaml(TINY_CPU_YAML, [override])
    assert f"--set {override!r}" in str(e.value) and "\n" not in str(e.value)
    assert main(["train", TINY_CPU_YAML, "--set", override]) == 1
    assert f"--set {override!r}: the value is not valid YAML" in _one_line_error(capsys, "train")


def test_demo_override_parse_error_is_one_line(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "d"), "--set", "lr=[1"]) == 1
    assert "--set 'lr=[1'" in _one_line_error(capsys, "demo")
    assert not (tmp_path / "d").exists()


# -------------------------------------------------------------------------- 7. attention_impl
def test_run_config_refuses_unknown_attention_impl(capsys):
    with pytest.raises(ValueError, match=r"attention_impl 'foo': choose one of \(None, 'xla'"):
        RunConfig(model="jais2-tiny", data="d", output_dir="o", attention_impl="foo")
    for impl in (None, "xla", "cudnn", "splash", "splash_interpret"):
        assert RunConfig(model="jais2-tiny", data="d", output_dir="o",
                         attention_impl=impl).attention_impl == impl
    assert main(["train", TINY_CPU_YAML, "--set", "attention_impl=foo"]) == 1
    assert "attention_impl 'foo'" in _one_line_error(capsys, "train")


def test_train_cli_refuses_attention_impl_in_the_yaml(tmp_path, capsys):
    text = open(TINY_CPU_YAML, encoding="utf-8").read() + "\nattention_impl: foo\n"
    path = tmp_path / "run.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    assert main(["train", str(path), "--set", f"output_dir={out}"]) == 1
    assert "attention_impl 'foo': choose one of" in _one_line_error(capsys, "train")
    assert not out.exists()  # refused by the config, before the trainer started
