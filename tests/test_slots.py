"""The slot-pool packed forward (softprompt.serve.slots) against plain transformers forwards."""
from __future__ import annotations

import pytest
import torch

from softprompt.errors import SoftPromptError
from softprompt.hf_cache import cache_kw
from softprompt.serve.slots import Chunk, Plan, SlotKV, check_model


def _packed(model, kv: SlotKV, plan: Plan, embeds: torch.Tensor, pos: list[int], keep: list[int]) -> torch.Tensor:
    with torch.no_grad(), kv.packed(model, plan):
        out = model(inputs_embeds=embeds[None], position_ids=torch.tensor([pos]), **cache_kw(kv), use_cache=True,
                    logits_to_keep=torch.tensor(keep), slot_kv=kv)
    return out.logits[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_forward_equals_each_row_alone(tiny, dtype):
    """Decoding rows and prompt chunks of other rows in one forward, rows in non-adjacent slots, a
    prompt prefilled across two forwards: every row's logits equal a plain forward of its whole
    sequence (no cache, transformers' own attention), in fp32 and in bf16 weights (serve --bf16)."""
    import copy

    model = tiny.model if dtype == torch.float32 else copy.deepcopy(tiny.model).to(dtype)
    emb = model.get_input_embeddings()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 500, (n,), generator=g) for n in (7, 5, 9)]
    kv = SlotKV.for_model(model, slots=4, capacity=4)  # small: the pools must grow on the way
    # Forward 1: row 0 (slot 2) prefills 6 tokens, row 2 (slot 0) prefills its first 4.
    plan = Plan([], [], [Chunk(2, 0, 6), Chunk(0, 0, 4)], torch.device("cpu"))
    kv.reserve(6)
    _packed(model, kv, plan, emb(torch.cat([seqs[0][:6], seqs[2][:4]])), list(range(6)) + list(range(4)), [5, 9])
    # Forward 2: row 0 decodes its 7th token, row 1 (slot 1) prefills all 5, row 2 its next 5.
    plan = Plan([2], [6], [Chunk(1, 0, 5), Chunk(0, 4, 5)], torch.device("cpu"))
    kv.reserve(9)
    got = _packed(model, kv, plan, emb(torch.cat([seqs[0][6:], seqs[1], seqs[2][4:]])),
                  [6] + list(range(5)) + list(range(4, 9)), [0, 5, 10])
    with torch.no_grad():
        want = torch.stack([model(input_ids=s[None]).logits[0, -1] for s in seqs])
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    else:  # bf16 keeps 8 bits of mantissa: the order of summation shows, the logits still agree closely
        assert kv.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.03 * float(want.float().abs().max()))
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert kv.capacity >= 9


def test_reserve_keeps_what_is_stored(tiny):
    kv = SlotKV.for_model(tiny.model, slots=2, capacity=8)
    k = [torch.randn(kv.kv_heads, 5, kv.head_dim) for _ in range(kv.n_layers)]
    v = [torch.randn(kv.kv_heads, 5, kv.head_dim) for _ in range(kv.n_layers)]
    kv.write(1, k, v)
    kv.reserve(kv.capacity * 3)
    keys, values = kv.read(1, range(5))
    for a, b in zip(keys + values, k + v):
        assert torch.equal(a, b)
    kv.move(1, 0, 5)
    assert all(torch.equal(a[0, :, :5], b) for a, b in zip(kv.keys, k))


def test_update_outside_a_packed_forward_is_refused(tiny):
    kv = SlotKV.for_model(tiny.model, slots=1)
    with pytest.raises(RuntimeError, match="outside a packed forward"):
        kv.update(torch.zeros(1, kv.kv_heads, 1, kv.head_dim), torch.zeros(1, kv.kv_heads, 1, kv.head_dim), 0)


def test_check_model_accepts_llama_and_refuses_sliding_window(tiny, tmp_path, smollm2_dir):
    from transformers import MistralConfig, MistralForCausalLM

    check_model(tiny.model)
    cfg = MistralConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, sliding_window=16, max_position_embeddings=256)
    with pytest.raises(SoftPromptError, match="sliding-window"):
        check_model(MistralForCausalLM(cfg))


def test_check_model_refuses_attention_that_ignores_the_interface(tiny, monkeypatch):
    """A model whose attention does not go through transformers' attention interface would silently
    compute something else: the numerical check catches it."""
    from transformers.models.llama import modeling_llama

    def own_attention(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kw):
        past_key_values = kw.pop("cache", past_key_values)  # its name from transformers 5.24
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        k, v = (t.repeat_interleave(self.num_key_value_groups, 1) for t in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] == k.shape[2])
        return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", own_attention)
    with pytest.raises(SoftPromptError, match="differs from a plain forward"):
        check_model(tiny.model)


def test_pools_grow_by_half_and_shrink_back(tiny):
    kv = SlotKV.for_model(tiny.model, slots=2, capacity=64)
    kv.reserve(70)
    assert kv.capacity == 128 and kv.keys[0].shape[2] == 128  # max(70, 1.5 x 64) rounded up to 64
    kv.reserve(129)
    assert kv.capacity == 192
    kv.shrink(64)
    assert kv.capacity == 64 and all(t.shape[2] == 64 for t in kv.keys + kv.values)


def test_engine_gives_long_request_memory_back_when_idle(tiny):
    """One long request grows the pools; once no row runs they return to their initial size."""
    import time

    from softprompt.generate import SamplingParams
    from softprompt.serve.engine import Engine, Request
    from softprompt.serve.kv_cache import PrefixCache

    engine = Engine(tiny, PrefixCache(), max_batch=2)
    engine.kv.shrink(64)
    engine.initial_capacity = 64
    grown, done = [], []
    ids = tiny.tokenizer(" ".join(["word"] * 120)).input_ids
    engine.submit(Request("long", None, ids, SamplingParams(4), lambda ev: (grown.append(engine.kv.capacity),
                                                                             ev[0] != "delta" and done.append(ev))))
    engine.start()
    deadline = time.time() + 60
    while not done:
        assert time.time() < deadline
        time.sleep(0.01)
    engine.stop()
    assert done[0][0] == "done" and max(grown) >= len(ids) + 1 > 64
    assert engine.kv.capacity == 64
