"""Jais2Config: HF config.json round trip, presets, and a named ValueError for every invalid config."""

import json

import pytest

from helpers import hf_config
from jais2_jax import Jais2Config
from jais2_jax.model.config import preset


def test_hf_config_json_round_trips_exactly(tmp_path):
    hf = hf_config(num_key_value_heads=2, eos_token_id=[2, 5],
                   rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5,
                                    "original_max_position_embeddings": 16})
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    config = Jais2Config.from_json_file(tmp_path)
    assert config.eos_token_ids == (2, 5)
    assert config.num_key_value_heads == 2 and config.head_dim == 16
    assert config.rope_parameters["factor"] == 4.0
    assert config.to_dict() == written
    config.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == written
    # and transformers reads ours back to the same config
    from transformers import Jais2Config as HFConfig
    assert HFConfig.from_pretrained(tmp_path / "again").to_dict() == hf.to_dict()


def test_legacy_rope_theta_and_rope_scaling():
    legacy = {"model_type": "jais2", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    config = Jais2Config.from_dict(legacy)
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    out = config.to_dict()
    assert out["rope_theta"] == 500000.0 and out["rope_scaling"] == legacy["rope_scaling"]
    assert "rope_parameters" not in out
    # Theta only, no scaling: default rope with that theta (theta is never guessed).
    plain = Jais2Config.from_dict({k: v for k, v in legacy.items() if k != "rope_scaling"})
    assert plain.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}


def test_presets_load_and_have_the_released_shapes():
    c8 = preset("jais2-8b")
    assert (c8.hidden_size, c8.num_hidden_layers, c8.num_attention_heads, c8.vocab_size) == \
        (3328, 32, 26, 150272)
    assert c8.num_parameters() == 8_090_401_280  # the released checkpoint's count
    c70 = preset("jais2-70b")
    assert (c70.hidden_size, c70.num_hidden_layers, c70.num_attention_heads,
            c70.intermediate_size) == (7168, 68, 56, 57344)
    assert 65e9 < c70.num_parameters() < 75e9
    assert preset("jais2-tiny").num_hidden_layers >= 1


BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4)


@pytest.mark.parametrize("changes, field", [
    (dict(hidden_act="swish2"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "ntk-by-parts", "rope_theta": 1e4}), "rope_type"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "factor"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), "rope_theta"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0],
                           "long_factor": [1.0]}), "short_factor"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=66), "hidden_size"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(intermediate_size=2.5), "intermediate_size"),
    (dict(head_dim=7), "head_dim"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    (dict(eos_token_id=[2, -1]), "eos_token_id"),
    (dict(attention_dropout=1.5), "attention_dropout"),
    (dict(hidden_size=60), "head_dim must be even"),  # 60 / 4 heads = 15
    (dict(tie_word_embeddings="false"), "tie_word_embeddings"),
    (dict(attention_bias=1), "attention_bias"),
    (dict(mlp_bias=None), "mlp_bias"),
    (dict(initializer_range=None), "initializer_range"),
    (dict(rope_parameters="default"), "rope_parameters"),
])
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        Jais2Config(**{**BASE, **changes})


def test_rope_keys_read_as_transformers_reads_them():
    """A legacy rope_scaling replaces rope_parameters (theta then from rope_theta or the default);
    rope_theta beside rope_parameters does not override it; null attention_dropout is accepted;
    a rope_scaling that is not an object is named."""
    from transformers import Jais2Config as HFConfig
    for extra in ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
                   "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                  {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
                   "rope_theta": 1e4},
                  {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}},
                  {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 300.0},
                   "rope_scaling": {}},  # an empty rope_scaling replaces nothing
                  {"attention_dropout": None}):
        d = {**BASE, "model_type": "jais2", **extra}
        assert Jais2Config.from_dict(d).rope_parameters == HFConfig(**d).rope_parameters, extra
    with pytest.raises(ValueError, match="rope_scaling must be an object"):
        Jais2Config.from_dict({**BASE, "rope_theta": 1e4, "rope_scaling": "linear"})


@pytest.mark.parametrize("rope", [
    {"rope_theta": 5e5},  # no rope_scaling key at all
    {"rope_theta": 5e5, "rope_scaling": None},
    {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}},  # the old "type" key
    {"rope_theta": 5e5, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
])
def test_legacy_rope_keys_are_written_back_as_read(rope):
    d = {**BASE, "model_type": "jais2", **rope}
    out = Jais2Config.from_dict(d).to_dict()
    assert {k: v for k, v in out.items() if k.startswith("rope")} == rope


def test_unknown_keys_are_listed():
    with pytest.raises(ValueError, match=r"unknown config keys: \['hiden_size', 'n_layers'\]"):
        Jais2Config.from_dict({**BASE, "hiden_size": 3, "n_layers": 2})
    with pytest.raises(ValueError, match="model_type"):
        Jais2Config.from_dict({**BASE, "model_type": "llama"})


def test_head_dim_may_differ_when_hidden_not_divisible():
    config = Jais2Config(**{**BASE, "hidden_size": 66, "head_dim": 16})
    assert config.head_dim == 16


def test_malformed_json_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Jais2Config.from_json_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        Jais2Config.from_json_file(tmp_path / "missing")
