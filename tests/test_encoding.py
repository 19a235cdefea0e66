"""softprompt.encoding: PromptFormat's prompt ids in plain and chat formats, where the soft-slot
markers go, targets and labels; and softprompt.chat, the bare model's conversations."""
from __future__ import annotations

import copy

import pytest

from softprompt.chat import chat_ids
from softprompt.data.examples import Example
from softprompt.encoding import IGNORE, PromptFormat
from softprompt.errors import DataError, SoftPromptError
from softprompt.prompts.soft_prompt import marker
from softprompt.template import parse_template


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _fmt(tok, template: str, **kw) -> PromptFormat:
    return PromptFormat(tok, parse_template(template), **kw)


def _pieces(ids: list[int]) -> list[list[int]]:
    """``ids`` cut into runs of text ids and runs of markers, in order."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and (runs[-1][0] < 0) == (i < 0):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _plain_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def test_marker_is_the_negative_row():
    assert [marker(k) for k in range(3)] == [-1, -2, -3]


def test_plain_prompt_ids_place_markers_between_the_texts(tok):
    fmt = _fmt(tok, "Review: [soft:3] {input} Sentiment:", chat=False)
    assert not fmt.chat
    ids = fmt.prompt_ids(Example({"input": "good movie"}))
    bos = [tok.bos_token_id] if tok("a").input_ids[0] == tok.bos_token_id else []
    assert ids == bos + _plain_ids(tok, "Review: ") + [-1, -2, -3] + _plain_ids(tok, " good movie Sentiment:")


def test_each_soft_span_reads_its_own_rows_and_named_spans_share_them(tok):
    ids = _fmt(tok, "[soft:2] Q: {input} [soft:3] A:", chat=False).prompt_ids(Example({"input": "why"}))
    runs = _pieces(ids)
    assert [r for r in runs if r[0] < 0] == [[-1, -2], [-3, -4, -5]]
    assert tok.decode([i for r in runs if r[0] >= 0 for i in r]).endswith(" Q: why  A:")
    shared = _fmt(tok, "[soft:2 name=s] {a} [soft name=s] {b} [soft:1]", chat=False)
    runs = _pieces(shared.prompt_ids(Example({"a": "x", "b": "y"})))
    assert [r for r in runs if r[0] < 0] == [[-1, -2], [-1, -2], [-3]]


def test_chat_prompt_is_the_template_turn_inside_the_chat_template(tok):
    """With a chat template the rendered template is the last user message (soft tokens inside it),
    after the format's system prompt and any history."""
    fmt = _fmt(tok, "[soft:2] {input}", system="be brief")
    assert fmt.chat
    history = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"}]
    ids = fmt.prompt_ids(Example({"input": "good movie"}), history)
    msgs = [{"role": "system", "content": "be brief"}, *history, {"role": "user", "content": "@@"}]
    head, tail = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False).split("@@")
    runs = _pieces(ids)
    assert len(runs) == 3 and runs[1] == [-1, -2]
    assert tok.decode(runs[0]) == head and tok.decode(runs[2]) == " good movie" + tail


def test_chat_needs_a_chat_template_and_plain_formats_take_no_history(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    fmt = _fmt(bare, "[soft:2] {input}", chat=True)
    assert not fmt.chat and fmt.describe() == {"chat": False, "system": None}
    with pytest.raises(SoftPromptError, match="plain text"):
        fmt.prompt_ids(Example({"input": "x"}), [{"role": "user", "content": "earlier"}])


def test_encode_labels_only_the_target_and_ends_it_with_eos(tok):
    fmt = _fmt(tok, "[soft:2] {input} =>", chat=False)
    ex = Example({"input": "good movie"}, "positive")
    enc = fmt.encode(ex)
    prompt = fmt.prompt_ids(ex)
    target = _plain_ids(tok, " positive") + [tok.eos_token_id]  # a space between "=>" and the target
    assert enc.ids == prompt + target and enc.n_prompt == len(prompt)
    assert enc.labels == [IGNORE] * len(prompt) + target
    assert fmt.encode(ex, with_target=False).ids == prompt
    assert fmt.encode(ex, target="no").ids == prompt + _plain_ids(tok, " no") + [tok.eos_token_id]
    spaced = _fmt(tok, "[soft:2] {input}: ", chat=False)
    assert spaced.encode(ex).ids == spaced.prompt_ids(ex) + _plain_ids(tok, "positive") + [tok.eos_token_id]  # its own space


def test_encode_refuses_missing_fields_targets_and_overlong_examples(tok):
    fmt = _fmt(tok, "[soft:2] {input} {context}", chat=False, max_length=8)
    with pytest.raises(DataError, match=r"\{context\} is missing \(fields present: input\)"):
        fmt.prompt_ids(Example({"input": "x"}))
    with pytest.raises(DataError, match="no target"):
        fmt.encode(Example({"input": "x", "context": "y"}))
    with pytest.raises(DataError, match="longer than the model's window of 8"):
        fmt.encode(Example({"input": "x " * 20, "context": "y"}, "z"))


def test_bare_model_chat_uses_the_chat_template_or_joins_the_turns(tok):
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert chat_ids(tok, turns) == _plain_ids(tok, text)
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    assert chat_ids(bare, turns) == bare("be brief\nhello").input_ids
    refusing = copy.deepcopy(tok)
    refusing.chat_template = "{{ raise_exception('only one turn') }}"
    with pytest.raises(SoftPromptError, match="the chat template refused this conversation: only one turn"):
        chat_ids(refusing, turns)
