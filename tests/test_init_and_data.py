"""Initialization methods, CSV data, early stopping."""
from __future__ import annotations

import pytest
import torch

from softprompt.data.readers import read_examples
from softprompt.errors import SoftPromptError
from softprompt.init import FREQUENT_VOCAB, init_vectors, parse_init, text_ids
from softprompt.train import TrainConfig, Trainer


def test_init_methods(tiny):
    emb, tok = tiny.embedding.weight, tiny.tokenizer
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    text = init_vectors(parse_init("text:Classify the review:"), 7, emb, tok, g())
    ids = tok("Classify the review:", add_special_tokens=False).input_ids
    assert len(ids) < 7  # tiled
    assert torch.equal(text, emb[torch.tensor((ids * 7)[:7])])
    assert text_ids(tok, "Classify the review:", 2) == ids[:2]  # cut
    vocab = init_vectors(parse_init("vocab"), 5, emb, tok, g())
    rows = [int((emb == v).all(1).nonzero()[0]) for v in vocab]
    assert all(r < FREQUENT_VOCAB + 200 and r not in tok.all_special_ids for r in rows)
    assert torch.equal(vocab, init_vectors(parse_init("vocab"), 5, emb, tok, g()))  # seeded
    labels = init_vectors(parse_init("labels:positive,negative"), 3, emb, tok, g())
    pos = tok(" positive", add_special_tokens=False).input_ids
    assert torch.allclose(labels[0], emb[torch.tensor(pos)].mean(0))
    rnd = init_vectors(parse_init("random"), 2000, emb, tok, g())
    assert torch.allclose(rnd.std(0).mean(), emb.std(0).mean(), rtol=0.1)
    for bad in ("bogus", "text:", "vocab:3"):
        with pytest.raises(SoftPromptError):
            parse_init(bad)
    with pytest.raises(SoftPromptError, match="no label words"):
        init_vectors(parse_init("labels"), 2, emb, tok, g(), label_words=[])


def test_csv_and_tsv(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\n"Hello, world",greeting\nbye,farewell\n')
    exs = read_examples(tmp_path / "d.csv", ["text"], "label")
    assert [(e.fields["text"], e.target, e.line) for e in exs] == [("Hello, world", "greeting", 2), ("bye", "farewell", 3)]
    (tmp_path / "d.tsv").write_text("text\tlabel\nhi\tgreeting\n")
    assert read_examples(tmp_path / "d.tsv", ["text"], "label")[0].target == "greeting"
    with pytest.raises(SoftPromptError, match=r"d.csv:2: missing field 'input'"):
        read_examples(tmp_path / "d.csv")


def test_early_stopping(tiny, tiny_dir, sentiment_files, tmp_path):
    train_set = read_examples(sentiment_files[0])
    # a learning rate of 0 never improves the dev score after the first evaluation
    cfg = TrainConfig(model=str(tiny_dir), tokens=2, steps=50, batch_size=4, lr=0.0, eval_every=2, patience=2, device="cpu")
    res = Trainer(cfg, train_set, train_set[:4], tmp_path / "p", base=tiny, progress=False).run()
    assert res.stopped_early and res.steps_done == 6  # evals at 2 (best), 4 and 6 (no improvement x2)
    assert res.best["step"] == 2
