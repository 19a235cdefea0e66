"""Request bodies and their validation: JSON read under a size limit, parsed strictly into the
schemas below, checked against the server's limits and the model's window, and turned into the
engine's requests. Every refusal is an :class:`APIError` (400 unless said otherwise)."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Callable, Literal

from fastapi import Request
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, ValidationError

from softprompt.generate import SamplingParams
from softprompt.serve.engine import Request as GenRequest
from softprompt.serve.errors import APIError
from softprompt.serve.registry import LoadedPrompt


@dataclass
class Limits:
    max_tokens: int = 512  # cap on a request's max_tokens
    max_input_tokens: int = 2048  # cap on a request's prompt length in tokens
    max_body_bytes: int = 1 << 20  # cap on a generation request's body
    max_admin_body_bytes: int = 64 << 20  # cap on an admin upload
    max_stop: int = 4
    max_stop_chars: int = 128  # cap on the length of each stop string
    max_n: int = 16  # cap on choices per request (each is a row of its own)
    max_json_depth: int = 16  # cap on the nesting of a request body
    tenant_max_queued: int | None = None  # default per-tenant cap on waiting rows (keys.yaml: max_queued)
    tenant_max_running: int | None = None  # default per-tenant cap on running rows (keys.yaml: max_running)
    max_queue_wait: float | None = 60.0  # seconds a row may wait for a batch slot before its request gets 429 (None: no cap)
    max_context_tokens: int = 2048  # cap on a request's (or an admin's) context, in tokens (with --compressor)


SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed's range (a choice's seed is seed + i)

# OpenAI request fields this server does not implement, each with its neutral values: refused with a
# 400 naming them unless they carry one of those (what clients send by default), so a client never
# believes they applied. ``user`` is an identifier for abuse monitoring, with no effect on the output.
UNSUPPORTED: dict[str, tuple] = {
    "logit_bias": (None, {}), "best_of": (None, 1), "echo": (None, False),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
    "suffix": (None, ""), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"), "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "reasoning_effort": (None,), "web_search_options": (None,), "service_tier": (None, "auto", "default"),
    "store": (None, False), "metadata": (None, {}),
}
IGNORED = ("user",)


def _neutral(key: str, value) -> bool:
    return any(type(value) is type(v) and value == v for v in UNSUPPORTED[key])


# -- request bodies --------------------------------------------------------------------------------
CONTEXT_FIELD = Field(None, description=(
    "softprompt extension, on a server started with --compressor: a context (a document, a long system prompt) "
    "compressed by the amortized compressor in one forward into this request's prompt, in place of a named prompt "
    "('model' is then 'base' or the compressor's name); cached by its content hash. The OpenAI client sends it with "
    "extra_body={'context': ...}."))


class ContextBody(Schema):
    """``PUT /admin/contexts/{name}``: a context to compress and install as prompt ``name``."""

    model_config = ConfigDict(extra="forbid")
    context: str = Field(description="the context to compress (one forward of the server's --compressor)")


class Body(Schema):
    model_config = ConfigDict(extra="allow")  # unknown fields are refused by name in :func:`parse`

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    n: int | None = 1
    stream_options: dict | None = None


class CompletionBody(Body):
    prompt: str | list[str]
    logprobs: int | None = None  # top alternatives per token (0..5); 0: the chosen token's only
    fields: dict[str, str] | None = None  # extension: values for the template's other fields
    context: str | None = CONTEXT_FIELD  # extension (--compressor): compressed into the request's prompt


class TextPart(Schema):
    type: Literal["text"]
    text: str


class Message(Schema):
    model_config = ConfigDict(extra="allow")  # unknown fields are refused unless null (see :func:`parse`)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def turn(self) -> dict:
        """The message as a chat-template turn (``developer`` is the system role there)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatBody(Body):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None  # 0..20, with logprobs
    context: str | None = CONTEXT_FIELD  # extension (--compressor): compressed into the request's prompt


def openapi_body(schema: type[Schema]) -> dict:
    """``openapi_extra`` for a route that reads ``schema`` itself (under the size and depth limits): the
    request body in the OpenAPI document, definitions inlined, unknown fields not allowed (they are
    refused, except neutral values of the ``UNSUPPORTED`` ones)."""
    doc = schema.model_json_schema()
    defs = doc.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            out = {k: inline(v) for k, v in node.items()}
            if out.get("type") == "object" and "properties" in out:
                out["additionalProperties"] = False
            return out
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(doc)}}}}


# -- reading and parsing ---------------------------------------------------------------------------
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    """OpenAI-style message and ``param`` (e.g. ``messages.0.content``) for the first problem."""
    e = err.errors()[0]
    path = [str(x) for x in e.get("loc", ()) if not (isinstance(x, str) and (x in _TYPE_TAGS or "[" in x or "-" in x))]
    param = ".".join(path) or None
    if e.get("type") == "missing":
        return f"missing required field '{param}'", param
    return f"invalid value for '{param}': {e.get('msg', 'invalid value')}", param


async def read_json(request: Request, limit: int) -> dict:
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
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    return data


def check_depth(data: dict, limit: int) -> None:
    """Refuse a body nested deeper than ``limit`` levels (the body itself is level 1), naming the
    top-level field that holds the deepest nesting. Iterative: a deep body cannot exhaust the stack."""
    stack = [(v, 2, k) for k, v in data.items()]
    while stack:
        value, depth, top = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                raise APIError(400, f"'{top}' is nested more than {limit} levels deep", param=str(top),
                               code="invalid_json")
            stack.extend((v, depth + 1, top) for v in (value.values() if isinstance(value, dict) else value))


def _refuse_unknown(schema: type[Schema], data: dict, where: str = "") -> None:
    for key, value in data.items():
        if key in schema.model_fields or key in IGNORED:
            continue
        if key in UNSUPPORTED:
            if not _neutral(key, value):
                raise APIError(400, f"'{where}{key}' is not supported by this server", param=f"{where}{key}",
                               code="unsupported_parameter")
            continue
        raise APIError(400, f"unknown field '{where}{key}'", param=f"{where}{key}", code="unknown_parameter")


def parse(schema: type[Schema], data: dict, max_depth: int = 16):
    """``data`` as ``schema``: nesting at most ``max_depth`` deep, strict types, and no field the
    schema does not know unless it carries its neutral value (``UNSUPPORTED``) or is ``user``."""
    check_depth(data, max_depth)
    _refuse_unknown(schema, data)
    messages = data.get("messages")
    if isinstance(messages, list):
        for i, m in enumerate(messages):
            if isinstance(m, dict):
                for key, value in m.items():
                    if key not in Message.model_fields and value not in (None, [], ""):
                        raise APIError(400, f"'messages.{i}.{key}' is not supported by this server",
                                       param=f"messages.{i}.{key}", code="unsupported_parameter")
    options = data.get("stream_options")
    if isinstance(options, dict):
        for key in options:
            if key != "include_usage":
                raise APIError(400, f"unknown field 'stream_options.{key}'", param=f"stream_options.{key}",
                               code="unknown_parameter")
    try:
        return schema.model_validate(data, strict=True)
    except ValidationError as e:
        msg, param = validation_message(e)
        raise APIError(400, msg, param=param) from None


# -- checks ----------------------------------------------------------------------------------------
def check_ids(ids: list[int], param: str) -> list[int]:
    if not ids:
        raise APIError(400, "the prompt is empty", param=param)
    return ids


def sampling_params(body: Body, max_tokens: int | None, prompt_len: int, limits: Limits,
                    max_positions: int) -> SamplingParams:
    """The request's sampling parameters, checked against ``limits`` and the model's window of
    ``max_positions``; ``max_tokens`` defaults to 16 for completions, to the cap for chat, and never
    past the window."""
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
    room = max_positions - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt is {prompt_len} tokens, the model's window is {max_positions}",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(16 if isinstance(body, CompletionBody) else limits.max_tokens, room)
    elif prompt_len + max_tokens > max_positions:
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                       f"window of {max_positions} tokens", param="max_tokens", code="context_length_exceeded")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2 (got {temperature})", param="temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1] (got {top_p})", param="top_p")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > limits.max_stop or any(not s for s in stop):
        raise APIError(400, f"stop takes at most {limits.max_stop} non-empty strings", param="stop")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise APIError(400, f"each stop string may be at most {limits.max_stop_chars} characters", param="stop")
    if body.seed is not None and not 0 <= body.seed <= SEED_MAX - (n - 1):
        raise APIError(400, f"seed must be between 0 and {SEED_MAX - (n - 1)} (2^63 - n; choice i uses seed + i)",
                       param="seed")
    return SamplingParams(max_tokens, temperature, top_p, body.seed, tuple(stop))


def engine_requests(rid: str, n: int, lp: LoadedPrompt | None, ids: list[int], params: SamplingParams,
                    emit: Callable[[int, tuple], None], logprobs: int | None = None, tenant: str = "",
                    max_queued: int | None = None, max_running: int | None = None,
                    max_wait: float | None = None) -> list[GenRequest]:
    """One engine row per choice: choice ``i`` is ``rid-i`` (``rid`` alone when ``n`` is 1), with the
    seed ``seed + i`` when the request is seeded; its events go to ``emit(i, event)``; every row
    carries the tenant and its caps, and the longest it may wait for a slot."""
    return [GenRequest(rid if n == 1 else f"{rid}-{i}", lp, ids,
                       replace(params, seed=None if params.seed is None else params.seed + i),
                       lambda ev, i=i: emit(i, ev), logprobs=logprobs, tenant=tenant, max_queued=max_queued,
                       max_running=max_running, max_wait=max_wait)
            for i in range(n)]
