"""Per-context jobs: the existing compression job (:class:`softprompt.compress.Compressor`) supplies
the layout, the queries' teacher targets (cached on disk) and the distillation loss for one context;
the amortized compressor only changes where the student's prompt comes from."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from softprompt.atomic import atomic_write_json
from softprompt.base_model import BaseModel
from softprompt.compress.compressor import CompressConfig, Compressor
from softprompt.compress.queries import dedupe
from softprompt.compress.selfstudy import chunks, self_study, sentence_queries
from softprompt.data.queries import Query
from softprompt.errors import SoftPromptError

QUERY_SOURCES = ("selfstudy", "sentences", "dataset")


@contextlib.contextmanager
def quiet_precision():
    """Each job resolves the precision; log that choice once per run, not once per context."""
    lg = logging.getLogger("softprompt.precision")
    old = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(old)


def context_job(base: BaseModel, text: str, form: str, memory: int, out: str | Path, placement: str = "system",
                cls: type[Compressor] = Compressor, **cfg) -> Compressor:
    """The compression job of one context with the student of ``form`` (``kv``: a prefix; else prompt tuning)."""
    n_ctx = len(base.tokenizer(text.strip(), add_special_tokens=False).input_ids)
    if form == "kv" and n_ctx < memory:
        raise SoftPromptError(f"the context has {n_ctx} tokens, fewer than the compressor's {memory} memory tokens: "
                              "nothing to compress (pass it as text instead)")
    cfg_queries, progress = cfg.pop("queries", []), cfg.pop("progress", False)
    c = CompressConfig(model=base.name, tokens=memory, kind="prefix" if form == "kv" else "prompt-tuning",
                       placement=placement, baselines=cfg.pop("baselines", ("truncated", "none")), **cfg)
    with quiet_precision():
        return cls(text, c, cfg_queries, out, base=base, progress=progress)


def make_queries(job: Compressor, n: int, source: str, seed: int, chunk_tokens: int,
                 questions: tuple = (), path: Path | None = None) -> list[Query]:
    """``n`` training queries for the job's context: self-study (the model writes them), questions built
    from its sentences (cheap), or the dataset's own questions; saved at ``path`` and reused from it."""
    if source not in QUERY_SOURCES:
        raise SoftPromptError(f"--query-source {source!r}: expected one of {', '.join(QUERY_SOURCES)}")
    if path is not None and path.exists():
        return [Query(q["text"], tuple(q.get("answers", ())), meta=q.get("meta", {})) for q in json.loads(path.read_text())]
    qs: list[Query] = []
    if source == "dataset":
        qs = [Query(q, tuple(a), meta={"origin": "dataset"}) for q, a in questions]
    elif source == "selfstudy":
        qs = self_study(job.teacher_base, job.base.tokenizer, job.context, n, 0, seed, chunk_tokens, bf16=job.bf16,
                        progress=False)[0]
    if len(qs) < n:  # sentence questions fill up (and are the whole set for source 'sentences')
        pieces = chunks(job.base.tokenizer, job.context, chunk_tokens)
        per = [sentence_queries(p) for p in pieces]
        extra = [Query(q, meta={"origin": "sentence", "type": t}) for i in range(max(map(len, per), default=0))
                 for p in per if i < len(p) for t, q in [p[i]]]
        qs = dedupe(qs + extra)
    if not qs:
        qs = [Query("Summarize the text.", meta={"origin": "generic"})]
    qs = qs[:n]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, [{"text": q.text, "answers": list(q.answers), "meta": dict(q.meta or {})} for q in qs])
    return qs
