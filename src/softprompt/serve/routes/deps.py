"""Dependencies the routes share: the running :class:`Server`, the tenant of the request's API key,
and the admin check."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from softprompt.serve.auth import Tenant
from softprompt.serve.errors import APIError
from softprompt.serve.server import Server


def get_server(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(get_server)]


def tenant_of(request: Request, server: ServerDep) -> Tenant:
    """The tenant of ``Authorization: Bearer KEY``; 401 when the key is missing or wrong."""
    tenant = server.auth.tenant(request.headers.get("authorization"))
    if tenant is None:
        has = bool(request.headers.get("authorization"))
        raise APIError(401, "Incorrect API key provided." if has else
                       "Missing API key: send 'Authorization: Bearer YOUR_KEY'.", "authentication_error",
                       code="invalid_api_key")
    return tenant


def admin_of(request: Request, server: ServerDep) -> Tenant:
    """The tenant of an admin key; 403 when the server has no keys or the key is not an admin's."""
    if not server.auth.enabled:
        raise APIError(403, "admin endpoints are disabled: start the server with --keys and an admin key",
                       "permission_error")
    tenant = tenant_of(request, server)
    if not tenant.admin:
        raise APIError(403, "this key may not administer prompts", "permission_error")
    return tenant


TenantDep = Annotated[Tenant, Depends(tenant_of)]
AdminDep = Annotated[Tenant, Depends(admin_of)]


def link(path: str, method: str, description: str, parameters: dict | None = None, body: dict | None = None) -> dict:
    """An OpenAPI link to the operation ``method path`` (by JSON pointer), its values from runtime
    expressions: clients and stateful fuzzers (schemathesis) follow them from one call to the next."""
    ref = "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method
    out: dict = {"operationRef": ref, "description": description}
    if parameters:
        out["parameters"] = parameters
    if body:
        out["requestBody"] = body
    return out
