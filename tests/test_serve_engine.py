"""softprompt serve's engine alone, without HTTP: mixed batches of every prompt kind (prefix cache on
and off, whole and chunked prefill) equal each prompt run alone through softprompt.generate; seeded
sampling; a failing forward; prepacked weights; the queue limit; prefixes copied out of a prefill."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from serve_helpers import A_PROMPTS, TEXTS, base_reference, reference
from strict import inductor_missing, need

from softprompt.generate import SamplingParams
from softprompt.serve.engine import Engine, QueueFull, Request
from softprompt.serve.kv_cache import PrefixCache
from softprompt.serve.registry import Registry


@pytest.mark.parametrize("decode", ["eager", "transformers"])
@pytest.mark.parametrize("cache", [True, False], ids=["prefix-cache", "no-prefix-cache"])
@pytest.mark.parametrize("budget", [512, 7], ids=["whole-prompts", "chunked-prefill"])
def test_mixed_batch_equals_each_prompt_alone(base, prompts_dir, cache, budget, decode):
    """One batch holds every kind (prompt tuning, hybrid, P-tuning, prefix), chat and plain formats,
    prefixes of different lengths, and bare-model rows; greedy output equals each run alone. With a
    budget of 7 tokens per forward, prompts are prefilled in chunks across forwards while other
    rows decode. Pure decode steps run the written-out step (``eager``) or transformers' forward."""
    run_mixed_batch(base, prompts_dir, cache, budget, decode)


@pytest.mark.slow
def test_mixed_batch_with_the_compiled_decode_step(base, prompts_dir):
    """``--compile``: the same mixed batch, its decode steps through torch.compile, still equals each
    prompt run alone (greedy tokens; the logits move by summation order only)."""
    need(inductor_missing() is None, str(inductor_missing()))
    run_mixed_batch(base, prompts_dir, True, 7, "compiled")


def run_mixed_batch(base, prompts_dir, cache: bool, budget: int, decode: str) -> None:
    registry = Registry(base, prompts_dir)
    registry.scan()
    # A batch of 6 slots and different lengths: rows finish at different steps and newcomers join a
    # running batch whose keys/values are wider or narrower than theirs.
    engine = Engine(base, PrefixCache(enabled=cache), max_batch=6, max_batch_tokens=budget, decode=decode)
    assert (engine.decode_step is None) == (decode == "transformers")
    if engine.decode_step is not None:  # count the steps that went through it
        calls, step = [], engine.decode_step
        engine.decode_step = lambda e, p, c: calls.append(e.shape[0]) or step(e, p, c)
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
    if engine.decode_step is not None:  # every pure decode forward, of 1 row up to the whole batch
        assert len(calls) == engine.metrics.forwards["decode"] and 1 in calls and max(calls) > 2
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


def test_packed_rows_are_padded_to_a_few_buckets_with_the_same_outputs():
    """oneDNN keeps a primitive per row count (a server that saw every count from 1 to 512 grew by
    hundreds of MB): rows are padded to about twenty bucket sizes, and the padding changes no output row."""
    from softprompt.serve.packed import PackedLinear, bucket, packing_available

    need(packing_available(torch.device("cpu")), "this torch build cannot prepack linear weights (no oneDNN)")
    sizes = {bucket(m) for m in range(1, 513)}
    assert len(sizes) <= 21 and all(bucket(m) >= m for m in range(1, 2000)) and bucket(16) == 16 and bucket(17) == 32
    assert [bucket(m) for m in (1, 2, 3, 5, 9, 33, 513)] == [1, 2, 4, 8, 16, 64, 768]
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40)
    packed = PackedLinear(lin)
    with torch.no_grad():
        for shape in [(1, 3, 24), (5, 24), (2, 7, 24), (1, 17, 24)]:
            x = torch.randn(*shape)
            y = packed(x)
            assert y.shape == (*shape[:-1], 40)
            torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)


def test_prepacked_linear_weights_serve_the_same_outputs(base, prompts_dir):
    """softprompt serve prepacks the linear weights for oneDNN (CPU): logits stay within 1e-5 of the
    plain model's, and a mixed batch on the packed copy gives the plain model's greedy outputs."""
    import copy
    import dataclasses

    from softprompt.serve.packed import PackedLinear, pack_linears, packing_available

    need(packing_available(torch.device("cpu")), "this torch build cannot prepack linear weights (no oneDNN)")
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


def test_the_server_converts_and_packs_its_own_copy_of_the_base(tiny_dir, base, prompts_dir):
    """build_server turns its model to bf16 and prepacks it in place: that is never the process-wide
    model load_base hands to everyone else (a packed shared model broke their bf16 forwards)."""
    from softprompt.base_model import load_base
    from softprompt.serve.app import build_server
    from softprompt.serve.packed import PackedLinear, packing_available

    need(packing_available(torch.device("cpu")), "this torch build cannot prepack linear weights (no oneDNN)")
    server = build_server(str(tiny_dir), prompts_dir, device="cpu", precision="bf16", pack_weights=True, watch_interval=None)
    # bf16 weights pack where oneDNN runs them (AVX-512 or AVX-NE-CONVERT); an AVX2-only CPU keeps plain bf16 layers
    bf16_packs = packing_available(torch.device("cpu"), torch.bfloat16)
    assert any(isinstance(m, PackedLinear) for m in server.base.model.modules()) == bf16_packs
    assert all(p.dtype == torch.bfloat16 for p in server.base.model.parameters())
    shared = load_base(str(tiny_dir), device="cpu")
    assert shared is base and shared.model is not server.base.model
    assert not any(isinstance(m, PackedLinear) for m in shared.model.modules())
    assert all(p.dtype == torch.float32 for p in shared.model.parameters())
    ids = torch.tensor([base.tokenizer(TEXTS[3]).input_ids])
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.isfinite(shared.model(input_ids=ids).logits).all()


def test_a_second_start_runs_no_second_loop_and_stop_ends_the_thread(base):
    """ASGI clients that run the app's lifespan start a started server again: there must still be one
    engine loop, and stop() must end it (two loops once left one waiting forever)."""
    engine = Engine(base, PrefixCache(), max_batch=2).start()
    first = engine._thread
    assert engine.start()._thread is first
    assert [t.name for t in threading.enumerate()].count("softprompt-engine") == 1
    engine.stop()
    assert not first.is_alive()
