"""softprompt serve: the official openai client against a live uvicorn server on 127.0.0.1 with the
tiny model and tiny prompts of every kind; mixed-batch equality with single runs; cache invalidation;
tenants and every error path; a bounded load test."""
from __future__ import annotations

import base64
import json
import logging
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml

from softprompt.artifact import TENSORS, build_meta, save_artifact
from softprompt.base import load_base
from softprompt.data.examples import Example
from softprompt.encoding import PromptFormat
from softprompt.generate import SamplingParams, generate, generate_ids
from softprompt.prompts import PrefixTuning, PromptTuning, PTuning
from softprompt.serve.api import Limits, Server, create_app
from softprompt.serve.auth import Auth, hash_key
from softprompt.serve.engine import Engine, QueueFull, Request
from softprompt.serve.kv_cache import PrefixCache
from softprompt.serve.registry import Registry
from softprompt.template import parse_template
from softprompt.train import TrainConfig, Trainer

KEY_A, KEY_B, KEY_ADMIN = "sk-tenant-a", "sk-tenant-b", "sk-admin"
A_PROMPTS = ["trained", "pt", "pt-plain", "hybrid", "ptune", "prefix", "prefix-plain", "base"]
TEXTS = ["hello there", "the movie was bad", "x", "a much longer input text to see that padding works well"]


def _save(base, directory: Path, prompt, template: str, chat: bool = True) -> Path:
    fmt = PromptFormat(base.tokenizer, parse_template(template), chat=chat)
    return save_artifact(directory, prompt, build_meta(prompt, template, base, format=fmt.describe()))


def _make_prompts(base, root: Path, tmp: Path) -> None:
    torch.manual_seed(0)
    data = [Example({"input": t}, y) for t, y in [("good movie", "positive"), ("bad film", "negative")]] * 4
    cfg = TrainConfig(model=base.name, kind="prompt-tuning", tokens=4, steps=8, lr=0.05, init="vocab", batch_size=4)
    res = Trainer(cfg, data, data[:2], tmp / "trained", base=base, progress=False).run()
    shutil.copytree(res.out, root / "trained", ignore=shutil.ignore_patterns("checkpoint*"))
    _save(base, root / "pt", PromptTuning(4, 32, init=torch.randn(4, 32)), "[soft:4] {input}")
    _save(base, root / "pt-plain", PromptTuning(3, 32, init=torch.randn(3, 32)), "Review: [soft:3] {input} Sentiment:", chat=False)
    _save(base, root / "hybrid", PromptTuning(5, 32, init=torch.randn(5, 32)), "[soft:2] Q: {input} [soft:3] A:")
    pt = PTuning.create(6, base, torch.randn(6, 32), {"encoder": "mlp"})
    pt.eval()
    _save(base, root / "ptune", pt, "[soft:6] {input}")
    pf = PrefixTuning.create(5, base, torch.randn(5, 32))
    pf.eval()
    _save(base, root / "prefix", pf, "{input}")
    _save(base, root / "prefix-plain", pf, "{input} =>", chat=False)
    _save(base, root / "secret", PromptTuning(2, 32, init=torch.randn(2, 32)), "[soft:2] {input}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A uvicorn server in a thread on a free loopback port."""

    def __init__(self, server: Server):
        import uvicorn

        self.server = server
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)

    def client(self, key: str | None = KEY_A, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60, **kw)


@pytest.fixture(scope="module")
def base(tiny_dir):
    return load_base(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def prompts_dir(base, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prompts")
    _make_prompts(base, root, tmp_path_factory.mktemp("work"))
    return root


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [
        {"name": "a", "sha256": hash_key(KEY_A), "prompts": A_PROMPTS + ["replace-me", "uploaded"]},
        {"name": "b", "sha256": hash_key(KEY_B), "prompts": ["secret"]},
        {"name": "ops", "sha256": hash_key(KEY_ADMIN), "prompts": "*", "admin": True},
    ]}))
    return path


@pytest.fixture(scope="module")
def live(base, prompts_dir, keys_file):
    server = Server(base, Registry(base, prompts_dir), Auth.from_file(keys_file),
                    Limits(max_tokens=64, max_input_tokens=100, max_body_bytes=4096), max_batch=8, max_queue=64,
                    watch_interval=0.2)
    with LiveServer(server) as s:
        yield s


def reference(base, registry: Registry, name: str, text: str, params: SamplingParams) -> str:
    """The same prompt and input run alone through softprompt.generate."""
    lp = registry.get(name)
    return generate(base, lp.prompt, lp.fmt, [text], params)[0]


def base_reference(base, ids: list[int], params: SamplingParams) -> str:
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    return base.tokenizer.decode(generate_ids(base.model, None, batch, params, base.eos_ids())[0], skip_special_tokens=True)


# -- the engine alone -------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", [True, False], ids=["prefix-cache", "no-prefix-cache"])
@pytest.mark.parametrize("budget", [512, 7], ids=["whole-prompts", "chunked-prefill"])
def test_mixed_batch_equals_each_prompt_alone(base, prompts_dir, cache, budget):
    """One batch holds every kind (prompt tuning, hybrid, P-tuning, prefix), chat and plain formats,
    prefixes of different lengths, and bare-model rows; greedy output equals each run alone. With a
    budget of 7 tokens per forward, prompts are prefilled in chunks across forwards while other
    rows decode."""
    registry = Registry(base, prompts_dir)
    registry.scan()
    # A batch of 6 slots and different lengths: rows finish at different steps and newcomers join a
    # running batch whose keys/values are wider or narrower than theirs.
    engine = Engine(base, PrefixCache(enabled=cache), max_batch=6, max_batch_tokens=budget)
    jobs = [(n, t) for n in A_PROMPTS for t in TEXTS]
    results: dict[int, tuple] = {}
    for i, (name, text) in enumerate(jobs):
        params = SamplingParams(max_new_tokens=3 + (i * 5) % 11)
        lp = registry.get(name) if name != "base" else None
        ids = lp.fmt.prompt_ids(lp.example(text)) if lp else base.tokenizer(text).input_ids
        parts: list[str] = []
        engine.submit(Request(str(i), lp, ids, params,
                              lambda ev, i=i, parts=parts: parts.append(ev[1]) if ev[0] == "delta" else results.__setitem__(i, ("".join(parts), ev))))
    engine.start()
    deadline = time.time() + 120
    while len(results) < len(jobs):
        assert time.time() < deadline
        time.sleep(0.01)
    engine.stop()
    assert engine.joins > 0 and engine.metrics.batch_rows_total > engine.metrics.forwards["decode"]
    assert engine.metrics.forwards["mixed"] > 0  # newcomers' prompts ran in the same forwards as decoding rows
    for i, (name, text) in enumerate(jobs):
        params = SamplingParams(max_new_tokens=3 + (i * 5) % 11)
        want = (base_reference(base, base.tokenizer(text).input_ids, params) if name == "base"
                else reference(base, registry, name, text, params))
        assert results[i][0] == want, (name, text)
        assert results[i][1][0] == "done"


def test_seeded_sampling_equals_generate_alone(base, prompts_dir):
    registry = Registry(base, prompts_dir)
    registry.scan()
    engine = Engine(base, PrefixCache(), max_batch=8).start()
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.8, seed=123)
    got = {}
    lp = registry.get("ptune")
    for i, text in enumerate(TEXTS[:2]):
        parts: list[str] = []
        engine.submit(Request(str(i), lp, lp.fmt.prompt_ids(lp.example(text)), params,
                              lambda ev, i=i, parts=parts: parts.append(ev[1]) if ev[0] == "delta" else got.__setitem__(i, "".join(parts))))
    deadline = time.time() + 60
    while len(got) < 2:
        assert time.time() < deadline
        time.sleep(0.01)
    engine.stop()
    for i, text in enumerate(TEXTS[:2]):
        assert got[i] == reference(base, registry, "ptune", text, params)


def test_a_failing_step_errors_its_requests_and_the_engine_keeps_serving(base, prompts_dir, monkeypatch):
    """An exception inside a forward answers every running and newly admitted request with an error
    event (none is left waiting), and the next request is served normally."""
    registry = Registry(base, prompts_dir)
    registry.scan()
    engine = Engine(base, PrefixCache(), max_batch=4)
    real_step = engine._step
    calls = {"n": 0}

    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        real_step()

    monkeypatch.setattr(engine, "_step", flaky)
    events: dict[str, list] = {}
    lp = registry.get("pt")
    for i in range(3):
        engine.submit(Request(str(i), lp, lp.fmt.prompt_ids(lp.example(TEXTS[i])), SamplingParams(3),
                              lambda ev, i=i: events.setdefault(str(i), []).append(ev)))
    engine.start()
    deadline = time.time() + 60
    while len(events) < 3 or not all(e[-1][0] in ("error", "done") for e in events.values()):
        assert time.time() < deadline
        time.sleep(0.01)
    assert all(e[-1][0] == "error" and "boom" in e[-1][1] for e in events.values())
    engine.submit(Request("after", lp, lp.fmt.prompt_ids(lp.example(TEXTS[0])), SamplingParams(3),
                          lambda ev: events.setdefault("after", []).append(ev)))
    while not events.get("after") or events["after"][-1][0] not in ("error", "done"):
        assert time.time() < deadline
        time.sleep(0.01)
    engine.stop()
    assert events["after"][-1][0] == "done"
    assert "".join(ev[1] for ev in events["after"] if ev[0] == "delta") == reference(base, registry, "pt", TEXTS[0], SamplingParams(3))


def test_prepacked_linear_weights_serve_the_same_outputs(base, prompts_dir):
    """softprompt serve prepacks the linear weights for oneDNN (CPU): logits stay within 1e-5 of the
    plain model's, and a mixed batch on the packed copy gives the plain model's greedy outputs."""
    import copy
    import dataclasses

    from softprompt.serve.packed import PackedLinear, pack_linears, packing_available

    if not packing_available(torch.device("cpu")):
        pytest.skip("this torch build cannot prepack linear weights (no oneDNN)")
    packed = dataclasses.replace(base, model=copy.deepcopy(base.model))
    n_linear = sum(type(m) is torch.nn.Linear for m in base.model.modules())
    assert pack_linears(packed.model) == n_linear > 0
    assert not any(type(m) is torch.nn.Linear for m in packed.model.modules())
    ids = torch.tensor([base.tokenizer(TEXTS[3]).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(packed.model(input_ids=ids).logits, base.model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    layer = next(m for m in packed.model.modules() if isinstance(m, PackedLinear))
    with pytest.raises(RuntimeError, match="no autograd"):
        layer(torch.randn(2, layer.in_features, requires_grad=True))
    registry = Registry(packed, prompts_dir)
    registry.scan()
    engine = Engine(packed, PrefixCache(), max_batch=4).start()
    jobs = [(n, t) for n in ("pt", "hybrid", "ptune", "prefix") for t in TEXTS[:2]]
    got: dict[int, str] = {}
    for i, (name, text) in enumerate(jobs):
        lp = registry.get(name)
        parts: list[str] = []
        engine.submit(Request(str(i), lp, lp.fmt.prompt_ids(lp.example(text)), SamplingParams(6),
                              lambda ev, i=i, parts=parts: parts.append(ev[1]) if ev[0] == "delta" else got.__setitem__(i, "".join(parts))))
    deadline = time.time() + 60
    while len(got) < len(jobs):
        assert time.time() < deadline
        time.sleep(0.01)
    engine.stop()
    plain = Registry(base, prompts_dir)
    plain.scan()
    for i, (name, text) in enumerate(jobs):
        assert got[i] == reference(base, plain, name, text, SamplingParams(6)), (name, text)


def test_queue_limit_raises(base):
    engine = Engine(base, PrefixCache(), max_batch=1, max_queue=2)  # not started: nothing is taken off the queue
    ids = base.tokenizer("hi").input_ids
    for i in range(2):
        engine.submit(Request(str(i), None, ids, SamplingParams(), lambda ev: None))
    with pytest.raises(QueueFull):
        engine.submit(Request("x", None, ids, SamplingParams(), lambda ev: None))


# -- the API ------------------------------------------------------------------------------------------
def test_models_lists_only_the_tenants_prompts(live):
    assert sorted(m.id for m in live.client(KEY_A).models.list()) == sorted(A_PROMPTS)
    assert [m.id for m in live.client(KEY_B).models.list()] == ["secret"]
    assert live.client(KEY_A).models.retrieve("pt").id == "pt"


def test_completion_equals_generate_with_usage(live, base):
    c = live.client()
    for name in ["trained", "hybrid", "prefix-plain"]:
        r = c.completions.create(model=name, prompt="good movie", max_tokens=6, temperature=0)
        assert r.choices[0].text == reference(base, live.server.registry, name, "good movie", SamplingParams(6))
        lp = live.server.registry.get(name)
        n_in = len(lp.fmt.prompt_ids(lp.example("good movie")))
        assert r.usage.prompt_tokens == n_in and r.usage.total_tokens == n_in + r.usage.completion_tokens
        assert r.usage.completion_tokens <= 6 and r.object == "text_completion" and r.model == name


def test_chat_conversation_precedes_the_template_turn_and_base_uses_chat_template(live, base):
    """Earlier turns go through the chat template before the last user message, which fills the
    prompt's template (soft tokens included); the answer equals generate alone on those ids."""
    c = live.client()
    tok = base.tokenizer
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "the movie was bad"}]
    r = c.chat.completions.create(model="pt", messages=msgs, max_tokens=7, temperature=0)
    lp = live.server.registry.get("pt")
    ids = lp.fmt.prompt_ids(lp.example("the movie was bad"), msgs[:-1])
    first_soft = next(k for k, i in enumerate(ids) if i < 0)
    before = tok.decode(ids[:first_soft])
    assert "be brief" in before and "first" in before and "ok" in before  # the history, before the soft tokens
    assert "the movie was bad" in tok.decode([i for i in ids[first_soft:] if i >= 0])
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    want = tok.decode(generate_ids(base.model, lp.prompt, batch, SamplingParams(7), base.eos_ids())[0], skip_special_tokens=True)
    assert r.choices[0].message.content == want and r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    # A one-message conversation is exactly the template's prompt.
    one = c.chat.completions.create(model="pt", messages=msgs[-1:], max_tokens=7, temperature=0)
    assert one.choices[0].message.content == reference(base, live.server.registry, "pt", "the movie was bad", SamplingParams(7))
    r = c.chat.completions.create(model="base", messages=msgs, max_completion_tokens=7, temperature=0)
    ids = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids
    assert r.choices[0].message.content == base_reference(base, ids, SamplingParams(7))
    assert r.usage.prompt_tokens == len(ids)


def test_n_choices_are_rows_of_their_own(live, base):
    """n choices: choice i of a seeded request equals a single request with seed + i; the prompt is
    counted once in usage; a greedy stream of n choices carries each one under its index."""
    c = live.client()
    many = c.completions.create(model="ptune", prompt="hello there", max_tokens=6, temperature=0.9, seed=7, n=3)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    singles = [c.completions.create(model="ptune", prompt="hello there", max_tokens=6, temperature=0.9, seed=7 + i)
               for i in range(3)]
    assert [ch.text for ch in many.choices] == [s.choices[0].text for s in singles]
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    texts, usage = {0: "", 1: ""}, None
    for ch in c.chat.completions.create(model="pt", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                        temperature=0, n=2, stream=True, stream_options={"include_usage": True}):
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
        usage = ch.usage or usage
    want = reference(base, live.server.registry, "pt", "x", SamplingParams(5))
    assert texts == {0: want, 1: want}
    one = c.chat.completions.create(model="pt", messages=[{"role": "user", "content": "x"}], max_tokens=5, temperature=0)
    assert usage.completion_tokens == 2 * one.usage.completion_tokens and usage.prompt_tokens == one.usage.prompt_tokens


def test_logprobs_equal_an_independent_forward(live, base):
    """Completion logprobs: every generated token's logprob equals log-softmax of a plain forward
    over prompt + completion (soft prompt in the embeddings); the greedy token is the top
    alternative; tokens add up to the text."""
    c = live.client()
    r = c.completions.create(model="pt", prompt="the movie was bad", max_tokens=6, temperature=0, logprobs=3)
    lpj = r.choices[0].logprobs
    assert "".join(lpj.tokens) == r.choices[0].text and len(lpj.tokens) == r.usage.completion_tokens
    lp = live.server.registry.get("pt")
    ids = lp.fmt.prompt_ids(lp.example("the movie was bad"))
    gen = generate_ids(base.model, lp.prompt, {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)},
                       SamplingParams(6), base.eos_ids())[0]
    full = torch.tensor([ids + gen])
    with torch.no_grad():
        logits = base.model(**lp.prompt.model_inputs(base.model, full, torch.ones_like(full))).logits[0]
    want = torch.log_softmax(logits[len(ids) - 1:len(ids) - 1 + len(lpj.tokens)], -1)
    for k, (token_lp, top) in enumerate(zip(lpj.token_logprobs, lpj.top_logprobs)):
        assert abs(token_lp - float(want[k, gen[k]])) < 1e-4
        assert len(top) == 3 and abs(max(top.values()) - token_lp) < 1e-6  # greedy: the chosen one is the best
    assert lpj.text_offset == [sum(len(t) for t in lpj.tokens[:k]) for k in range(len(lpj.tokens))]
    # Chat, streamed: one entry per generated token, with the requested alternatives.
    content, entries = "", []
    for ch in c.chat.completions.create(model="pt", messages=[{"role": "user", "content": "hello there"}], max_tokens=5,
                                        temperature=0, logprobs=True, top_logprobs=2, stream=True,
                                        stream_options={"include_usage": True}):
        if ch.choices:
            content += ch.choices[0].delta.content or ""
            if ch.choices[0].logprobs is not None:
                entries += ch.choices[0].logprobs.content
        if ch.usage is not None:
            assert len(entries) == ch.usage.completion_tokens
    assert "".join(e.token for e in entries) == content
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)


def test_streaming_completion_and_chat(live):
    c = live.client()
    whole = c.completions.create(model="prefix", prompt="hello there", max_tokens=10, temperature=0)
    chunks = list(c.completions.create(model="prefix", prompt="hello there", max_tokens=10, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    chat = list(c.chat.completions.create(model="hybrid", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                          temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chat[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chat if ch.choices)
    assert chat[-1].usage.completion_tokens == 5 and chat[-1].choices == []
    assert text == c.chat.completions.create(model="hybrid", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                             temperature=0).choices[0].message.content
    with httpx.stream("POST", live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY_A}"},
                      json={"model": "pt", "prompt": "hi", "max_tokens": 3, "stream": True, "temperature": 0}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"


def test_stop_strings_and_seed(live, base):
    c = live.client()
    full = c.completions.create(model="pt", prompt="the movie was bad", max_tokens=12, temperature=0).choices[0].text
    stop = full[3:6]
    r = c.completions.create(model="pt", prompt="the movie was bad", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="pt", prompt="the movie was bad", max_tokens=12, temperature=0, stop=stop, stream=True))
    assert streamed == r.choices[0].text
    a, b = (c.completions.create(model="prefix", prompt="x", max_tokens=8, temperature=1.0, seed=7).choices[0].text
            for _ in range(2))
    assert a == b == reference(base, live.server.registry, "prefix", "x", SamplingParams(8, 1.0, 1.0, 7))


def test_prefix_cache_hits_and_cached_tokens(live):
    c = live.client()
    before = live.server.cache.hits
    r1 = c.completions.create(model="ptune", prompt="one", max_tokens=2, temperature=0)
    r2 = c.completions.create(model="ptune", prompt="two", max_tokens=2, temperature=0)
    assert live.server.cache.hits >= before + 1
    lp = live.server.registry.get("ptune")
    assert r2.usage.prompt_tokens_details.cached_tokens == len(lp.prefix_ids) > 6  # chat header + 6 soft tokens
    assert r1.usage.prompt_tokens_details.cached_tokens in (0, len(lp.prefix_ids))  # 0 if it was the first
    text = httpx.get(live.url + "/metrics").text
    for name in ("softprompt_queue_length", "softprompt_batch_size", "softprompt_tokens_per_second",
                 "softprompt_prefix_cache_hits_total"):
        assert f"\n{name} " in text or text.startswith(f"{name} ") or f"# TYPE {name} " in text
    hits = float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("softprompt_prefix_cache_hits_total")))
    assert hits >= 1
    h = httpx.get(live.url + "/health").json()
    assert h["status"] == "ok" and h["prompts"] >= 8


# -- errors -------------------------------------------------------------------------------------------
def _err(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_auth_errors_and_tenant_isolation(live):
    with pytest.raises(openai.AuthenticationError):
        live.client("sk-wrong").models.list()
    _err(httpx.get(live.url + "/v1/models"), 401)
    _err(httpx.post(live.url + "/v1/completions", json={"model": "pt", "prompt": "x"}), 401)
    with pytest.raises(openai.NotFoundError) as other:
        live.client(KEY_A).completions.create(model="secret", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as missing:
        live.client(KEY_A).completions.create(model="nonexistent", prompt="x", max_tokens=2)
    strip = lambda e, n: json.dumps(e.value.body).replace(n, "NAME")  # noqa: E731
    assert strip(other, "secret") == strip(missing, "nonexistent")  # indistinguishable
    assert live.client(KEY_B).completions.create(model="secret", prompt="x", max_tokens=2).choices[0].text is not None
    with pytest.raises(openai.NotFoundError):
        live.client(KEY_B).completions.create(model="base", prompt="x", max_tokens=2)


@pytest.mark.parametrize("body,param", [
    ({"model": "pt", "prompt": "x", "max_tokens": 1000}, "max_tokens"),
    ({"model": "pt", "prompt": "x", "max_tokens": -3}, "max_tokens"),
    ({"model": "pt", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "pt", "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "pt", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"model": "pt", "prompt": 42}, "prompt"),
    ({"model": "pt"}, "prompt"),
    ({"model": 3, "prompt": "x"}, "model"),
    ({"model": "pt", "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": "pt", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "pt", "prompt": "x", "n": 0}, "n"),
    ({"model": "pt", "prompt": "x", "n": 17}, "n"),
    ({"model": "pt", "prompt": "x", "logprobs": 6}, "logprobs"),
    ({"model": "pt", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "pt", "prompt": "word " * 150}, "prompt"),
])
def test_bad_completion_requests_are_400(live, body, param):
    err = _err(httpx.post(live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY_A}"}, json=body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", [
    ({"model": "pt", "messages": []}, "messages"),
    ({"model": "pt", "messages": "hello"}, "messages"),
    ({"model": "pt", "messages": [{"role": "user"}, {"role": "wizard", "content": "x"}]}, "messages.1.role"),
    ({"model": "pt", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"model": "pt", "messages": [{"role": "system", "content": "only a system message"}]}, "messages"),
    ({"model": "pt", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**12}, "max_tokens"),
    ({"model": "pt", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages.1.role"),
    ({"model": "pt", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": "pt-plain", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                        {"role": "user", "content": "c"}]}, "messages"),
])
def test_bad_chat_requests_are_400(live, body, param):
    err = _err(httpx.post(live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"}, json=body), 400)
    assert err["param"] == param


def test_malformed_and_oversized_bodies_are_400(live):
    h = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}
    assert "JSON" in _err(httpx.post(live.url + "/v1/completions", headers=h, content=b'{"model": "pt", '), 400)["message"]
    _err(httpx.post(live.url + "/v1/completions", headers=h, content=b"[1, 2]"), 400)
    _err(httpx.post(live.url + "/v1/completions", headers=h, content=b"\xff\xfe"), 400)
    _err(httpx.post(live.url + "/v1/completions", headers=h, content=b""), 400)
    big = json.dumps({"model": "pt", "prompt": "x" * 5000}).encode()
    assert _err(httpx.post(live.url + "/v1/completions", headers=h, content=big), 400)["code"] == "body_too_large"
    _err(httpx.get(live.url + "/v1/nothing-here"), 404)
    with pytest.raises(openai.BadRequestError):
        live.client().completions.create(model="pt", prompt="x", max_tokens=-1)
    assert httpx.get(live.url + "/health").json()["status"] == "ok"  # still serving


def test_full_queue_is_429(base, prompts_dir):
    server = Server(base, Registry(base, prompts_dir), Auth(), max_batch=1, max_queue=1, watch_interval=None)
    with LiveServer(server) as s:
        def one(_):
            try:
                s.client().completions.create(model="base", prompt="hello", max_tokens=200, temperature=0)
                return 200
            except openai.RateLimitError as e:
                assert e.body["code"] == "queue_full"
                return 429
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(8)))
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}


def test_disconnect_mid_stream_frees_the_slot(base, prompts_dir):
    server = Server(base, Registry(base, prompts_dir), Auth(), Limits(max_tokens=240), watch_interval=None)
    body = {"model": "pt-plain", "prompt": "hello", "max_tokens": 240, "temperature": 0}
    with LiveServer(server) as s:
        full = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()
        assert full["choices"][0]["finish_reason"] == "length"  # left alone, this request runs all 240 steps
        engine = server.engine
        tokens_before = server.metrics.tokens_out
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # hang up after the first chunk
        _wait(lambda: engine.cancelled_rows == 1)  # a request that ran to the end would never count here
        _wait(lambda: not engine.rows and not engine.queue_length)
        assert server.metrics.tokens_out - tokens_before < 240


# -- the registry at run time -------------------------------------------------------------------------
def _wait(pred, timeout=20.0):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_updated_prompt_is_never_served_stale(live, base, prompts_dir):
    c = live.client()
    target = prompts_dir / "replace-me"
    torch.manual_seed(1)
    _save(base, target, PromptTuning(4, 32, init=torch.randn(4, 32) * 3), "[soft:4] {input}")
    _wait(lambda: "replace-me" in live.server.registry.names())
    old = c.completions.create(model="replace-me", prompt="hello there", max_tokens=8, temperature=0).choices[0].text
    old_hash = live.server.registry.entries["replace-me"].hash
    assert old_hash in live.server.cache
    new_prompt = PromptTuning(4, 32, init=torch.randn(4, 32) * 3)
    _save(base, target, new_prompt, "[soft:4] {input}")
    _wait(lambda: live.server.registry.entries["replace-me"].hash != old_hash)
    new = c.completions.create(model="replace-me", prompt="hello there", max_tokens=8, temperature=0).choices[0].text
    fmt = PromptFormat(base.tokenizer, parse_template("[soft:4] {input}"))
    assert new == generate(base, new_prompt, fmt, ["hello there"], SamplingParams(8))[0]
    assert new != old and old_hash not in live.server.cache
    shutil.rmtree(target)
    _wait(lambda: "replace-me" not in live.server.registry.names())
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="replace-me", prompt="x", max_tokens=2)


def test_broken_artifacts_are_refused_and_logged(live, base, prompts_dir, other_tiny_dir, caplog):
    caplog.set_level(logging.ERROR, logger="softprompt")
    (prompts_dir / "corrupt").mkdir()
    (prompts_dir / "corrupt" / "prompt.json").write_text("{not json")
    other = load_base(str(other_tiny_dir), device="cpu")
    _save(other, prompts_dir / "wrong-base", PromptTuning(2, 32, init=torch.randn(2, 32)), "[soft:2] {input}")
    shutil.copytree(prompts_dir / "pt", prompts_dir / "truncated")
    (prompts_dir / "truncated" / TENSORS).write_bytes(b"\x00" * 10)
    try:
        _wait(lambda: {"corrupt", "wrong-base", "truncated"} <= {e["name"] for e in live.server.registry.status()})
        status = {e["name"]: e for e in live.server.registry.status()}
        assert "corrupt metadata" in status["corrupt"]["error"]
        assert "trained on base model" in status["wrong-base"]["error"]
        assert "corrupt tensor file" in status["truncated"]["error"]
        assert not {"corrupt", "wrong-base", "truncated"} & set(live.server.registry.names())
        logged = caplog.text
        assert "'corrupt' refused" in logged and "'wrong-base' refused" in logged
        r = live.client(KEY_ADMIN).completions.create(model="pt", prompt="x", max_tokens=2)  # others keep serving
        assert r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.NotFoundError):
            live.client(KEY_ADMIN).completions.create(model="corrupt", prompt="x", max_tokens=2)
    finally:
        for n in ("corrupt", "wrong-base", "truncated"):
            shutil.rmtree(prompts_dir / n)


def test_admin_endpoint_adds_replaces_and_removes(live, base, prompts_dir, tmp_path):
    h = {"Authorization": f"Bearer {KEY_ADMIN}"}
    _err(httpx.get(live.url + "/admin/prompts", headers={"Authorization": f"Bearer {KEY_A}"}), 403)
    _err(httpx.get(live.url + "/admin/prompts"), 401)
    prompt = PromptTuning(3, 32, init=torch.randn(3, 32))
    art = _save(base, tmp_path / "up", prompt, "[soft:3] Answer: {input}")
    body = {"meta": json.loads((art / "prompt.json").read_text()),
            "tensors": base64.b64encode((art / TENSORS).read_bytes()).decode()}
    r = httpx.put(live.url + "/admin/prompts/uploaded", headers=h, json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert (prompts_dir / "uploaded" / "prompt.json").exists()
    got = live.client().completions.create(model="uploaded", prompt="hi", max_tokens=5, temperature=0).choices[0].text
    fmt = PromptFormat(base.tokenizer, parse_template("[soft:3] Answer: {input}"))
    assert got == generate(base, prompt, fmt, ["hi"], SamplingParams(5))[0]
    bad = dict(body, tensors=base64.b64encode(b"garbage").decode())
    assert "refused" in _err(httpx.put(live.url + "/admin/prompts/uploaded", headers=h, json=bad), 400)["message"]
    assert live.client().completions.create(model="uploaded", prompt="hi", max_tokens=5, temperature=0).choices[0].text == got
    _err(httpx.put(live.url + "/admin/prompts/base", headers=h, json=body), 400)
    _err(httpx.put(live.url + "/admin/prompts/x", headers=h, json={"meta": 1, "tensors": "x"}), 400)
    assert httpx.delete(live.url + "/admin/prompts/uploaded", headers=h).status_code == 200
    assert not (prompts_dir / "uploaded").exists()
    _err(httpx.delete(live.url + "/admin/prompts/uploaded", headers=h), 404)
    with pytest.raises(openai.NotFoundError):
        live.client().completions.create(model="uploaded", prompt="hi", max_tokens=2)


def test_registry_memory_budget_evicts_lru_and_reloads(base, prompts_dir):
    registry = Registry(base, prompts_dir, budget_bytes=1)  # room for one prompt at a time
    registry.scan()
    loaded = [n for n, e in registry.entries.items() if e.loaded is not None]
    assert len(loaded) == 1 and registry.evictions >= len(registry.names()) - 1
    a, b = registry.get("pt"), registry.get("hybrid")
    assert a is not None and b is not None and registry.entries["pt"].loaded is None
    assert registry.get("pt").hash == a.hash


# -- load ---------------------------------------------------------------------------------------------
def test_bounded_load_64_requests_8_concurrent_no_errors(live):
    c = live.client()
    names = [n for n in A_PROMPTS]

    def one(i: int) -> int:
        name = names[i % len(names)]
        if i % 2:
            r = c.completions.create(model=name, prompt=TEXTS[i % 4], max_tokens=8, temperature=0.7, seed=i)
        else:
            r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": TEXTS[i % 4]}],
                                          max_tokens=8, temperature=0)
        return r.usage.completion_tokens

    t0 = time.time()
    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(one, range(64), timeout=300))
    assert len(counts) == 64 and all(0 <= n <= 8 for n in counts)
    assert time.time() - t0 < 300


# -- CLI ----------------------------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "softprompt", *args], capture_output=True, text=True, timeout=120)


def test_cli_hash_key_and_bad_arguments(tmp_path):
    r = _cli("serve", "--hash-key", "sk-x")
    assert r.returncode == 0 and r.stdout.strip() == hash_key("sk-x")
    r = _cli("serve", "--model", "smollm2")
    assert r.returncode == 2 and "--prompts" in r.stderr
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys:\n  - name: a\n    sha256: plaintext-key\n    prompts: [x]\n")
    r = _cli("serve", "--prompts", str(tmp_path), "--keys", str(bad))
    assert r.returncode == 2 and "sha256" in r.stderr and "Traceback" not in r.stderr


# -- the real model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_concurrent_prompts_equal_generate(smollm2, tmp_path):
    """Two prompts and the bare model at once on SmolLM2; each answer equals generate alone."""
    emb = smollm2.embedding.weight
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate((6, 11)):
        table = emb[torch.randint(0, emb.shape[0], (n,), generator=g)].detach().clone()
        _save(smollm2, tmp_path / f"p{i}", PromptTuning(n, smollm2.hidden_size, init=table), f"[soft:{n}] Review: {{input}}\nSentiment:")
    server = Server(smollm2, Registry(smollm2, tmp_path), Auth(), watch_interval=None)
    jobs = [("p0", "a gorgeous, witty film"), ("p1", "dull and far too long"), ("base", "The capital of France is")]
    params = SamplingParams(max_new_tokens=8)
    with LiveServer(server) as s:
        c = s.client(None)
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda j: c.completions.create(model=j[0], prompt=j[1], max_tokens=8, temperature=0)
                                .choices[0].text, jobs))
    for (name, text), out in zip(jobs[:2], got[:2]):
        assert out == reference(smollm2, server.registry, name, text, params)
    assert got[2] == base_reference(smollm2, smollm2.tokenizer(jobs[2][1]).input_ids, params)


def test_prefix_copied_from_a_prefill_equals_a_separate_materialization(base, prompts_dir):
    """On a cache miss the prefix's keys/values are copied out of the batched prefill; they equal
    running the prefix alone through the model (materialize)."""
    from softprompt.serve.kv_cache import materialize

    registry = Registry(base, prompts_dir)
    registry.scan()
    engine = Engine(base, PrefixCache(), max_batch=8)
    names = ["pt", "prefix", "hybrid", "pt-plain"]
    for i, name in enumerate(names):
        lp = registry.get(name)
        engine._waiting.append(Request(str(i), lp, lp.fmt.prompt_ids(lp.example(TEXTS[i])), SamplingParams(2), lambda ev: None))
    engine._admit([engine._waiting.popleft() for _ in names])
    engine._step()
    assert all(r.pending is None for r in engine.rows)
    for name in names:
        lp = registry.get(name)
        got, want = engine.cache.get(lp.hash), materialize(base.model, lp.prompt, lp.prefix_ids)
        assert got.ids == want.ids and got.n_fixed == want.n_fixed and got.n_slots == want.n_slots > 0
        for k1, k2, v1, v2 in zip(got.keys, want.keys, got.values, want.values):
            torch.testing.assert_close(k1, k2, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-5)


def test_cli_serves_with_the_engine_in_the_main_thread_and_stops_on_sigterm(tiny_dir, prompts_dir):
    """`softprompt serve` end to end in its own process: the engine loop runs in the main thread and
    uvicorn in a thread; a streamed completion equals generate alone; SIGTERM shuts down cleanly."""
    import signal

    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "softprompt", "serve", "--model", str(tiny_dir), "--prompts", str(prompts_dir),
                             "--port", str(port), "--max-batch", "4", "--max-batch-tokens", "8", "--watch-interval", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        text = "".join(c.choices[0].text for c in client.completions.create(model="pt", prompt=TEXTS[3], max_tokens=6,
                                                                            temperature=0, stream=True) if c.choices)
        base = load_base(str(tiny_dir), device="cpu")
        registry = Registry(base, prompts_dir)
        registry.scan()
        assert text == reference(base, registry, "pt", TEXTS[3], SamplingParams(max_new_tokens=6))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]


def test_cli_refuses_a_token_budget_below_the_batch(tmp_path):
    r = _cli("serve", "--prompts", str(tmp_path), "--max-batch", "8", "--max-batch-tokens", "4")
    assert r.returncode == 2 and "--max-batch-tokens" in r.stderr and "Traceback" not in r.stderr
