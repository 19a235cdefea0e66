"""Scoring examples with a (soft-prompted) frozen model: target loss, and classification by ranking
the label words' log-probabilities (one forward per example and label, batched; no sampling)."""
from __future__ import annotations

import math

import torch

from softprompt.data.examples import Example
from softprompt.encoding import Encoded, PromptFormat, collate
from softprompt.objectives import lm_loss, sequence_logprobs, sequence_scores
from softprompt.precision import autocast
from softprompt.prompts import SoftPrompt


@torch.no_grad()
def mean_loss(model, prompt: SoftPrompt | None, fmt: PromptFormat, examples: list[Example], batch_size: int = 16,
              bf16: bool = False) -> float:
    """Mean per-token cross-entropy of the targets."""
    device = next(model.parameters()).device
    encoded = [fmt.encode(e) for e in examples]
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[i:i + batch_size], fmt.tok.pad_token_id).items()}
        with autocast(device, bf16):
            loss = lm_loss(model, prompt, batch, reduction="sum", share_prefix=True)
        total += float(loss)
        count += int((batch["labels"][:, 1:] != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def label_logprobs(model, prompt: SoftPrompt | None, fmt: PromptFormat, examples: list[Example], labels: list[str],
                   batch_size: int = 16, bf16: bool = False, normalize: bool = False) -> torch.Tensor:
    """[n_examples, n_labels] total log-probability of each label word as the target (mean per token
    when ``normalize``)."""
    device = next(model.parameters()).device
    items, lengths = [], []
    for e in examples:
        for lab in labels:
            enc = fmt.encode(e, target=lab)
            items.append(enc)
            lengths.append(sum(1 for x in enc.labels if x != -100))
    scores = []
    for i in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(items[i:i + batch_size], fmt.tok.pad_token_id).items()}
        with autocast(device, bf16):
            scores.append(sequence_logprobs(model, prompt, batch).float().cpu())
    out = torch.cat(scores).view(len(examples), len(labels))
    if normalize:
        out = out / torch.tensor(lengths, dtype=torch.float).view(len(examples), len(labels))
    return out


@torch.no_grad()
def continuation_scores(model, prompt: SoftPrompt | None, items: list[Encoded], pad_id: int, batch_size: int = 16,
                        bf16: bool = False, progress=None) -> list[tuple[float, bool]]:
    """For each encoded item: the total log-probability of its target tokens (the positions whose label
    is not ignored) and whether every one of them is the greedy choice. Batched longest first, so rows
    of a batch have similar lengths; ``progress(n)`` is called after each batch of n items."""
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: -len(items[i].ids))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(items)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = {k: v.to(device) for k, v in collate([items[i] for i in idx], pad_id).items()}
        with autocast(device, bf16):
            total, greedy = sequence_scores(model, prompt, batch)
        for j, i in enumerate(idx):
            out[i] = (float(total[j]), bool(greedy[j]))
        if progress:
            progress(len(idx))
    return out


def classify(model, prompt, fmt, examples, labels, **kw) -> list[str]:
    scores = label_logprobs(model, prompt, fmt, examples, labels, **kw)
    return [labels[i] for i in scores.argmax(-1).tolist()]


def label_accuracy(model, prompt, fmt, examples, labels, **kw) -> float:
    preds = classify(model, prompt, fmt, examples, labels, **kw)
    gold = [e.target for e in examples]
    return sum(p.strip() == (g or "").strip() for p, g in zip(preds, gold)) / max(len(gold), 1)


def label_set(examples: list[Example], max_labels: int = 20) -> list[str] | None:
    """The distinct targets when the data looks like classification (few distinct short targets)."""
    targets = sorted({(e.target or "").strip() for e in examples})
    if 1 < len(targets) <= max_labels and len(targets) * 3 <= len(examples) and all(len(t.split()) <= 3 for t in targets):
        return targets
    return None


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
