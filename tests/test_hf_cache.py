"""softprompt.hf_cache: every path that hands a KV cache to the model or reads one back uses the
name the installed transformers expects, so none of them trips its deprecation of the old name
(a FutureWarning on each call of a forward given ``past_key_values``, a logged notice on each read
of ``output.past_key_values``)."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from softprompt.compress.teacher import Teacher
from softprompt.data.examples import Example
from softprompt.encoding import PromptFormat
from softprompt.generate import SamplingParams, generate
from softprompt.hf_cache import cache_kw, cache_of, kv_name
from softprompt.kv_prefix import forward_with_prefix
from softprompt.prompts import NO_PROMPT, PrefixTuning, PromptTuning
from softprompt.prompts.prefix import cache_layout
from softprompt.template import parse_template


def test_the_name_is_the_one_the_installed_forward_takes(tiny):
    params = inspect.signature(type(tiny.model).forward).parameters
    assert kv_name() in params
    out = tiny.model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert cache_of(out) is not None and cache_of(out).get_seq_length() == 3
    again = tiny.model(input_ids=torch.tensor([[4]]), position_ids=torch.tensor([[3]]), **cache_kw(cache_of(out)),
                       use_cache=True)
    assert cache_of(again).get_seq_length() == 4


@pytest.fixture
def deprecations(monkeypatch):
    """FutureWarnings raised and transformers' once-only notices attempted while the test runs."""
    from transformers.utils import generic

    notices: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: notices.append(str(msg)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lambda: [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] + notices


def _kinds(tiny):
    torch.manual_seed(0)
    h = tiny.hidden_size
    layers, kv_heads, head_dim = cache_layout(tiny.model)
    return {"none": NO_PROMPT, "prompt-tuning": PromptTuning(3, h, init=torch.randn(3, h) * 0.5),
            "prefix": PrefixTuning(3, h, layers, kv_heads, head_dim,
                                   init=torch.randn(layers, 2, kv_heads, 3, head_dim) * 0.5)}


def test_generation_prefix_sharing_and_the_teacher_raise_no_cache_deprecation(tiny, deprecations):
    for kind, prompt in _kinds(tiny).items():
        soft = "[soft:3] " if kind == "prompt-tuning" else ""
        fmt = PromptFormat(tiny.tokenizer, parse_template(soft + "{input}"), chat=False)
        out = generate(tiny, prompt, fmt, [Example({"input": "hello there"}), Example({"input": "x"})],
                       SamplingParams(4))
        assert len(out) == 2
        ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 10, 11]])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            forward_with_prefix(tiny.model, prompt.model_inputs(tiny.model, ids, mask), 3)
    teacher = Teacher(tiny)
    teacher.set_prefix([5, 6, 7, 8])
    teacher.continue_([5, 6, 7, 8, 9], 3, 1.0, 8)
    teacher.continue_batch([[5, 6, 7, 8, 9], [5, 6, 7, 8, 10, 11]], 3, 1.0, 8)
    assert deprecations() == []


def test_the_check_sees_the_old_name(tiny, deprecations):
    """The fixture is not blind: the old keyword and the old attribute are both caught (on a
    transformers that has the new name; before 5.24 the old one is the only one and nothing warns)."""
    if kv_name() == "past_key_values":
        pytest.skip("this transformers predates the rename")
    out = tiny.model(input_ids=torch.tensor([[1, 2]]), use_cache=True)
    tiny.model(input_ids=torch.tensor([[3]]), position_ids=torch.tensor([[2]]), past_key_values=out.past_key_values,
               use_cache=True)
    found = deprecations()
    assert any("past_key_values" in m for m in found) and len(found) >= 2
