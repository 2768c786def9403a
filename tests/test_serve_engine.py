"""The serving engine's pipeline, in this process (no HTTP): decode chunk k+1 is dispatched before
chunk k's tokens are read, so a stop string found on the host ends a reply one chunk after the
device went past it. The reference is transformers' greedy generation of each prompt alone,
decoded whole and cut before the stop string."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from helpers import serve
from test_serve import WORDS, folder  # noqa: F401 - the module's tiny checkpoint fixture

SLOTS = 4


@pytest.fixture(scope="module")
def program(folder):  # noqa: F811
    from jais2_jax import Tokenizer, load_checkpoint
    from jais2_jax.inference.program import build_inference_program
    path, hf, tok = folder
    config, params = load_checkpoint(str(path), dtype="float32")
    program = build_inference_program(config, batch_size=SLOTS, max_length=128, dtype="float32")
    return program, program.place(params), Tokenizer.from_pretrained(str(path)), hf, tok


def make_engine(program, **kw):
    from jais2_jax.serving.engine import Engine
    program, params, tokenizer, _, tok = program
    return Engine(program, params, tokenizer, stop_ids=(tok.eos_token_id,), **kw)


def hf_ids(hf, ids, n) -> list[int]:
    with torch.no_grad():
        return hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                           max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


def replied(events):
    deltas = [ev for ev in events if ev[0] == "delta"]
    return "".join(ev[1] for ev in deltas), [t for ev in deltas for t in ev[2]]


def test_a_stop_string_found_after_the_next_chunk_was_dispatched(program):
    """One request, chunks of 2 steps: when the host reads the chunk that completes the stop
    string, the next chunk is already running on the device. The reply is transformers' text cut
    before the stop string; the tokens emitted end with the one that completed it (the ones the
    device made past it, in that chunk and in the next, are never emitted)."""
    _, _, _, hf, tok = program
    prompt = tok.encode("the lazy fox writes Arabic مرحبا")
    want = hf_ids(hf, prompt, 60)
    assert tok.eos_token_id not in want[:40]
    text = tok.decode(want, skip_special_tokens=True)
    # a stop string completed by a token well inside a decode chunk
    stop, done_at = None, None
    for j in range(8, 30):
        piece = tok.decode(want[j - 1:j], skip_special_tokens=True).strip()
        if len(piece) >= 2 and text.find(piece) == len(tok.decode(want[:j - 1],
                                                                  skip_special_tokens=True)):
            stop, done_at = piece, j
            break
    assert stop is not None
    engine = make_engine(program, chunk=2, short_chunk=2)
    [events] = serve(engine, [{"prompt_ids": prompt, "max_tokens": 60, "stop_strings": (stop,)}])
    got_text, got_ids = replied(events)
    assert got_text == text[:text.find(stop)]
    assert got_ids == want[:done_at]  # nothing past the token that completed the stop string
    assert events[-1] == ("done", "stop", len(prompt), done_at)
    assert [ev[0] for ev in events].count("done") == 1
    # The device made the tokens of the chunk that completed it and of one more chunk
    # (dispatched before that one was read), all discarded: decode token k is in chunk ceil(k/2).
    chunk_of_stop = -(-(done_at - 1) // 2)
    assert engine.generated_tokens == 2 * (chunk_of_stop + 1)


def test_pipelined_replies_with_admissions_stop_strings_and_arabic_equal_transformers(program):
    """More requests than slots (admitted while others decode), chunks of 3, stop strings: each
    reply's text is transformers' greedy text (decoded whole) cut before its first stop string;
    the text comes incrementally (a window of tokens decoded per chunk) and must still be equal,
    multi-byte Arabic characters included."""
    _, _, _, hf, tok = program
    rng = np.random.default_rng(3)
    jobs = []
    for i in range(9):
        prompt = tok.encode(" ".join(rng.choice(WORDS, size=int(rng.integers(1, 10)))))
        n = int(rng.integers(4, 40))
        want = hf_ids(hf, prompt, n)
        if tok.eos_token_id in want:
            want = want[:want.index(tok.eos_token_id)]
        text = tok.decode(want, skip_special_tokens=True)
        stops = ()
        if i % 2 and len(text) > 12:  # a stop string from the reply's second half
            stops = (text[len(text) // 2:len(text) // 2 + 2],)
        jobs.append((prompt, n, want, text, stops))
    engine = make_engine(program, chunk=3)
    logs = serve(engine, [{"prompt_ids": p, "max_tokens": n, "stop_strings": s}
                          for p, n, _, _, s in jobs])
    arabic = 0
    for (prompt, n, want, text, stops), events in zip(jobs, logs):
        got_text, got_ids = replied(events)
        cut = min([text.find(s) for s in stops if s in text], default=-1)
        assert got_text == (text if cut < 0 else text[:cut])
        assert got_ids == want[:len(got_ids)]
        reason = events[-1][1]
        assert reason == ("stop" if cut >= 0 or len(want) < n else "length")
        if cut < 0:
            assert got_ids == want
        arabic += any("\u0600" <= c <= "\u06ff" for c in got_text)
    assert arabic  # the incremental decoding met multi-byte characters
    assert sum(bool(s) for *_, s in jobs) >= 2


def test_a_burst_joins_within_a_short_chunk(program, monkeypatch):
    """Requests arriving while the first request's first chunk runs: that chunk is a short one
    (a slot was just taken and others are free), the burst is admitted in the next pass, and
    once no slot changes hands chunks are full again; when the first reply ends (a slot freed,
    its client may send again) the next chunk is short. Replies equal transformers'."""
    from jais2_jax.serving import engine as engine_lib
    _, _, _, hf, tok = program
    seen = []
    real = engine_lib.decode_chunk

    def recorded(model, params, cache, tokens, live, counts, settings, steps, **kw):
        seen.append((int(np.sum(live)), int(steps)))
        return real(model, params, cache, tokens, live, counts, settings, steps, **kw)
    monkeypatch.setattr(engine_lib, "decode_chunk", recorded)
    engine = make_engine(program, chunk=8, short_chunk=2)
    prompts = [tok.encode(w) for w in ("the lazy fox", "مرحبا بكم", "over the")]
    burst = [{"prompt_ids": p, "max_tokens": 40} for p in prompts[1:]]
    from jais2_jax.serving.engine import Request
    logs = []

    def arrive(_):  # on the first event of the first request: the rest of the burst comes
        for kw in burst:
            events: list = []
            logs.append(events)

            def emit(ev, events=events):
                events.append(ev)
                if ev[0] == "done":
                    finished.release()
            engine.submit(Request(emit=emit, **kw))
    finished = threading.Semaphore(0)
    [first] = serve(engine, [{"prompt_ids": prompts[0], "max_tokens": 20}], on_first=arrive)
    for _ in burst:
        assert finished.acquire(timeout=120)
    assert seen[0] == (1, 2)  # one request in, slots free: a short chunk
    assert seen[1] == (3, 2)  # the burst admitted right after it (a slot still free: short)
    assert seen[2] == (3, 8)  # no slot changed hands: a full chunk
    # The first request (20 tokens: the prefill's + 19 decoded) ends in the 4th chunk (2 + 2 + 8
    # + 8 steps); the 5th is dispatched before that is read, the 6th after: short.
    assert seen[3] == (3, 8) and seen[4] == (3, 8) and seen[5] == (2, 2)
    assert engine.stats.prefill_calls == 2 and engine.stats.prefill_rows == 3  # 1, then 2
    for prompt, events, n in zip(prompts, [first] + logs, (20, 40, 40)):
        assert replied(events)[1] == hf_ids(hf, prompt, n)


def test_sampling_keys_made_on_the_host_equal_jax_keys():
    import jax

    from jais2_jax.serving.engine import key_data
    for seed in (0, 7, 2 ** 31 - 1, 2 ** 31, 2 ** 32 + 5, 2 ** 63 - 1):
        want = np.asarray(jax.random.key_data(jax.random.key(seed))).tolist()
        assert list(key_data(seed)) == want, seed


def test_bad_chunk_settings_are_refused(program):
    with pytest.raises(ValueError, match="short_chunk must be in"):
        make_engine(program, chunk=4, short_chunk=5)
    with pytest.raises(ValueError, match="chunk must be positive"):
        make_engine(program, chunk=0)


def test_a_chunk_that_fails_when_read_fails_every_request(program, monkeypatch):
    """With the pipeline, a device failure may surface only when a chunk's tokens are read (the
    chunk after it already dispatched): every request in a slot or in the queue still gets an
    error at once, the loop ends, and later requests are refused."""
    from jais2_jax.serving import engine as engine_lib
    _, _, _, _, tok = program
    real = engine_lib.decode_chunk

    class Unreadable:
        def copy_to_host_async(self):
            pass

        def __array__(self, *args, **kwargs):
            raise RuntimeError("INTERNAL: the device failed (simulated)")

    def failing(*args, **kwargs):
        out = real(*args, **kwargs)
        return (Unreadable(),) + tuple(out[1:])
    monkeypatch.setattr(engine_lib, "decode_chunk", failing)
    engine = make_engine(program, chunk=2)
    logs = serve(engine, [{"prompt_ids": tok.encode("the sea " * (n + 1)), "max_tokens": 8}
                          for n in range(SLOTS + 3)])
    for events in logs:
        assert events[-1][0] == "error" and "the device failed" in events[-1][1], events
    assert engine.failed is not None
    with pytest.raises(engine_lib.QueueFull, match="engine failed"):
        engine.submit(engine_lib.Request(prompt_ids=tok.encode("the sea"), max_tokens=4,
                                         emit=lambda ev: None))
