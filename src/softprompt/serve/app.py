"""The server's composition: :func:`build_server` loads the base model and builds the registry,
tenants, limits, metrics and engine; :func:`create_app` wraps a :class:`Server` in the FastAPI app
(error handlers in OpenAI's shape, request counting, the routers); :func:`serve_forever` runs it
the way ``softprompt serve`` does. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt import __version__
from softprompt.serve.auth import Auth
from softprompt.serve.errors import APIError
from softprompt.serve.registry import Registry
from softprompt.serve.routes import ROUTERS
from softprompt.serve.schemas import Limits
from softprompt.serve.server import Server

log = logging.getLogger(__name__)


def build_server(model: str, prompts: str | Path, *, device: str | None = None, keys: str | Path | None = None,
                 precision: str = "auto", pack_weights: bool = True, prompt_memory_bytes: int = 256 << 20,
                 limits: Limits | None = None, max_batch: int = 16, max_batch_tokens: int = 512, max_queue: int = 64,
                 prefix_cache: bool = True, cache_bytes: int = 512 << 20,
                 watch_interval: float | None = 1.0, compressor: str | Path | None = None,
                 context_cache: int = 64, decode: str = "eager") -> Server:
    """A :class:`Server` for the prompt artifacts under ``prompts`` on ``model`` (tenants from the
    ``keys`` file; without one the API is open). With ``compressor`` (an amortized compressor for
    this base, fingerprint-checked) requests may carry a ``context``, and ``PUT /admin/contexts/{name}``
    registers one (softprompt.serve.from_context); ``context_cache`` compressed contexts are kept
    (LRU by content hash). The keys file is read before the model is loaded;
    ``precision`` (auto | fp32 | bf16, see softprompt.precision) resolved to bf16 converts the weights once; with ``pack_weights`` the linear
    layers are prepacked for oneDNN (CPU only)."""
    import torch

    from softprompt.base_model import default_device, load_base

    auth = Auth.from_file(keys) if keys else Auth()
    from softprompt.precision import resolve_precision

    bf16 = resolve_precision(precision, device or default_device()).bf16
    # The server converts and packs its model in place: it takes its own copy then, never the
    # process-wide one that load_base hands to other callers (a packed model breaks their bf16 forwards).
    base = load_base(model, device=device, reuse=not (bf16 or pack_weights))
    if bf16:  # converted once: autocast would re-cast every forward
        base.model.to(torch.bfloat16)
    contexts = None
    if compressor is not None:  # before the linears are packed: an encoder LoRA wraps plain nn.Linear layers
        from softprompt.serve.from_context import ContextPrompts

        contexts = ContextPrompts.load(compressor, base, precision=precision, cache_size=context_cache,
                                       max_tokens=(limits or Limits()).max_context_tokens)
    if pack_weights:
        from softprompt.serve.packed import pack_linears

        n = pack_linears(base.model)
        if n:
            logging.getLogger("softprompt.serve").info("%d linear layers prepacked for oneDNN", n)
    registry = Registry(base, prompts, budget_bytes=prompt_memory_bytes)
    return Server(base, registry, auth, limits, max_batch=max_batch, max_queue=max_queue,
                  max_batch_tokens=max_batch_tokens, prefix_cache=prefix_cache, cache_bytes=cache_bytes,
                  watch_interval=watch_interval, contexts=contexts, decode=decode)


def route_template(request: Request) -> str:
    """The route a request matched, as its template (``/v1/models/{name}``, never the raw path, so
    the metrics stay bounded); ``other`` for a path no route matches."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "other"


def build_vllm_server(model: str, prompts: str | Path, upstreams: list[str], *, keys: str | Path | None = None,
                      dtype: str = "auto", policy: str = "least-loaded", prompt_memory_bytes: int = 256 << 20,
                      limits: Limits | None = None, max_inflight: int = 64, max_queue: int = 64,
                      health_interval: float = 2.0, watch_interval: float | None = 1.0) -> Server:
    """A :class:`Server` whose generation runs on the vLLM servers ``upstreams`` (``--engine vllm``):
    only the tokenizer and the input-embedding matrix of ``model`` are loaded here (the prompts are
    validated against its fingerprint as usual), see :mod:`softprompt.serve.vllm_engine`."""
    from softprompt.serve.embed_only import load_embedding_base
    from softprompt.serve.vllm_engine import VLLMEngine

    auth = Auth.from_file(keys) if keys else Auth()
    base = load_embedding_base(model)
    registry = Registry(base, prompts, budget_bytes=prompt_memory_bytes)

    def engine(metrics):
        return VLLMEngine(base, upstreams, metrics, dtype=dtype, policy=policy, max_inflight=max_inflight,
                          max_queue=max_queue, health_interval=health_interval)

    return Server(base, registry, auth, limits, max_queue=max_queue, prefix_cache=False, watch_interval=watch_interval,
                  engine=engine)


def create_app(server: Server, studio: bool = False) -> FastAPI:
    """The ASGI app; with ``studio`` the web studio (softprompt.serve.studio) is served at ``/studio``."""
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
        server.metrics.request(route_template(request), response.status_code)
        return response

    for router in ROUTERS:
        app.include_router(router)
    if studio:
        from softprompt.serve.studio import mount

        mount(app)
    return app


# Idle keep-alive connections stay open this long. HTTP client pools (httpx, so the openai client)
# drop an idle connection after 5 s; uvicorn's default is also 5 s, so a client could send a request on a
# connection the server was closing that instant and get a connection error. Longer than the clients'.
KEEP_ALIVE_S = 75


def serve_forever(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
                  studio: bool = False) -> int:
    """Serve until SIGINT or SIGTERM: HTTP in a thread, the engine in this (main) thread, so the
    thread that loaded the model keeps torch's CPU workers to itself (see Engine.run)."""
    import signal
    import threading

    import uvicorn

    from softprompt.errors import SoftPromptError

    config = uvicorn.Config(create_app(server, studio=studio), host=host, port=port, log_level=log_level,
                            timeout_keep_alive=KEEP_ALIVE_S)
    server.engine_thread = False
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, name="softprompt-http", daemon=True)

    def on_signal(signum, frame) -> None:
        web.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    thread.start()
    try:
        server.engine.run(should_stop=lambda: web.should_exit or not thread.is_alive())
    finally:
        web.should_exit = True
        thread.join(timeout=30)
    if not web.started:
        raise SoftPromptError(f"the HTTP server did not start on {config.host}:{config.port} (see the log above)")
    return 0
