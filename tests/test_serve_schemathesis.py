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
    server.start()  # the engine thread; schemathesis' ASGI client may run the lifespan too (start is idempotent)
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


# -- stateful: sequences that follow the document's links ----------------------------------------------
@pytest.fixture(scope="module")
def own_prompts(prompts_dir, tmp_path_factory):
    """A copy of the prompts directory the stateful test may delete from (restored before each scenario)."""
    import shutil

    root = tmp_path_factory.mktemp("stateful") / "prompts"
    shutil.copytree(prompts_dir, root)
    return prompts_dir, root


def test_the_document_links_list_get_complete_and_delete(api_schema):
    raw = api_schema.raw_schema["paths"]
    links = raw["/v1/models"]["get"]["responses"]["200"]["links"]
    assert {"GetModel", "Complete", "Chat"} <= set(links)
    assert set(raw["/admin/prompts/{name}"]["delete"]["responses"]["200"]["links"]) >= {"GetDeleted", "CompleteDeleted"}


def test_stateful_sequences_keep_the_registry_consistent(base, own_prompts, keys_file):
    """schemathesis' state machine over the links: list the models, read one, complete with it, list
    as admin, delete one, then read and complete with the deleted one. Besides no 5xx and OpenAI's error
    shape on every step: a prompt deleted in a scenario answers 404 (model_not_found) from then on, and
    a prompt the listing just showed is served."""
    import shutil

    from serve_helpers import KEY_ADMIN

    pristine, root = own_prompts
    server = Server(base, Registry(base, root), Auth.from_file(keys_file),
                    Limits(max_tokens=8, max_input_tokens=100, max_body_bytes=4096), max_batch=8, max_queue=64,
                    watch_interval=None)
    server.start()
    seen = {"deleted": 0, "after_delete": 0, "served": 0}
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(server))

        class Workflow(schema.as_state_machine()):
            def setup(self):
                for d in root.iterdir():
                    shutil.rmtree(d)
                shutil.copytree(pristine, root, dirs_exist_ok=True)
                server.registry.scan()
                self.deleted: set[str] = set()

            def get_call_kwargs(self, case):
                return {"headers": {"Authorization": f"Bearer {KEY_ADMIN}"}}

            def before_call(self, case):
                if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                    case.body["max_tokens"] = min(max(case.body["max_tokens"], -1), 8)

            def after_call(self, response, case):
                assert response.status_code < 500, (case.method, case.path, case.body, response.text)
                name = (case.path_parameters or {}).get("name")
                model = case.body.get("model") if isinstance(case.body, dict) else None
                if case.method == "DELETE" and response.status_code == 200:
                    self.deleted.add(name)
                    seen["deleted"] += 1
                    assert name not in server.registry.names()
                elif (case.method == "GET" and case.path == "/v1/models/{name}" and name in self.deleted) or \
                        (case.method == "POST" and model in self.deleted):
                    seen["after_delete"] += 1
                    assert response.status_code == 404, (case.path, name or model, response.text)
                elif case.method == "POST" and response.status_code == 200:
                    seen["served"] += 1

            def validate_response(self, response, case, **kwargs):
                ctype = response.headers.get("content-type") or [""]
                ctype = ctype[0] if isinstance(ctype, list) else ctype
                if response.status_code >= 400 and ctype.startswith("application/json"):
                    err = response.json()["error"]
                    assert set(err) == {"message", "type", "param", "code"} and err["message"]

        Workflow.run(settings=settings(max_examples=40, stateful_step_count=6, deadline=None, database=None,
                                       suppress_health_check=list(HealthCheck)))
    finally:
        server.stop()
    assert seen["deleted"] and seen["after_delete"] and seen["served"], seen
