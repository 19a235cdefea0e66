"""The KV-prefix module: common prefixes, running a prefix once and reusing its keys/values, and the
null prompt (the bare model as a SoftPrompt)."""
from __future__ import annotations

import pytest
import torch

from softprompt.hf_cache import cache_kw, cache_of
from softprompt.kv_prefix import (
    batch_prefix_len,
    broadcast,
    cache_rows,
    common_prefix_len,
    extends,
    forward_with_prefix,
    grow_in_place,
    layer_kv,
    reusable_prefix,
    rewind,
    run_prefix,
    select_rows,
)
from softprompt.objectives import target_logits
from softprompt.prompts import NO_PROMPT, NoPrompt, PrefixTuning, PromptTuning, as_prompt, marker
from softprompt.prompts.prefix import cache_layout

ATOL = 1e-5


# -- common prefixes -------------------------------------------------------------------------------
def test_common_prefix_len_edge_cases():
    assert common_prefix_len([]) == 0
    assert common_prefix_len([[]]) == 0
    assert common_prefix_len([[1, 2, 3]]) == 3  # one row shares all of itself
    assert common_prefix_len([[1, 2, 3], [1, 2, 3], [1, 2, 3]]) == 3  # identical rows
    assert common_prefix_len([[1, 2, 3], [1, 2]]) == 2  # one row is a prefix of another
    assert common_prefix_len([[1, 2, 3], [1, 5, 3], [1, 2, 3]]) == 1
    assert common_prefix_len([[1, 2, 3], [4, 2, 3]]) == 0
    assert common_prefix_len([[1, 2, 3], []]) == 0
    assert common_prefix_len([[1, 2, 3], [1, 2, 3]], limit=2) == 2
    assert common_prefix_len([(1, 2), [1, 2]]) == 2  # any sequences


def test_reusable_prefix_leaves_every_row_a_token():
    assert reusable_prefix([]) == []
    assert reusable_prefix([[1, 2, 3]]) == [1, 2]
    assert reusable_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]
    assert reusable_prefix([[1, 2, 3, 4], [1, 2]]) == [1]
    assert reusable_prefix([[1, 2, 3, 4], [1, 2, 3, 5]], limit=2) == [1, 2]
    assert reusable_prefix([[1], [1]]) == []
    assert reusable_prefix([[], [1]]) == []


def test_extends():
    assert extends([1, 2, 3], [1, 2]) and extends([1], [])
    assert not extends([1, 2], [1, 2])  # nothing left to run
    assert not extends([1, 3, 4], [1, 2]) and not extends([1], [1, 2]) and not extends([], [])


def test_batch_prefix_len():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 8]])
    assert batch_prefix_len(ids, torch.ones_like(ids)) == 2
    assert batch_prefix_len(ids[:1], torch.ones_like(ids[:1])) == 4  # one row
    assert batch_prefix_len(ids[[0, 0]], torch.ones_like(ids[[0, 0]])) == 4  # identical rows
    assert batch_prefix_len(ids[[0, 0]], torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]])) == 1  # a masked column stops it
    assert batch_prefix_len(torch.tensor([[1, 2], [3, 2]]), torch.ones(2, 2)) == 0
    assert batch_prefix_len(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0)) == 0  # empty


# -- running the prefix once -----------------------------------------------------------------------
def _prompts(tiny):
    torch.manual_seed(0)
    h = tiny.hidden_size
    layers, kv_heads, head_dim = cache_layout(tiny.model)
    return {
        "none": NO_PROMPT,
        "prompt-tuning": PromptTuning(3, h, init=torch.randn(3, h) * 0.5),
        "prefix": PrefixTuning(3, h, layers, kv_heads, head_dim, init=torch.randn(layers, 2, kv_heads, 3, head_dim) * 0.5),
    }


def _batch(kind: str):
    """Three rows sharing their first five positions (soft tokens among them where the kind has any)."""
    head = [marker(0), marker(1), 17, marker(2), 23] if kind == "prompt-tuning" else [11, 17, 19, 23, 29]
    ids = torch.tensor([head + [31, 37, 41], head + [43, 47, 53], head + [59, 61, 67]])
    return ids, torch.ones_like(ids), 5


@pytest.mark.parametrize("kind", ["none", "prompt-tuning", "prefix"])
def test_prefix_once_and_broadcast_equals_per_row_forwards(tiny, kind):
    model, prompt = tiny.model, _prompts(tiny)[kind]
    ids, mask, m = _batch(kind)
    assert batch_prefix_len(ids, mask) == m
    with torch.no_grad():
        got = forward_with_prefix(model, prompt.model_inputs(model, ids, mask), m).logits
        assert got.shape[:2] == (3, ids.shape[1] - m)
        for i in range(ids.shape[0]):
            want = model(**prompt.model_inputs(model, ids[i:i + 1], mask[i:i + 1]), use_cache=False).logits[0, m:]
            torch.testing.assert_close(got[i], want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ["none", "prompt-tuning", "prefix"])
def test_run_prefix_holds_the_keys_of_a_full_forward(tiny, kind):
    model, prompt = tiny.model, _prompts(tiny)[kind]
    ids, mask, m = _batch(kind)
    with torch.no_grad():
        cache = run_prefix(model, prompt.model_inputs(model, ids, mask), m)
        full = cache_of(model(**prompt.model_inputs(model, ids[:1, :m], mask[:1, :m]), use_cache=True))
    keys, values = layer_kv(cache)
    want_k, want_v = layer_kv(full)
    n_fixed = prompt.n_virtual if kind == "prefix" else 0
    for k, v, wk, wv in zip(keys, values, want_k, want_v):
        assert k.shape[1] == n_fixed + m
        torch.testing.assert_close(k, wk, rtol=0, atol=ATOL)
        torch.testing.assert_close(v, wv, rtol=0, atol=ATOL)


def test_rewind_then_continue_equals_a_fresh_run(tiny):
    model = tiny.model
    prefix, a, b = [11, 17, 19], [23, 29], [31, 37, 41]

    def run(ids, start, cache):
        t = torch.tensor([ids])
        return model(input_ids=t, position_ids=torch.arange(start, start + len(ids)).unsqueeze(0),
                     **cache_kw(cache), use_cache=True)

    with torch.no_grad():
        cache = cache_of(run(prefix, 0, None))
        run(a, len(prefix), cache)
        assert cache.get_seq_length() == len(prefix) + len(a)
        rewind(cache, len(prefix))
        assert cache.get_seq_length() == len(prefix)
        rewind(cache, len(prefix) + 5)  # nothing past it: unchanged
        assert cache.get_seq_length() == len(prefix)
        got = run(b, len(prefix), cache).logits[0]
        want = run(prefix + b, 0, None).logits[0, len(prefix):]
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_cache_rows_and_broadcast(tiny):
    with torch.no_grad():
        cache = cache_of(tiny.model(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), use_cache=True))
    one = cache_rows(cache, 1, 2)
    many = broadcast(one, 4)
    for src, row, wide in zip(cache.layers, one.layers, many.layers):
        assert torch.equal(row.keys[0], src.keys[1]) and torch.equal(row.values[0], src.values[1])
        assert wide.keys.shape[0] == 4 and all(torch.equal(wide.keys[i], src.keys[1]) for i in range(4))


def test_a_cache_grown_in_place_decodes_like_a_concatenating_one(tiny):
    """grow_in_place: each step writes its position into spare room (no copy of the cache, the buffer
    doubles when full) and the logits equal the concatenating DynamicCache's bit for bit, through a
    rewind, a row selection and a growth past the reserved room."""
    model = tiny.model
    steps = [[[5], [6]], [[7], [8]], [[9], [10]], [[11], [12]], [[13], [14]]]

    def decode(grow: bool):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]]), use_cache=True)
            cache = cache_of(out)
            if grow:
                grow_in_place(cache, 2)
                buf = cache.layers[0]._kbuf
            logits, pos = [], 4
            for i, ids in enumerate(steps):
                if i == 2:
                    rewind(cache, pos - 1)  # drop the last position, then write it again
                    pos -= 1
                    logits.append(model(input_ids=torch.tensor(steps[1]), position_ids=torch.tensor([[pos]] * 2),
                                        **cache_kw(cache), use_cache=True).logits)
                    pos += 1
                if i == 3:
                    select_rows(cache, torch.tensor([1, 0]))  # rows swapped: a fresh tensor, not the buffer
                    ids = ids[::-1]
                out = model(input_ids=torch.tensor(ids), position_ids=torch.tensor([[pos]] * 2), **cache_kw(cache),
                            use_cache=True)
                logits.append(out.logits)
                pos += 1
            if grow:
                layer = cache.layers[0]
                assert type(layer).__name__ == "GrowingLayer" and layer.keys.data_ptr() == layer._kbuf.data_ptr()
                assert buf.shape[-2] == 6 and layer._kbuf.shape[-2] > 6  # grew past the reserved room
        return torch.cat(logits), cache.get_seq_length()

    (plain, n1), (grown, n2) = decode(False), decode(True)
    assert n1 == n2 == 4 + len(steps)
    assert torch.equal(plain, grown)


# -- the null prompt -------------------------------------------------------------------------------
def test_null_prompt_is_the_bare_model(tiny):
    model = tiny.model
    assert as_prompt(None) is NO_PROMPT and as_prompt(NO_PROMPT) is NO_PROMPT
    p = _prompts(tiny)["prompt-tuning"]
    assert as_prompt(p) is p
    assert isinstance(NO_PROMPT, NoPrompt) and NO_PROMPT.n_virtual == 0 and NO_PROMPT.prefix_kv() is None
    assert list(NO_PROMPT.parameters()) == [] and NO_PROMPT.export_tensors() == {} and NO_PROMPT.num_trainable() == 0
    ids = torch.tensor([[0, 0, 11, 17, 19], [23, 29, 31, 37, 41]])  # left-padded first row
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        got = model(**NO_PROMPT.model_inputs(model, ids, mask)).logits
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    emb = model.get_input_embeddings()
    assert torch.equal(NO_PROMPT.embed(emb, ids), emb(ids))
    labels = torch.where(torch.arange(5) >= 3, ids, torch.full_like(ids, -100))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        a, b = target_logits(model, None, batch)[0], target_logits(model, NO_PROMPT, batch)[0]
    assert torch.equal(a, b)


def test_null_prompt_materializes_to_nothing_and_its_prefix_to_the_bare_forward(tiny):
    from softprompt.serve.kv_cache import materialize

    empty = materialize(tiny.model, None, [])
    assert (empty.keys, empty.ids, empty.n_fixed, empty.start_pos) == ([], [], 0, 0)
    ids = [11, 17, 19]
    pre = materialize(tiny.model, None, ids)
    with torch.no_grad():
        full = cache_of(tiny.model(input_ids=torch.tensor([ids]), use_cache=True))
    assert pre.ids == ids and pre.n_fixed == 0 and pre.n_slots == 3
    for k, layer in zip(pre.keys, full.layers):
        torch.testing.assert_close(k, layer.keys[0], rtol=0, atol=ATOL)
