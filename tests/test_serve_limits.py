"""softprompt serve's edge and fairness: every request field validated with a 400 naming it (seed
range, nesting depth, unsupported OpenAI fields, stop caps); admission per request (a request that
fails in the engine fails alone, beside another tenant's running requests); per-tenant caps on
waiting and running rows with 429 and Retry-After; metrics by route template with escaped labels;
/health without paths; admin keys confined to their prompts list."""
from __future__ import annotations

import base64
import json
import re
import shutil
import threading
import time
from collections import Counter

import pytest
import yaml
from serve_helpers import KEY_A, KEY_B, LiveServer, _err, _save, _wait, base_reference, http, reference

from softprompt.artifact import TENSORS
from softprompt.generate import SamplingParams
from softprompt.prompts import PromptTuning
from softprompt.serve.auth import Auth, hash_key
from softprompt.serve.engine import Engine, Request
from softprompt.serve.kv_cache import PrefixCache
from softprompt.serve.metrics import label
from softprompt.serve.registry import Registry
from softprompt.serve.schemas import Limits
from softprompt.serve.server import Server

H_A = {"Authorization": f"Bearer {KEY_A}"}
X = {"role": "user", "content": "x"}


# -- 1. the edge -------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,param", [
    ({"seed": 2**64, "temperature": 1}, "seed"),
    ({"seed": 2**63, "temperature": 1}, "seed"),
    ({"seed": 2**63 - 2, "n": 3, "temperature": 1}, "seed"),  # choice 2 would use 2^63
    ({"seed": -1}, "seed"),
    ({"fields": {"a": "b"}, "user": {"a": [[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]]}}, "user"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"best_of": 3}, "best_of"),
    ({"echo": True}, "echo"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": 1}, "presence_penalty"),
    ({"suffix": "the end"}, "suffix"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"temprature": 0}, "temprature"),  # a misspelt field is not silently ignored
    ({"stream": True, "stream_options": {"include_usage": True, "chunked": 1}}, "stream_options.chunked"),
    ({"stop": "x" * 129}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_fields_are_400_naming_them(live, extra, param):
    err = _err(http.post(live.url + "/v1/completions", headers=H_A, json={"model": "pt", "prompt": "x", **extra}), 400)
    assert err["param"] == param and param in err["message"], err


def test_chat_fields_are_checked_too(live):
    url = live.url + "/v1/chat/completions"
    assert _err(http.post(url, headers=H_A, json={"model": "pt", "messages": [X], "tool_choice": "required"}),
                400)["param"] == "tool_choice"
    assert _err(http.post(url, headers=H_A, json={"model": "pt", "messages": [{**X, "tool_calls": [{"id": "1"}]}]}),
                400)["param"] == "messages.0.tool_calls"
    assert _err(http.post(url, headers=H_A, json={"model": "pt", "messages": [X], "seed": 2**64, "temperature": 1}),
                400)["param"] == "seed"


def test_neutral_values_of_unsupported_fields_are_accepted(live):
    """What clients send by default (null, 0 penalties, best_of 1, echo false, an empty logit_bias,
    a user id) changes nothing, so it is accepted."""
    body = {"model": "pt", "prompt": "x", "max_tokens": 3, "temperature": 0, "logit_bias": {}, "best_of": 1,
            "echo": False, "frequency_penalty": 0, "presence_penalty": 0.0, "tools": None, "user": "u-1",
            "seed": 2**63 - 1, "stop": "y" * 128}
    r = http.post(live.url + "/v1/completions", headers=H_A, json=body, timeout=60)
    assert r.status_code == 200, r.text
    chat = {"model": "pt", "messages": [{**X, "tool_calls": None}], "max_tokens": 3, "temperature": 0,
            "response_format": {"type": "text"}, "parallel_tool_calls": False}
    assert http.post(live.url + "/v1/chat/completions", headers=H_A, json=chat, timeout=60).status_code == 200


def test_deep_nesting_is_400_not_500(live):
    """Nesting beyond the limit is refused by name; nesting deep enough to exhaust the JSON parser's
    recursion is a 400 too (it was a 500 RecursionError)."""
    h = {**H_A, "Content-Type": "application/json"}
    for depth in (17, 1900):
        body = b'{"model": "pt", "prompt": "x", "fields": ' + b"[" * depth + b"]" * depth + b"}"
        err = _err(http.post(live.url + "/v1/completions", headers=h, content=body), 400)
        assert err["code"] == "invalid_json" and "nested" in err["message"]
    assert http.get(live.url + "/health").json()["status"] == "ok"


def _collect(results: dict, key: str):
    parts: list[str] = []

    def emit(ev):
        if ev[0] == "delta":
            parts.append(ev[1])
        elif ev[0] in ("done", "error"):
            results[key] = (ev[0], "".join(parts) if ev[0] == "done" else ev[1])
    return emit


def test_a_request_failing_at_admission_fails_alone(base, prompts_dir):
    """A seed torch refuses (2^64, as if it had passed the edge) reaches the engine's admission
    while another tenant's greedy requests run: it alone gets an error; their outputs equal each
    run alone, and the engine keeps admitting."""
    registry = Registry(base, prompts_dir)
    registry.scan()
    engine = Engine(base, PrefixCache(), max_batch=6)
    lp = registry.get("pt")
    results: dict[str, tuple] = {}
    good = SamplingParams(max_new_tokens=24)
    for i, text in enumerate(["hello there", "the movie was bad", "x"]):
        engine.submit(Request(f"b{i}", lp, lp.fmt.prompt_ids(lp.example(text)), good, _collect(results, f"b{i}"), tenant="b"))
    started = threading.Event()
    first = engine._step

    def step():
        first()
        started.set()
    engine._step = step
    engine.start()
    assert started.wait(60)
    bad = SamplingParams(max_new_tokens=4, temperature=1.0, seed=2**64)
    engine.submit(Request("bad", lp, lp.fmt.prompt_ids(lp.example("x")), bad, _collect(results, "bad"), tenant="a"))
    engine.submit(Request("after", lp, lp.fmt.prompt_ids(lp.example("x")), SamplingParams(3), _collect(results, "after"), tenant="a"))
    _wait(lambda: len(results) == 5, 120)
    engine.stop()
    assert results["bad"][0] == "error" and "refused" in results["bad"][1]
    for i, text in enumerate(["hello there", "the movie was bad", "x"]):
        assert results[f"b{i}"] == ("done", reference(base, registry, "pt", text, good)), i
    assert results["after"] == ("done", reference(base, registry, "pt", "x", SamplingParams(3)))


def test_bad_requests_beside_another_tenants_running_requests_leave_them_identical(live, base):
    """Over HTTP: while tenant b's greedy requests stream, tenant a sends every kind of bad request;
    b's outputs equal each run alone."""
    want = reference(base, live.server.registry, "secret", "hello there", SamplingParams(20))
    out: list[str] = []

    def tenant_b():
        c = live.client(KEY_B)
        out.append(c.completions.create(model="secret", prompt="hello there", max_tokens=20, temperature=0).choices[0].text)
    threads = [threading.Thread(target=tenant_b) for _ in range(3)]
    for t in threads:
        t.start()
    _wait(lambda: live.server.engine.rows or len(out) == 3)
    for extra in ({"seed": 2**64, "temperature": 1}, {"logit_bias": {"1": 1}}, {"stop": "z" * 1000}, {"n": 99}):
        _err(http.post(live.url + "/v1/completions", headers=H_A, json={"model": "pt", "prompt": "x", **extra}), 400)
    for t in threads:
        t.join(120)
    assert out == [want] * 3


# -- 2. fairness ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fair(base, prompts_dir, tmp_path_factory):
    """A server of 2 slots and a queue of 8, where the key 'heavy' may have 4 rows waiting and 1
    running, and 'light' has no cap of its own; and an admin key confined to the prompt 'mine'."""
    root = tmp_path_factory.mktemp("fair-prompts")
    shutil.copytree(prompts_dir / "pt", root / "pt")
    shutil.copytree(prompts_dir / "secret", root / "secret")
    keys = tmp_path_factory.mktemp("fair-keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"name": "heavy", "sha256": hash_key("sk-heavy"), "prompts": ["pt", "base"], "max_queued": 4, "max_running": 1},
        {"name": "light", "sha256": hash_key("sk-light"), "prompts": ["pt"]},
        {"name": "scoped-admin", "sha256": hash_key("sk-scoped"), "prompts": ["mine"], "admin": True},
    ]}))
    server = Server(base, Registry(base, root), Auth.from_file(keys), Limits(max_tokens=300), max_batch=2, max_queue=8,
                    watch_interval=None)
    with LiveServer(server) as s:
        yield s, root


def test_a_heavy_tenant_gets_429_while_others_are_served(fair, base):
    live, _ = fair
    engine = live.server.engine
    want = reference(base, live.server.registry, "pt", "x", SamplingParams(5))  # before the engine runs: same model
    seen: list[Counter] = []
    step = engine._step

    def counting_step():
        seen.append(Counter(r.req.tenant for r in engine.rows))
        step()
    engine._step = counting_step
    h_heavy = {"Authorization": "Bearer sk-heavy"}
    heavy = {"model": "base", "prompt": "hello", "max_tokens": 200, "temperature": 0, "n": 4}
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", http.post(live.url + "/v1/completions", headers=h_heavy,
                                                                         json=heavy, timeout=300)))
    t.start()
    _wait(lambda: any(r.req.tenant == "heavy" for r in engine.rows))
    # Its share of the queue is full: 429 with Retry-After, at once.
    r = http.post(live.url + "/v1/completions", headers=h_heavy, json={**heavy, "n": 2}, timeout=60)
    err = _err(r, 429)
    assert err["code"] == "tenant_queue_full" and int(r.headers["retry-after"]) >= 1
    # More choices than its share can ever hold: a 400, not a 429 that could never succeed.
    assert _err(http.post(live.url + "/v1/completions", headers=h_heavy, json={**heavy, "n": 5}), 400)["param"] == "n"
    # The light tenant is served in the slot the heavy one may not take, while the heavy rows wait.
    c = live.client("sk-light")
    got = c.completions.create(model="pt", prompt="x", max_tokens=5, temperature=0).choices[0].text
    assert got == want
    assert "r" not in box and any(w.tenant == "heavy" for w in engine._waiting)
    t.join(300)
    engine._step = step
    assert box["r"].status_code == 200 and len(box["r"].json()["choices"]) == 4
    assert max(s["heavy"] for s in seen) == 1 and any(s["light"] for s in seen)


def test_a_full_queue_is_429_with_retry_after(base, prompts_dir):
    server = Server(base, Registry(base, prompts_dir), Auth(), max_batch=1, max_queue=1, watch_interval=None)
    with LiveServer(server) as s:
        body = {"model": "base", "prompt": "hello", "max_tokens": 150, "temperature": 0}
        running = threading.Thread(target=lambda: http.post(s.url + "/v1/completions", json=body, timeout=300))
        running.start()
        _wait(lambda: server.engine.rows)
        waiting = threading.Thread(target=lambda: http.post(s.url + "/v1/completions", json=body, timeout=300))
        waiting.start()
        _wait(lambda: server.engine.queue_length == 1)
        r = http.post(s.url + "/v1/completions", json=body, timeout=60)
        assert _err(r, 429)["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
        for t in (running, waiting):
            t.join(300)


def test_a_request_that_waits_too_long_for_a_slot_gets_429(base, prompts_dir):
    """With every slot taken, a waiting request (streamed or not) is answered 429 with Retry-After once
    it has waited max_queue_wait seconds, instead of hanging; the running request is untouched."""
    server = Server(base, Registry(base, prompts_dir), Auth(), Limits(max_tokens=200, max_queue_wait=0.5), max_batch=1,
                    max_queue=8, watch_interval=None)
    want = base_reference(base, base.tokenizer("hello").input_ids, SamplingParams(200))
    step = server.engine._step

    def slow_step():  # every forward takes at least 20 ms, so the running request holds its slot for seconds
        time.sleep(0.02)
        step()
    server.engine._step = slow_step
    with LiveServer(server) as s:
        body = {"model": "base", "prompt": "hello", "max_tokens": 200, "temperature": 0}
        box: dict = {}
        running = threading.Thread(target=lambda: box.setdefault("r", http.post(s.url + "/v1/completions", json=body,
                                                                                   timeout=300)))
        running.start()
        _wait(lambda: server.engine.rows)
        r = http.post(s.url + "/v1/completions", json={**body, "max_tokens": 3}, timeout=60)
        err = _err(r, 429)
        assert err["code"] == "queue_timeout" and int(r.headers["retry-after"]) >= 1 and "0.5 s" in err["message"]
        r = http.post(s.url + "/v1/chat/completions", json={"model": "base", "messages": [X], "max_tokens": 3,
                                                             "stream": True}, timeout=60)
        assert _err(r, 429)["code"] == "queue_timeout"
        running.join(300)
        assert box["r"].status_code == 200 and box["r"].json()["choices"][0]["text"] == want
        assert server.engine.queue_length == 0
        assert re.search(r"^softprompt_queue_timeouts_total [1-9]", http.get(s.url + "/metrics").text, re.M)


def test_keys_file_caps_are_checked(tmp_path):
    path = tmp_path / "keys.yaml"
    for bad in ({"max_queued": 0}, {"max_running": "4"}, {"max_running": True}, {"admin": "yes"}, {"quota": 3}):
        path.write_text(yaml.safe_dump({"keys": [{"name": "a", "sha256": hash_key("k"), "prompts": "*", **bad}]}))
        with pytest.raises(Exception, match=next(iter(bad))):
            Auth.from_file(path)
    path.write_text(yaml.safe_dump({"keys": [{"name": "a", "sha256": hash_key("k"), "prompts": "*", "max_queued": 3}]}))
    t = Auth.from_file(path).tenant("Bearer k")
    assert (t.max_queued, t.max_running) == (3, None)


# -- 3. metrics, health, admin scope ------------------------------------------------------------------
_SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\\n]|\\["\\n])*",?)*\})? -?[0-9.e+-]+$|^# (HELP|TYPE) ')


def test_metrics_use_route_templates_and_escape_labels(live):
    for name in ("a", "b", 'q"uote', "new\\line"):
        http.get(live.url + f"/v1/models/{name}", headers=H_A)
    http.get(live.url + '/v1/made-up-"path', headers=H_A)
    text = http.get(live.url + "/metrics").text
    endpoints = set(re.findall(r'softprompt_requests_total\{endpoint="((?:[^"\\]|\\.)*)"', text))
    assert "/v1/models/{name}" in endpoints and "other" in endpoints
    assert not any("uote" in e or "made-up" in e or e.startswith("/v1/models/") and e != "/v1/models/{name}"
                   for e in endpoints), endpoints
    assert all(_SAMPLE.match(line) for line in text.splitlines()), [x for x in text.splitlines() if not _SAMPLE.match(x)]
    assert label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_health_shows_no_local_path(live, tiny_dir):
    text = http.get(live.url + "/health").text
    assert str(tiny_dir) not in text and str(tiny_dir.parent) not in text
    assert json.loads(text)["model"] == tiny_dir.name


def test_an_admin_key_with_a_prompts_list_administers_only_those(fair, base, tmp_path):
    live, root = fair
    h = {"Authorization": "Bearer sk-scoped"}
    art = _save(base, tmp_path / "up", PromptTuning(2, 32), "[soft:2] {input}")
    body = {"meta": json.loads((art / "prompt.json").read_text()), "tensors": base64.b64encode((art / TENSORS).read_bytes()).decode()}
    assert _err(http.put(live.url + "/admin/prompts/pt", headers=h, json=body, timeout=60), 403)["param"] == "name"
    _err(http.delete(live.url + "/admin/prompts/pt", headers=h), 403)
    assert (root / "pt" / "prompt.json").exists() and "pt" in live.server.registry.names()
    assert http.put(live.url + "/admin/prompts/mine", headers=h, json=body, timeout=60).status_code == 200
    listed = [p["name"] for p in http.get(live.url + "/admin/prompts", headers=h).json()["prompts"]]
    assert listed == ["mine"]
    assert http.delete(live.url + "/admin/prompts/mine", headers=h).status_code == 200
    assert not (root / "mine").exists()


def test_engine_loop_never_waits_on_a_capped_tenant_alone(base):
    """Rows passed over for their tenant's running cap keep their place and are admitted when the
    tenant's row leaves (no request is left waiting forever)."""
    engine = Engine(base, PrefixCache(), max_batch=4)
    ids = base.tokenizer("hi").input_ids
    results: dict[str, tuple] = {}
    for i in range(3):
        engine.submit(Request(f"h{i}", None, ids, SamplingParams(3), _collect(results, f"h{i}"), tenant="h", max_running=1))
    engine.start()
    _wait(lambda: len(results) == 3, 60)
    engine.stop()
    assert all(v[0] == "done" for v in results.values()) and len({v[1] for v in results.values()}) == 1
