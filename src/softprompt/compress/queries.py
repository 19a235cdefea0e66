"""Queries for distillation: read from a file (:func:`softprompt.data.queries.read_queries`), or
sampled from the model itself given the context plus generic probes; split into training and
held-out sets."""
from __future__ import annotations

import random

from softprompt.data.queries import Query
from softprompt.errors import SoftPromptError

# Generic probes asked of every context when queries are generated automatically.
PROBES = (
    "Summarize the text in one sentence.",
    "What is the main topic of the text?",
    "List three key facts from the text.",
    "Who or what is the text mainly about?",
    "What is the most important detail in the text?",
    "Give the text a short title.",
    "What numbers or dates does the text mention?",
    "Explain the text to a child.",
    "What question does the text answer?",
    "What happens first in the text?",
    "Name a place, person or thing mentioned in the text.",
    "What is surprising in the text?",
)
QUESTION_INSTRUCTIONS = (
    "Write one question that can be answered from the text above. Reply with the question only.",
    "Write one instruction a user might give about the text above. Reply with the instruction only.",
)


def split_queries(queries: list[Query], heldout: float = 0.2, seed: int = 0) -> tuple[list[Query], list[Query]]:
    """Seeded shuffle, then a held-out share (at least one query on each side)."""
    if len(queries) < 2:
        raise SoftPromptError(f"need at least 2 queries (one to train on, one held out), got {len(queries)}")
    if not 0 < heldout < 1:
        raise SoftPromptError(f"--heldout must be between 0 and 1 (got {heldout})")
    order = list(range(len(queries)))
    random.Random(seed).shuffle(order)
    k = min(len(queries) - 1, max(1, round(heldout * len(queries))))
    return [queries[i] for i in order[k:]], [queries[i] for i in order[:k]]


def _first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip().strip('"').strip()
        if len(line) > 8:
            return line
    return ""


def generate_queries(base, context: str, n: int = 24, seed: int = 0, max_new_tokens: int = 40,
                     bf16: bool = False) -> list[Query]:
    """``n`` queries: questions and instructions sampled from the model given the context, topped up
    with the generic :data:`PROBES` (always at least half of the probes are included)."""
    from softprompt.encoding import PromptFormat
    from softprompt.generate import SamplingParams, generate
    from softprompt.template import Template

    n_sampled = n - min(len(PROBES), max(1, n // 2))
    fmt = PromptFormat(base.tokenizer, Template.default(0), chat=True)
    sampled: list[str] = []
    attempt = 0
    while len(sampled) < n_sampled and attempt < 3:
        asks = [f"{context}\n\n{QUESTION_INSTRUCTIONS[i % len(QUESTION_INSTRUCTIONS)]}" for i in range(n_sampled * 2)]
        outs = generate(base, None, fmt, asks, SamplingParams(max_new_tokens, temperature=0.9, top_p=0.95,
                                                               seed=seed + attempt), batch_size=8, bf16=bf16)
        for o in outs:
            q = _first_line(o)
            if q and q not in sampled and len(sampled) < n_sampled:
                sampled.append(q)
        attempt += 1
    probes = list(PROBES[: n - len(sampled)])
    return [Query(q, meta={"origin": "sampled"}) for q in sampled] + [Query(p, meta={"origin": "probe"}) for p in probes]


def query_key(text: str) -> str:
    """What two queries must differ in to count as distinct: case, spacing and punctuation ignored."""
    return " ".join("".join(ch.lower() if ch.isalnum() else " " for ch in text).split())


def dedupe(queries: list[Query], exclude: list[str] = ()) -> list[Query]:
    """``queries`` without repeats (by :func:`query_key`) and without those in ``exclude``."""
    seen = {query_key(t) for t in exclude}
    out = []
    for q in queries:
        k = query_key(q.text)
        if k and k not in seen:
            seen.add(k)
            out.append(q)
    return out
