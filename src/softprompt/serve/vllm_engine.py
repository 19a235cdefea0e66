"""``softprompt serve --engine vllm``: the same API, with generation forwarded to vLLM servers.

Each request becomes *prompt embeddings*: the token ids the prompt's format renders (slot markers
included) are embedded with the base model's input-embedding matrix (:mod:`softprompt.serve.embed_only`,
the gateway never loads the layers), the soft rows are scattered in from the prompt's vectors, the
result is cast to the upstream's dtype and sent as ``prompt_embeds`` (base64 of a ``torch.save``d
``[seq, hidden]`` tensor) to ``/v1/completions`` of a vLLM server started with
``--enable-prompt-embeds``. The same prompt always yields the same bytes, so vLLM's prefix cache
(which keys blocks on a hash of the embeddings) hits across requests.

Upstreams are chosen least-loaded (fewest requests in flight; ties go round-robin) among those whose
``/health`` answered at the last check. A request that fails to reach an upstream, or gets a 5xx or
a broken stream before any text was sent to the client, is retried on the next upstream; one that
already streamed text to its client fails with an error (its text cannot be taken back).

The engine has the interface the routes use (:class:`softprompt.serve.engine.Engine`'s ``submit_all``,
``cancel``, ``queue_length``, ``rows``, ``start``, ``stop``, ``run``, ``forget``) and emits the same
events, so keys and tenants, the registry and hot reload, ``n``, streaming and metrics are unchanged.
"""
from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from softprompt.errors import SoftPromptError
from softprompt.serve.engine import QueueFull, QueueTimeout, Request, Unsupported
from softprompt.serve.metrics import Metrics

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UpstreamError(Exception):
    """An upstream failed; ``retryable`` when the request may go to another one."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Upstream:
    url: str
    healthy: bool = True  # optimistic until the first check says otherwise
    inflight: int = 0
    requests: int = 0
    failures: int = 0
    model: str | None = None  # the served model's id, from /v1/models
    max_model_len: int | None = None
    last_error: str | None = None


@dataclass
class _Flight:
    req: Request
    task: asyncio.Task | None = None
    sent_text: bool = False
    started: float = field(default_factory=time.monotonic)


def convert_command(name: str) -> str:
    """The command, run in the prompts directory, that distills prompt ``name`` into ``NAME-pt``, which
    the gateway then serves (hot reload)."""
    return f"softprompt convert {name} --to prompt-tuning --out {name}-pt"


def refusal(name: str, kind: str) -> str:
    return (f"prompt {name!r} is {kind}, whose per-layer keys/values vLLM cannot take as input embeddings; "
            f"serve it with --engine native, or distill it into an input-level prompt: in the prompts directory run "
            f"`{convert_command(name)}`, then use model {name + '-pt'!r}")


def encode_embeds(tensor: torch.Tensor) -> str:
    """``prompt_embeds`` as vLLM reads it: base64 of a ``torch.save``d tensor."""
    buf = io.BytesIO()
    torch.save(tensor.contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class VLLMEngine:
    """Forwards requests to vLLM servers as prompt embeddings (see the module's docstring)."""

    def __init__(self, base, upstreams: list[str], metrics: Metrics | None = None, dtype: str = "auto",
                 max_inflight: int = 64, max_queue: int = 64, health_interval: float = 2.0, timeout: float = 600.0,
                 policy: str = "least-loaded", max_tokens_default: int | None = None):
        if not upstreams:
            raise SoftPromptError("--engine vllm needs at least one --upstream URL (a vLLM server started with "
                                  "--enable-prompt-embeds; see scripts/serve_vllm.sh)")
        if policy not in ("least-loaded", "round-robin"):
            raise SoftPromptError(f"unknown upstream policy {policy!r} (least-loaded or round-robin)")
        name = base.dtype_name if dtype == "auto" else dtype
        if name not in DTYPES:
            raise SoftPromptError(f"upstream dtype {name!r}: choose from {', '.join(DTYPES)}")
        self.base, self.tok = base, base.tokenizer
        self.eos = set(base.eos_ids())
        self.dtype = DTYPES[name]
        self.upstreams = [Upstream(u.rstrip("/")) for u in upstreams]
        self.metrics = metrics or Metrics()
        self.max_inflight, self.max_queue = max_inflight, max_queue
        self.health_interval, self.timeout, self.policy = health_interval, timeout, policy
        self._rr = itertools.count()
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._sem: asyncio.Semaphore | None = None
        self._client = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failovers = 0
        self.joins = self.cancelled_rows = 0
        self.metrics.extra.append(self._render_metrics)

    # -- client side (any thread) ------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        self.submit_all([req])

    def submit_all(self, reqs: list[Request]) -> None:
        for r in reqs:
            lp = r.prompt
            if lp is not None and not lp.prompt.input_level:
                raise Unsupported(refusal(lp.name, lp.artifact.kind))
        with self._lock:
            if len(self._flights) + len(reqs) > self.max_inflight + self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            flights = [_Flight(r) for r in reqs]
            for f in flights:
                self._flights[f.req.id] = f
        for f in flights:
            self.loop.call_soon_threadsafe(self._launch, f)

    def cancel(self, req_id: str) -> None:
        with self._lock:
            f = self._flights.get(req_id)
        if f is not None:
            self.loop.call_soon_threadsafe(lambda: f.task.cancel() if f.task is not None else None)

    @property
    def rows(self) -> list:
        with self._lock:
            return list(self._flights.values())

    @property
    def queue_length(self) -> int:
        with self._lock:
            return max(0, len(self._flights) - self.max_inflight)

    def forget(self, prompt_hash: str) -> None:
        """Nothing to drop here: vLLM's prefix cache keys on the embeddings, so a changed prompt never hits."""

    def start(self) -> "VLLMEngine":
        self._thread = threading.Thread(target=self.run, name="softprompt-vllm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def run(self, should_stop: Callable[[], bool] | None = None) -> None:
        """The event loop in the calling thread, until :meth:`stop` (or ``should_stop()``)."""
        import httpx

        asyncio.set_event_loop(self.loop)
        self._sem = asyncio.Semaphore(self.max_inflight)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=5.0),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.loop.run_until_complete(self.check_health())
        health = self.loop.create_task(self._health_loop())
        if should_stop is not None:
            async def watch() -> None:
                while not should_stop() and not self._stopping:
                    await asyncio.sleep(0.25)
                self.loop.stop()
            self.loop.create_task(watch())
        try:
            self.loop.run_forever()
        finally:
            health.cancel()
            for f in self.rows:
                if f.task is not None:
                    f.task.cancel()
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self._client.aclose())

    # -- health ------------------------------------------------------------------------------------
    async def check_health(self) -> None:
        await asyncio.gather(*(self._check(u) for u in self.upstreams))
        lens = [u.max_model_len for u in self.upstreams if u.max_model_len]
        if lens:
            self.base.window = min(min(lens), int(self.base.config.get("max_position_embeddings") or min(lens)))

    async def _check(self, u: Upstream) -> None:
        try:
            r = await self._client.get(u.url + "/health", timeout=5.0)
            ok = r.status_code == 200
            if ok and u.model is None:
                models = (await self._client.get(u.url + "/v1/models", timeout=5.0)).json()["data"]
                u.model, u.max_model_len = models[0]["id"], models[0].get("max_model_len")
            if ok != u.healthy:
                log.warning("upstream %s is %s", u.url, "up" if ok else f"down (/health answered {r.status_code})")
            u.healthy = ok
        except Exception as e:  # noqa: BLE001 - any failure means down
            if u.healthy:
                log.warning("upstream %s is down: %s", u.url, e)
            u.healthy, u.last_error = False, str(e)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            await self.check_health()

    def pick(self, exclude: set[str]) -> Upstream | None:
        """Least-loaded (or round-robin) among healthy upstreams not yet tried; unhealthy ones last."""
        candidates = [u for u in self.upstreams if u.url not in exclude]
        if not candidates:
            return None
        healthy = [u for u in candidates if u.healthy] or candidates
        turn = next(self._rr)
        if self.policy == "round-robin":
            return healthy[turn % len(healthy)]
        least = min(u.inflight for u in healthy)
        tied = [u for u in healthy if u.inflight == least]
        return tied[turn % len(tied)]

    # -- one request -------------------------------------------------------------------------------
    def prompt_embeds(self, req: Request) -> torch.Tensor:
        """``[seq, hidden]`` in the upstream's dtype: the text embedded, the soft rows from the prompt."""
        ids = torch.tensor([req.ids])
        with torch.no_grad():
            embeds = req.soft_prompt.embed(self.base.embedding, ids)[0]
        return embeds.to(self.dtype).contiguous()

    def body(self, req: Request, model: str | None) -> dict:
        p = req.params
        body = {"model": model, "prompt_embeds": encode_embeds(self.prompt_embeds(req)), "max_tokens": p.max_new_tokens,
                "temperature": p.temperature, "top_p": p.top_p, "stream": True,
                "stream_options": {"include_usage": True}, "return_token_ids": True}
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if req.logprobs is not None:
            body["logprobs"] = req.logprobs
            body["return_tokens_as_token_ids"] = True
        return body  # no "prompt" field: vLLM would take "" as a second, empty prompt

    def _launch(self, f: _Flight) -> None:
        f.task = self.loop.create_task(self._serve(f))

    async def _serve(self, f: _Flight) -> None:
        req = f.req
        try:
            wait = req.max_wait - (time.monotonic() - req.created) if req.max_wait is not None else None
            try:
                await asyncio.wait_for(self._sem.acquire(), wait)
            except asyncio.TimeoutError:
                self.metrics.queue_timeouts += 1
                req.emit(("error", f"waited {req.max_wait:g} s for an upstream slot; the server is busy, retry later",
                          QueueTimeout.code))
                return
            try:
                await self._forward(f)
            finally:
                self._sem.release()
        except asyncio.CancelledError:
            self.cancelled_rows += 1
        except UpstreamError as e:
            req.emit(("error", str(e)))
        except Exception as e:  # noqa: BLE001 - one bad request never stops the gateway
            log.exception("request %s failed", req.id)
            req.emit(("error", f"internal error: {type(e).__name__}: {e}"))
        finally:
            with self._lock:
                self._flights.pop(req.id, None)

    async def _forward(self, f: _Flight) -> None:
        tried: set[str] = set()
        body = None
        last = "no upstream configured"
        while True:
            u = self.pick(tried)
            if u is None:
                raise UpstreamError(f"no vLLM upstream could serve the request (last error: {last})", False)
            tried.add(u.url)
            if body is None or body["model"] != u.model:
                body = await asyncio.to_thread(self.body, f.req, u.model)
            u.inflight += 1
            u.requests += 1
            try:
                await self._stream(u, body, f)
                return
            except UpstreamError as e:
                u.failures += 1
                last = str(e)
                if not e.retryable or f.sent_text:
                    raise
                self.failovers += 1
                log.warning("upstream %s failed (%s); retrying %s elsewhere", u.url, e, f.req.id)
            finally:
                u.inflight -= 1

    async def _stream(self, u: Upstream, body: dict, f: _Flight) -> None:
        import httpx

        req = f.req
        completion = 0
        reason = None
        cached = 0
        try:
            async with self._client.stream("POST", u.url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode("utf-8", "replace")
                    try:
                        text = json.loads(text)["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        pass
                    if r.status_code >= 500:
                        u.healthy = False
                    raise UpstreamError(f"vLLM at {u.url} answered {r.status_code}: {text}", r.status_code >= 500)
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        raise UpstreamError(f"vLLM at {u.url}: {ev['error'].get('message', ev['error'])}", not f.sent_text)
                    if ev.get("usage"):
                        completion = ev["usage"].get("completion_tokens", completion)
                        cached = ((ev["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                    for ch in ev.get("choices") or []:
                        self._tokens(req, ch)
                        if ch.get("text"):
                            f.sent_text = True
                            req.emit(("delta", ch["text"]))
                        n = len(ch.get("token_ids") or [])
                        if n:
                            self.metrics.tokens(n)
                        if ch.get("finish_reason"):
                            reason = ch["finish_reason"]
        except (httpx.TransportError, httpx.StreamError) as e:
            u.healthy = False
            raise UpstreamError(f"vLLM at {u.url} unreachable or stream broken: {type(e).__name__}: {e}", True) from None
        if reason is None:
            raise UpstreamError(f"vLLM at {u.url} ended the stream without a finish reason", not f.sent_text)
        usage = {"prompt_tokens": len(req.ids), "completion_tokens": completion, "total_tokens": len(req.ids) + completion,
                 "cached_tokens": cached}
        req.emit(("done", reason, usage))

    def _tokens(self, req: Request, choice: dict) -> None:
        """Logprobs in the engine's ``("token", id, logprob, top)`` events (tokens come as ``token_id:N``); the
        end-of-sequence token vLLM reports at a stop gets none, as in our engine (its text is not output)."""
        lp = choice.get("logprobs")
        if req.logprobs is None or not lp:
            return

        def tid(s: str) -> int:
            return int(s.split(":", 1)[1]) if s.startswith("token_id:") else self.tok.convert_tokens_to_ids(s)

        tops = lp.get("top_logprobs") or [None] * len(lp.get("tokens") or [])
        for t, val, top in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [], tops):
            token = tid(t)
            if token in self.eos:
                continue
            alts = sorted(((tid(k), v) for k, v in (top or {}).items()), key=lambda x: -x[1])[:req.logprobs]
            req.emit(("token", token, float(val), alts))

    def _render_metrics(self) -> list[str]:
        lines: list[str] = []
        for name, kind, help_, value in [
                ("up", "gauge", "vLLM upstream answered /health at the last check", lambda u: int(u.healthy)),
                ("inflight", "gauge", "requests in flight per vLLM upstream", lambda u: u.inflight),
                ("requests_total", "counter", "requests sent per vLLM upstream", lambda u: u.requests),
                ("failures_total", "counter", "failed attempts per vLLM upstream", lambda u: u.failures)]:
            lines += [f"# HELP softprompt_upstream_{name} {help_}", f"# TYPE softprompt_upstream_{name} {kind}"]
            lines += [f'softprompt_upstream_{name}{{url="{u.url}"}} {value(u)}' for u in self.upstreams]
        lines += ["# HELP softprompt_upstream_failovers_total requests retried on another upstream",
                  "# TYPE softprompt_upstream_failovers_total counter", f"softprompt_upstream_failovers_total {self.failovers}"]
        return lines
