"""``/health`` and ``/metrics`` (Prometheus text), open to anyone who can reach the server."""
from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from softprompt.serve.routes.deps import ServerDep

router = APIRouter()


@router.get("/health")
async def health(server: ServerDep):
    engine = server.engine
    return {"status": "ok", "model": server.base.name, "prompts": len(server.registry.names()),
            "queue": engine.queue_length, "batch": len(engine.rows), "uptime_s": round(time.time() - server.started, 1)}


@router.get("/metrics")
async def metrics(server: ServerDep):
    return PlainTextResponse(server.metrics.render(server.cache, server.registry), media_type="text/plain; version=0.0.4")
