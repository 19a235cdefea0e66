"""The paths users take, on the real embedded SmolLM2 (slow: tens of seconds on CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from softprompt.artifact import load_artifact
from softprompt.data.readers import read_examples
from softprompt.generate import SamplingParams, generate
from softprompt.scoring import label_accuracy, label_logprobs
from softprompt.train import TrainConfig, train

TOPIC = Path(__file__).resolve().parents[1] / "examples" / "topic"
LABELS = ["food", "sports", "weather", "technology"]


@pytest.mark.slow
def test_smollm2_answers_chat(smollm2):
    ids = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = smollm2.model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0][ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_prompt_tuning_on_smollm2(smollm2, tmp_path):
    """12 steps at the precision ``auto`` picks for this CPU. Asserted with margins that hold on every
    CPU (fp32 on AVX2-only ones, bf16 where it is native), not on one sampled word."""
    train_set = read_examples(TOPIC / "train.jsonl")
    test_set = read_examples(TOPIC / "test.jsonl")[:16]
    emb_before = smollm2.embedding.weight.clone()
    cfg = TrainConfig(model="smollm2", tokens=8, init="text:Classify the topic of this text:", steps=12, batch_size=8,
                      lr=0.03, seed=0, device="cpu")
    res = train(cfg, train_set, None, tmp_path / "p", base=smollm2, progress=False)
    assert res.metrics["final_train_loss"] < 0.7 * res.metrics["first_train_loss"], res.metrics
    assert torch.equal(smollm2.embedding.weight, emb_before)
    art = load_artifact(res.out, base=smollm2)
    assert art.meta["precision"]["setting"] == "auto" and art.meta["precision"]["dtype"] in ("fp32", "bf16")
    fmt = art.prompt_format(smollm2)
    acc = label_accuracy(smollm2.model, art.prompt, fmt, test_set, LABELS)
    assert acc >= 0.75, acc  # chance is 0.25; 12 steps reach 1.0 in our runs
    # the label words' margin: the true label's log-probability beats the best other label's on average
    scores = label_logprobs(smollm2.model, art.prompt, fmt, test_set, LABELS)
    gold = torch.tensor([LABELS.index(e.target.strip()) for e in test_set])
    true = scores.gather(1, gold[:, None]).squeeze(1)
    other = scores.masked_fill(torch.nn.functional.one_hot(gold, len(LABELS)).bool(), float("-inf")).max(1).values
    assert (true - other).mean() > 1.0, (true - other)
    out = generate(smollm2, art.prompt, fmt, ["The goalkeeper saved a penalty in extra time."], SamplingParams(max_new_tokens=4))
    assert isinstance(out[0], str) and out[0].strip()
