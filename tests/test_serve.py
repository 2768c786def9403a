"""`jais2 serve`: the official `openai` client against a server this file starts (a subprocess on
127.0.0.1, `--port 0`; the tests wait for its "ready on" line and read /metrics, never sleep a
fixed time). The reference is transformers: greedy replies of each prompt alone, log-softmax of
its forward."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import numpy as np
import pytest
import torch
from helpers import hf_model, serve

SLOTS, QUEUE, CONTEXT = 4, 16, 128
MODEL = "tiny-jais2"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from test_tokenizer import _bpe
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(), bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", chat_template=CHAT_TEMPLATE)
    # initializer_range 0.2: replies that vary with the prompt (at 0.02 every reply is one token
    # repeated, which would hide a slot mix-up).
    hf = hf_model(1, initializer_range=0.2, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  max_position_embeddings=CONTEXT)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path, hf, tok


class Served:
    def __init__(self, proc, url):
        self.proc, self.url = proc, url
        self.lines: list[str] = []

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    def wait_for(self, what, timeout=60.0):
        """Polls the server's own state (not a fixed sleep) until `what()` is true."""
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, "the server did not get there in time"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def server(folder):
    path, _, _ = folder
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jais2_jax.cli", "serve", "--checkpoint", str(path),
         "--port", "0", "--max-slots", str(SLOTS), "--max-queue", str(QUEUE),
         "--decode-chunk", "4", "--model-name", MODEL, "--shutdown-timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    served = None
    for line in proc.stdout:  # the readiness signal: printed once compiled and bound
        m = re.search(r"ready on (http://127\.0\.0\.1:\d+)", line)
        if m:
            served = Served(proc, m.group(1))
            break
    assert served is not None, "the server exited before it was ready"
    drain = threading.Thread(target=lambda: served.lines.extend(proc.stdout), daemon=True)
    drain.start()
    yield served
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def client(served, **kw):
    from openai import OpenAI
    return OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, **kw)


def hf_greedy(hf, tok, ids, n) -> str:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                          max_new_tokens=n, do_sample=False)[0, len(ids):]
    return tok.decode(out, skip_special_tokens=True)


WORDS = ["the", "lazy", "fox", "writes", "Arabic", "مرحبا", "بكم", "في", "عالم", "الذكاء", "and", "more", "words", "اللغة", "العربية", "jumps", "over"]


def test_concurrent_greedy_replies_equal_transformers_alone(server, folder):
    _, hf, tok = folder
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(16):
        prompt = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30))))
        jobs.append((prompt, int(rng.integers(1, 40))))
    api = client(server)

    def ask(job):
        prompt, n = job
        return api.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, jobs))
    texts = set()
    for (prompt, n), reply in zip(jobs, replies):
        ids = tok.encode(prompt)
        want = hf_greedy(hf, tok, ids, n)
        assert reply.choices[0].text == want, prompt
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.choices[0].finish_reason in ("length", "stop")
        texts.add(want)
    assert len(texts) > 8  # the replies differ: a slot mix-up would show


def test_stream_concatenates_to_the_reply_and_ends_with_usage(server, folder):
    _, hf, tok = folder
    api = client(server)
    messages = [{"role": "user", "content": "the lazy fox مرحبا"}]
    whole = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=30,
                                        temperature=0)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert whole.choices[0].message.content == hf_greedy(hf, tok, ids, 30)
    chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=30,
                                              temperature=0, stream=True))
    deltas = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert deltas == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    last = chunks[-1]
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == len(ids)
    # completions stream too
    text = "".join(c.choices[0].text for c in api.completions.create(
        model=MODEL, prompt="the lazy fox", max_tokens=20, temperature=0, stream=True))
    assert text == api.completions.create(model=MODEL, prompt="the lazy fox", max_tokens=20,
                                          temperature=0).choices[0].text


def test_echo_logprobs_equal_transformers_log_softmax(server, folder):
    _, hf, tok = folder
    ids = tok.encode("the lazy fox writes Arabic مرحبا بكم")
    reply = client(server).completions.create(model=MODEL, prompt=ids, max_tokens=1,
                                              temperature=0, echo=True, logprobs=1)
    lp = reply.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1).numpy()
    want = ref[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], want, rtol=1e-5, atol=1e-5)
    # the generated token: the greedy one, with its log-prob; its top-1 alternative is itself
    assert reply.choices[0].text.startswith(tok.decode(ids))
    np.testing.assert_allclose(lp.token_logprobs[-1], ref[-1].max(), rtol=1e-5, atol=1e-5)
    assert max(lp.top_logprobs[-1].values()) == pytest.approx(lp.token_logprobs[-1], abs=1e-6)
    for i in range(1, len(ids)):  # each prompt position's top-1 is the model's best token
        assert max(lp.top_logprobs[i].values()) == pytest.approx(ref[i - 1].max(), abs=1e-5)


def test_a_disconnect_mid_stream_frees_the_slot(server):
    cancelled = server.metric("jais2_cancelled_requests")
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", server.url + "/v1/completions",
            json={"model": MODEL, "prompt": "the", "max_tokens": 120, "temperature": 0,
                  "stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: ") for line in got)
    # closed mid-stream: the engine cancels the request and frees its slot
    server.wait_for(lambda: server.metric("jais2_cancelled_requests") == cancelled + 1)
    server.wait_for(lambda: server.metric("jais2_live_slots") == 0)
    reply = client(server).completions.create(model=MODEL, prompt="the", max_tokens=5,
                                              temperature=0)
    assert reply.usage.completion_tokens >= 1


def test_a_full_queue_answers_503_at_once(server):
    import openai
    api = client(server)
    total = SLOTS + QUEUE + 20

    def ask(_):
        try:
            api.completions.create(model=MODEL, prompt="the lazy fox", max_tokens=100,
                                   temperature=0)
            return 200, None
        except openai.APIStatusError as e:
            return e.status_code, e.body

    with concurrent.futures.ThreadPoolExecutor(total) as pool:
        results = list(pool.map(ask, range(total)))
    codes = [c for c, _ in results]
    assert set(codes) == {200, 503}, codes
    assert codes.count(200) >= SLOTS + QUEUE
    body = next(b for c, b in results if c == 503)
    assert body["code"] == "queue_full" and "queue is full" in body["message"]


def _post(server, body, **kw):
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + "/v1/completions", content=raw,
                      headers={"content-type": "application/json"}, timeout=60, **kw)


GOOD = {"model": MODEL, "prompt": "the lazy fox", "max_tokens": 4}
BAD = [
    ("malformed json", b'{"model": "tiny-jais2", "prompt": "x"', None, "not valid JSON"),
    ("unknown field (refused, as OpenAI)", dict(GOOD, frobnicate=1), "frobnicate",
     "Unrecognized request argument supplied: frobnicate"),
    ("max_tokens 0", dict(GOOD, max_tokens=0), "max_tokens", "max_tokens must be positive"),
    ("max_tokens -3", dict(GOOD, max_tokens=-3), "max_tokens", "max_tokens must be positive"),
    ("max_tokens over the context", dict(GOOD, max_tokens=CONTEXT), "max_tokens",
     "exceeds the context"),
    ("temperature < 0", dict(GOOD, temperature=-0.5), "temperature", "temperature must be in"),
    ("top_p 0", dict(GOOD, top_p=0), "top_p", r"top_p must be in \(0, 1\]"),
    ("top_p 1.5", dict(GOOD, top_p=1.5), "top_p", r"top_p must be in \(0, 1\]"),
    ("n 2 (refused)", dict(GOOD, n=2), "n", "n must be 1"),
    ("empty prompt", dict(GOOD, prompt=""), "prompt", "the prompt is empty"),
    ("empty token list", dict(GOOD, prompt=[]), "prompt", "the prompt is empty"),
    ("token id outside the vocabulary", dict(GOOD, prompt=[1, 10 ** 6]), None,
     "outside the vocabulary"),
    ("lone surrogate", b'{"model": "tiny-jais2", "prompt": "ab\\ud800cd", "max_tokens": 2}',
     "prompt", "not valid UTF-8"),
]


@pytest.mark.parametrize("name,body,param,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_400_in_openai_shape(server, name, body, param, message):
    r = _post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert re.search(message, err["message"]), err["message"]


def test_chat_bad_input_and_model_not_served(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = _post(server, dict(GOOD, model="gpt-4"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "gpt-4" in r.json()["error"]["message"]
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_a_100_mb_body_is_413_and_the_server_goes_on(server):
    big = b'{"model": "tiny-jais2", "prompt": "' + b"a" * (100 << 20) + b'"}'
    try:
        r = _post(server, big)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"
    except httpx.TransportError:
        pass  # the server answered and closed before the client finished sending: also refused
    r = _post(server, GOOD)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_health(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_engine_on_a_mesh_equals_transformers_alone(folder):
    """The engine in this process on a 2-device tensor-parallel mesh (fake CPU devices), more
    requests than slots: each request's tokens are transformers' greedy tokens for it alone."""
    import jax

    from jais2_jax import Tokenizer, load_checkpoint
    from jais2_jax.inference.program import build_inference_program
    from jais2_jax.parallel.sharding import make_mesh
    from jais2_jax.serving.engine import Engine
    path, hf, tok = folder
    mesh = make_mesh((1, 1, 2), devices=jax.devices()[:2])
    config, params = load_checkpoint(str(path), dtype="float32", mesh=mesh)
    program = build_inference_program(config, batch_size=3, max_length=64, mesh=mesh,
                                      dtype="float32")
    engine = Engine(program, program.place(params), Tokenizer.from_pretrained(str(path)),
                    chunk=3, stop_ids=(tok.eos_token_id,))
    rng = np.random.default_rng(1)
    jobs = [(tok.encode(" ".join(rng.choice(WORDS, size=int(rng.integers(1, 12))))),
             int(rng.integers(1, 20))) for _ in range(7)]
    logs = serve(engine, [{"prompt_ids": ids, "max_tokens": n} for ids, n in jobs])
    for (ids, n), events in zip(jobs, logs):
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                               max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
        if tok.eos_token_id in want:
            want = want[:want.index(tok.eos_token_id)]
        got = [t for ev in events if ev[0] == "delta" for t in ev[2]]
        assert got == want
        assert events[-1][0] == "done" and events[-1][3] == len(want)


def test_sampling_depends_on_the_seed_only_and_stop_strings_cut(server):
    """A sampled request gives the same text alone and among other requests (its own key per
    token); a stop string ends the reply before it, with finish_reason "stop"."""
    api = client(server)
    ask = {"model": MODEL, "prompt": "the lazy fox", "max_tokens": 24, "temperature": 1.0, "top_k": 20,
               "top_p": 0.9, "seed": 7}
    alone = api.completions.create(**{k: v for k, v in ask.items() if k != "top_k"},
                                   extra_body={"top_k": 20}).choices[0].text
    other = api.completions.create(**{k: v for k, v in ask.items() if k not in ("top_k", "seed")},
                                   seed=8, extra_body={"top_k": 20}).choices[0].text
    assert alone != other  # the seed matters

    def one(i):
        kw = {k: v for k, v in ask.items() if k not in ("top_k", "seed")}
        return api.completions.create(**kw, seed=7 if i == 0 else 100 + i,
                                      extra_body={"top_k": 20}).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        busy = list(pool.map(one, range(6)))
    assert busy[0] == alone
    greedy = api.completions.create(model=MODEL, prompt="the lazy fox", max_tokens=30,
                                    temperature=0).choices[0]
    cut = greedy.text[len(greedy.text) // 2:][:3]
    assert cut and greedy.text.find(cut) > 0
    stopped = api.completions.create(model=MODEL, prompt="the lazy fox", max_tokens=30,
                                     temperature=0, stop=[cut]).choices[0]
    assert stopped.text == greedy.text[:greedy.text.find(cut)]
    assert stopped.finish_reason == "stop"


def test_sigterm_finishes_in_flight_requests_and_exits_0(server):
    """Last in the file: it stops the module's server. A streamed request is in flight (its
    first chunk read) when SIGTERM comes: it still ends with its finish_reason."""
    api = client(server)
    stream = api.completions.create(model=MODEL, prompt="the lazy fox", max_tokens=100,
                                    temperature=0, stream=True)
    chunks = [next(stream)]
    server.proc.send_signal(signal.SIGTERM)
    chunks += list(stream)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].usage.completion_tokens >= 1
    assert server.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(server.url + "/health")


def test_a_failing_decode_step_fails_every_request_instead_of_hanging(folder, monkeypatch):
    """A decode chunk that raises (e.g. out of device memory: its donated cache is gone): the
    requests in slots and in the queue get an error at once, and later ones are refused."""

    from jais2_jax import Tokenizer, load_checkpoint
    from jais2_jax.inference.program import build_inference_program
    from jais2_jax.serving import engine as engine_lib
    path, _, tok = folder
    config, params = load_checkpoint(str(path), dtype="float32")
    program = build_inference_program(config, batch_size=2, max_length=64, dtype="float32")
    engine = engine_lib.Engine(program, program.place(params), Tokenizer.from_pretrained(str(path)),
                               chunk=2)

    def broken(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (simulated)")
    monkeypatch.setattr(engine_lib, "decode_chunk", broken)
    done = threading.Semaphore(0)
    events: list = []

    def emit(ev):
        events.append(ev)
        if ev[0] in ("done", "error"):
            done.release()
    for n in range(5):  # 2 slots: 2 requests in slots, 3 waiting
        engine.submit(engine_lib.Request(prompt_ids=tok.encode("the sea " * (n + 1)),
                                         max_tokens=8, emit=emit))
    worker = threading.Thread(target=engine.run)
    worker.start()
    for _ in range(5):
        assert done.acquire(timeout=120), events
    worker.join(timeout=60)
    assert not worker.is_alive()
    errors = [ev for ev in events if ev[0] == "error"]
    assert len(errors) == 5 and all("RESOURCE_EXHAUSTED" in ev[1] for ev in errors), events
    with pytest.raises(engine_lib.QueueFull, match="engine failed"):
        engine.submit(engine_lib.Request(prompt_ids=tok.encode("the sea"), max_tokens=4,
                                         emit=emit))
