"""The OpenAI-compatible HTTP layer (FastAPI) over an `Engine`: it only translates.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true`:
server-sent events, the last chunk with `finish_reason` and `usage`), `GET /health`, `GET /metrics`
(Prometheus text). Errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`.

Refused with 400, as OpenAI refuses them: unknown fields ("Unrecognized request argument"), `n` or
`best_of` other than 1, non-zero penalties, `logit_bias`, `suffix`, tools and non-text response
formats. A full queue is 503, a body over `max_body` bytes 413.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
import weakref

from starlette.requests import Request as HttpRequest  # module level: FastAPI resolves the name

from jais2_jax.serving.engine import TOP_LOGPROBS, QueueFull, Request

MAX_BODY = 8 * 1024 * 1024
MAX_STOP_STRINGS = 4

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options",
          "stop", "seed", "user", "presence_penalty", "frequency_penalty", "logit_bias"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs",
                        "response_format", "tools", "tool_choice", "parallel_tool_calls"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (status, message, param,
                                                                       type_, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before it is read
    (by its Content-Length) or as soon as the bytes received pass the limit (chunked)."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = ApiError(413, f"the request body is over {self.limit} bytes",
                           code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_error(send, too_big)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            return await self.app(scope, limited, send)
        except _TooLarge:
            return await _send_error(send, too_big)


class _TooLarge(Exception):
    pass


async def _send_error(send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------ field checks
def _number(body, name, default, lo=None, hi=None, lo_open=False, integer=False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}, got "
                       f"{v!r}", name)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise ApiError(400, f"{name} must be in {rng}, got {v}", name)
    return v


def _text(value, param: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{param} must be a string", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{param} is not valid UTF-8 text (a lone surrogate at {e.start})",
                       param) from e
    return value


def _check_common(body: dict, fields: set, context: int) -> dict:
    unknown = sorted(set(body) - fields)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}",
                       unknown[0])
    for name in ("n", "best_of"):
        if _number(body, name, 1, integer=True) != 1:
            raise ApiError(400, f"{name} must be 1: one choice per request is served", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0) != 0:
            raise ApiError(400, f"{name} is not supported (only 0)", name)
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias is not supported", "logit_bias")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or not all(
            isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to "
                       f"{MAX_STOP_STRINGS}", "stop")
    for s in stops:
        _text(s, "stop")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "stream must be a boolean", "stream")
    return {
        "temperature": _number(body, "temperature", 1.0, lo=0, hi=2),
        "top_p": _number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True),
        "top_k": _number(body, "top_k", None, lo=1, integer=True),
        "seed": _number(body, "seed", 0, lo=0, hi=2 ** 63 - 1, integer=True),
        "stop_strings": tuple(stops)}


class Server:
    """The app's state: the engine, its tokenizer and model name, the counters for /metrics."""

    def __init__(self, engine, tokenizer, model_name: str, chat_template: bool):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.has_chat_template = chat_template
        self.started = int(time.time())
        self.requests = 0
        self.errors = 0
        self.rejected = 0

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name != self.model_name:
            raise ApiError(404, f"The model `{name}` does not exist: this server serves "
                           f"`{self.model_name}`", "model", code="model_not_found")

    def completion_request(self, body: dict) -> tuple[Request, dict]:
        c = self.engine.max_length
        settings = _check_common(body, COMPLETION_FIELDS, c)
        if body.get("suffix"):
            raise ApiError(400, "suffix is not supported", "suffix")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "the prompt is empty", "prompt")
            ids = self.tokenizer.encode(_text(prompt, "prompt"))
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                              for t in prompt):
            ids = list(prompt)
        else:
            raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per "
                           "request)", "prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        logprobs = _number(body, "logprobs", None, lo=0, hi=TOP_LOGPROBS, integer=True)
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise ApiError(400, "echo must be a boolean", "echo")
        max_tokens = _number(body, "max_tokens", 16, integer=True)
        return self._request(ids, max_tokens, settings, logprobs=logprobs,
                             echo_logprobs=echo and logprobs is not None), {"echo": echo}

    def chat_request(self, body: dict) -> Request:
        settings = _check_common(body, CHAT_FIELDS, self.engine.max_length)
        if body.get("tools"):
            raise ApiError(400, "tools are not supported", "tools")
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise ApiError(400, "response_format: only {\"type\": \"text\"}", "response_format")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", "messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a role",
                               f"messages[{i}]")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}]
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ApiError(400, "only text content parts are supported",
                                   f"messages[{i}].content")
                content = "".join(str(p.get("text", "")) for p in content)
            clean.append({"role": m["role"],
                          "content": _text(content, f"messages[{i}].content")})
        if not self.has_chat_template:
            raise ApiError(400, "the checkpoint's tokenizer has no chat template: use "
                           "/v1/completions", "messages")
        try:
            ids = self.tokenizer.apply_chat_template(clean, add_generation_prompt=True,
                                                     tokenize=True)
        except ValueError as e:
            raise ApiError(400, f"the chat template failed: {e}", "messages") from e
        logprobs = body.get("logprobs") or False
        if not isinstance(logprobs, bool):
            raise ApiError(400, "logprobs must be a boolean", "logprobs")
        top = _number(body, "top_logprobs", 0, lo=0, hi=TOP_LOGPROBS, integer=True)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = self.engine.max_length - len(ids)  # what the context leaves
            if max_tokens <= 0:
                raise ApiError(400, f"the conversation ({len(ids)} tokens) fills the context "
                               f"({self.engine.max_length} tokens)", "messages")
        else:
            max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, integer=True)
        return self._request(ids, max_tokens, settings, logprobs=top if logprobs else None)

    def _request(self, ids, max_tokens, settings, **kw) -> Request:
        r = Request(prompt_ids=ids, max_tokens=max_tokens, emit=None, **settings, **kw)
        try:
            self.engine.check(r)
        except ValueError as e:
            param = "max_tokens" if "max_tokens" in str(e) else None
            for name in ("temperature", "top_p", "top_k"):
                if str(e).startswith(name):
                    param = name
            raise ApiError(400, str(e), param) from e
        return r

    def token_text(self, t: int) -> str:
        return self.tokenizer.decode([t])


class _Inbox:
    """Events from the engine thread into one event loop's queues, many per wake-up: the engine
    emits an event for each of its slots per decode chunk, and one `call_soon_threadsafe` (a
    write to the loop's wake-up pipe, a switch of threads) for each would cost more than the
    events themselves."""

    def __init__(self, loop):
        self.loop = weakref.ref(loop)  # the table below must not keep a finished loop alive
        self.lock = threading.Lock()
        self.items: list = []

    def put(self, queue: asyncio.Queue, event) -> None:
        with self.lock:
            self.items.append((queue, event))
            if len(self.items) > 1:
                return  # a flush is already scheduled and has not run yet
        loop = self.loop()
        if loop is not None:
            loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, event in items:
            queue.put_nowait(event)


_inboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> _Inbox


def _inbox(loop) -> _Inbox:
    inbox = _inboxes.get(loop)
    if inbox is None:
        inbox = _inboxes.setdefault(loop, _Inbox(loop))
    return inbox


async def _events(server: Server, r: Request, request) -> asyncio.Queue:
    queue: asyncio.Queue = asyncio.Queue()
    inbox = _inbox(asyncio.get_running_loop())
    r.emit = lambda event: inbox.put(queue, event)
    try:
        server.engine.submit(r)
    except QueueFull as e:
        server.rejected += 1
        raise ApiError(503, str(e), type_="server_error", code="queue_full") from e
    return queue


async def _next(queue: asyncio.Queue, r: Request, request):
    """The next event; cancels the request when the client has gone."""
    if not queue.empty():  # the usual case while streaming: no timer, no task
        return queue.get_nowait()
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                r.cancel()
                return ("done", "cancelled", len(r.prompt_ids), len(r.ids))


def _logprobs_block(server: Server, tokens, lps, alts, offset0: int):
    text = [server.token_text(t) for t in tokens]
    offsets, at = [], offset0
    for s in text:
        offsets.append(at)
        at += len(s)
    top = [None if a is None else {server.token_text(i): v for i, v in a} for a in alts]
    return {"tokens": text, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def create_app(server: Server, *, max_body: int = MAX_BODY):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import CollectorRegistry, Counter, Gauge, Summary, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    app = FastAPI(title="jais2 serve", docs_url=None, redoc_url=None, openapi_url=None)
    engine = server.engine
    registry = CollectorRegistry()

    class Live:
        def collect(self):
            yield GaugeMetricFamily("jais2_queue_depth", "requests waiting for a slot",
                                    value=engine.queue_depth())
            yield GaugeMetricFamily("jais2_live_slots", "slots decoding a request",
                                    value=engine.live_slots())
            yield GaugeMetricFamily("jais2_slots", "slots of the decode batch", value=engine.slots)
            yield GaugeMetricFamily("jais2_tokens_per_second", "output tokens a second (last 10 s)",
                                    value=engine.tokens_per_second())
            yield GaugeMetricFamily("jais2_generated_tokens", "output tokens since start",
                                    value=engine.generated_tokens)
            yield GaugeMetricFamily("jais2_cancelled_requests",
                                    "requests cancelled in a slot (client gone, shutdown)",
                                    value=engine.cancelled)

    registry.register(Live())
    ttft = Summary("jais2_time_to_first_token_seconds", "time from arrival to the first token",
                   registry=registry)
    requests = Counter("jais2_requests", "requests answered, by status", ["status"],
                       registry=registry)
    Gauge("jais2_max_queue", "queue capacity", registry=registry).set(engine.max_queue)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        requests.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status)

    async def read_json(request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        server.check_model(body)
        return body

    @app.get("/health")
    async def health():
        if server.engine.failed is not None:
            return JSONResponse({"status": "failed", "error": server.engine.failed},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                            "created": server.started, "owned_by": "jais2"}]}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def run(request, r: Request):
        """Submits `r`; returns an async generator of its events."""
        queue = await _events(server, r, request)
        t0 = time.perf_counter()
        first = [True]

        def seen_token():
            if first[0]:
                first[0] = False
                ttft.observe(time.perf_counter() - t0)

        async def events():
            try:
                while True:
                    ev = await _next(queue, r, request)
                    if ev[0] == "delta":
                        seen_token()
                    yield ev
                    if ev[0] in ("done", "error"):
                        return
            finally:  # the client went away (or the handler failed): free the slot
                if not r.finished:
                    r.cancel()
                    engine.wake()

        return events

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await read_json(request)
        r, extra = server.completion_request(body)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        events = await run(request, r)
        prompt_text = server.tokenizer.decode(r.prompt_ids) if extra["echo"] else ""

        def choice(text, reason, lp=None):
            return {"index": 0, "text": text, "logprobs": lp, "finish_reason": reason}

        def base(choices, usage=None):
            out = {"id": rid, "object": "text_completion", "created": created,
                   "model": server.model_name, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        if body.get("stream"):
            async def stream():
                if prompt_text:
                    yield sse(base([choice(prompt_text, None)]))
                async for ev in events():
                    if ev[0] == "delta":
                        lp = None if r.logprobs is None else _logprobs_block(
                            server, ev[2], ev[3], ev[4], 0)
                        yield sse(base([choice(ev[1], None, lp)]))
                    elif ev[0] == "done":
                        if ev[1] != "cancelled":
                            usage = _usage(ev)
                            yield sse(base([choice("", ev[1])], usage))
                            yield "data: [DONE]\n\n"
                        requests.labels("200").inc()
                    elif ev[0] == "error":
                        yield sse(ApiError(500, ev[1], type_="server_error").body())
            return StreamingResponse(stream(), media_type="text/event-stream")

        text, toks, lps, alts, prompt_lp = "", [], [], [], None
        async for ev in events():
            if ev[0] == "prompt":
                prompt_lp = ev
            elif ev[0] == "delta":
                text += ev[1]
                toks += ev[2]
                lps += ev[3]
                alts += ev[4]
            elif ev[0] == "error":
                raise ApiError(500, ev[1], type_="server_error")
            else:
                reason, usage = ev[1], _usage(ev)
        lp = None
        if r.logprobs is not None:
            gen = _logprobs_block(server, toks, lps, alts, len(prompt_text))
            if extra["echo"] and prompt_lp is not None:
                head = _logprobs_block(server, r.prompt_ids, prompt_lp[1], prompt_lp[2], 0)
                lp = {k: head[k] + gen[k] for k in gen}
            else:
                lp = gen
        requests.labels("200").inc()
        return base([choice(prompt_text + text, reason, lp)], usage)

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        body = await read_json(request)
        r = server.chat_request(body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = await run(request, r)

        def base(obj, choices, usage=None):
            out = {"id": rid, "object": obj, "created": created, "model": server.model_name,
                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        def chat_lp(ev):
            if r.logprobs is None:
                return None
            return {"content": [
                {"token": server.token_text(t), "logprob": v,
                 "top_logprobs": [{"token": server.token_text(i), "logprob": x} for i, x in a]}
                for t, v, a in zip(ev[2], ev[3], ev[4])]}

        if body.get("stream"):
            async def stream():
                yield sse(base("chat.completion.chunk", [
                    {"index": 0, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None}]))
                async for ev in events():
                    if ev[0] == "delta" and ev[1]:
                        yield sse(base("chat.completion.chunk", [
                            {"index": 0, "delta": {"content": ev[1]}, "logprobs": chat_lp(ev),
                             "finish_reason": None}]))
                    elif ev[0] == "done":
                        if ev[1] != "cancelled":
                            yield sse(base("chat.completion.chunk", [
                                {"index": 0, "delta": {}, "logprobs": None,
                                 "finish_reason": ev[1]}], _usage(ev)))
                            yield "data: [DONE]\n\n"
                        requests.labels("200").inc()
                    elif ev[0] == "error":
                        yield sse(ApiError(500, ev[1], type_="server_error").body())
            return StreamingResponse(stream(), media_type="text/event-stream")

        text, content = "", []
        async for ev in events():
            if ev[0] == "delta":
                text += ev[1]
                lp = chat_lp(ev)
                if lp:
                    content += lp["content"]
            elif ev[0] == "error":
                raise ApiError(500, ev[1], type_="server_error")
            elif ev[0] == "done":
                reason, usage = ev[1], _usage(ev)
        requests.labels("200").inc()
        return base("chat.completion", [{
            "index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": None if r.logprobs is None else {"content": content},
            "finish_reason": reason}], usage)

    return BodyLimit(app, max_body)


def _usage(ev) -> dict:
    _, _, prompt, completion = ev
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
