"""Evaluation: soft prompts beside hand-written zero-shot and few-shot prompts, on one dev set.

Classification is scored by ranking the label words' log-probabilities (one forward per example and
label, no sampling); generation by greedy decoding and exact match, ROUGE-L or BLEU. Every score comes
with a bootstrap confidence interval, since dev sets are small.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from softprompt.artifact import PromptArtifact
from softprompt.atomic import atomic_write_json, atomic_write_text
from softprompt.base_model import BaseModel
from softprompt.data.examples import Example
from softprompt.encoding import PromptFormat
from softprompt.errors import SoftPromptError
from softprompt.generate import SamplingParams, generate
from softprompt.scoring import classify, mean_loss, perplexity
from softprompt.task_metrics import bootstrap_ci, metric_fn
from softprompt.template import Field, parse_template

DEMOS_FIELD = "_demonstrations"


@dataclass
class Contender:
    """One row of the report: a way of prompting the frozen model."""

    name: str
    fmt: PromptFormat
    prompt: object | None = None  # SoftPrompt, or None for a hard prompt
    examples_transform: object | None = None  # adds few-shot demonstrations
    n_prompt_tokens: int | None = None


@dataclass
class EvalResult:
    name: str
    metric: str
    score: float
    ci: tuple[float, float]
    n: int
    loss: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"name": self.name, "metric": self.metric, "score": self.score, "ci_low": self.ci[0], "ci_high": self.ci[1], "n": self.n}
        if self.loss is not None:
            d["loss"], d["perplexity"] = self.loss, perplexity(self.loss)
        return {**d, **self.extra}


def hard_contender(base: BaseModel, name: str, template_source: str, chat: bool = True) -> Contender:
    t = parse_template(template_source)
    if t.n_virtual:
        raise SoftPromptError(f"hard prompt {name!r} must not contain soft spans: {template_source!r}")
    return Contender(name, PromptFormat(base.tokenizer, t, chat=chat, max_length=base.max_positions))


def few_shot_contender(base: BaseModel, template_source: str, train: list[Example], k: int, seed: int = 0,
                       chat: bool = True) -> Contender:
    """The hard prompt preceded by k solved training examples (the same k for every dev example)."""
    if k < 1 or not train:
        raise SoftPromptError("few-shot needs k >= 1 and training examples to draw demonstrations from")
    t = parse_template(template_source)
    plain = PromptFormat(base.tokenizer, t, chat=False)
    demos = random.Random(seed).sample(train, min(k, len(train)))
    text = "".join(plain.render(d).rstrip() + " " + (d.target or "").strip() + "\n\n" for d in demos)
    full = type(t)((Field(DEMOS_FIELD),) + t.segments)
    fmt = PromptFormat(base.tokenizer, full, chat=chat, max_length=base.max_positions)

    def add(ex: Example) -> Example:
        return Example({**ex.fields, DEMOS_FIELD: text}, ex.target, ex.source, ex.line, ex.meta)

    return Contender(f"few-shot (k={len(demos)})", fmt, examples_transform=add)


def soft_contender(base: BaseModel, art: PromptArtifact, name: str | None = None) -> Contender:
    return Contender(name or (art.path.name if art.path else art.kind), art.prompt_format(base), art.prompt)


def evaluate(base: BaseModel, contenders: list[Contender], examples: list[Example], metric: str,
             labels: list[str] | None = None, max_new_tokens: int = 32, bf16: bool = False,
             resamples: int = 500, batch_size: int = 16) -> list[EvalResult]:
    """Score every contender on the same examples."""
    if not examples:
        raise SoftPromptError("empty evaluation set")
    metric_fn(metric)
    if labels is not None and metric not in ("accuracy", "macro_f1", "exact_match"):
        raise SoftPromptError(f"metric {metric!r} does not fit a classification task (use accuracy or macro_f1)")
    refs = [list(e.meta.get("references") or [e.target or ""]) for e in examples]
    results = []
    for c in contenders:
        exs = [c.examples_transform(e) for e in examples] if c.examples_transform else examples
        if labels is not None:
            preds = classify(base.model, c.prompt, c.fmt, exs, labels, batch_size=batch_size, bf16=bf16)
        else:
            preds = generate(base, c.prompt, c.fmt, exs, SamplingParams(max_new_tokens=max_new_tokens), batch_size=batch_size, bf16=bf16)
        score = metric_fn(metric)(preds, refs)
        ci = bootstrap_ci(metric, preds, refs, resamples=resamples)
        loss = mean_loss(base.model, c.prompt, c.fmt, exs, batch_size=batch_size, bf16=bf16) if all(e.target for e in exs) else None
        prompt_tokens = len(c.fmt.prompt_ids(exs[0]))
        results.append(EvalResult(c.name, metric, score, ci, len(exs), loss,
                                  {"prompt_tokens_first_example": prompt_tokens, "predictions": preds[:20]}))
    return results


def format_table(results: list[EvalResult]) -> str:
    rows = [("prompt", "metric", "score", "95% CI", "loss", "prompt tokens")]
    for r in results:
        rows.append((r.name, r.metric, f"{r.score:.4f}", f"[{r.ci[0]:.3f}, {r.ci[1]:.3f}]",
                     "-" if r.loss is None else f"{r.loss:.4f}", str(r.extra.get("prompt_tokens_first_example", "-"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def save_report(results: list[EvalResult], out: str | Path, title: str = "evaluation", meta: dict | None = None) -> Path:
    """JSON + Markdown + bar chart (with CI whiskers) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "eval.json", {"title": title, **(meta or {}), "results": [r.as_dict() for r in results]})
    md = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in (meta or {}).items()] + ["", "```", format_table(results), "```", ""]
    atomic_write_text(out / "eval.md", "\n".join(md))
    from softprompt.plots import _plt, save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(results)), 3.5))
    xs = range(len(results))
    ax.bar(xs, [r.score for r in results], yerr=[[r.score - r.ci[0] for r in results], [r.ci[1] - r.score for r in results]], capsize=4)
    ax.set_xticks(list(xs), [r.name for r in results], rotation=20, ha="right")
    ax.set_ylabel(results[0].metric if results else "")
    ax.set_title(title)
    save_figure(fig, out / "eval.png")
    plt.close(fig)
    return out


def results_json(results: list[EvalResult]) -> str:
    return json.dumps([r.as_dict() for r in results], indent=2)


__all__ = ["Contender", "EvalResult", "evaluate", "hard_contender", "few_shot_contender", "soft_contender",
           "format_table", "save_report"]
