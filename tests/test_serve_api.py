"""softprompt serve over HTTP: the official openai client against a live uvicorn server on 127.0.0.1
with the tiny model and tiny prompts of every kind (completions, chat, n choices, logprobs,
streaming, stop strings, the prefix cache), every request error path, a full queue, a client that
hangs up, a bounded load test, and SmolLM2 (slow)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from serve_helpers import A_PROMPTS, KEY_A, TEXTS, LiveServer, _err, _save, _wait, base_reference, http, reference

from softprompt.generate import SamplingParams, generate_ids
from softprompt.prompts import PromptTuning
from softprompt.serve.auth import Auth
from softprompt.serve.registry import Registry
from softprompt.serve.schemas import Limits
from softprompt.serve.server import Server


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
    with http.stream("POST", live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY_A}"},
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
    text = http.get(live.url + "/metrics").text
    for name in ("softprompt_queue_length", "softprompt_batch_size", "softprompt_tokens_per_second",
                 "softprompt_prefix_cache_hits_total"):
        assert f"\n{name} " in text or text.startswith(f"{name} ") or f"# TYPE {name} " in text
    hits = float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("softprompt_prefix_cache_hits_total")))
    assert hits >= 1
    h = http.get(live.url + "/health").json()
    assert h["status"] == "ok" and h["prompts"] >= 8


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
    err = _err(http.post(live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY_A}"}, json=body), 400)
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
    err = _err(http.post(live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"}, json=body), 400)
    assert err["param"] == param


def test_malformed_and_oversized_bodies_are_400(live):
    h = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}
    assert "JSON" in _err(http.post(live.url + "/v1/completions", headers=h, content=b'{"model": "pt", '), 400)["message"]
    _err(http.post(live.url + "/v1/completions", headers=h, content=b"[1, 2]"), 400)
    _err(http.post(live.url + "/v1/completions", headers=h, content=b"\xff\xfe"), 400)
    _err(http.post(live.url + "/v1/completions", headers=h, content=b""), 400)
    big = json.dumps({"model": "pt", "prompt": "x" * 5000}).encode()
    assert _err(http.post(live.url + "/v1/completions", headers=h, content=big), 400)["code"] == "body_too_large"
    _err(http.get(live.url + "/v1/nothing-here"), 404)
    with pytest.raises(openai.BadRequestError):
        live.client().completions.create(model="pt", prompt="x", max_tokens=-1)
    assert http.get(live.url + "/health").json()["status"] == "ok"  # still serving


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
        full = http.post(s.url + "/v1/completions", json=body, timeout=60).json()
        assert full["choices"][0]["finish_reason"] == "length"  # left alone, this request runs all 240 steps
        engine = server.engine
        tokens_before = server.metrics.tokens_out
        with http.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # hang up after the first chunk
        _wait(lambda: engine.cancelled_rows == 1)  # a request that ran to the end would never count here
        _wait(lambda: not engine.rows and not engine.queue_length)
        assert server.metrics.tokens_out - tokens_before < 240


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

    with ThreadPoolExecutor(8) as pool:  # the timeout guards against a hang, not a speed claim
        counts = list(pool.map(one, range(64), timeout=300))
    assert len(counts) == 64 and all(0 <= n <= 8 for n in counts)


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
