"""Checkpoints: transformers save_pretrained (several shards) -> `jais2 convert` -> our logits ->
`jais2 export` -> from_pretrained with bitwise identical tensors; HF and Orbax loads agree, also on a
2x2x2 mesh of fake CPU devices; every kind of bad input fails clearly and leaves nothing behind."""

import json
import math
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from helpers import hf_model, rel_err
from jais2_jax import Jais2Config, Jais2ForCausalLM
from jais2_jax import checkpoint as ckpt_lib
from jais2_jax.checkpoint import load as ckpt_load
from jais2_jax.checkpoint import safetensors_io
from jais2_jax.checkpoint import hf_mapping
from jais2_jax.checkpoint import load_checkpoint, parse_size
from jais2_jax.cli import main
from jais2_jax.parallel.sharding import LOGICAL_AXIS_RULES, make_mesh, param_shardings

CONFIGS = {"untied": {}, "tied": dict(tie_word_embeddings=True), "gqa": dict(num_key_value_heads=2)}
TOKENIZER = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"x": 1}',
             "chat_template.jinja": "{{ messages }}", "spm.model": "not really sentencepiece"}
IDS = np.random.RandomState(0).randint(0, 128, (2, 7)).astype(np.int32)


def _hf_logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(IDS).long()).logits.numpy()


def _logits(config, params):
    return np.asarray(jax.jit(Jais2ForCausalLM(config).apply)({"params": params}, IDS))


def _save_hf(model, folder, shard="20KB"):
    model.save_pretrained(folder, max_shard_size=shard)
    for name, text in TOKENIZER.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = hf_model(seed=3, **CONFIGS[request.param])
    _save_hf(model, root / "hf")
    assert main(["convert", str(root / "hf"), str(root / "orbax"), "--quiet"]) == 0
    return model, root


def test_convert_matches_transformers(converted):
    model, root = converted
    shards = [f for f in os.listdir(root / "hf") if f.endswith(".safetensors")]
    assert len(shards) >= 3 and os.path.exists(root / "hf" / ckpt_lib.INDEX_FILE)
    config, params = load_checkpoint(root / "orbax")
    assert rel_err(_logits(config, params), _hf_logits(model)) <= 1e-5
    for name, text in TOKENIZER.items():
        assert (root / "orbax" / name).read_text() == text
    assert sorted(os.listdir(root)) == ["hf", "orbax"]  # no temporary folder left behind


def test_hf_and_orbax_loads_are_identical(converted):
    model, root = converted
    c_hf, p_hf = load_checkpoint(root / "hf")
    c_ob, p_ob = load_checkpoint(root / "orbax")
    assert c_hf == c_ob
    a, b = _leaves(p_hf), _leaves(p_ob)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # The embedding is transformers' tensor, untouched.
    emb = model.state_dict()["model.embed_tokens.weight"].numpy()
    assert np.array_equal(np.asarray(p_ob["embed_tokens"]["embedding"]), emb)
    _, p16 = load_checkpoint(root / "orbax", dtype="bfloat16")
    assert all(np.array_equal(np.asarray(x), a[k].astype(x.dtype)) and x.dtype == "bfloat16"
               for k, x in _leaves(p16).items())


def test_export_loads_bitwise_in_transformers(converted):
    from transformers import Jais2ForCausalLM as HFModel
    model, root = converted
    out = root / "export"
    assert main(["export", str(root / "orbax"), str(out), "--max-shard-size", "30KB",
                 "--quiet"]) == 0
    index = json.loads((out / ckpt_lib.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) >= 3
    tied = model.config.tie_word_embeddings
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    back = HFModel.from_pretrained(out).eval()
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd2[k].dtype == sd[k].dtype and torch.equal(sd2[k], sd[k]), k
    if tied:
        assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    for name, text in TOKENIZER.items():
        assert (out / name).read_text() == text
    shutil.rmtree(out)


def test_bfloat16_checkpoint_round_trip(tmp_path):
    from transformers import Jais2ForCausalLM as HFModel
    model = hf_model(seed=5).to(torch.bfloat16)
    _save_hf(model, tmp_path / "hf", shard="30KB")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "orbax"), "--quiet"]) == 0
    _, params = load_checkpoint(tmp_path / "orbax")
    q = model.state_dict()["model.layers.1.self_attn.q_proj.weight"]  # [H * hd, D]
    ours = np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][1])  # [D, H, hd]
    assert ours.dtype == "bfloat16"
    assert np.array_equal(ours.reshape(ours.shape[0], -1).T.view(np.uint16),
                          q.view(torch.int16).numpy().view(np.uint16))
    assert main(["export", str(tmp_path / "orbax"), str(tmp_path / "back"), "--quiet"]) == 0
    back = HFModel.from_pretrained(tmp_path / "back", dtype=torch.bfloat16)
    sd, sd2 = model.state_dict(), back.state_dict()
    assert all(sd2[k].dtype == torch.bfloat16 and torch.equal(sd2[k], sd[k]) for k in sd)


def test_load_into_mesh(tmp_path_factory):
    model = hf_model(seed=4, num_key_value_heads=2)
    root = tmp_path_factory.mktemp("mesh")
    _save_hf(model, root / "hf")
    assert main(["convert", str(root / "hf"), str(root / "orbax"), "--quiet"]) == 0
    mesh = make_mesh((2, 2, 2))
    expected_logits = _hf_logits(model)
    for folder in ("hf", "orbax"):
        config, params = load_checkpoint(root / folder, mesh=mesh)
        want = param_shardings(config, mesh)
        jax.tree.map(lambda x, s: None if x.sharding == s else pytest.fail(
            f"{folder}: {x.sharding} != {s}"), params, want)
        sharded = [x for x in jax.tree.leaves(params) if len(x.addressable_shards) and
                   x.addressable_shards[0].data.size < x.size]
        assert len(sharded) >= 10  # the kernels and the embedding really are split
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            logits = jax.jit(Jais2ForCausalLM(config).apply)({"params": params}, IDS)
        assert rel_err(logits, expected_logits) <= 1e-5, folder


# ---------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "hf"
    _save_hf(hf_model(seed=6), folder)
    return folder


@pytest.fixture
def hf_copy(hf_src, tmp_path):
    shutil.copytree(hf_src, tmp_path / "hf")
    return tmp_path / "hf"


def _index(folder):
    return json.loads((folder / ckpt_lib.INDEX_FILE).read_text())


def _write_index(folder, index):
    (folder / ckpt_lib.INDEX_FILE).write_text(json.dumps(index))


def _rewrite_shard(folder, tensor, change):
    """Loads the shard holding `tensor` (no pickle: safetensors), applies `change`, saves it."""
    index = _index(folder)
    path = folder / index["weight_map"][tensor]
    tensors = load_file(path)
    change(tensors, index, path.name)
    save_file(tensors, path, metadata={"format": "pt"})
    _write_index(folder, index)


def _fails(args, capsys, *phrases):
    out = args[2]
    parent_before = sorted(os.listdir(os.path.dirname(out)))
    assert main(args + ["--quiet"]) == 1
    err = capsys.readouterr().err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    assert sorted(os.listdir(os.path.dirname(out))) == parent_before  # nothing half-written
    return err


def test_missing_config(hf_copy, capsys):
    os.remove(hf_copy / "config.json")
    _fails(["convert", str(hf_copy), str(hf_copy.parent / "out")], capsys, "no config.json")


def test_missing_tensor(hf_copy, capsys):
    name = "model.layers.1.mlp.up_proj.weight"

    def drop(tensors, index, _):
        del tensors[name], index["weight_map"][name]
    _rewrite_shard(hf_copy, name, drop)
    _fails(["convert", str(hf_copy), str(hf_copy.parent / "out")], capsys, "missing tensors", name)


def test_unexpected_tensor(hf_copy, capsys):
    extra = "model.layers.0.mlp.gate_proj.weight"

    def add(tensors, index, shard):
        tensors[extra] = np.zeros((4, 4), np.float32)
        index["weight_map"][extra] = shard
    _rewrite_shard(hf_copy, "model.layers.0.mlp.up_proj.weight", add)
    _fails(["convert", str(hf_copy), str(hf_copy.parent / "out")], capsys, "unexpected tensors",
           extra)


def test_shape_disagrees_with_config(hf_copy, capsys):
    config = json.loads((hf_copy / "config.json").read_text())
    config["intermediate_size"] = 128
    (hf_copy / "config.json").write_text(json.dumps(config))
    _fails(["convert", str(hf_copy), str(hf_copy.parent / "out")], capsys, "has shape (96, 64)",
           "(128, 64)")


@pytest.mark.parametrize("bad, phrase", [("model-99999-of-99999.safetensors", "does not exist"),
                                         ("../x.safetensors", "not a .safetensors file inside")])
def test_index_names_bad_file(hf_copy, capsys, bad, phrase):
    index = _index(hf_copy)
    first = sorted(index["weight_map"])[0]
    shutil.copy(hf_copy / index["weight_map"][first], hf_copy.parent / "x.safetensors")
    index["weight_map"][first] = bad
    _write_index(hf_copy, index)
    _fails(["convert", str(hf_copy), str(hf_copy.parent / "out")], capsys, phrase, bad)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(hf_copy, capsys, damage):
    shard = hf_copy / _index(hf_copy)["weight_map"]["model.embed_tokens.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100] if damage == "truncate" else b"\xff" * 16 + data[16:])
    err = _fails(["convert", str(hf_copy), str(hf_copy.parent / "out")], capsys,
                 "not a valid safetensors file", shard.name)
    assert ("ends at byte" in err) if damage == "truncate" else ("header length" in err)


def _all_tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(folder / f))
    return out


def _single_file(folder, tensors):
    """Replaces the folder's shards with one model.safetensors holding `tensors`."""
    for f in os.listdir(folder):
        if f.endswith(".safetensors") or f == ckpt_lib.INDEX_FILE:
            os.remove(folder / f)
    save_file(tensors, folder / ckpt_lib.SINGLE_FILE, metadata={"format": "pt"})


def test_tied_config_with_a_different_lm_head(hf_copy, capsys):
    """tie_word_embeddings=true beside an lm_head.weight that is not the embedding: transformers
    then keeps them apart, so dropping the head would change the logits. An equal copy is fine."""
    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    _fails(["convert", str(hf_copy), str(hf_copy.parent / "out")], capsys,
           "tie_word_embeddings", "lm_head.weight differs")
    tensors = _all_tensors(hf_copy)
    with pytest.raises(ValueError, match="lm_head.weight differs"):  # the in-memory path too
        hf_mapping.params_from_state_dict(Jais2Config.from_json_file(hf_copy), tensors)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    _single_file(hf_copy, tensors)
    config, params = load_checkpoint(hf_copy)
    assert config.tie_word_embeddings and "lm_head" not in params


def _edit_header(path, change):
    """Rewrites a safetensors file's JSON header with `change(header)` (data bytes unchanged)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


@pytest.mark.parametrize("damage, phrase", [
    ("float offsets", "must be non-negative integers"),
    ("overlap", "overlaps the tensor before it"),
])
def test_safetensors_header_offsets_are_checked(hf_copy, capsys, damage, phrase):
    """What the safetensors library itself rejects: non-integer offsets, tensors sharing bytes."""
    shard = hf_copy / _index(hf_copy)["weight_map"]["model.layers.0.self_attn.q_proj.weight"]

    def change(header):
        entries = sorted((k for k in header if k != "__metadata__"),
                         key=lambda k: header[k]["data_offsets"][0])
        if damage == "float offsets":
            header[entries[0]]["data_offsets"] = [float(v) for v in header[entries[0]]["data_offsets"]]
        else:  # the second tensor starts where the first does (its length unchanged)
            a, b = entries[:2]
            begin, end = header[b]["data_offsets"]
            start = header[a]["data_offsets"][0]
            header[b]["data_offsets"] = [start, start + end - begin]
    _edit_header(shard, change)
    _fails(["convert", str(hf_copy), str(hf_copy.parent / "out")], capsys, phrase, shard.name)


def test_float16_with_bfloat16_loads_as_float32(hf_copy):
    """A checkpoint mixing float16 and bfloat16 (same width, neither holds the other) keeps every
    value: float32, not whichever 2-byte type came first (1e6 is inf in float16)."""
    import ml_dtypes
    tensors = {k: v.astype(np.float16) for k, v in _all_tensors(hf_copy).items()}
    embed = tensors["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16)
    embed[0, 0] = 1e6
    tensors["model.embed_tokens.weight"] = embed
    _single_file(hf_copy, tensors)
    assert ckpt_lib.HFCheckpoint(hf_copy).dtype == np.float32
    assert main(["convert", str(hf_copy), str(hf_copy.parent / "ob"), "--quiet"]) == 0
    _, params = load_checkpoint(hf_copy.parent / "ob")
    table = np.asarray(params["embed_tokens"]["embedding"])
    assert table.dtype == np.float32 and table[0, 0] == float(embed[0, 0].astype(np.float32))


def test_damaged_orbax_files_are_named(hf_src, tmp_path):
    assert main(["convert", str(hf_src), str(tmp_path / "ob"), "--quiet"]) == 0
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "ob" / "params") for f in fs
             if os.path.basename(d) == "d"]  # OCDBT data files
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    with pytest.raises(ValueError, match="could not read the Orbax checkpoint"):
        load_checkpoint(tmp_path / "ob")


def test_relative_paths(hf_src, tmp_path, monkeypatch):
    """Folders named relative to the working directory (Orbax reads no metadata from those)."""
    monkeypatch.chdir(tmp_path)
    assert main(["convert", str(hf_src), "ob", "--quiet"]) == 0
    _, want = load_checkpoint(hf_src)
    _, got = load_checkpoint("ob")
    a, b = _leaves(want), _leaves(got)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert main(["export", "ob", "hf_again", "--quiet"]) == 0
    c = _leaves(load_checkpoint("hf_again")[1])
    assert all(np.array_equal(a[k], c[k]) for k in a)


def test_output_never_replaces_its_input(hf_copy, tmp_path, capsys):
    """convert / export with --force onto their own input (or a folder holding it) are refused:
    they replaced the input with the output."""
    files = sorted(os.listdir(hf_copy))
    _fails(["convert", str(hf_copy), str(hf_copy), "--force"], capsys, "would replace its input")
    _fails(["convert", str(hf_copy), str(tmp_path), "--force"], capsys, "would replace its input")
    assert main(["convert", str(hf_copy), str(tmp_path / "ob"), "--quiet"]) == 0
    _fails(["export", str(tmp_path / "ob"), str(tmp_path / "ob"), "--force"], capsys,
           "would replace its input")
    assert sorted(os.listdir(hf_copy)) == files and load_checkpoint(tmp_path / "ob")


def test_unwritable_destination_is_one_line(hf_src, tmp_path, capsys):
    """A destination that cannot be written (here below a file) is one line, not a traceback."""
    (tmp_path / "afile").write_text("x")
    assert main(["convert", str(hf_src), str(tmp_path / "afile" / "ob"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and "afile" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "x" and os.listdir(tmp_path) == ["afile"]


def test_pickle_only_folder_is_refused(hf_copy, capsys):
    for f in os.listdir(hf_copy):
        if f.endswith(".safetensors") or f.endswith(".json") and f != "config.json":
            os.remove(hf_copy / f)
    # Not a loadable pickle: were it ever unpickled, the error would be a different one.
    (hf_copy / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle")
    _fails(["convert", str(hf_copy), str(hf_copy.parent / "out")], capsys,
           "pytorch_model.bin", "never unpickled", "safetensors")


def test_existing_output_needs_force(hf_src, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(hf_src), str(out), "--quiet"]) == 0  # a model folder of ours
    (out / "keep.txt").write_text("mine")
    _fails(["convert", str(hf_src), str(out)], capsys, "exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["convert", str(hf_src), str(out), "--force", "--quiet"]) == 0
    assert sorted(os.listdir(out)) == sorted(["config.json", "params", "generation_config.json",
                                             *TOKENIZER])
    assert sorted(os.listdir(tmp_path)) == ["out"]
    _fails(["export", str(out), str(out)], capsys, "exists")


def test_orbax_config_mismatch(hf_src, tmp_path, capsys):
    assert main(["convert", str(hf_src), str(tmp_path / "orbax"), "--quiet"]) == 0
    config = json.loads((tmp_path / "orbax" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "orbax" / "config.json").write_text(json.dumps(config))
    _fails(["export", str(tmp_path / "orbax"), str(tmp_path / "hf")], capsys,
           "layers/input_layernorm/scale has shape (2, 64)", "config.json implies (3, 64)")


@pytest.mark.parametrize("command", ["convert", "export"])
def test_interrupted_write_leaves_nothing(hf_src, tmp_path, monkeypatch, command):
    src = hf_src
    if command == "export":
        assert main(["convert", str(hf_src), str(tmp_path / "orbax"), "--quiet"]) == 0
        src = tmp_path / "orbax"
    calls = []
    real = safetensors_io._map_bits

    def failing(fn, x):  # every tensor passes through here in both directions
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(fn, x)
    monkeypatch.setattr(safetensors_io, "_map_bits", failing)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(RuntimeError, match="disk on fire"):
        main([command, str(src), str(tmp_path / "out"), "--quiet"])
    assert len(calls) >= 5
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary folder


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("20KB") == 20_000
    assert parse_size("2GiB") == 2 * 2**30 and parse_size(1234) == 1234
    with pytest.raises(ValueError, match="5GB"):
        parse_size("five gigs")


def test_partial_reads_match_full_reads(hf_src):
    """What one process of a multi-host mesh reads (a box of each parameter, from only the HF rows
    it needs) equals the same box of the whole parameter."""
    ckpt = ckpt_lib.HFCheckpoint(hf_src)
    state = {}
    for f in os.listdir(hf_src):
        if f.endswith(".safetensors"):
            state.update(load_file(hf_src / f))
    rng = np.random.RandomState(0)
    for spec in ckpt.specs:
        full = ckpt.read(spec)
        # The reader's fast transposes agree with hf_mapping, and back.
        layers = spec.hf_names(ckpt.config.num_hidden_layers)
        assert np.array_equal(full, np.stack([spec.to_ours(state[n]) for n in layers]) if
                              spec.stacked else spec.to_ours(state[spec.hf_name])), spec.path
        assert np.array_equal(safetensors_io.to_hf(spec, full[0] if spec.stacked else full),
                              state[layers[0]]), spec.path
        for _ in range(3):
            box = []
            for n in full.shape:
                a = rng.randint(0, n)
                box.append(slice(a, rng.randint(a + 1, n + 1)))
            assert np.array_equal(ckpt.read(spec, tuple(box)), full[tuple(box)]), spec.path


def test_process_reads_only_its_part(hf_src):
    """A process of a 2x2x2 mesh holding the devices of fsdp index 0 (as if the mesh spanned two
    hosts along fsdp) reads half of every fsdp-sharded parameter, and serves its devices right."""
    ckpt = ckpt_lib.HFCheckpoint(hf_src)
    mesh = make_mesh((2, 2, 2))
    local = set(mesh.devices[:, 0, :].reshape(-1))
    shardings = param_shardings(ckpt.config, mesh)
    halved = 0
    for spec in ckpt.specs:
        shape = spec.full_shape(ckpt.config.num_hidden_layers)
        sharding = hf_mapping.tree_get(shardings, spec.path)
        owned = {d: i for d, i in sharding.devices_indices_map(shape).items() if d in local}

        class ThisProcess:  # sees only its own devices
            def addressable_devices_indices_map(self, shape):
                return owned
        box = ckpt_load._process_box(ThisProcess(), shape)
        part, full = ckpt.read(spec, box), ckpt.read(spec)
        for index in owned.values():
            assert np.array_equal(ckpt_load._local_part(part, box, index, shape), full[index])
        size = math.prod(b.stop - b.start for b in box)
        if "fsdp" in sharding.spec:
            assert size * 2 == math.prod(shape), spec.path
            halved += 1
        else:
            assert size == math.prod(shape), spec.path
    assert halved >= 8


def test_dtype_options(hf_src, tmp_path):
    """convert --dtype bfloat16 stores bf16 (config.json says so); export --dtype float32 writes the
    same values back as float32."""
    from transformers import Jais2ForCausalLM as HFModel
    assert main(["convert", str(hf_src), str(tmp_path / "ob"), "--dtype", "bfloat16",
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "ob" / "config.json").read_text())["dtype"] == "bfloat16"
    _, params = load_checkpoint(tmp_path / "ob")
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("bfloat16")}
    assert main(["export", str(tmp_path / "ob"), str(tmp_path / "hf"), "--dtype", "float32",
                 "--quiet"]) == 0
    sd = HFModel.from_pretrained(hf_src).state_dict()
    sd2 = HFModel.from_pretrained(tmp_path / "hf").state_dict()
    for k in sd:
        assert sd2[k].dtype == torch.float32
        assert torch.equal(sd2[k], sd[k].to(torch.bfloat16).float()), k
