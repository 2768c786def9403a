"""Cached prefill/decode and `generate` against transformers; sampling filters and draws."""

import copy
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import torch

from helpers import hf_model, our_config, our_params, rel_err
from jais2_jax import Jais2ForCausalLM, init_cache, unstack_layers
from jais2_jax.model.options import ModelOptions
from jais2_jax.inference.generate import decode_step, generate, prefill, right_align
from jais2_jax.inference.sampling import Sampler, filter_logits, sample

# A larger init scale than HF's 0.02: the tiny model then continues different prompts differently
# instead of repeating one token, so greedy parity and EOS stopping are actually exercised.
INIT = 0.2


@pytest.fixture(scope="module")
def ref():
    hf = hf_model(0, initializer_range=INIT)
    config = our_config(hf)
    return hf, config, our_params(hf, config)


def _model(config, params, scan):
    return Jais2ForCausalLM(config,
                            options=ModelOptions(scan_layers=scan)), params if scan else unstack_layers(params)


def _left_padded(lengths, seed=0, pad=0):
    rs = np.random.RandomState(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), pad, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = rs.randint(3, 128, n)
        mask[i, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("scan", [True, False])
def test_cached_prefill_and_decode_match_uncached_forward(ref, scan):
    hf, config, params = ref
    model, p = _model(config, params, scan)
    lengths, steps = [7, 4], 3
    ids, mask = right_align(*_left_padded(lengths, seed=1))
    rs = np.random.RandomState(2)
    fed = rs.randint(3, 128, (2, steps)).astype(np.int32)  # tokens decoded after the prompts
    cache = init_cache(config, 2, 16, dtype=jnp.float32, per_layer=not scan)
    logits, cache = prefill(model, p, jnp.asarray(ids), jnp.asarray(mask), cache)
    ours = [np.asarray(logits)]
    for t in range(steps):
        logits, cache = decode_step(model, p, jnp.asarray(fed[:, t]), cache)
        ours.append(np.asarray(logits))
    ours = np.stack(ours, axis=1)  # [B, 1 + steps, V]
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.array(lengths) + steps)
    for b, n in enumerate(lengths):
        full = np.concatenate([ids[b, :n], fed[b]])[None]
        with torch.no_grad():
            want = hf(torch.tensor(full)).logits[0, n - 1:].numpy()  # [1 + steps, V]
        assert rel_err(ours[b], want) <= 1e-5


def _hf_greedy(hf, ids, mask, n, eos):
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                          do_sample=False, eos_token_id=eos, pad_token_id=0).numpy()
    new = out[:, ids.shape[1]:]
    return np.pad(new, ((0, 0), (0, n - new.shape[1])))  # HF stops early when all rows are done


@pytest.mark.parametrize("scan", [True, False])
def test_greedy_matches_transformers_with_eos(ref, scan):
    hf, config, params = ref
    ids, mask = _left_padded([5, 9, 12, 3])
    n = 16
    free = _hf_greedy(hf, ids, mask, n, eos=None)
    # An EOS id that the reference emits mid-sequence in some rows but not in others.
    candidates = [t for t in np.unique(free[:, 1:-1])
                  if 0 < sum(t in row[1:-1] for row in free) < len(free)]
    assert candidates, free
    eos = int(candidates[0])
    want = _hf_greedy(hf, ids, mask, n, eos=eos)
    stopped = (want == eos).any(axis=1)
    assert stopped.any() and not stopped.all()

    streamed = {}
    if scan:  # the config's eos list (an id the reference never emits, and the chosen one)
        unused = min(set(range(3, 128)) - set(free.ravel().tolist()))
        config = config.replace(eos_token_id=(unused, eos))
        kwargs = {}
    else:  # an explicit eos replaces the config's (2), with a streaming callback
        kwargs = dict(eos_token_id=eos, callback=lambda step, tok: streamed.__setitem__(int(step), tok))
    model, p = _model(config, params, scan)
    got = np.asarray(generate(model, p, ids, mask, max_new_tokens=n, **kwargs))
    np.testing.assert_array_equal(got, want)
    if streamed:
        cols = np.stack([streamed[s] for s in sorted(streamed)], axis=1)
        np.testing.assert_array_equal(cols, got[:, :cols.shape[1]])
        assert cols.shape[1] == n or (got[:, cols.shape[1]:] == 0).all()


def test_padded_positions_may_hold_any_id(ref):
    """What sits under attention_mask == 0 is ignored, as in transformers, even an id outside the
    vocabulary (which would embed as NaN and poison the row's attention)."""
    hf, config, params = ref
    model = Jais2ForCausalLM(config)
    kw = dict(max_new_tokens=6, eos_token_id=[])
    want = _hf_greedy(hf, *_left_padded([3, 7, 5]), 6, eos=None)
    for pad in (config.vocab_size, config.vocab_size + 1000, -7):
        ids, mask = _left_padded([3, 7, 5], pad=pad)
        np.testing.assert_array_equal(np.asarray(generate(model, params, ids, mask, **kw)), want)


def test_sampling_is_reproducible(ref):
    _, config, params = ref
    model = Jais2ForCausalLM(config)
    ids, mask = _left_padded([6, 10])
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, eos_token_id=[])
    a = generate(model, params, ids, mask, rng=jax.random.key(0), **kw)
    b = generate(model, params, ids, mask, rng=jax.random.key(0), **kw)
    c = generate(model, params, ids, mask, rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, None), (1.0, 10, None),
                                                     (1.3, None, 0.8), (0.8, 30, 0.6),
                                                     (1.0, 1, None), (0.5, None, 0.01)])
def test_filter_logits_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    logits = np.random.RandomState(3).randn(4, 128).astype(np.float32) * 3
    scores = torch.tensor(logits)
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    want = scores.numpy()
    got = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


@pytest.mark.parametrize("top_k,top_p", [(8, None), (None, 0.5)])
def test_samples_stay_in_the_filter_and_follow_its_distribution(top_k, top_p):
    rs = np.random.RandomState(4)
    row = rs.randn(64).astype(np.float32) * 2
    n = 20000
    logits = jnp.broadcast_to(jnp.asarray(row), (n, 64))
    draws = np.asarray(sample(logits, jax.random.key(5), Sampler(1.0, top_k, top_p)))
    # The allowed set and its probabilities, computed in numpy from the definitions.
    order = np.argsort(-row)
    p = np.exp(row - row.max())
    p /= p.sum()
    if top_k is not None:
        allowed = order[:top_k]
    else:
        before = np.cumsum(p[order]) - p[order]
        allowed = order[before < top_p]
    assert len(allowed) < 64 // 2
    assert np.isin(draws, allowed).all()  # a token outside top-k / top-p is never drawn
    q = np.zeros(64)
    q[allowed] = p[allowed] / p[allowed].sum()
    freq = np.bincount(draws, minlength=64) / n
    # 5 standard errors of a binomial frequency: a wrong renormalisation would be far outside.
    assert (np.abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / n) + 1e-12).all()


# ---------------------------------------------------------------------------------------- bad input
BAD = [
    (dict(input_ids=np.ones((1, 60), np.int64), max_new_tokens=10), "max_position_embeddings"),
    (dict(max_new_tokens=9, cache_length=10), "needs 11 cache slots, but cache_length is 10"),
    (dict(input_ids=np.zeros((2, 0), np.int64)), "empty prompt"),
    (dict(attention_mask=np.array([[1, 1, 1], [0, 0, 0]])), r"empty prompt \(rows \[1\]\)"),
    (dict(input_ids=np.array([[3, 128, 4], [5, 6, 7]])), "token id 128 is outside"),
    (dict(input_ids=np.array([[3, -1, 4], [5, 6, 7]])), "token id -1 is outside"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive"),
    (dict(max_new_tokens=-3), "max_new_tokens must be a positive"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=1.0, top_p=0.0, rng=jax.random.key(0)), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.5, rng=jax.random.key(0)), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_k=0, rng=jax.random.key(0)), "top_k must be a positive"),
    (dict(temperature=1.0), "needs an explicit key"),
    (dict(eos_token_id=500), "eos_token_id 500 is outside"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_input_is_a_clear_error(ref, kwargs, message):
    _, config, params = ref
    args = dict(input_ids=np.array([[3, 4, 5], [6, 7, 8]]), max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(Jais2ForCausalLM(config), params, **args)


# --------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    """An HF folder as transformers saves it: a tiny model and a byte-level BPE tokenizer."""
    from transformers import PreTrainedTokenizerFast
    from test_tokenizer import CHAT_TEMPLATE, _bpe
    bpe = _bpe()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", chat_template=CHAT_TEMPLATE)
    hf = hf_model(1, initializer_range=INIT, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  max_position_embeddings=256)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path, hf, tok


def _hf_reply(hf, tok, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):]
    return tok.decode(out, skip_special_tokens=True)


def test_cli_streams_the_greedy_continuation(cli_folder, capsys, tmp_path):
    from jais2_jax.checkpoint import convert_hf_to_orbax
    from jais2_jax.cli import main
    path, hf, tok = cli_folder
    prompt = "مرحبا بكم في the lazy fox"
    want = _hf_reply(hf, tok, tok.encode(prompt), 24)
    orbax = tmp_path / "orbax"
    convert_hf_to_orbax(path, orbax, progress=False)
    for folder in (path, orbax):
        assert main(["generate", "--checkpoint", str(folder), "--prompt", prompt,
                     "--max-new-tokens", "24"]) == 0
        assert capsys.readouterr().out == want + "\n"


def test_cli_default_length_fits_the_context(cli_folder, capsys):
    """Without --max-new-tokens the reply is up to 256 tokens, fewer where the prompt leaves less
    room (this model takes 256 positions): the default never trips the length check."""
    from jais2_jax.cli import main
    path, hf, tok = cli_folder
    prompt = "مرحبا بكم في the lazy fox"
    ids = tok.encode(prompt)
    assert main(["generate", "--checkpoint", str(path), "--prompt", prompt]) == 0
    assert capsys.readouterr().out == _hf_reply(hf, tok, ids, 256 - len(ids)) + "\n"


def test_cli_prompt_filling_the_context_is_named(cli_folder, capsys):
    from jais2_jax.cli import main
    path, hf, tok = cli_folder
    prompt = " ".join(["the lazy fox"] * 120)
    assert len(tok.encode(prompt)) > 256
    assert main(["generate", "--checkpoint", str(path), "--prompt", prompt]) == 1
    err = capsys.readouterr().err
    assert "fills the model's 256 positions" in err and "max_new_tokens" not in err, err


def test_cli_stops_at_generation_config_eos(cli_folder, capsys, tmp_path):
    """An eos id listed only in generation_config.json (as instruct checkpoints do) ends the reply,
    as in transformers' generate, which reads it from there."""
    import json
    import shutil
    from transformers import AutoModelForCausalLM
    from jais2_jax.cli import main
    path, hf, tok = cli_folder
    folder = tmp_path / "ckpt"
    shutil.copytree(path, folder)
    prompt = "مرحبا بكم في the lazy fox"
    ids = tok.encode(prompt)
    with torch.no_grad():
        free = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    # the first token the free-running reply emits that it had not emitted before (not the first)
    at = next(i for i in range(1, len(free)) if int(free[i]) not in free[:i].tolist())
    stop = int(free[at])
    assert stop != tok.eos_token_id
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = [tok.eos_token_id, stop]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    with torch.no_grad():  # transformers stops there (and keeps the stop token)
        out = AutoModelForCausalLM.from_pretrained(folder).eval().generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    assert out.tolist() == free[:at + 1].tolist()
    assert main(["generate", "--checkpoint", str(folder), "--prompt", prompt,
                 "--max-new-tokens", "12"]) == 0
    # the CLI prints the reply up to its stop token, as for the config's eos
    assert capsys.readouterr().out == tok.decode(free[:at], skip_special_tokens=True) + "\n"


def test_cli_chat_keeps_the_conversation(cli_folder, capsys, monkeypatch):
    import io
    from jais2_jax.cli import main
    path, hf, tok = cli_folder
    monkeypatch.setattr("sys.stdin", io.StringIO("مرحبا\n\nhow are you?\n"))
    assert main(["generate", "--checkpoint", str(path), "--chat", "--max-new-tokens", "10"]) == 0
    messages, want = [], []
    for line in ("مرحبا", "how are you?"):
        messages.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        want.append(_hf_reply(hf, tok, ids, 10))
        messages.append({"role": "assistant", "content": want[-1]})
    assert capsys.readouterr().out == "".join(w + "\n" for w in want)


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "hi", "--top-p", "1.5"], "top_p must be in"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--prompt", "hi", "--max-new-tokens", "300"], "exceeds max_position_embeddings"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
])
def test_cli_bad_input(cli_folder, capsys, argv, message):
    from jais2_jax.cli import main
    assert main(["generate", "--checkpoint", str(cli_folder[0])] + argv) == 1
    assert message in capsys.readouterr().err


def test_cli_checkpoint_without_tokenizer(cli_folder, capsys, tmp_path):
    from jais2_jax.cli import main
    cli_folder[1].save_pretrained(tmp_path)  # the model only
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi"]) == 1
    assert "has no tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_cli_quantized_reply_is_transformers_on_the_dequantized_weights(cli_folder, capsys,
                                                                        scheme):
    """`jais2 generate --quantize`: the reply of transformers' greedy generate on the same
    model whose projections hold q * scale."""
    from jais2_jax import dequantize, load_checkpoint
    from jais2_jax.checkpoint.hf_mapping import state_dict_from_params
    from jais2_jax.cli import main
    path, hf, tok = cli_folder
    config, qparams = load_checkpoint(path, quantize=scheme)
    deq = copy.deepcopy(hf)
    deq.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32).copy()) for k, v in
                         state_dict_from_params(config, dequantize(qparams)).items()},
                        strict=False)
    prompt = "مرحبا بكم في the lazy fox"
    want = _hf_reply(deq, tok, tok.encode(prompt), 24)
    args = ["generate", "--checkpoint", str(path), "--prompt", prompt, "--max-new-tokens", "24",
            "--quantize", scheme]
    assert main(args) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(args + ["--cache-dtype", "int8"]) == 0  # the int8 cache: same reply here
    assert capsys.readouterr().out == want + "\n"
