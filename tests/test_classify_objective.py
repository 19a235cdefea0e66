"""The rank-classification objective (``TrainConfig.objective="classify"``, ``train --objective
classify``): a softmax over the label words, each scored as evaluation ranks them."""
from __future__ import annotations

import pytest
import torch

from softprompt.artifact import load_artifact
from softprompt.data.examples import Example
from softprompt.data.readers import read_examples
from softprompt.encoding import PromptFormat, collate
from softprompt.errors import SoftPromptError
from softprompt.objectives import class_loss
from softprompt.scoring import label_accuracy
from softprompt.train import TrainConfig, Trainer


def cfg_for(tiny_dir, **kw) -> TrainConfig:
    base = dict(model=str(tiny_dir), tokens=4, steps=20, batch_size=4, lr=0.1, init="random", seed=0, device="cpu",
                objective="classify")
    base.update(kw)
    return TrainConfig(**base)


def _reference_loss(model, prompt, fmt, examples, labels) -> float:
    """Mean cross-entropy of the gold label among the labels, each label's score the summed
    log-probability of its target tokens from one unbatched, unshared full forward per (example, label)."""
    total = 0.0
    for e in examples:
        scores = []
        for lab in labels:
            enc = fmt.encode(e, target=lab)
            ids = torch.tensor([enc.ids])
            inputs = prompt.model_inputs(model, ids, torch.ones_like(ids))
            logp = torch.log_softmax(model(**inputs, use_cache=False).logits[0].double(), -1)
            logp = logp[logp.shape[0] - len(enc.ids):]  # the text's own positions
            scores.append(sum(float(logp[i - 1, t]) for i, t in enumerate(enc.labels) if t != -100))
        s = torch.tensor(scores, dtype=torch.float64)
        total -= float(torch.log_softmax(s, 0)[labels.index(e.target)])
    return total / len(examples)


def test_class_loss_equals_an_unbatched_reference(tiny, tiny_dir, sentiment_files, tmp_path):
    train_f, _ = sentiment_files
    examples = read_examples(train_f)[3:9]  # 3 of each label
    tr = Trainer(cfg_for(tiny_dir, init="random"), examples, out=tmp_path / "p", base=tiny, progress=False)
    labels = tr.labels
    assert labels == ["negative", "positive"]
    batch = collate([c for cs in tr.candidates for c in cs], tiny.tokenizer.pad_token_id)
    gold = torch.tensor(tr.gold)
    with torch.no_grad():
        got = float(class_loss(tiny.model, tr.prompt, batch, len(labels), gold, share_prefix=True, reduction="mean"))
        want = _reference_loss(tiny.model, tr.prompt, tr.fmt, examples, labels)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert tr.gold == [labels.index(e.target) for e in examples]


def _mean_class_loss(trainer, prompt) -> float:
    batch = collate([c for cs in trainer.candidates for c in cs], trainer.base.tokenizer.pad_token_id)
    with torch.no_grad():
        return float(class_loss(trainer.base.model, prompt, batch, len(trainer.labels), torch.tensor(trainer.gold), reduction="mean"))


def test_classify_training_beats_the_lm_objective_on_what_eval_ranks_and_keeps_the_base(tiny, tiny_dir, sentiment_files, tmp_path):
    train_f, dev_f = sentiment_files
    examples, dev = read_examples(train_f), read_examples(dev_f)
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    scores = {}
    for objective in ("classify", "lm"):
        tr = Trainer(cfg_for(tiny_dir, steps=60, lr=0.3, objective=objective), examples, dev, tmp_path / objective, base=tiny,
                     progress=False)
        if objective == "classify":
            ref, first = tr, _mean_class_loss(tr, tr.prompt)
        tr.run()
        art = load_artifact(tmp_path / objective, tiny)
        assert art.meta["train_config"]["objective"] == objective
        fmt = PromptFormat(tiny.tokenizer, art.template, chat=art.chat, max_length=tiny.max_positions)
        with torch.no_grad():
            acc = label_accuracy(tiny.model, art.prompt, fmt, examples, ["negative", "positive"])
        scores[objective] = (_mean_class_loss(ref, art.prompt), acc)
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a base weight changed"
    assert scores["classify"][0] < 0.7 * first, (first, scores)
    assert scores["classify"][0] < scores["lm"][0] and scores["classify"][1] > scores["lm"][1], scores


def test_classify_needs_classification_data(tiny, tiny_dir, tmp_path):
    free_text = [Example({"input": f"say {i}"}, f"a different answer number {i}") for i in range(12)]
    with pytest.raises(SoftPromptError, match="classification training set"):
        Trainer(cfg_for(tiny_dir), free_text, out=tmp_path / "p", base=tiny, progress=False)
    with pytest.raises(SoftPromptError, match="objective 'nope'"):
        Trainer(cfg_for(tiny_dir, objective="nope"), free_text, out=tmp_path / "q", base=tiny, progress=False)
