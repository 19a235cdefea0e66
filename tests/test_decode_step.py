"""The written-out decode step (softprompt.serve.decode_step): bit-equal to transformers' forward in
eager mode (fp32 and bf16, packed and plain linears, a one-slot pool), its check at start-up catches
a step that computes something else, and models it does not know fall back (or refuse ``--compile``).
The compiled step is tested in test_serve_engine.py (a mixed batch through it)."""
from __future__ import annotations

import copy

import pytest
import torch

from softprompt.errors import SoftPromptError
from softprompt.hf_cache import cache_kw
from softprompt.serve.decode_step import DecodeStep, unsupported
from softprompt.serve.engine import Engine
from softprompt.serve.kv_cache import PrefixCache
from softprompt.serve.packed import pack_linears, packing_available
from softprompt.serve.slots import Plan, SlotKV


def model_copy(base, dtype=torch.float32, packed=False):
    model = copy.deepcopy(base.model).to(dtype).eval()
    if packed:
        if packing_available(torch.device("cpu"), dtype):
            assert pack_linears(model) > 0
        else:  # bf16 on an AVX2-only CPU: oneDNN refuses it, so nothing is packed and the plain layers serve
            assert pack_linears(model) == 0
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_eager_step_is_bit_equal_to_transformers(base, dtype, packed):
    model = model_copy(base, dtype, packed)
    assert unsupported(model) is None
    step = DecodeStep(model, SlotKV.for_model(model, 4))
    assert step.verify(tol=0.0) == 0.0


def test_one_slot_pool(base):
    model = model_copy(base)
    assert DecodeStep(model, SlotKV.for_model(model, 1)).verify(tol=0.0) == 0.0


def test_keys_and_values_land_where_transformers_puts_them(base):
    """From the same pool contents, one step each way: equal logits, and equal pools afterwards (the new
    keys/values at each row's column, the rest untouched)."""
    model = model_copy(base)
    a, b = SlotKV.for_model(model, 3), SlotKV.for_model(model, 3)
    g = torch.Generator().manual_seed(0)
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        x.copy_(torch.randn(x.shape, generator=g))
        y.copy_(x)
    e = model.get_input_embeddings()(torch.tensor([5, 9, 2]))
    cols, positions = torch.tensor([3, 1, 6]), torch.tensor([5, 1, 6])  # a prefix-tuning row: column != position
    with torch.no_grad():
        with a.packed(model, Plan([0, 1, 2], cols.tolist(), [], torch.device("cpu"))):
            want = model(inputs_embeds=e[None], position_ids=positions[None], **cache_kw(a), use_cache=True,
                         logits_to_keep=torch.arange(3), slot_kv=a).logits[0]
        got = DecodeStep(model, b)(e, positions, cols)
    assert torch.equal(got, want)
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        assert torch.equal(x, y)
    g = torch.Generator().manual_seed(0)
    assert all(not torch.equal(x, torch.randn(x.shape, generator=g)) for x in b.keys)  # the step wrote into every layer


def test_verify_catches_a_step_that_computes_something_else(base):
    model = model_copy(base)
    step = DecodeStep(model, SlotKV.for_model(model, 2))
    step.scaling *= 1.05  # attention scores scaled wrongly
    with pytest.raises(ValueError, match="differs from the transformers forward"):
        step.verify()


def test_engine_falls_back_for_a_model_it_does_not_know(base, monkeypatch):
    monkeypatch.setattr(base.model.config, "model_type", "qwen3")
    assert "model type 'qwen3'" in unsupported(base.model)
    assert Engine(base, PrefixCache(), max_batch=2).decode_step is None
    with pytest.raises(SoftPromptError, match=r"--compile: model type 'qwen3' is not one of llama"):
        Engine(base, PrefixCache(), max_batch=2, decode="compiled")
    with pytest.raises(SoftPromptError, match="decode must be one of"):
        Engine(base, PrefixCache(), max_batch=2, decode="fast")


def test_engine_falls_back_when_the_check_fails(base, monkeypatch):
    """A written-out step that disagrees with transformers is never used: the engine serves with
    transformers' forward (and ``--compile`` refuses to start)."""
    monkeypatch.setattr(DecodeStep, "verify", lambda self, tol=None, ids=None: (_ for _ in ()).throw(ValueError("it differs")))
    assert Engine(base, PrefixCache(), max_batch=2).decode_step is None
    with pytest.raises(SoftPromptError, match="--compile: it differs"):
        Engine(base, PrefixCache(), max_batch=2, decode="compiled")


@pytest.mark.slow
def test_compiled_step_compiles_once(base):
    """One graph serves every row count (1 included), every length and pools that grew: a recompile in
    a running server would stall every request for as long as the first compile took."""
    from strict import inductor_missing, need

    need(inductor_missing() is None, str(inductor_missing()))
    from torch._dynamo.utils import counters

    model = model_copy(base, packed=True)
    kv = SlotKV.for_model(model, 4, capacity=16)
    step = DecodeStep(model, kv, compile=True)
    counters.clear()
    eager = DecodeStep(model, kv)
    emb = model.get_input_embeddings()
    for n, col in [(2, 3), (1, 5), (4, 9), (3, 15), (4, 40), (1, 70)]:
        kv.reserve(col + 1)  # the last two grow the pools past their 16 columns
        e = emb(torch.arange(n) + 11)
        cols = torch.full((n,), col)
        saved = [t.clone() for t in kv.keys + kv.values]
        want = eager(e, cols.clone(), cols)
        for t, s in zip(kv.keys + kv.values, saved):
            t.copy_(s)
        got = step(e, cols.clone(), cols)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert kv.capacity > 16
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
