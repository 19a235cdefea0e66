"""The OpenAI-compatible API: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``,
where ``model`` names a prompt (``base``: the bare model) the request's key may use."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from softprompt.chat import chat_ids, refusal
from softprompt.errors import SoftPromptError
from softprompt.generate import SamplingParams
from softprompt.serve.auth import Tenant
from softprompt.serve.engine import QueueFull, QueueTimeout, Unsupported
from softprompt.serve.errors import APIError, model_not_found
from softprompt.serve.registry import BASE_NAME, LoadedPrompt
from softprompt.serve.routes.deps import ServerDep, TenantDep, link
from softprompt.serve.schemas import Body, ChatBody, CompletionBody, check_ids, engine_requests, openapi_body, parse, read_json, sampling_params
from softprompt.serve.server import Server
from softprompt.serve.streaming import TokenLog, event_stream, usage

router = APIRouter(prefix="/v1")
log = logging.getLogger(__name__)


def visible(server: Server, tenant: Tenant) -> list[str]:
    names = [BASE_NAME] + server.registry.names()
    return [n for n in names if tenant.may_use(n)]


async def resolve(server: Server, tenant: Tenant, name: str) -> LoadedPrompt | None:
    """The prompt ``name`` names (None for the bare model); 404 alike whether it is missing or not
    the tenant's."""
    if not tenant.may_use(name):
        raise model_not_found(name)
    if name == BASE_NAME:
        return None
    lp = await asyncio.to_thread(server.registry.get, name)
    if lp is None:
        raise model_not_found(name)
    return lp


async def context_prompt(server: Server, tenant: Tenant, body: Body) -> LoadedPrompt:
    """The prompt compressed from the request's ``context`` (``--compressor``): from the cache, or one
    forward of the compressor in the engine's thread. 400 naming the field for a server without a
    compressor, a ``model`` that names a prompt, or a context the compressor cannot take."""
    from softprompt.serve.from_context import ContextError

    ctx = server.contexts
    if ctx is None:
        await resolve(server, tenant, body.model)  # an unknown model is 404 first, as without a context
        raise APIError(400, "this server has no compressor, so it takes no 'context': start softprompt serve with "
                            "--compressor DIR (or send a named prompt in 'model')", param="context", code="no_compressor")
    if body.model not in (BASE_NAME, ctx.name):
        raise APIError(400, f"'context' is compressed into the request's prompt, so 'model' must be {BASE_NAME!r} or the "
                            f"compressor's name {ctx.name!r}, not {body.model!r}: a context cannot be combined with another "
                            "prompt", param="model", code="context_conflict")
    if not tenant.may_use(BASE_NAME):
        raise model_not_found(body.model)
    try:
        ctx.check(body.context)
        lp, _ = await ctx.prompt_for(body.context, server.engine.call)
    except ContextError as e:
        raise APIError(400, str(e), param="context", code="invalid_context") from None
    except SoftPromptError as e:  # the server is stopping
        raise APIError(503, f"the context could not be compressed: {e}", "server_error", param="context") from None
    except Exception as e:  # noqa: BLE001 - a failure of this request's compression is this request's alone
        log.exception("compressing a context failed")
        raise APIError(500, f"compressing the context failed: {type(e).__name__}", "server_error", param="context") from None
    return lp


def _model_card(name: str, server: Server) -> dict:
    return {"id": name, "object": "model", "created": int(server.started), "owned_by": "softprompt"}


RETRY_AFTER_S = 1  # what a 429 tells the client to wait: rows finish and leave the batch every step


def _requeue_first(queue: asyncio.Queue, first: tuple) -> None:
    """Put ``first`` back at the head of ``queue`` (events that arrived after it stay in order)."""
    rest = []
    while not queue.empty():
        rest.append(queue.get_nowait())
    for item in [first, *rest]:
        queue.put_nowait(item)


async def respond(server: Server, request: Request, tenant: Tenant, body: Body, lp: LoadedPrompt | None,
                  ids: list[int], params: SamplingParams, chat: bool, logprobs: int | None = None):
    """Submit the request's ``n`` choices (one engine row each; a seeded request gives choice ``i``
    the seed ``seed + i``) under the tenant's caps, and answer with one body or one event stream
    for all of them. A full queue, the tenant's full share of it, or a wait for a batch slot longer
    than ``limits.max_queue_wait`` answers 429 with Retry-After; so that a stream can answer it too,
    a stream's headers go out with its first event."""
    engine, tok = server.engine, server.base.tokenizer
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    n = body.n or 1
    max_queued = tenant.max_queued if tenant.max_queued is not None else server.limits.tenant_max_queued
    max_running = tenant.max_running if tenant.max_running is not None else server.limits.tenant_max_running
    if max_queued is not None and n > max_queued:
        raise APIError(400, f"n is {n}; this key may have at most {max_queued} rows waiting", param="n")
    reqs = engine_requests(rid, n, lp, ids, params, lambda i, ev: loop.call_soon_threadsafe(queue.put_nowait, (i, ev)),
                           logprobs=logprobs, tenant=tenant.name, max_queued=max_queued, max_running=max_running,
                           max_wait=server.limits.max_queue_wait)
    try:
        engine.submit_all(reqs)
    except QueueFull as e:
        raise APIError(429, str(e), "rate_limit_error", code=e.code, headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except Unsupported as e:
        raise APIError(400, str(e), param="model", code="unsupported_prompt_kind") from None
    server.metrics.tokens_in += len(ids)
    created = int(time.time())

    def cancel() -> None:
        for r in reqs:
            engine.cancel(r.id)

    async def next_event() -> tuple[int, tuple] | None:
        """The next engine event; None when the client went away (its rows are cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    cancel()
                    return None

    def failure(ev: tuple) -> APIError:
        cancel()
        if len(ev) > 2 and ev[2] == QueueTimeout.code:
            return APIError(429, ev[1], "rate_limit_error", code=QueueTimeout.code, headers={"Retry-After": str(RETRY_AFTER_S)})
        return APIError(500, ev[1], "server_error")

    if body.stream:
        try:
            first = await next_event()
        except asyncio.CancelledError:
            cancel()
            raise
        if first is None:
            return JSONResponse({}, status_code=499)
        if first[1][0] == "error":
            raise failure(first[1])
        _requeue_first(queue, first)
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(event_stream(queue, n, cancel, rid, body.model, created, chat, include_usage,
                                              None if logprobs is None else [TokenLog(tok, chat) for _ in range(n)]),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    parts: list[list[str]] = [[] for _ in range(n)]
    logs = [TokenLog(tok, chat) for _ in range(n)]
    done: dict[int, tuple] = {}
    try:
        while len(done) < n:
            got = await next_event()
            if got is None:
                return JSONResponse({}, status_code=499)
            i, ev = got
            if ev[0] == "delta":
                parts[i].append(ev[1])
            elif ev[0] == "token":
                logs[i].add(*ev[1:])
            elif ev[0] == "error":
                raise failure(ev)
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
            "model": body.model, "choices": choices, "usage": usage([done[i][2] for i in range(n)])}


MODELS_LINKS = {200: {"description": "the models (prompts) this key may use", "links": {
    "GetModel": link("/v1/models/{name}", "get", "one model's card", {"name": "$response.body#/data/0/id"}),
    "GetPrompt": link("/v1/prompts/{name}/details", "get", "the prompt behind a model", {"name": "$response.body#/data/1/id"}),
    "Complete": link("/v1/completions", "post", "a completion with the first model",
                     body={"model": "$response.body#/data/1/id", "prompt": "hello", "max_tokens": 4}),
    "Chat": link("/v1/chat/completions", "post", "a chat completion with the first model",
                 body={"model": "$response.body#/data/1/id", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
}}}


@router.get("/models", responses=MODELS_LINKS)
async def models(server: ServerDep, tenant: TenantDep):
    return {"object": "list", "data": [_model_card(n, server) for n in visible(server, tenant)]}


@router.get("/models/{name}")
async def model(name: str, server: ServerDep, tenant: TenantDep):
    if name not in visible(server, tenant):
        raise model_not_found(name)
    return _model_card(name, server)


@router.post("/completions", openapi_extra=openapi_body(CompletionBody))
async def completions(request: Request, server: ServerDep, tenant: TenantDep):
    limits = server.limits
    body: CompletionBody = parse(CompletionBody, await read_json(request, limits.max_body_bytes), limits.max_json_depth)
    lp = await (resolve(server, tenant, body.model) if body.context is None else context_prompt(server, tenant, body))
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "give one prompt per request (a string, or a list of one string)", param="prompt")
        prompt = prompt[0]
    if lp is None:
        ids = server.base.tokenizer(prompt).input_ids
    else:
        try:
            ids = lp.fmt.prompt_ids(lp.example(prompt, body.fields))
        except SoftPromptError as e:
            raise APIError(400, f"{e} (send the template's other fields as 'fields')", param="fields") from None
    check_ids(ids, "prompt")
    params = sampling_params(body, body.max_tokens, len(ids), limits, server.base.max_positions)
    if body.logprobs is not None and not 0 <= body.logprobs <= 5:
        raise APIError(400, f"logprobs must be between 0 and 5 (got {body.logprobs})", param="logprobs")
    return await respond(server, request, tenant, body, lp, ids, params, chat=False, logprobs=body.logprobs)


@router.post("/chat/completions", openapi_extra=openapi_body(ChatBody))
async def chat_completions(request: Request, server: ServerDep, tenant: TenantDep):
    limits = server.limits
    body: ChatBody = parse(ChatBody, await read_json(request, limits.max_body_bytes), limits.max_json_depth)
    if not body.messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    lp = await (resolve(server, tenant, body.model) if body.context is None else context_prompt(server, tenant, body))
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise APIError(400, "messages must contain a user message", param="messages")
    if lp is None:
        try:
            ids = chat_ids(server.base.tokenizer, [m.turn() for m in body.messages])
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
    params = sampling_params(body, mt, len(ids), limits, server.base.max_positions)
    if body.top_logprobs is not None and not (body.logprobs and 0 <= body.top_logprobs <= 20):
        raise APIError(400, "top_logprobs must be between 0 and 20, with logprobs: true", param="top_logprobs")
    return await respond(server, request, tenant, body, lp, ids, params, chat=True,
                         logprobs=(body.top_logprobs or 0) if body.logprobs else None)
