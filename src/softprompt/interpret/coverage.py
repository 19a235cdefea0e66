"""Which parts of a compressed context a prompt keeps: per-query agreement with the teacher (the
model given the full context), grouped by the part of the context each query needs. Parts are the
context's paragraphs; a query's part is its user-given tag or the paragraph it overlaps most."""
from __future__ import annotations

import re

import torch

from softprompt.data.examples import Example
from softprompt.data.queries import Query
from softprompt.encoding import IGNORE, Encoded, collate
from softprompt.errors import SoftPromptError
from softprompt.generate import SamplingParams, generate_ids
from softprompt.objectives import target_logits

_WORD = re.compile(r"[a-z0-9]+")
STOP = set("the a an and or of to in on at for with by from is are was were be been it its this that these those "
           "what which who whom when where why how does do did can could would should will not no as into than then "
           "there their they them he she his her you your we our i me my".split())


def split_parts(context: str) -> list[str]:
    """The context's paragraphs (blank-line separated); its sentences when it has one paragraph."""
    parts = [p.strip() for p in re.split(r"\n\s*\n", context) if p.strip()]
    if len(parts) <= 1:
        parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", context.strip()) if s.strip()]
    return parts


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOP and len(w) > 2}


def tag_by_overlap(query: str, parts: list[str]) -> int | None:
    """Index of the part sharing the most content words with the query (None when none is shared)."""
    q = _words(query)
    scores = [len(q & _words(p)) for p in parts]
    best = max(scores, default=0)
    return scores.index(best) if best > 0 else None


def _teacher_ids(student_ids: list[int], context_ids: list[int]) -> list[int]:
    soft = [i for i, t in enumerate(student_ids) if t < 0]
    if not soft or soft != list(range(soft[0], soft[-1] + 1)):
        raise SoftPromptError("coverage needs a prompt whose template holds one soft span (where the context was)")
    return student_ids[:soft[0]] + context_ids + student_ids[soft[-1] + 1:]


@torch.no_grad()
def query_agreement(base, prompt, fmt, context: str, queries: list[Query], max_new_tokens: int = 16,
                    field: str = "input") -> list[float]:
    """Per query: top-1 next-token agreement of the soft-prompted model with the full-context teacher
    along the teacher's greedy continuation."""
    context_ids = base.tokenizer(context, add_special_tokens=False).input_ids
    device, pad = base.device, base.tokenizer.pad_token_id
    out = []
    for q in queries:
        student = fmt.prompt_ids(Example({field: q.text}))
        teacher = _teacher_ids(student, context_ids)
        x = torch.tensor([teacher], device=device)
        cont = generate_ids(base.model, None, {"input_ids": x, "attention_mask": torch.ones_like(x)},
                            SamplingParams(max_new_tokens=max_new_tokens), base.eos_ids())[0]
        if not cont:
            cont = base.eos_ids()[:1]
        logits = []
        for ids, p in ((teacher, None), (student, prompt)):
            enc = Encoded(ids + cont, [IGNORE] * len(ids) + cont, len(ids))
            batch = {k: v.to(device) for k, v in collate([enc], pad).items()}
            logits.append(target_logits(base.model, p, batch)[0])
        out.append(float((logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean()))
    return out


def coverage_table(queries: list[Query], agreement: list[float], parts: list[str]) -> list[dict]:
    """Mean agreement per context part (or user tag), with the number of queries in each."""
    groups: dict[str, list[float]] = {}
    for q, a in zip(queries, agreement):
        if q.tag is not None:
            key = str(q.tag)
        else:
            i = tag_by_overlap(q.text, parts)
            key = "untagged (no overlap)" if i is None else f"part {i + 1}: {parts[i][:60]}"
        groups.setdefault(key, []).append(a)
    return [{"part": k, "queries": len(v), "mean_agreement": sum(v) / len(v)} for k, v in groups.items()]
