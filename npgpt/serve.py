"""`npgpt serve`: an OpenAI-compatible HTTP server with continuous batching, streaming and a chat page.

One engine thread owns the model. Each step it samples one token for every active sequence, retires
the finished and the cancelled (a client that leaves cancels its sequences), advances all the others by
one position in one batched forward, and fills the free rows from the queue. HTTP handlers only
validate, enqueue and stream what the engine hands them.

The ragged KV cache: the active sequences sit in rows 0 .. A-1 of one cache, each right-aligned to a
common end column L, so row b keeps its positions in columns pad[b] .. L-1. The model's left padding
then masks each row and gives it its own positions, and a decode step is the ordinary one-token forward
with a cache, fused kernels included. A new prompt is encoded alone, exactly as `npgpt generate` encodes
it, and its keys and values are copied into the next free row; a prompt longer than L moves the others
right, and when L reaches the context everyone moves left by the smallest pad. A retired row is filled
with the last one. A sequence whose window is full is re-encoded from its newest block // 2 tokens (the
context shift of `generate`), so every sequence sees the windows it would see alone, and its greedy
tokens are those of `npgpt generate --temperature 0` (bit for bit where decoding runs the fused kernels,
whose rows are independent; BLAS may round a batched product differently from a single row).

Routes: POST /v1/completions and /v1/chat/completions (both with `stream`), GET /v1/models, /health
(503 while loading), /metrics (Prometheus), and the chat page at /. Starlette and uvicorn are the
optional extra npgpt[serve]; only `npgpt serve` imports this module.
"""
from __future__ import annotations

import asyncio
import copy
import hmac
import json
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chat import ROLES, chat_ids, encode_chat
from .checkpoint import load_model, read_config
from .errors import NpgptError
from .model import KVCache
from .sampling import TextStream, check_sampling, sample_next, start_ids, stop_reached

PAGE = Path(__file__).parent / "static" / "chat.html"
MAX_LOGPROBS = 20


# ---------------------------------------------------------------- the engine
@dataclass(frozen=True)
class Settings:
    """How one request samples (the meanings of `npgpt generate`); logprobs k: report each token's
    log-probability and the k most likely alternatives (None: none)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    eos_id: int | None = None
    logprobs: int | None = None


class _Text:
    """The `out` of a TextStream: collects what it writes until taken."""

    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass

    def take(self) -> str:
        s, self.parts = "".join(self.parts), []
        return s


class Sequence:
    """One choice being generated: its tokens, settings and RNG (seeded as `npgpt generate --seed`), and
    on_event(dict), called on the engine thread with every token and the finish."""

    def __init__(self, model, prompt: list[int], settings: Settings, seed: int | None, on_event):
        self.tokens, self.prompt_len = list(prompt), len(prompt)
        self.settings, self.rng, self.on_event = settings, np.random.default_rng(seed), on_event
        self.seen = None
        if settings.repetition_penalty != 1.0:
            self.seen = np.zeros((1, model.config.vocab_size), bool)
            self.seen[0, prompt] = True
        self.text = TextStream(model, _Text(), list(settings.stop))
        self.start = 0          # the window: tokens[start:]
        self.logits = None      # [V], for the next token
        self.cancelled = self.done = False

    def emit(self, event: dict):
        try:
            self.on_event(event)
        except RuntimeError:  # the receiving event loop is gone
            self.cancelled = True


class QueueFull(Exception):
    pass


class Engine:
    """Continuous batching over `parallel` cache rows, with at most `max_queue` sequences waiting."""

    def __init__(self, model, parallel: int = 8, max_queue: int = 64):
        if model.tokenizer is None:
            raise NpgptError("serving needs a model with a tokenizer")
        self.model, self.parallel, self.max_queue = model, parallel, max_queue
        self.dtype = model.flat.dtype if model.flat is not None else np.float32
        self.cache = KVCache(model.config, parallel, dtype=self.dtype, ring=False)
        self.rows: list[Sequence] = []           # row i of the cache holds rows[i]
        self.pad = np.zeros(parallel, np.int64)
        self.end = 0                             # L: every row ends at column L - 1
        self.waiting: deque[Sequence] = deque()
        self.admitting: list[Sequence] = []      # taken from `waiting`, not yet in a row
        self.busy = 0                            # sequences taken from `waiting` and not yet finished
        self.cond = threading.Condition()        # guards waiting, busy, closed
        self.closed = False
        self.counts = Counter()                  # prompt_tokens, generated_tokens
        self.thread = threading.Thread(target=self._loop, name="npgpt-engine", daemon=True)
        self.thread.start()

    def load(self) -> tuple[int, int]:
        """(sequences being generated, sequences waiting for a slot)."""
        with self.cond:
            return self.busy, len(self.waiting)

    def submit(self, seqs: list[Sequence]):
        with self.cond:
            if self.closed or len(seqs) > self.max_queue + self.parallel - self.busy - len(self.waiting):
                raise QueueFull()
            self.waiting.extend(seqs)
            self.cond.notify()

    def cancel(self, seqs: list[Sequence]):
        """Stop generating seqs: their rows are freed at the next step."""
        for s in seqs:
            s.cancelled = True
        with self.cond:
            self.cond.notify()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()
        for s in self.rows + self.admitting + list(self.waiting):
            s.emit({"error": "the server is shutting down"})

    def _loop(self):
        while True:
            with self.cond:
                while not self.closed and not self.rows and not self.waiting:
                    self.cond.wait()
                if self.closed:
                    return
            try:
                self.step()
            except Exception as e:  # a bug must not leave every client waiting: fail what is in flight
                traceback.print_exc()
                for s in self.rows + self.admitting:
                    s.emit({"error": f"internal error: {e}"})
                with self.cond:
                    self.busy -= len(self.rows) + len(self.admitting)
                self.rows, self.admitting, self.end = [], [], 0

    def step(self):
        """Sample a token for every row, retire the finished and the cancelled, decode the others one
        position in one batched forward, then fill the free rows."""
        for s in self.rows:
            if not s.cancelled:
                self._sample(s)
        block, again, finished = self.model.config.block_size, [], 0
        for i in reversed(range(len(self.rows))):
            s = self.rows[i]
            if s.cancelled or s.done:
                self._retire(i)
                finished += 1
            elif len(s.tokens) - s.start > block:  # the window is full: re-encode its newest half
                self._retire(i)
                s.start = len(s.tokens) - max(1, block // 2)
                again.append(s)
        if self.rows:
            self._decode()
        with self.cond:
            self.busy -= finished
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
            free = self.parallel - len(self.rows) - len(again)
            new = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            self.busy += len(new)
            self.admitting = again + new
        encoded = {}  # the n choices of a prompt are encoded once
        while self.admitting:
            self._admit(self.admitting[0], encoded)
            self.admitting.pop(0)

    def _admit(self, s: Sequence, encoded: dict):
        """Encode s's window alone (as generate's prefill) into the next free row; s.logits follow."""
        ids = tuple(s.tokens[s.start:])
        if ids not in encoded:
            one = KVCache(self.model.config, 1, dtype=self.dtype, length=len(ids), ring=False)
            encoded[ids] = one, self.model.forward(np.array([ids]), kv=one, last_only=True)[0, -1]
        one, s.logits = encoded[ids]
        P, r = len(ids), len(self.rows)
        if P > self.end:
            self._move(P - self.end)
        for a, b in zip(self.cache.k + self.cache.v, one.k + one.v):
            a[r, :, self.end - P:self.end] = b[0, :, :P]
        self.pad[r] = self.end - P
        self.rows.append(s)
        if s.start == 0:
            self.counts["prompt_tokens"] += P

    def _move(self, d: int):
        """Shift every row's columns by d (right > 0, left < 0); only the live columns are copied."""
        A, L = len(self.rows), self.end
        lo = int(self.pad[:A].min()) if A else L
        for a in self.cache.k + self.cache.v:
            a[:A, :, lo + d:L + d] = a[:A, :, lo:L]
        self.pad[:A] += d
        self.end += d

    def _retire(self, i: int):
        """Free row i: the last row moves into it."""
        last = len(self.rows) - 1
        if i != last:
            lo = self.pad[last]
            for a in self.cache.k + self.cache.v:
                a[i, :, lo:self.end] = a[last, :, lo:self.end]
            self.pad[i], self.rows[i] = lo, self.rows[last]
        self.rows.pop()
        if not self.rows:
            self.end = 0

    def _view(self, A: int) -> KVCache:
        """The first A rows as a cache of their own at length L with their pads, sharing the storage:
        what the forward stores lands in self.cache."""
        view = copy.copy(self.cache)
        view.k, view.v = [a[:A] for a in self.cache.k], [a[:A] for a in self.cache.v]
        view.length, view.pad, view.follow = self.end, self.pad[:A], False  # follow would replace the storage
        return view

    def _decode(self):
        """One batched forward: every row's last token -> its logits for the next."""
        A = len(self.rows)
        m = int(self.pad[:A].min())
        # a full cache must move (m >= 1 there: a row at the full context was re-encoded shorter); a
        # mostly idle one is worth moving too, since the unfused attention reads every column up to L
        if m and (self.end == self.cache.room or 2 * m >= self.end):
            self._move(-m)
        ids = np.array([[s.tokens[-1]] for s in self.rows], np.int64)
        logits = self.model.forward(ids, kv=self._view(A))[:, -1]
        self.end += 1
        for s, z in zip(self.rows, logits):
            s.logits = z

    def _sample(self, s: Sequence):
        """Draw s's next token and hand the event to its caller (text delta, logprobs, finish)."""
        st = s.settings
        try:
            tok = int(sample_next(s.logits[None], s.rng, st.temperature, st.top_k, st.top_p, s.seen,
                                  st.repetition_penalty)[0])
        except NpgptError as e:  # e.g. NaN logits: this sequence fails, the others go on
            s.done = True
            s.emit({"error": str(e)})
            return
        self.counts["generated_tokens"] += 1
        s.tokens.append(tok)
        if s.seen is not None:
            s.seen[0, tok] = True
        new = s.tokens[s.prompt_len:]
        event = {"token": tok, "finish_reason": None}
        eos = st.eos_id is not None and tok == st.eos_id
        if not eos:
            s.text(np.array([tok]))
            if st.logprobs is not None:
                event["logprobs"] = _logprobs(s.logits, tok, st.logprobs)
        if eos or stop_reached(self.model.tokenizer, new, list(st.stop)):
            event["finish_reason"] = "stop"
        elif len(new) >= st.max_tokens:
            event["finish_reason"] = "length"
        if event["finish_reason"]:
            s.text.close()
            s.done = True
        event["text"] = s.text.out.take()
        s.logits = None
        s.emit(event)


def _logprobs(logits, tok: int, k: int):
    """(log p(tok), [(id, log p)] of the k most likely ids, best first) under softmax(logits [V])."""
    z = logits.astype(np.float64)
    z -= z.max()
    lp = z - np.log(np.exp(z).sum())
    top = np.argpartition(-lp, k - 1)[:k] if 0 < k < len(lp) else np.arange(len(lp) if k else 0)
    top = top[np.argsort(-lp[top], kind="stable")]
    return float(lp[tok]), [(int(i), float(lp[i])) for i in top]


# ---------------------------------------------------------------- requests
class ApiError(Exception):
    """An error answered as OpenAI's error JSON with this HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param

    def response(self):
        from starlette.responses import JSONResponse
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return JSONResponse({"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}},
                            status_code=self.status)


def _get(body: dict, name: str, kind, default=None):
    """body[name] checked to be of `kind` (int, float, bool, str); default when absent or null."""
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, bool) if kind is bool else not isinstance(v, bool) and isinstance(
        v, (int, float) if kind is float else kind)
    if not ok:
        what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
        raise ApiError(400, f"'{name}' must be {what}", param=name)
    return float(v) if kind is float else v


def _at_least(body, name, lo, default=None):
    v = _get(body, name, int, default)
    if v is not None and v < lo:
        raise ApiError(400, f"'{name}' must be >= {lo}, got {v}", param=name)
    return v


UNSUPPORTED = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "echo": False, "suffix": "",
               "tools": [], "functions": [], "response_format": {"type": "text"}}


def settings_from(body: dict, *, max_tokens: int, eos_id, stop=()) -> tuple[Settings, int | None, int]:
    """(Settings, seed, n) of a request body; `logprobs` is the number of alternatives."""
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) not in (None, neutral):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    user_stop = body.get("stop")
    user_stop = [user_stop] if isinstance(user_stop, str) else user_stop or []
    if not isinstance(user_stop, list) or not all(isinstance(s, str) for s in user_stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    n = _at_least(body, "n", 1, 1)
    if body.get("best_of") not in (None, n):
        raise ApiError(400, "'best_of' other than n is not supported", param="best_of")
    if isinstance(body.get("logprobs"), bool):  # chat: logprobs true, top_logprobs k
        logprobs = _at_least(body, "top_logprobs", 0, 0) if body["logprobs"] else None
    else:  # completions: logprobs k
        logprobs = _at_least(body, "logprobs", 0)
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise ApiError(400, f"at most {MAX_LOGPROBS} logprobs", param="logprobs")
    s = Settings(max_tokens=_at_least(body, "max_completion_tokens", 1, _at_least(body, "max_tokens", 1, max_tokens)),
                 temperature=_get(body, "temperature", float, 1.0), top_k=_get(body, "top_k", int),
                 top_p=_get(body, "top_p", float), repetition_penalty=_get(body, "repetition_penalty", float, 1.0),
                 stop=(*user_stop, *stop), eos_id=eos_id, logprobs=logprobs)
    seed = _get(body, "seed", int)
    check_sampling(s.temperature, s.top_k, s.top_p, s.repetition_penalty, user_stop, seed)
    return s, seed, n


def completion_prompts(model, prompt, limit: int) -> list[list[int]]:
    """The `prompt` of /v1/completions (a string, a list of strings, token ids or lists of them) as id
    lists, at most `limit` of them; an empty string is an unconditional start, as `npgpt generate`
    without a prompt."""
    def ids(p):
        if isinstance(p, str):
            return model.tokenizer.encode(p) if p else start_ids(model)[0]
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if min(p) < 0 or max(p) >= model.config.vocab_size:
                raise ApiError(400, f"token ids must be in [0, {model.config.vocab_size})", param="prompt")
            return p
        raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > limit:
            raise ApiError(400, f"at most {limit} prompts in one request", param="prompt")
        return [ids(p) for p in prompt]
    return [ids(prompt)]


def chat_messages(messages) -> list[dict]:
    """OpenAI's messages as the chat template's: roles system (or developer), user, assistant; content a
    string or a list of text parts; stripped as `npgpt generate --chat` strips its message."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if role not in ROLES or not isinstance(content, str):
            raise ApiError(400, f"each message needs a role ({', '.join(ROLES)}) and text content", param="messages")
        out.append({"role": role, "content": content.strip()})
    if not any(m["content"] for m in out):
        raise ApiError(400, "every message is empty", param="messages")
    return out


# ---------------------------------------------------------------- the HTTP app
def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _disconnected(request):
    """Returns when the client has gone (the body is read: the next message can only be the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Server:
    """The app's state: the engine (None while loading), the key, and the request counts."""

    def __init__(self, load, model_id: str, api_key: str | None = None, parallel: int = 8, max_queue: int = 64,
                 on_ready=None, on_error=None):
        self.load, self.model_id, self.api_key = load, model_id, api_key
        self.parallel, self.max_queue = parallel, max_queue
        self.on_ready, self.on_error = on_ready, on_error
        self.engine = self.model = self.error = None
        self.requests = Counter()   # (route, status) -> count
        self.created = int(time.time())

    def app(self):
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        @asynccontextmanager
        async def lifespan(app):
            threading.Thread(target=self._start, name="npgpt-load", daemon=True).start()
            yield
            if self.engine is not None:
                self.engine.close()

        async def http_error(request, exc):
            self.requests[("other", exc.status_code)] += 1
            msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
            return ApiError(exc.status_code, msg).response()

        routes = [Route("/", self._route("/", self.page, key=False, ready=False)),
                  Route("/health", self._route("/health", self.health, key=False, ready=False)),
                  Route("/metrics", self._route("/metrics", self.metrics, ready=False)),
                  Route("/v1/models", self._route("/v1/models", self.models)),
                  Route("/v1/models/{model:path}", self._route("/v1/models", self.models)),
                  Route("/v1/completions", self._route("/v1/completions", self.completions), methods=["POST"]),
                  Route("/v1/chat/completions", self._route("/v1/chat/completions", self.chat), methods=["POST"])]
        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})

    def _start(self):
        """Load the model and warm the engine up (compiles the kernels); /health says 503 until then."""
        try:
            model = self.load()
            engine = Engine(model, self.parallel, self.max_queue)
            done = threading.Event()
            engine.submit([Sequence(model, [0], Settings(max_tokens=2, temperature=0), None,
                                    lambda e: (e.get("finish_reason") or "error" in e) and done.set())])
            done.wait()
            engine.counts.clear()
            self.model, self.engine = model, engine
            if self.on_ready:
                self.on_ready()
        except Exception as e:  # the server stops with this one line
            self.error = str(e) if isinstance(e, NpgptError) else f"cannot load the model: {type(e).__name__}: {e}"
            if self.on_error:
                self.on_error()

    def _route(self, name, handler, key=True, ready=True):
        async def run(request):
            try:
                if key and self.api_key is not None:
                    given = request.headers.get("authorization", "").encode()
                    if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                        raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                       code="invalid_api_key")
                if ready and self.engine is None:
                    raise ApiError(503, "the model is loading")
                response = await handler(request)
            except ApiError as e:
                response = e.response()
            except NpgptError as e:
                response = ApiError(400, str(e)).response()
            self.requests[(name, response.status_code)] += 1
            return response
        return run

    # ------------------------------------------------------------ plain routes
    async def page(self, request):
        from starlette.responses import HTMLResponse
        return HTMLResponse(PAGE.read_text())

    async def health(self, request):
        from starlette.responses import JSONResponse
        if self.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request):
        from starlette.responses import PlainTextResponse
        e = self.engine
        counts, (busy, queued) = (e.counts, e.load()) if e else (Counter(), (0, 0))
        lines = ["# HELP npgpt_requests_total HTTP requests answered, by route and status.",
                 "# TYPE npgpt_requests_total counter"]
        lines += [f'npgpt_requests_total{{route="{r}",code="{c}"}} {n}' for (r, c), n in sorted(self.requests.items())]
        for name, kind, help_, v in [
                ("prompt_tokens_total", "counter", "Prompt tokens encoded.", counts["prompt_tokens"]),
                ("generated_tokens_total", "counter", "Tokens generated.", counts["generated_tokens"]),
                ("slots_busy", "gauge", "Sequences being generated.", busy),
                ("slots_total", "gauge", "Sequences that can be generated at once.", self.parallel),
                ("queue_length", "gauge", "Sequences waiting for a slot.", queued)]:
            lines += [f"# HELP npgpt_{name} {help_}", f"# TYPE npgpt_{name} {kind}", f"npgpt_{name} {v}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def models(self, request):
        from starlette.responses import JSONResponse
        card = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "npgpt"}
        wanted = request.path_params.get("model")
        if wanted is None:
            return JSONResponse({"object": "list", "data": [card]})
        self._check_model(wanted)
        return JSONResponse(card)

    def _check_model(self, name):
        if name is not None and name != self.model_id:
            raise ApiError(404, f"model {name!r} not found; this server has {self.model_id!r}", code="model_not_found",
                           param="model")

    # ------------------------------------------------------------ generation
    async def _body(self, request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):
            raise ApiError(400, "the request body must be JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self._check_model(_get(body, "model", str))
        return body

    def _fits(self, prompts):
        block = self.model.config.block_size
        for p in prompts:
            if len(p) > block:
                raise ApiError(400, f"the prompt has {len(p)} tokens; the model's context is {block}",
                               code="context_length_exceeded", param="prompt")

    async def completions(self, request):
        body = await self._body(request)
        prompts = completion_prompts(self.model, body.get("prompt", ""), self.parallel + self.max_queue)
        self._fits(prompts)
        settings, seed, n = settings_from(body, max_tokens=16, eos_id=self.model.tokenizer.eot_id)
        return await self._generate(request, body, prompts, settings, seed, n, chat=False)

    async def chat(self, request):
        body = await self._body(request)
        end = chat_ids(self.model)["<|end|>"]  # a clear 400 for a model without the chat template
        ids = encode_chat(self.model, chat_messages(body.get("messages")), generation_prompt=True)[0]
        self._fits([ids])
        # as `npgpt generate --chat`: the end token ends the reply, and so does its text
        settings, seed, n = settings_from(body, max_tokens=max(1, self.model.config.block_size - len(ids)),
                                          eos_id=end, stop=("<|end|>",))
        return await self._generate(request, body, [ids], settings, seed, n, chat=True)

    async def _generate(self, request, body, prompts, settings, seed, n, chat):
        from starlette.responses import JSONResponse, StreamingResponse
        opts = body.get("stream_options")
        streaming, usage = _get(body, "stream", bool, False), isinstance(opts, dict) and bool(opts.get("include_usage"))
        if len(prompts) * n > self.parallel + self.max_queue:
            raise ApiError(400, f"{len(prompts) * n} sequences asked for; this server takes at most "
                                f"{self.parallel + self.max_queue} in one request", param="n")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        seqs = [Sequence(self.model, p, settings, None if seed is None else seed + j,
                         lambda e, i=i * n + j: loop.call_soon_threadsafe(events.put_nowait, (i, e)))
                for i, p in enumerate(prompts) for j in range(n)]
        try:
            self.engine.submit(seqs)
        except QueueFull:
            raise ApiError(429, "the server's queue is full; retry later", code="queue_full") from None
        reply = _Reply(self.model, chat, "chatcmpl-" if chat else "cmpl-", self.model_id, len(seqs),
                       sum(map(len, prompts)))
        if not streaming:
            watch = asyncio.ensure_future(_disconnected(request))
            try:
                while not reply.finished:
                    get = asyncio.ensure_future(events.get())
                    await asyncio.wait([get, watch], return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():  # the client left: free its rows
                        get.cancel()
                        self.engine.cancel(seqs)
                        return JSONResponse({}, status_code=499)
                    reply.add(*get.result())
            finally:
                watch.cancel()
            if reply.error:
                raise ApiError(500, reply.error)
            return JSONResponse(reply.whole())
        async def stream():
            try:
                if chat:
                    for i in range(len(seqs)):
                        yield _sse(reply.chunk(i, {"role": "assistant", "content": ""}, None, usage))
                while not reply.finished:
                    i, event = await events.get()
                    if "error" in event:
                        yield _sse({"error": {"message": event["error"], "type": "server_error"}})
                        return
                    reply.add(i, event)
                    if event["text"] or event["finish_reason"] or event.get("logprobs"):
                        yield _sse(reply.chunk(i, event["text"], event, usage))
                if usage:
                    yield _sse({**reply.head(chunk=True), "choices": [], "usage": reply.usage()})
                yield "data: [DONE]\n\n"
            finally:  # done, or the client left (the response is cancelled): free the rows either way
                self.engine.cancel(seqs)
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Reply:
    """The choices of one request as they arrive, and OpenAI's JSON for them (whole, or chunks)."""

    def __init__(self, model, chat: bool, prefix: str, model_id: str, n: int, prompt_tokens: int):
        self.tok, self.chat, self.model_id = model.tokenizer, chat, model_id
        self.id, self.created = prefix + uuid.uuid4().hex[:24], int(time.time())
        self.texts, self.finish = [[] for _ in range(n)], [None] * n
        self.logprobs, self.tokens = [[] for _ in range(n)], [0] * n
        self.prompt_tokens, self.error = prompt_tokens, None

    @property
    def finished(self) -> bool:
        return self.error is not None or all(self.finish)

    def add(self, i: int, event: dict):
        if "error" in event:
            self.error = event["error"]
            return
        self.tokens[i] += 1
        self.texts[i].append(event["text"])
        self.finish[i] = event["finish_reason"]
        if "logprobs" in event:
            self.logprobs[i].append((event["token"], *event["logprobs"]))

    def usage(self) -> dict:
        c = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": c, "total_tokens": self.prompt_tokens + c}

    def head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    def _logprobs(self, entries):
        """OpenAI's logprobs object for (token, logprob, top) entries (None when not asked for)."""
        if not entries:
            return None
        text = self.tok.decode
        if self.chat:
            def one(t, lp):
                s = text([t])
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**one(t, lp), "top_logprobs": [one(u, q) for u, q in top]} for t, lp, top in entries]}
        strings = [text([t]) for t, _, _ in entries]
        return {"tokens": strings, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{text([u]): q for u, q in top} for _, _, top in entries],
                "text_offset": np.cumsum([0] + [len(s) for s in strings[:-1]]).tolist()}

    def whole(self) -> dict:
        choices = []
        for i, (parts, fin) in enumerate(zip(self.texts, self.finish)):
            text = "".join(parts)
            c = {"index": i, "message": {"role": "assistant", "content": text}} if self.chat else {"index": i, "text": text}
            choices.append({**c, "logprobs": self._logprobs(self.logprobs[i]), "finish_reason": fin})
        return {**self.head(chunk=False), "choices": choices, "usage": self.usage()}

    def chunk(self, i: int, delta, event: dict | None, usage: bool) -> dict:
        lp = self._logprobs([(event["token"], *event["logprobs"])]) if event and "logprobs" in event else None
        fin = event["finish_reason"] if event else None
        c = {"index": i, "delta": delta if isinstance(delta, dict) else ({"content": delta} if delta else {})} \
            if self.chat else {"index": i, "text": delta}
        out = {**self.head(chunk=True), "choices": [{**c, "logprobs": lp, "finish_reason": fin}]}
        return {**out, "usage": None} if usage else out


# ---------------------------------------------------------------- running it
def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one), or a one-line NpgptError."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except (OSError, OverflowError) as e:
        raise NpgptError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    return sock


def read_api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    """The key from --api-key or the first line of --api-key-file (not both)."""
    if api_key is not None and api_key_file is not None:
        raise NpgptError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            api_key = Path(api_key_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise NpgptError(f"{api_key_file}: cannot read the API key ({getattr(e, 'strerror', None) or e})") from None
    if api_key is not None and (not api_key.strip() or any(c.isspace() for c in api_key)):
        raise NpgptError("the API key must be non-empty and without spaces")
    return api_key


def serve(model_dir, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None, parallel: int = 8,
          max_queue: int = 64):
    """Run the server until interrupted. The port is bound and /health answers (503) while the model
    loads and its kernels compile; a model that fails to load stops the server with its error."""
    try:
        import uvicorn
    except ImportError:
        raise NpgptError("npgpt serve needs starlette and uvicorn: pip install 'npgpt[serve]'") from None
    if parallel < 1 or max_queue < 0:
        raise NpgptError("--parallel must be >= 1 and --max-queue >= 0")
    read_config(model_dir)  # a wrong dir fails here, before the port is taken
    sock = listen(host, port)
    url = f"http://{host}:{sock.getsockname()[1]}/"
    state = Server(lambda: load_model(model_dir), Path(model_dir).resolve().name, api_key, parallel, max_queue,
                   on_ready=lambda: print(f"npgpt serve: ready at {url}", file=sys.stderr, flush=True))
    server = uvicorn.Server(uvicorn.Config(state.app(), log_level="warning", timeout_graceful_shutdown=3))
    state.on_error = lambda: setattr(server, "should_exit", True)
    print(f"npgpt serve: loading {model_dir}, listening on {url} ({parallel} slots)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    if state.error:
        raise NpgptError(state.error)
    if server.should_exit:  # stopped by Ctrl-C: uvicorn re-raises it, but asyncio.run can swallow that (a race)
        raise KeyboardInterrupt
