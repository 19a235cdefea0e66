"""``--refine N``: per-context distillation (the ordinary compression loop) started from the
compressor's one-forward prompt instead of the context's first tokens."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from softprompt.atomic import atomic_write_json
from softprompt.compress.amortized.store import AmortizedCompressor
from softprompt.compress.compressor import Compressor, CompressResult
from softprompt.data.queries import Query
from softprompt.prompts import SoftPrompt


class RefineJob(Compressor):
    """A compression job whose student starts as a given prompt."""

    start: SoftPrompt | None = None

    def make_prompt(self) -> SoftPrompt:
        p = copy.deepcopy(self.start).to(self.base.device)
        p.requires_grad_(True)
        return p.train()


def refine(comp: AmortizedCompressor, text: str, out: str | Path, steps: int, queries: list[Query] | None = None,
           progress: bool = True, warn=None, heldout_queries: list[Query] | None = None, **cfg) -> CompressResult:
    """``steps`` steps of per-context distillation from the compressor's prompt for ``text``; writes the
    prompt artifact and its compression report to ``out`` (like ``softprompt compress``)."""
    cfg.setdefault("eval_every", max(1, min(10, steps)))
    job = comp.job(text, out, cls=RefineJob, steps=steps, queries=queries, progress=progress, **cfg)
    job.fixed_heldout = heldout_queries
    if warn:
        job._warn_cb = warn
    job.start = comp.prompt(text, job)
    res = job.run()
    meta_path = Path(out) / "prompt.json"
    meta = json.loads(meta_path.read_text())
    meta["init"] = "compressor"
    meta.setdefault("compression", {}).update(method="amortized+refine", refine_steps=steps,
                                              compressor={"form": comp.form, "memory": comp.memory,
                                                          "path": str(comp.path) if comp.path else None})
    atomic_write_json(meta_path, meta)
    return res
