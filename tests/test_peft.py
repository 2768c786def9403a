"""PEFT LoRA adapters both ways: adapters made by `peft` on a tiny transformers Jais2 loaded by
`load_checkpoint(..., adapter=)` (merged or kept apart, HF or Orbax base, int8, a mesh) give
transformers + PEFT's logits; adapters we write load in `peft.PeftModel.from_pretrained`; what we
do not support is refused by name."""

import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from helpers import hf_model, rel_err

from jais2_jax import Jais2ForCausalLM, load_checkpoint
from jais2_jax.checkpoint import (
    AdapterConfig,
    convert_hf_to_orbax,
    read_adapter,
    read_adapter_config,
    save_adapter,
)
from jais2_jax.checkpoint.hf_mapping import params_from_state_dict, state_dict_from_params

IDS = np.array([[5, 17, 99, 3, 42, 7, 64, 11, 23, 80], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _peft_model(base, targets, rslora=False, seed=1):
    """transformers + PEFT with random A and random non-zero B (PEFT initialises B to zero)."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=targets, lora_dropout=0.0,
                     use_rslora=rslora, task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), cfg).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def _logits(torch_model):
    with torch.no_grad():
        return torch_model(torch.tensor(IDS)).logits.numpy()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A base (HF and Orbax folders, with a tokenizer) and two PEFT adapters with their
    reference logits: all six projections, and three of them with rsLoRA scaling."""
    from test_tokenizer import CHAT_TEMPLATE, _bpe
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(), bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", chat_template=CHAT_TEMPLATE)
    root = tmp_path_factory.mktemp("peft")
    base = hf_model(0, initializer_range=0.2, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    max_position_embeddings=256)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    convert_hf_to_orbax(root / "base", root / "orbax", progress=False)
    adapters = {}
    for name, targets, rslora in (("all", ALL, False), ("some", ["q_proj", "v_proj", "down_proj"],
                                                        True)):
        pm = _peft_model(base, targets, rslora)
        pm.save_pretrained(root / name)
        adapters[name] = (root / name, _logits(pm), pm)
    return dict(root=root, base=base, tok=tok, adapters=adapters, base_logits=_logits(base))


def _ours(config, params, **model_kw):
    params = jax.tree_util.tree_map(np.asarray, params)  # gathered from any mesh
    return np.asarray(Jais2ForCausalLM(config, **model_kw).apply({"params": params}, IDS))


@pytest.mark.parametrize("adapter", ["all", "some"])
@pytest.mark.parametrize("base", ["base", "orbax"])
def test_merged_and_kept_apart_equal_transformers_peft(made, adapter, base):
    folder, want, _ = made["adapters"][adapter]
    path = made["root"] / base
    config, merged = load_checkpoint(path, adapter=folder)
    assert rel_err(_ours(config, merged), want) < 1e-5
    # The adapter changes the output (else the comparison would prove nothing).
    assert rel_err(made["base_logits"], want) > 1e-2
    config, apart = load_checkpoint(path, adapter=folder, merge_adapter=False)
    ac = read_adapter_config(folder)
    assert "lora_a" in apart["layers"]["self_attn"]["q_proj"]
    assert ("lora_a" in apart["layers"]["self_attn"]["k_proj"]) == ("k_proj" in ac.target_modules)
    got = _ours(config, apart, lora=ac.spec, lora_targets=ac.target_modules)
    assert rel_err(got, want) < 1e-5


def test_rslora_scale_is_alpha_over_sqrt_rank(made):
    ac = read_adapter_config(made["adapters"]["some"][0])
    assert ac.use_rslora and ac.rank == 4 and ac.alpha == 12
    assert ac.scale == pytest.approx(12 / 2) and ac.spec.scale == pytest.approx(12 / 2)
    assert read_adapter_config(made["adapters"]["all"][0]).scale == pytest.approx(12 / 4)


def test_mesh_load_equals_transformers_peft(made):
    from jais2_jax.parallel.sharding import make_mesh
    mesh = make_mesh((1, 2, 4))
    folder, want, _ = made["adapters"]["all"]
    for base in ("base", "orbax"):
        config, merged = load_checkpoint(made["root"] / base, adapter=folder, mesh=mesh)
        kernel = merged["layers"]["self_attn"]["q_proj"]["kernel"]
        assert len(kernel.sharding.device_set) == 8
        assert rel_err(_ours(config, merged), want) < 1e-5
        config, apart = load_checkpoint(made["root"] / base, adapter=folder, mesh=mesh,
                                        merge_adapter=False)
        ac = read_adapter_config(folder)
        assert rel_err(_ours(config, apart, lora=ac.spec), want) < 1e-5


def test_int8_merges_before_quantizing(made):
    """int8 with an adapter: the quantized values are quantize() of PEFT's merged weights, and
    the logits are transformers' on those weights dequantized."""
    from jais2_jax import dequantize, quantize
    folder, _, pm = made["adapters"]["all"]
    merged_hf = copy.deepcopy(pm).merge_and_unload()
    sd = {k: v.numpy() for k, v in merged_hf.state_dict().items()}
    for base in ("base", "orbax"):
        config, qparams = load_checkpoint(made["root"] / base, adapter=folder, quantize="int8")
        ref = quantize(params_from_state_dict(config, sd), "int8")
        q_ours = np.asarray(qparams["layers"]["mlp"]["up_proj"]["kernel"]).astype(np.int32)
        q_ref = np.asarray(ref["layers"]["mlp"]["up_proj"]["kernel"]).astype(np.int32)
        # float32 A.B in numpy and B.A in torch may round one value differently; at most a step.
        assert np.abs(q_ours - q_ref).max() <= 1 and (q_ours != q_ref).mean() < 1e-3
        deq = copy.deepcopy(made["base"])
        deq.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32).copy()) for k, v in
                             state_dict_from_params(config, dequantize(qparams)).items()},
                            strict=False)
        got = _ours(config, qparams, quantization="int8")
        assert rel_err(got, _logits(deq)) < 1e-5
        assert rel_err(got, _logits(merged_hf)) < 5e-2  # and near the float32 merged model


def test_int8_base_with_the_adapter_kept_apart(made):
    """QLoRA's layout: the int8 base and the float32 adapter beside it equal transformers + PEFT
    on the dequantized base; on a mesh, the same arrays."""
    from peft import PeftModel

    from jais2_jax import dequantize
    from jais2_jax.parallel.sharding import make_mesh
    folder = made["adapters"]["some"][0]
    ac = read_adapter_config(folder)
    config, qparams = load_checkpoint(made["root"] / "orbax", adapter=folder, quantize="int8",
                                      merge_adapter=False)
    assert str(qparams["layers"]["self_attn"]["q_proj"]["kernel"].dtype) == "int8"
    assert str(qparams["layers"]["self_attn"]["q_proj"]["lora_a"].dtype) == "float32"
    deq = copy.deepcopy(made["base"])
    base_only = jax.tree_util.tree_map(np.asarray, qparams)
    for block in base_only["layers"].values():
        for p in block.values():
            if isinstance(p, dict):
                p.pop("lora_a", None), p.pop("lora_b", None)
    deq.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32).copy()) for k, v in
                         state_dict_from_params(config, dequantize(base_only)).items()},
                        strict=False)
    want = _logits(PeftModel.from_pretrained(deq, folder).eval())
    got = _ours(config, qparams, quantization="int8", lora=ac.spec,
                lora_targets=ac.target_modules)
    assert rel_err(got, want) < 1e-5
    _, on_mesh = load_checkpoint(made["root"] / "base", adapter=folder, quantize="int8",
                                 merge_adapter=False, mesh=make_mesh((1, 2, 4)))
    for a, b in zip(jax.tree_util.tree_leaves(qparams), jax.tree_util.tree_leaves(on_mesh)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_our_adapter_loads_in_peft(made, tmp_path):
    """An adapter tree of ours (random, in the per-layer layout a training run holds) written by
    save_adapter: PEFT's from_pretrained on it gives our kept-apart logits."""
    from peft import PeftModel
    config, params = load_checkpoint(made["root"] / "base")
    rng = np.random.default_rng(0)
    ac = AdapterConfig(rank=3, alpha=5.0, target_modules=("k_proj", "o_proj", "up_proj"))
    layers = {}
    for i in range(config.num_hidden_layers):
        layer = {}
        for name, block in (("k_proj", "self_attn"), ("o_proj", "self_attn"), ("up_proj", "mlp")):
            kernel = np.asarray(params["layers"][block][name]["kernel"][i])
            n_in = 2 if name == "o_proj" else 1
            layer.setdefault(block, {})[name] = {
                "lora_a": rng.normal(size=kernel.shape[:n_in] + (3,)).astype(np.float32),
                "lora_b": rng.normal(size=(3,) + kernel.shape[n_in:]).astype(np.float32) * 0.3}
        layers[f"layers_{i}"] = layer
    save_adapter(tmp_path / "ours", ac, layers, config)
    pm = PeftModel.from_pretrained(copy.deepcopy(made["base"]), tmp_path / "ours").eval()
    want = _logits(pm)
    assert rel_err(want, made["base_logits"]) > 1e-2
    stacked = jax.tree_util.tree_map(lambda *a: np.stack(a), *layers.values())
    both = jax.tree_util.tree_map(np.asarray, params)
    for block, names in stacked.items():
        for name, leaves in names.items():
            both["layers"][block][name].update(leaves)
    got = _ours(config, both, lora=ac.spec, lora_targets=ac.target_modules)
    assert rel_err(got, want) < 1e-5
    # And read back by us: the same tree.
    ac2, tree = read_adapter(tmp_path / "ours", config)
    assert ac2 == ac
    np.testing.assert_array_equal(tree["layers"]["self_attn"]["o_proj"]["lora_b"],
                                  stacked["self_attn"]["o_proj"]["lora_b"])
    with pytest.raises(FileExistsError, match="exists"):
        save_adapter(tmp_path / "ours", ac, layers, config)


def _bad_copy(made, tmp_path, config_change=None, tensors_change=None):
    src = made["adapters"]["all"][0]
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    if config_change is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config_change(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors_change is not None:
        from safetensors.numpy import load_file, save_file
        sd = load_file(dst / "adapter_model.safetensors")
        tensors_change(sd)
        save_file(sd, dst / "adapter_model.safetensors")
    return dst


def _set(**kv):
    return lambda cfg: cfg.update(kv)


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("config_change,tensors_change,message", [
    (_set(use_dora=True), None, "DoRA"),
    (_set(use_rslora="yes"), None, "use_rslora must be"),
    (_set(bias="lora_only"), None, "bias 'lora_only'"),
    (_set(lora_bias=True), None, "LoRA biases"),
    (_set(modules_to_save=["lm_head"]), None, "modules_to_save"),
    (_set(layers_to_transform=[0]), None, "layers_to_transform"),
    (_set(rank_pattern={"q_proj": 8}), None, "rank_pattern"),
    (_set(alpha_pattern={"q_proj": 8}), None, "alpha_pattern"),
    (_set(fan_in_fan_out=True), None, "fan_in_fan_out"),
    (_set(target_modules=".*proj"), None, "regular expression"),
    (_set(target_modules=["q_proj", "gate_proj"]), None, r"\['gate_proj'\]"),
    (_set(peft_type="IA3"), None, "peft_type 'IA3'"),
    (_set(task_type="SEQ_CLS"), None, "task_type 'SEQ_CLS'"),
    (_set(r=0), None, "r \\(the rank\\) must be a positive integer"),
    (_set(lora_alpha="8"), None, "lora_alpha must be a number"),
    (_set(new_feature={"on": 1}), None, r"keys \['new_feature'\]"),
    (_set(target_modules=["q_proj", "k_proj"]), None, "o_proj is not in target_modules"),
    (None, lambda sd: sd.pop(f"{Q0}.lora_B.weight"), "missing 1 tensors"),
    (None, lambda sd: sd.update({"base_model.model.lm_head.lora_A.weight":
                                 np.zeros((4, 64), np.float32)}),
     "lm_head.lora_A.weight is not a LoRA weight of a projection"),
    (None, lambda sd: sd.update({f"{Q0}.lora_magnitude_vector": np.zeros(64, np.float32)}),
     "lora_magnitude_vector is not a LoRA weight"),
    (None, lambda sd: sd.update({f"{Q0}.lora_A.weight": np.zeros((4, 32), np.float32)}),
     r"shape \[4, 32\], but r=4 and the base's config imply \[4, 64\]"),
    (_set(r=8), None, "another base"),
])
def test_bad_adapter_refused_by_name(made, tmp_path, config_change, tensors_change, message):
    bad = _bad_copy(made, tmp_path, config_change, tensors_change)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(made["root"] / "base", adapter=bad)


def test_adapter_of_another_base_refused(made, tmp_path):
    """The adapter applied to a base of other shapes (more layers, another width)."""
    folder = made["adapters"]["all"][0]
    for kw, message in ((dict(num_hidden_layers=3), "missing 12 tensors"),
                        (dict(intermediate_size=80), r"up_proj.lora_B.weight has shape \[96, 4\]")):
        other = hf_model(0, **kw)
        other.save_pretrained(tmp_path / str(kw))
        with pytest.raises(ValueError, match=message):
            load_checkpoint(tmp_path / str(kw), adapter=folder)


def test_pickled_adapter_refused_and_base_name_warned(made, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(made["adapters"]["all"][0] / "adapter_config.json", bad)
    (bad / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="adapter_model.bin .a pickle, which is never loaded"):
        load_checkpoint(made["root"] / "base", adapter=bad)
    named = _bad_copy(made, tmp_path, _set(base_model_name_or_path="someone/Other-Model-70B"))
    with pytest.warns(UserWarning, match="'someone/Other-Model-70B', but it is applied to"):
        config, params = load_checkpoint(made["root"] / "base", adapter=named)
    assert rel_err(_ours(config, params), made["adapters"]["all"][1]) < 1e-5


def test_generate_cli_with_adapter_equals_transformers_peft(made, capsys):
    from jais2_jax.cli import main
    folder, _, pm = made["adapters"]["some"]
    tok = made["tok"]
    prompt = "مرحبا بكم في the lazy fox"
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = pm.generate(input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    want = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    with torch.no_grad():
        plain = made["base"].generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    assert tok.decode(plain[0, len(ids):], skip_special_tokens=True) != want
    assert main(["generate", "--checkpoint", str(made["root"] / "base"), "--prompt", prompt,
                 "--max-new-tokens", "16", "--adapter", str(folder)]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert os.path.isdir(folder)


# ----------------------------------------------------------------------- export of a LoRA run
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A LoRA run (q, v, up, down) and a full fine-tune of a tiny base, two steps each."""
    from jais2_jax.training import data
    from jais2_jax.training.run_config import RunConfig
    from jais2_jax.training.trainer import train
    root = tmp_path_factory.mktemp("runs")
    store = root / "store"
    data.prepare_data([os.path.join(ROOT, "data", "corpus")], os.path.join(ROOT, "data",
                      "tokenizer"), str(store), show_progress=False)
    with open(os.path.join(ROOT, "configs", "jais2-tiny.json"), encoding="utf-8") as f:
        tiny = json.load(f)
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
    base = hf_model(3, **{k: tiny[k] for k in keep})
    base.save_pretrained(root / "base")
    common = dict(model=str(root / "base"), init_from=str(root / "base"), data=str(store),
                  seq_len=32, batch_size=8, loss_chunk=16, dtype="float32", remat_policy="none",
                  lr=2e-2, warmup_steps=0, total_steps=2, log_every=1, eval_every=0,
                  checkpoint_every=2, data_threads=1)
    lora = {"rank": 4, "alpha": 8, "dropout": 0.0,
            "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}
    for name, extra in (("lora", dict(lora=lora)), ("full", {})):
        assert train(RunConfig(output_dir=str(root / name), **common, **extra),
                     show_progress=False)["status"] == "done"
    return dict(root=root, base=base)


def test_exported_lora_run_loads_in_peft_and_merged_in_transformers(runs, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jais2_jax.checkpoint.peft import stacked_adapter
    from jais2_jax.cli import main
    from jais2_jax.training.lora import read_run_adapter
    root = runs["root"]
    assert main(["export", str(root / "lora"), str(root / "peft")]) == 0
    assert "a PEFT adapter: step 2" in capsys.readouterr().out
    pm = PeftModel.from_pretrained(copy.deepcopy(runs["base"]), root / "peft").eval()
    want = _logits(pm)
    assert rel_err(want, _logits(runs["base"])) > 1e-4  # the trained B moved the output
    # Ours: the base with the run's adapters kept apart.
    ra = read_run_adapter(root / "lora")
    config, params = load_checkpoint(root / "base")
    params = jax.tree_util.tree_map(np.asarray, params)
    for block, names in stacked_adapter(ra.adapters)["layers"].items():
        for name, leaves in names.items():
            params["layers"][block][name].update(leaves)
    got = _ours(config, params, lora=ra.spec, lora_targets=ra.target_modules)
    assert rel_err(got, want) < 1e-5
    assert main(["export", str(root / "lora"), str(root / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(root / "merged").eval()
    assert rel_err(_logits(merged), want) < 1e-5


def test_exporting_a_run_that_is_not_lora_as_an_adapter_is_refused(runs, made, capsys):
    from jais2_jax.cli import main
    root = runs["root"]
    for argv in (["export", str(root / "full"), str(root / "x"), "--adapter-only"],
                 ["export", str(root / "full"), str(root / "x"), "--merge"]):
        assert main(argv) == 1
        assert "is not a LoRA run (its run config has no lora block)" in capsys.readouterr().err
        assert not (root / "x").exists()
    assert main(["export", str(made["root"] / "orbax"), str(root / "x"), "--adapter-only"]) == 1
    assert "--adapter-only is for a LoRA training run" in capsys.readouterr().err
