"""Evaluation: label ranking equals a naive loop; the report holds the computed numbers."""
from __future__ import annotations

import json

import torch

from softprompt.cli import main
from softprompt.data.readers import read_examples
from softprompt.encoding import collate
from softprompt.evaluate import evaluate, few_shot_contender, hard_contender
from softprompt.objectives import model_inputs
from softprompt.scoring import label_logprobs


def test_label_ranking_equals_naive_loop(tiny, sentiment_files):
    exs = read_examples(sentiment_files[0])[:4]
    c = hard_contender(tiny, "hard", "Review: {input}\nSentiment:")
    labels = ["positive", "negative", "so-so"]
    batched = label_logprobs(tiny.model, None, c.fmt, exs, labels)
    for i, e in enumerate(exs):
        for j, lab in enumerate(labels):
            enc = c.fmt.encode(e, target=lab)
            b = collate([enc], 0)
            with torch.no_grad():
                logits = tiny.model(**model_inputs(tiny.model, None, b)).logits[0].log_softmax(-1)
            total = sum(float(logits[t - 1, enc.ids[t]]) for t in range(enc.n_prompt, len(enc.ids)))
            assert abs(total - float(batched[i, j])) < 1e-3


def test_evaluate_and_report(tiny, tiny_dir, sentiment_files, tmp_path, capsys):
    train_f, dev_f = sentiment_files
    exs = read_examples(dev_f)
    hard = hard_contender(tiny, "hard", "Review: {input}\nSentiment:")
    few = few_shot_contender(tiny, "Review: {input}\nSentiment:", read_examples(train_f), 2)
    assert "Sentiment: " in few.fmt.render(few.examples_transform(exs[0]))
    res = evaluate(tiny, [hard, few], exs, "accuracy", ["positive", "negative"], resamples=50)
    from softprompt.scoring import label_accuracy
    assert res[0].score == label_accuracy(tiny.model, None, hard.fmt, exs, ["positive", "negative"])
    assert res[0].ci[0] <= res[0].score <= res[0].ci[1]
    # the CLI: a trained soft prompt beside the baselines, report files written with those numbers
    out = tmp_path / "p"
    assert main(["train", "--model", str(tiny_dir), "--data", str(train_f), "--tokens", "2", "--steps", "2",
                 "--out", str(out), "--quiet"]) == 0
    rc = main(["eval", str(out), "--data", str(dev_f), "--hard-prompt", "Review: {input}\nSentiment:", "--few-shot", "2",
               "--train", str(train_f), "--labels", "positive,negative", "--out", str(tmp_path / "rep")])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "rep" / "eval.json").read_text())
    names = [r["name"] for r in report["results"]]
    assert names[0] == "hand-written" and names[1].startswith("few-shot") and names[2] == "p"
    assert report["results"][0]["score"] == res[0].score
    assert (tmp_path / "rep" / "eval.png").stat().st_size > 1000
    # bad input: a metric that does not fit, an empty label word
    assert main(["eval", str(out), "--data", str(dev_f), "--metric", "bleu", "--labels", "positive,negative"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["eval", str(out), "--data", str(dev_f), "--labels", "positive, ,negative"]) == 2


def test_eval_task_recipe(tiny_dir, tmp_path, capsys):
    from conftest import SHARED_DATA, need

    need((SHARED_DATA / "trec").exists(), f"public datasets not found at {SHARED_DATA}")
    rc = main(["eval", "--task", "trec", "--data-dir", str(SHARED_DATA), "--model", str(tiny_dir), "--limit", "6",
               "--few-shot", "1", "--out", str(tmp_path / "rep")])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "rep" / "eval.json").read_text())
    assert report["metric"] == "accuracy" and len(report["results"]) == 2 and report["examples"] == 6
