"""Task metrics on (prediction, references) pairs, and bootstrap confidence intervals."""
from __future__ import annotations

import random
import re
import string
from typing import Callable, Sequence

from softprompt.errors import SoftPromptError

Refs = Sequence[Sequence[str]]


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and articles, squeeze spaces (the SQuAD normalization)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def accuracy(preds: Sequence[str], refs: Refs) -> float:
    return sum(p.strip() == r[0].strip() for p, r in zip(preds, refs)) / max(len(preds), 1)


def exact_match(preds: Sequence[str], refs: Refs) -> float:
    return sum(any(normalize(p) == normalize(x) for x in r) for p, r in zip(preds, refs)) / max(len(preds), 1)


def token_f1(preds: Sequence[str], refs: Refs) -> float:
    """Mean token-overlap F1 after SQuAD normalization, best over each example's references (the SQuAD F1)."""
    def f1(pred: str, ref: str) -> float:
        p, r = normalize(pred).split(), normalize(ref).split()
        common = sum(min(p.count(w), r.count(w)) for w in set(p))
        if not p or not r:
            return float(p == r)
        return 0.0 if common == 0 else 2 * common / (len(p) + len(r))

    return sum(max(f1(p, x) for x in r) for p, r in zip(preds, refs)) / max(len(preds), 1)


def macro_f1(preds: Sequence[str], refs: Refs) -> float:
    gold = [r[0].strip() for r in refs]
    f1s = []
    for lab in sorted(set(gold)):
        tp = sum(p.strip() == lab and g == lab for p, g in zip(preds, gold))
        fp = sum(p.strip() == lab and g != lab for p, g in zip(preds, gold))
        fn = sum(p.strip() != lab and g == lab for p, g in zip(preds, gold))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / max(len(f1s), 1)


def rouge_l(preds: Sequence[str], refs: Refs) -> float:
    """Mean ROUGE-L F-measure, best over each example's references (rouge-score package)."""
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return sum(max(sc.score(x, p)["rougeL"].fmeasure for x in r) for p, r in zip(preds, refs)) / max(len(preds), 1)


def bleu(preds: Sequence[str], refs: Refs) -> float:
    """Corpus BLEU (sacrebleu), 0-100, with every example's references."""
    import sacrebleu

    n = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(n)]
    return float(sacrebleu.corpus_bleu(list(preds), streams).score)


METRICS: dict[str, Callable[[Sequence[str], Refs], float]] = {
    "accuracy": accuracy, "exact_match": exact_match, "f1": token_f1, "macro_f1": macro_f1, "rouge_l": rouge_l, "bleu": bleu,
}


def metric_fn(name: str) -> Callable[[Sequence[str], Refs], float]:
    if name not in METRICS:
        raise SoftPromptError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")
    return METRICS[name]


def bootstrap_ci(name: str, preds: Sequence[str], refs: Refs, resamples: int = 500, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the metric over examples."""
    fn, n = metric_fn(name), len(preds)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        stats.append(fn([preds[i] for i in idx], [refs[i] for i in idx]))
    stats.sort()
    lo = stats[int((1 - level) / 2 * resamples)]
    hi = stats[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return (lo, hi)
