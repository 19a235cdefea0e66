"""``/health`` and ``/metrics`` (Prometheus text), open to anyone who can reach the server."""
from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from softprompt.serve.routes.deps import ServerDep

router = APIRouter()


def public_model_name(name: str) -> str:
    """The model's name without the server's file system: a local directory shows as its last
    component (an embedded name or a hub id is shown as is)."""
    p = Path(name)
    return p.name if (p.is_absolute() or name.startswith((".", "~")) or p.exists()) else name


@router.get("/health")
async def health(server: ServerDep):
    engine = server.engine
    return {"status": "ok", "model": public_model_name(server.base.name), "prompts": len(server.registry.names()),
            "queue": engine.queue_length, "batch": len(engine.rows), "uptime_s": round(time.time() - server.started, 1)}


@router.get("/metrics")
async def metrics(server: ServerDep):
    return PlainTextResponse(server.metrics.render(server.cache, server.registry), media_type="text/plain; version=0.0.4")
