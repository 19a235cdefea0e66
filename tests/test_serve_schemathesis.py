"""schemathesis against the server's own OpenAPI document, in process (ASGI), on the tiny model:
every endpoint with generated paths, headers and bodies (valid ones and ones that break the schema)
answers without a 5xx, and every error has OpenAI's shape. Bounded: a fixed number of examples per
endpoint, max_tokens capped by the server's limits, no deadline."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from serve_helpers import KEY_A
from strict import need_module

schemathesis = need_module("schemathesis")  # the test extra installs it; strict CI fails without it

from softprompt.serve.app import create_app  # noqa: E402
from softprompt.serve.auth import Auth  # noqa: E402
from softprompt.serve.registry import Registry  # noqa: E402
from softprompt.serve.schemas import Limits  # noqa: E402
from softprompt.serve.server import Server  # noqa: E402


@pytest.fixture(scope="module")
def app(base, prompts_dir, keys_file):
    server = Server(base, Registry(base, prompts_dir), Auth.from_file(keys_file),
                    Limits(max_tokens=8, max_input_tokens=100, max_body_bytes=4096), max_batch=8, max_queue=64,
                    watch_interval=None)
    server.start()  # the engine thread; the ASGI client does not run the lifespan
    try:
        yield create_app(server)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_document_describes_the_generation_bodies(api_schema):
    raw = api_schema.raw_schema["paths"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = raw[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "model" in body["required"] and body["additionalProperties"] is False


def _check(case) -> None:
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {KEY_A}"}
    if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
        case.body["max_tokens"] = min(max(case.body["max_tokens"], -1), 8)
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    ctype = response.headers.get("content-type") or [""]
    ctype = ctype[0] if isinstance(ctype, list) else ctype
    if response.status_code >= 400 and ctype.startswith("application/json"):
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_generated_request_gets_a_5xx(api_schema, mode):
    """Every operation of the document, with cases that follow the schema (positive) and cases
    that break it (negative)."""
    from schemathesis import GenerationMode

    gm = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    ops = [r.ok() for r in api_schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/v1/models/{name}", "/health"}
    tried = set()
    for op in ops:
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy(gm))
        def run(case):
            _check(case)
        try:
            run()
            tried.add(op.path)
        except Unsatisfiable:  # an operation with nothing to break (no parameters, no body) has no negative case
            assert mode == "negative", op.path
    assert {"/v1/completions", "/v1/chat/completions"} <= tried, tried
