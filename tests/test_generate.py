"""softprompt.generate on the tiny model: greedy decoding equals an argmax loop over plain forwards
(no cache), stop strings cut the text (streamed or not), a padded batch equals each input alone,
and sample_next's greedy and nucleus edges."""
from __future__ import annotations

import pytest
import torch

from softprompt.data.examples import Example
from softprompt.encoding import PromptFormat, collate
from softprompt.generate import SamplingParams, generate, generate_ids, sample_next
from softprompt.prompts import PromptTuning
from softprompt.template import parse_template

TEXTS = ["hello there", "x", "a much longer input, so that the shorter rows are padded on the left", "the movie"]


def _by_hand(base, prompt, ids: list[int], steps: int) -> list[int]:
    """Greedy continuation of ``ids``: each step a whole forward over the sequence so far, no cache."""
    out: list[int] = []
    for _ in range(steps):
        x = torch.tensor([ids + out])
        with torch.no_grad():
            if prompt is None:
                logits = base.model(input_ids=x).logits[0, -1]
            else:
                logits = base.model(**prompt.model_inputs(base.model, x, torch.ones_like(x))).logits[0, -1]
        t = int(logits.argmax())
        if t in base.eos_ids():
            break
        out.append(t)
    return out


@pytest.fixture()
def soft(tiny):
    torch.manual_seed(0)
    return PromptTuning(5, tiny.hidden_size, init=torch.randn(5, tiny.hidden_size))


@pytest.mark.parametrize("with_prompt", [False, True], ids=["bare-model", "prompt-tuning"])
def test_greedy_generate_equals_an_argmax_loop_over_plain_forwards(tiny, soft, with_prompt):
    prompt = soft if with_prompt else None
    fmt = PromptFormat(tiny.tokenizer, parse_template("[soft:2] Q: {input} [soft:3] A:" if with_prompt else "{input}"),
                       chat=with_prompt)
    got = generate(tiny, prompt, fmt, TEXTS, SamplingParams(max_new_tokens=8), batch_size=4)
    for text, out in zip(TEXTS, got):
        ids = fmt.prompt_ids(Example({"input": text}))
        want = _by_hand(tiny, prompt, ids, 8)
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        assert generate_ids(tiny.model, prompt, batch, SamplingParams(8), tiny.eos_ids())[0] == want
        assert out == tiny.tokenizer.decode(want, skip_special_tokens=True)


def test_stop_strings_cut_the_text_streamed_or_not(tiny, soft):
    fmt = PromptFormat(tiny.tokenizer, parse_template("[soft:5] {input}"), chat=False)
    full = generate(tiny, soft, fmt, TEXTS[:1], SamplingParams(max_new_tokens=16))[0]
    assert len(full) >= 8
    stop, later = full[3:6], full[6:8]
    pieces: list[str] = []
    params = SamplingParams(max_new_tokens=16, stop=(later, stop))
    cut = generate(tiny, soft, fmt, TEXTS[:1], params, stream=lambda i, piece: pieces.append(piece))[0]
    assert cut == full[:full.find(stop)]  # the earliest stop string wins, and is not part of the text
    assert "".join(pieces) == cut
    assert generate(tiny, soft, fmt, TEXTS[:1], SamplingParams(max_new_tokens=16, stop=("\x00never",)))[0] == full


def test_a_padded_batch_equals_each_input_alone(tiny, soft):
    """Inputs of different lengths in one left-padded batch (and across batches) give the same
    greedy text as each alone; streamed pieces land under each input's own index."""
    fmt = PromptFormat(tiny.tokenizer, parse_template("[soft:2] {input} [soft:3]"))
    alone = [generate(tiny, soft, fmt, [t], SamplingParams(max_new_tokens=6))[0] for t in TEXTS]
    streamed: dict[int, str] = {}
    together = generate(tiny, soft, fmt, TEXTS, SamplingParams(max_new_tokens=6), batch_size=3,
                        stream=lambda i, piece: streamed.__setitem__(i, streamed.get(i, "") + piece))
    assert together == alone
    assert [streamed.get(i, "") for i in range(len(TEXTS))] == alone


def test_sample_next_greedy_and_top_p_keep_the_best_token():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 4.0]])
    assert sample_next(logits, SamplingParams(temperature=0), None).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # a nucleus smaller than the top token's mass keeps the top token only
        assert sample_next(logits, SamplingParams(temperature=1.0, top_p=0.01), g).tolist() == [1, 0]
    seen = {tuple(sample_next(logits, SamplingParams(temperature=1.0), g).tolist()) for _ in range(50)}
    assert len(seen) > 1  # with the whole distribution, sampling varies


def test_a_row_that_ends_stops_while_the_others_go_on(tiny, soft):
    """A token made end-of-sequence ends each row where it first appears (not kept); the other rows
    of the batch keep decoding, each as it would alone."""
    fmt = PromptFormat(tiny.tokenizer, parse_template("[soft:2] {input} [soft:3]"))
    enc = [fmt.encode(Example({"input": t}), with_target=False) for t in TEXTS]
    batch = collate(enc, tiny.tokenizer.pad_token_id, left=True)
    free = generate_ids(tiny.model, soft, batch, SamplingParams(6), eos_ids=[])
    eos = free[1][2]  # row 1's third token
    got = generate_ids(tiny.model, soft, batch, SamplingParams(6), eos_ids=[eos])
    assert got[1] == free[1][:free[1].index(eos)] and any(len(row) == 6 for row in got)
    for row, e in zip(got, enc):
        alone = collate([e], tiny.tokenizer.pad_token_id, left=True)
        assert row == generate_ids(tiny.model, soft, alone, SamplingParams(6), eos_ids=[eos])[0]


def test_until_ends_a_row_early_and_leaves_the_others_as_they_were(tiny, soft):
    """``until`` finishes a row at the first token where it holds; each text is then a prefix of the
    unbounded one, and sampled rows that never satisfy it are unchanged (the batch's draws do not shift)."""
    fmt = PromptFormat(tiny.tokenizer, parse_template("[soft:2] {input} [soft:3]"))
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    free = generate(tiny, soft, fmt, TEXTS, params, batch_size=4)
    limit = len(free[0]) // 2
    assert limit >= 2
    got = generate(tiny, soft, fmt, TEXTS, params, batch_size=4, until=lambda t: len(t) >= limit)
    assert got[0] != free[0]
    for g, f in zip(got, free):
        assert f.startswith(g)
        assert g == f or len(g) >= limit  # ended only where ``until`` held
        if len(f) < limit:
            assert g == f


def test_self_study_stops_a_sample_at_its_first_usable_line_without_changing_the_queries(tiny, monkeypatch):
    from softprompt.compress import selfstudy

    assert selfstudy.line_done("Question: what are the opening hours?\n") and not selfstudy.line_done("what are the opening")
    assert not selfstudy.line_done("ok\n") and selfstudy.line_done("ok\nIs the shop open on Monday?\nmore")
    early, _ = selfstudy.self_study(tiny, tiny.tokenizer, " ".join(TEXTS) * 3, n_train=12, n_heldout=0, chunk_tokens=20,
                                    progress=False, max_new_tokens=16)
    monkeypatch.setattr(selfstudy, "line_done", lambda text: False)
    late, _ = selfstudy.self_study(tiny, tiny.tokenizer, " ".join(TEXTS) * 3, n_train=12, n_heldout=0, chunk_tokens=20,
                                   progress=False, max_new_tokens=16)
    assert [q.text for q in early] == [q.text for q in late]


def test_self_study_shares_each_chunk_once_and_writes_the_same_queries(tiny, monkeypatch):
    """Self-study batches never straddle two chunks and run with share_prefix; in fp32 the queries are
    the ones every ask run whole gives."""
    from softprompt import generate as gen_mod
    from softprompt.compress import selfstudy

    calls: list[tuple[int, bool]] = []
    real = gen_mod.generate

    def spy(base, prompt, fmt, texts, *a, **k):
        calls.append((len({t.split("\n\n")[0] for t in texts}), k.get("share_prefix", False)))
        return real(base, prompt, fmt, texts, *a, **k)

    monkeypatch.setattr(gen_mod, "generate", spy)
    text = ("The shop opens at nine on weekdays. Bikes cost ten pounds a day to rent. Helmets are free with every "
            "rental. Repairs take two days in spring. The owner approves every discount herself. ") * 2
    assert len(selfstudy.chunks(tiny.tokenizer, text, 20)) >= 3
    shared, _ = selfstudy.self_study(tiny, tiny.tokenizer, text, n_train=12, n_heldout=0, chunk_tokens=20, progress=False,
                                     max_new_tokens=16)
    assert calls and all(n == 1 and share for n, share in calls)  # one chunk per batch, its prefix shared
    whole, _ = selfstudy.self_study(tiny, tiny.tokenizer, text, n_train=12, n_heldout=0, chunk_tokens=20, progress=False,
                                    max_new_tokens=16, share_prefix=False)
    assert [q.text for q in shared] == [q.text for q in whole] and len(shared) == 12


SHARED = "a long shared document that every request repeats word for word before its own question. "


def test_a_shared_prefix_runs_once_and_decodes_as_each_row_alone(tiny):
    """share_prefix: rows repeating a long text (different suffix lengths, so the rows' own tokens are
    padded) give the greedy ids of an argmax loop over plain forwards; the shared tokens run once."""
    fmt = PromptFormat(tiny.tokenizer, parse_template("{input}"), chat=True)
    texts = [SHARED + t for t in TEXTS]
    rows = [fmt.prompt_ids(Example({"input": t})) for t in texts]
    seen: list[int] = []
    hook = tiny.model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].numel()))
    try:
        got = generate(tiny, None, fmt, texts, SamplingParams(max_new_tokens=8), batch_size=4, share_prefix=True)
    finally:
        hook.remove()
    for ids, text in zip(rows, got):
        assert text == tiny.tokenizer.decode(_by_hand(tiny, None, ids, 8), skip_special_tokens=True)
    from softprompt.kv_prefix import reusable_prefix
    n_shared = len(reusable_prefix(rows))
    assert n_shared > 10
    # one forward over the shared tokens, one over the rows' own (padded) tokens, then one token per row
    assert seen[0] == n_shared and seen[1] == 4 * max(len(r) - n_shared for r in rows) and set(seen[2:]) <= {4}


def test_a_shared_prefix_samples_like_the_plain_batch_and_takes_no_soft_prompt(tiny, soft):
    """Sampled with a seed, the shared-prefix batch draws the same tokens as the left-padded one
    (fp32: the same next-token distributions, the same generator); a soft prompt is refused."""
    fmt = PromptFormat(tiny.tokenizer, parse_template("{input}"), chat=True)
    texts = [SHARED + t for t in TEXTS]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=5)
    plain = generate(tiny, None, fmt, texts, params, batch_size=4)
    assert generate(tiny, None, fmt, texts, params, batch_size=4, share_prefix=True) == plain
    with pytest.raises(ValueError, match="no soft prompt"):
        generate(tiny, soft, fmt, texts, params, share_prefix=True)


def test_equal_rows_run_their_own_tokens_once_and_sample_like_the_plain_batch(tiny):
    """Several samples of one prompt (self-study asks): the shared prefix runs once, each distinct
    row's own tokens run once, and the draws equal the plain left-padded batch's (fp32, one generator);
    the rows still draw apart."""
    fmt = PromptFormat(tiny.tokenizer, parse_template("{input}"), chat=True)
    texts = [SHARED + "what is it about?"] * 3 + [SHARED + "and who wrote it, please?"] * 3
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7)
    plain = generate(tiny, None, fmt, texts, params, batch_size=6)
    seen: list[int] = []
    hook = tiny.model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].numel()))
    try:
        shared = generate(tiny, None, fmt, texts, params, batch_size=6, share_prefix=True)
    finally:
        hook.remove()
    assert shared == plain
    assert len(set(shared[:3])) > 1  # equal prompts, different samples
    rows = [fmt.prompt_ids(Example({"input": t})) for t in texts]
    from softprompt.kv_prefix import reusable_prefix
    n_shared = len(reusable_prefix(rows))
    assert seen[0] == n_shared and seen[1] == 2 * max(len(r) - n_shared for r in rows)  # two distinct rows
    assert all(k <= 6 for k in seen[2:])  # then one token per row still running
