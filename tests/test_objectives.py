"""The exact shortcuts in the loss: the LM head only at target positions, and the batch's shared
prefix run once. Each must give the plain computation's loss and gradients."""
from __future__ import annotations

import pytest
import torch

from softprompt.batching import batch_plan
from softprompt.data.examples import Example
from softprompt.encoding import IGNORE, collate
from softprompt.objectives import lm_loss, sequence_logprobs, shared_prefix_len
from softprompt.train import TrainConfig, Trainer

EX = [Example({"input": t}, y) for t, y in [("good movie", "positive"), ("a bad film that was far too long", "negative"),
                                            ("x", "neutral"), ("fine", "positive")]]
CASES = [("prompt-tuning", None), ("prefix", None), ("p-tuning", "[soft:2] Review: {input} Sentiment:[soft:1]")]


def _setup(tiny, tmp_path, kind, template):
    cfg = TrainConfig(model=tiny.name, kind=kind, tokens=4, template=template, steps=1, init="random")
    tr = Trainer(cfg, EX, None, tmp_path / "p", base=tiny, progress=False)
    return tr, collate([tr.fmt.encode(e) for e in EX], tiny.tokenizer.pad_token_id)


def _loss_and_grads(tiny, prompt, batch, **kw):
    prompt.zero_grad()
    loss = lm_loss(tiny.model, prompt, batch, reduction="sum", **kw)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in prompt.parameters() if p.requires_grad]


def _reference_loss(tiny, prompt, batch):
    """Independent reference: full logits over every position, shifted by hand."""
    inputs = prompt.model_inputs(tiny.model, batch["input_ids"], batch["attention_mask"])
    logits = tiny.model(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("kind,template", CASES, ids=[c[0] for c in CASES])
def test_target_only_head_and_shared_prefix_match_full_computation(tiny, tmp_path, kind, template):
    tr, batch = _setup(tiny, tmp_path, kind, template)
    assert shared_prefix_len(batch) > 4  # the chat header and soft tokens are shared
    prompt = tr.prompt
    prompt.zero_grad()
    ref = _reference_loss(tiny, prompt, batch)
    ref.backward()
    ref_grads = [p.grad.clone() for p in prompt.parameters() if p.requires_grad]
    for kw in ({"target_only_head": False}, {"target_only_head": True},
               {"target_only_head": True, "share_prefix": True}, {"target_only_head": False, "share_prefix": True}):
        loss, grads = _loss_and_grads(tiny, prompt, batch, **kw)
        # tolerance: fp32 reassociation only (different matmul shapes)
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-4)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_sequence_logprobs_match_reference(tiny, tmp_path):
    tr, batch = _setup(tiny, tmp_path, "prompt-tuning", None)
    with torch.no_grad():
        got = sequence_logprobs(tiny.model, tr.prompt, batch)
        inputs = tr.prompt.model_inputs(tiny.model, batch["input_ids"], batch["attention_mask"])
        logp = torch.log_softmax(tiny.model(**inputs).logits[:, :-1], -1)
        want = []
        for i in range(len(EX)):
            lab = batch["labels"][i, 1:]
            want.append(sum(float(logp[i, t, lab[t]]) for t in range(len(lab)) if lab[t] != IGNORE))
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-4)


def test_shared_prefix_len_limits():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]])
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 8, 9], [IGNORE, IGNORE, IGNORE, 8, 9]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert shared_prefix_len(batch) == 2  # stops before the first position that predicts a target
    assert shared_prefix_len({**batch, "input_ids": ids[:1], "attention_mask": ids[:1] * 0 + 1, "labels": labels[:1]}) == 0
    ids2 = torch.tensor([[5, 6, 7, 8, 9], [5, 1, 7, 8, 9]])
    assert shared_prefix_len({**batch, "input_ids": ids2}) == 1


@pytest.mark.parametrize("bucket", [True, False])
def test_batch_plan_uses_every_example_once_per_epoch(bucket):
    lengths = [(i * 37) % 50 + 1 for i in range(103)]
    plan = batch_plan(lengths, 8, 13, seed=3, bucket=bucket)  # 13 batches = one epoch of 103
    flat = [i for b in plan for i in b]
    assert sorted(flat) == list(range(103))
    if bucket:  # length-bucketed: far less padding than random batches
        pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in plan)
        rnd = batch_plan(lengths, 8, 13, seed=3, bucket=False)
        pad_rnd = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in rnd)
        assert pad < pad_rnd / 2
