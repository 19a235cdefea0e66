"""The HTTP API: OpenAI-compatible completions and chat completions where ``model`` names a prompt,
plus /health, /metrics and authenticated admin endpoints. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt import __version__
from softprompt.base import BaseModel
from softprompt.chat import chat_ids, refusal
from softprompt.errors import SoftPromptError
from softprompt.generate import SamplingParams
from softprompt.serve.auth import Auth, Tenant
from softprompt.serve.engine import Engine, QueueFull, Request as GenRequest
from softprompt.serve.kv_cache import PrefixCache
from softprompt.serve.metrics import Metrics
from softprompt.serve.registry import BASE_NAME, LoadedPrompt, Registry

log = logging.getLogger(__name__)


@dataclass
class Limits:
    max_tokens: int = 512  # cap on a request's max_tokens
    max_input_tokens: int = 2048  # cap on a request's prompt length in tokens
    max_body_bytes: int = 1 << 20  # cap on a generation request's body
    max_admin_body_bytes: int = 64 << 20  # cap on an admin upload
    max_stop: int = 4
    max_n: int = 16  # cap on choices per request (each is a row of its own)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}},
                            status_code=self.status)


# -- request bodies --------------------------------------------------------------------------------
class _Body(Schema):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, logprobs: null, ...)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    n: int | None = 1
    stream_options: dict | None = None


class CompletionBody(_Body):
    prompt: str | list[str]
    logprobs: int | None = None  # top alternatives per token (0..5); 0: the chosen token's only
    fields: dict[str, str] | None = None  # extension: values for the template's other fields


class TextPart(Schema):
    type: Literal["text"]
    text: str


class Message(Schema):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def turn(self) -> dict:
        """The message as a chat-template turn (``developer`` is the system role there)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatBody(_Body):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None  # 0..20, with logprobs


# -- the server ------------------------------------------------------------------------------------
class Server:
    """Everything one ``softprompt serve`` process holds."""

    def __init__(self, base: BaseModel, registry: Registry, auth: Auth, limits: Limits | None = None,
                 max_batch: int = 16, max_queue: int = 64, prefix_cache: bool = True, cache_bytes: int = 512 << 20,
                 watch_interval: float | None = 1.0, max_batch_tokens: int = 512):
        self.base, self.registry, self.auth, self.limits = base, registry, auth, limits or Limits()
        self.metrics = Metrics()
        self.cache = PrefixCache(cache_bytes, enabled=prefix_cache)
        self.engine = Engine(base, self.cache, self.metrics, max_batch=max_batch, max_queue=max_queue,
                             max_batch_tokens=max_batch_tokens)
        registry.on_change = lambda name, old_hash: self.engine.forget(old_hash)
        self.watch_interval = watch_interval
        self.started = time.time()
        self.engine_thread = True  # False: the caller runs ``engine.run()`` itself (the CLI, in its main thread)

    def start(self) -> None:
        self.registry.scan()
        if self.engine_thread:
            self.engine.start()
        if self.watch_interval:
            self.registry.watch(self.watch_interval)

    def stop(self) -> None:
        self.registry.close()
        self.engine.stop()


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    """OpenAI-style message and ``param`` (e.g. ``messages.0.content``) for the first problem."""
    e = err.errors()[0]
    path = [str(x) for x in e.get("loc", ()) if not (isinstance(x, str) and (x in _TYPE_TAGS or "[" in x or "-" in x))]
    param = ".".join(path) or None
    if e.get("type") == "missing":
        return f"missing required field '{param}'", param
    return f"invalid value for '{param}': {e.get('msg', 'invalid value')}", param


async def _read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(400, f"request body is {declared} bytes; the limit is {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(400, f"request body is over the limit of {limit} bytes", code="body_too_large")
    if not body:
        raise APIError(400, "request body is empty; expected a JSON object")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    return data


def _parse(schema: type[Schema], data: dict):
    try:
        return schema.model_validate(data, strict=True)
    except ValidationError as e:
        msg, param = _validation_message(e)
        raise APIError(400, msg, param=param) from None


def create_app(server: Server) -> FastAPI:
    limits, registry, engine, base = server.limits, server.registry, server.engine, server.base
    tok = base.tokenizer

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="softprompt", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return APIError(400, str(exc.errors()[0].get("msg", "invalid request"))).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        server.metrics.request(request.url.path if request.url.path.startswith(("/v1/", "/health", "/metrics")) else "other",
                               response.status_code)
        return response

    # -- helpers -----------------------------------------------------------------------------------
    def tenant_of(request: Request) -> Tenant:
        tenant = server.auth.tenant(request.headers.get("authorization"))
        if tenant is None:
            has = bool(request.headers.get("authorization"))
            raise APIError(401, "Incorrect API key provided." if has else
                           "Missing API key: send 'Authorization: Bearer YOUR_KEY'.", "authentication_error",
                           code="invalid_api_key")
        return tenant

    def visible(tenant: Tenant) -> list[str]:
        names = [BASE_NAME] + registry.names()
        return [n for n in names if tenant.may_use(n)]

    async def resolve(tenant: Tenant, name: str) -> LoadedPrompt | None:
        not_found = APIError(404, f"The model '{name}' does not exist or you do not have access to it.",
                             param="model", code="model_not_found")
        if not tenant.may_use(name):
            raise not_found
        if name == BASE_NAME:
            return None
        lp = await asyncio.to_thread(registry.get, name)
        if lp is None:
            raise not_found
        return lp

    def sampling(body: _Body, max_tokens: int | None, prompt_len: int) -> SamplingParams:
        n = 1 if body.n is None else body.n
        if not 1 <= n <= limits.max_n:
            raise APIError(400, f"n must be between 1 and {limits.max_n} (got {n})", param="n")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1 (got {max_tokens})", param="max_tokens")
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                           param="max_tokens")
        if prompt_len > limits.max_input_tokens:
            raise APIError(400, f"the prompt is {prompt_len} tokens; this server allows at most {limits.max_input_tokens}",
                           param="messages" if isinstance(body, ChatBody) else "prompt", code="context_length_exceeded")
        room = base.max_positions - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt is {prompt_len} tokens, the model's window is {base.max_positions}",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(16 if isinstance(body, CompletionBody) else limits.max_tokens, room)
        elif prompt_len + max_tokens > base.max_positions:
            raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                           f"window of {base.max_positions} tokens", param="max_tokens", code="context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        if not 0 <= temperature <= 2:
            raise APIError(400, f"temperature must be between 0 and 2 (got {temperature})", param="temperature")
        top_p = 1.0 if body.top_p is None else body.top_p
        if not 0 < top_p <= 1:
            raise APIError(400, f"top_p must be in (0, 1] (got {top_p})", param="top_p")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > limits.max_stop or any(not s for s in stop):
            raise APIError(400, f"stop takes at most {limits.max_stop} non-empty strings", param="stop")
        return SamplingParams(max_tokens, temperature, top_p, body.seed, tuple(stop))

    def check_ids(ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        return ids

    async def run(request: Request, body: _Body, lp: LoadedPrompt | None, ids: list[int], params: SamplingParams,
                  chat: bool, logprobs: int | None = None):
        """Submit the request's ``n`` choices (one engine row each; a seeded request gives choice ``i``
        the seed ``seed + i``) and answer with one body or one event stream for all of them."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        n = body.n or 1
        reqs = [GenRequest(rid if n == 1 else f"{rid}-{i}", lp, ids,
                           replace(params, seed=None if params.seed is None else params.seed + i),
                           lambda ev, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, ev)), logprobs=logprobs)
                for i in range(n)]
        try:
            engine.submit_all(reqs)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        server.metrics.tokens_in += len(ids)
        created = int(time.time())

        def cancel() -> None:
            for r in reqs:
                engine.cancel(r.id)

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(queue, n, cancel, rid, body.model, created, chat, include_usage,
                                             None if logprobs is None else [TokenLog(tok, chat) for _ in range(n)]),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts: list[list[str]] = [[] for _ in range(n)]
        logs = [TokenLog(tok, chat) for _ in range(n)]
        done: dict[int, tuple] = {}
        try:
            while len(done) < n:
                try:
                    i, ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                if ev[0] == "delta":
                    parts[i].append(ev[1])
                elif ev[0] == "token":
                    logs[i].add(*ev[1:])
                elif ev[0] == "error":
                    cancel()
                    raise APIError(500, ev[1], "server_error")
                else:
                    done[i] = ev
        except asyncio.CancelledError:
            cancel()
            raise
        choices = []
        for i in range(n):
            text, reason = "".join(parts[i]), done[i][1]
            lps = logs[i].take() if logprobs is not None else None
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                            "logprobs": lps} if chat else
                           {"index": i, "text": text, "finish_reason": reason, "logprobs": lps})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": body.model, "choices": choices, "usage": _usage([done[i][2] for i in range(n)])}

    async def _stream(queue: asyncio.Queue, n: int, cancel, rid: str, model: str, created: int, chat: bool,
                      include_usage: bool, logs: list[TokenLog] | None = None):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i: int, delta: str | None, reason: str | None = None, first: bool = False) -> str:
            lps = logs[i].take() if logs is not None and not first else None  # the tokens behind this text
            if chat:
                d = ({"role": "assistant", "content": ""} if first else ({"content": delta} if delta is not None else {}))
                choice = {"index": i, "delta": d, "finish_reason": reason, "logprobs": lps}
            else:
                choice = {"index": i, "text": delta or "", "finish_reason": reason, "logprobs": lps}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                          "choices": [choice]}) + "\n\n"

        finished = False
        usages: dict[int, dict] = {}
        try:
            if chat:
                for i in range(n):
                    yield chunk(i, None, first=True)
            while len(usages) < n:
                i, ev = await queue.get()
                if ev[0] == "delta":
                    yield chunk(i, ev[1])
                elif ev[0] == "token":
                    if logs is not None:
                        logs[i].add(*ev[1:])
                elif ev[0] == "error":
                    finished = True
                    err = {"message": ev[1], "type": "server_error", "param": None, "code": None}
                    yield "data: " + json.dumps({"error": err}) + "\n\n"
                    break
                else:
                    _, reason, usages[i] = ev
                    yield chunk(i, None, reason)
            else:
                finished = True
                if include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                                 "choices": [], "usage": _usage([usages[i] for i in range(n)])}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away mid-stream (or a choice failed): free the batch slots
                cancel()

    # -- routes ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": base.name, "prompts": len(registry.names()), "queue": engine.queue_length,
                "batch": len(engine.rows), "uptime_s": round(time.time() - server.started, 1)}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.cache, registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        tenant = tenant_of(request)
        return {"object": "list", "data": [_model_card(n, server) for n in visible(tenant)]}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request):
        tenant = tenant_of(request)
        if name not in visible(tenant):
            raise APIError(404, f"The model '{name}' does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        return _model_card(name, server)

    @app.post("/v1/completions")
    async def completions(request: Request):
        tenant = tenant_of(request)
        body: CompletionBody = _parse(CompletionBody, await _read_json(request, limits.max_body_bytes))
        lp = await resolve(tenant, body.model)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "give one prompt per request (a string, or a list of one string)", param="prompt")
            prompt = prompt[0]
        if lp is None:
            ids = tok(prompt).input_ids
        else:
            try:
                ids = lp.fmt.prompt_ids(lp.example(prompt, body.fields))
            except SoftPromptError as e:
                raise APIError(400, f"{e} (send the template's other fields as 'fields')", param="fields") from None
        check_ids(ids, "prompt")
        params = sampling(body, body.max_tokens, len(ids))
        if body.logprobs is not None and not 0 <= body.logprobs <= 5:
            raise APIError(400, f"logprobs must be between 0 and 5 (got {body.logprobs})", param="logprobs")
        return await run(request, body, lp, ids, params, chat=False, logprobs=body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        tenant = tenant_of(request)
        body: ChatBody = _parse(ChatBody, await _read_json(request, limits.max_body_bytes))
        if not body.messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        lp = await resolve(tenant, body.model)
        users = [m for m in body.messages if m.role == "user"]
        if not users:
            raise APIError(400, "messages must contain a user message", param="messages")
        if lp is None:
            try:
                ids = chat_ids(tok, [m.turn() for m in body.messages])
            except SoftPromptError as e:
                raise APIError(400, str(e), param="messages") from None
        else:
            # The last message fills the prompt's template; earlier turns come before it, after the
            # format's own system prompt (a soft prompt's template is one user turn).
            last = body.messages[-1]
            if last.role != "user":
                raise APIError(400, f"the last message must be the user's (it fills prompt {body.model!r}'s template), "
                                    f"not {last.role!r}", param=f"messages.{len(body.messages) - 1}.role")
            history = [m.turn() for m in body.messages[:-1]]
            try:
                ids = lp.fmt.prompt_ids(lp.example(last.text()), history)
            except SoftPromptError as e:
                raise APIError(400, str(e), param="messages") from None
            except Exception as e:  # noqa: BLE001 - a chat template may refuse a conversation (jinja raise_exception)
                raise APIError(400, str(refusal(e)), param="messages") from None
        check_ids(ids, "messages")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        mt = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling(body, mt, len(ids))
        if body.top_logprobs is not None and not (body.logprobs and 0 <= body.top_logprobs <= 20):
            raise APIError(400, "top_logprobs must be between 0 and 20, with logprobs: true", param="top_logprobs")
        return await run(request, body, lp, ids, params, chat=True,
                         logprobs=(body.top_logprobs or 0) if body.logprobs else None)

    # -- admin -------------------------------------------------------------------------------------
    def admin_of(request: Request) -> Tenant:
        if not server.auth.enabled:
            raise APIError(403, "admin endpoints are disabled: start the server with --keys and an admin key",
                           "permission_error")
        tenant = tenant_of(request)
        if not tenant.admin:
            raise APIError(403, "this key may not administer prompts", "permission_error")
        return tenant

    @app.get("/admin/prompts")
    async def admin_list(request: Request):
        admin_of(request)
        return {"prompts": registry.status()}

    @app.put("/admin/prompts/{name}")
    async def admin_put(name: str, request: Request):
        admin_of(request)
        data = await _read_json(request, limits.max_admin_body_bytes)
        meta, tensors = data.get("meta"), data.get("tensors")
        if not isinstance(meta, dict):
            raise APIError(400, "'meta' must be the artifact's prompt.json as an object", param="meta")
        if not isinstance(tensors, str):
            raise APIError(400, "'tensors' must be prompt.safetensors, base64-encoded", param="tensors")
        try:
            raw = base64.b64decode(tensors, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "'tensors' is not valid base64", param="tensors") from None
        try:
            entry = await asyncio.to_thread(registry.install, name, meta, raw)
        except Exception as e:  # noqa: BLE001 - the reason goes back to the admin
            raise APIError(400, f"prompt {name!r} refused: {e}", param="meta") from None
        return {"name": name, "kind": entry.kind, "hash": entry.hash}

    @app.delete("/admin/prompts/{name}")
    async def admin_delete(name: str, request: Request):
        admin_of(request)
        if not await asyncio.to_thread(registry.remove, name):
            raise APIError(404, f"no prompt named {name!r}", param="name", code="model_not_found")
        return {"name": name, "deleted": True}

    @app.post("/admin/reload")
    async def admin_reload(request: Request):
        admin_of(request)
        await asyncio.to_thread(registry.scan)
        return {"prompts": registry.status()}

    return app


class TokenLog:
    """One choice's token logprobs, collected from the engine's ``("token", ...)`` events and handed
    out in OpenAI's shape: ``{"content": [...]}`` for chat, ``tokens``/``token_logprobs``/
    ``top_logprobs``/``text_offset`` for completions (offsets count from the completion's start)."""

    def __init__(self, tokenizer, chat: bool):
        self.tok, self.chat = tokenizer, chat
        self.pending: list[tuple[int, float, list]] = []
        self.offset = 0

    def add(self, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        self.pending.append((token, logprob, top))

    def take(self) -> dict | None:
        """The pending tokens' logprobs (None when there are none), and forget them."""
        if not self.pending:
            return None
        items, self.pending = self.pending, []
        text = lambda t: self.tok.decode([t])  # noqa: E731
        if self.chat:
            def entry(t: int, lp: float) -> dict:
                s = text(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]} for t, lp, top in items]}
        tokens = [text(t) for t, _, _ in items]
        offsets = []
        for s in tokens:
            offsets.append(self.offset)
            self.offset += len(s)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in items],
                "top_logprobs": [{text(a): b for a, b in top} for _, _, top in items], "text_offset": offsets}


def _usage(per_choice: list[dict]) -> dict:
    """OpenAI usage for a request's choices: the prompt counted once, the completions summed."""
    first = per_choice[0]
    completion = sum(u["completion_tokens"] for u in per_choice)
    return {"prompt_tokens": first["prompt_tokens"], "completion_tokens": completion,
            "total_tokens": first["prompt_tokens"] + completion,
            "prompt_tokens_details": {"cached_tokens": first["cached_tokens"]}}


def _model_card(name: str, server: Server) -> dict:
    return {"id": name, "object": "model", "created": int(server.started), "owned_by": "softprompt"}
