"""The HTTP routes, one router each: the OpenAI-compatible ``/v1`` API (:mod:`.v1`), ``/health``
and ``/metrics`` (:mod:`.ops`), the read-only prompt views the studio
uses (:mod:`.prompts`), and the authenticated admin endpoints (:mod:`.admin`)."""
from __future__ import annotations

from softprompt.serve.routes.admin import router as admin_router
from softprompt.serve.routes.ops import router as ops_router
from softprompt.serve.routes.prompts import router as prompts_router
from softprompt.serve.routes.v1 import router as v1_router

ROUTERS = (ops_router, v1_router, prompts_router, admin_router)
