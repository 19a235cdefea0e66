"""Admin endpoints (an admin key only): list, upload or replace, and remove prompts, register a
compressed context as a prompt (``--compressor``), and rescan the prompts directory."""
from __future__ import annotations

import asyncio
import base64
import binascii

from fastapi import APIRouter, Request

from softprompt.serve.auth import Tenant
from softprompt.serve.errors import APIError
from softprompt.serve.routes.deps import AdminDep, ServerDep, link
from softprompt.serve.schemas import ContextBody, openapi_body, parse, read_json

router = APIRouter(prefix="/admin")


def in_scope(tenant: Tenant, name: str) -> None:
    """An admin key with a ``prompts`` list administers those prompts only (403 for any other)."""
    if not tenant.may_use(name):
        raise APIError(403, f"this key may not administer prompt {name!r} (not in its prompts list)",
                       "permission_error", param="name")


def _visible(server, tenant: Tenant) -> list[dict]:
    return [s for s in server.registry.status() if tenant.may_use(s["name"])]


@router.get("/prompts", responses={200: {"description": "the prompts this admin key administers", "links": {
    "DeletePrompt": link("/admin/prompts/{name}", "delete", "remove the first prompt", {"name": "$response.body#/prompts/0/name"}),
    "GetPrompt": link("/v1/models/{name}", "get", "the first prompt as a model", {"name": "$response.body#/prompts/0/name"}),
}}})
async def admin_list(server: ServerDep, tenant: AdminDep):
    return {"prompts": _visible(server, tenant)}


@router.put("/prompts/{name}", responses={200: {"description": "the prompt is installed", "links": {
    "GetInstalled": link("/v1/models/{name}", "get", "the installed prompt as a model", {"name": "$request.path.name"}),
}}})
async def admin_put(name: str, request: Request, server: ServerDep, tenant: AdminDep):
    in_scope(tenant, name)
    data = await read_json(request, server.limits.max_admin_body_bytes)
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
        entry = await asyncio.to_thread(server.registry.install, name, meta, raw)
    except Exception as e:  # noqa: BLE001 - the reason goes back to the admin
        raise APIError(400, f"prompt {name!r} refused: {e}", param="meta") from None
    return {"name": name, "kind": entry.kind, "hash": entry.hash}


@router.put("/contexts/{name}", openapi_extra=openapi_body(ContextBody), responses={200: {
    "description": "the context is compressed (one forward of the server's --compressor) and installed as prompt {name}",
    "links": {"GetInstalled": link("/v1/models/{name}", "get", "the compressed context as a model", {"name": "$request.path.name"})}}})
async def admin_put_context(name: str, request: Request, server: ServerDep, tenant: AdminDep):
    from softprompt.serve.from_context import ContextError, install_prompt

    in_scope(tenant, name)
    body: ContextBody = parse(ContextBody, await read_json(request, server.limits.max_admin_body_bytes), server.limits.max_json_depth)
    ctx = server.contexts
    if ctx is None:
        raise APIError(400, "this server has no compressor: start softprompt serve with --compressor DIR to register "
                            "contexts", param="context", code="no_compressor")
    try:
        n = ctx.check(body.context)
        prompt, meta = await asyncio.wrap_future(server.engine.call(lambda: ctx.build(body.context)))
    except ContextError as e:
        raise APIError(400, str(e), param="context", code="invalid_context") from None
    except Exception as e:  # noqa: BLE001 - the reason goes back to the admin
        raise APIError(500, f"compressing the context failed: {type(e).__name__}: {e}", "server_error", param="context") from None
    try:
        entry = await asyncio.to_thread(install_prompt, server.registry, name, prompt, meta)
    except Exception as e:  # noqa: BLE001 - the reason goes back to the admin
        raise APIError(400, f"prompt {name!r} refused: {e}", param="name") from None
    return {"name": name, "kind": entry.kind, "hash": entry.hash, "context_tokens": n,
            "context_sha256": meta["compression"]["context_sha256"], "positions": prompt.n_virtual,
            "compressor": ctx.name}


@router.delete("/prompts/{name}", responses={200: {"description": "the prompt is gone", "links": {
    "GetDeleted": link("/v1/models/{name}", "get", "the removed prompt: 404 from now on", {"name": "$request.path.name"}),
    "CompleteDeleted": link("/v1/completions", "post", "a completion with the removed prompt: 404",
                            body={"model": "$request.path.name", "prompt": "hello", "max_tokens": 4}),
}}})
async def admin_delete(name: str, server: ServerDep, tenant: AdminDep):
    in_scope(tenant, name)
    if not await asyncio.to_thread(server.registry.remove, name):
        raise APIError(404, f"no prompt named {name!r}", param="name", code="model_not_found")
    return {"name": name, "deleted": True}


@router.post("/reload")
async def admin_reload(server: ServerDep, tenant: AdminDep):
    await asyncio.to_thread(server.registry.scan)
    return {"prompts": _visible(server, tenant)}
