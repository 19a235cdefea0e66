"""The compression report: fidelity on held-out queries for the soft prompt and two baselines (no
context, the context cut to the soft prompt's length), and the cost side (tokens, time to first token,
KV-cache bytes) with the full context and with the soft prompt. Every number comes from real forwards."""
from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from softprompt.atomic import atomic_write_json, atomic_write_text
from softprompt.compress.distill import kl_loss, rows_batch
from softprompt.compress.teacher import TeacherDists
from softprompt.encoding import Encoded, collate
from softprompt.generate import SamplingParams, generate_ids
from softprompt.hf_cache import cache_of
from softprompt.objectives import target_logits
from softprompt.precision import autocast
from softprompt.prompts import as_prompt
from softprompt.task_metrics import normalize, rouge_l

CONFIDENT_LOGP = math.log(0.5)  # top-1 agreement is also reported apart where the teacher's top token has p >= 0.5
VARIANTS = {"soft": "soft prompt", "truncated": "truncated context", "none": "no context"}


def answer_f1(pred: str, golds: list[str]) -> float:
    """SQuAD token F1 of a prediction, best over the gold answers."""
    best = 0.0
    p = normalize(pred).split()
    for g in golds:
        gt = normalize(g).split()
        common = sum((Counter(p) & Counter(gt)).values())
        if common:
            prec, rec = common / len(p), common / len(gt)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def forced_logits(model, prompt, prompt_rows: list[list[int]], conts: list[list[int]], pad_id: int,
                  bf16: bool = False, batch_size: int = 8) -> list[torch.Tensor]:
    """Per row, ``[len(cont), vocab]`` logits along the given continuation."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for i in range(0, len(prompt_rows), batch_size):
        rows = list(zip(prompt_rows[i:i + batch_size], conts[i:i + batch_size]))
        with autocast(device, bf16):
            logits = target_logits(model, prompt, rows_batch(rows, pad_id, device), share_prefix=False)[0].float()
        out += list(logits.split([len(c) for _, c in rows]))
    return out


@torch.no_grad()
def greedy(base, prompt, prompt_rows: list[list[int]], max_new_tokens: int, bf16: bool = False,
           batch_size: int = 8) -> list[list[int]]:
    """Greedy continuations (the ordinary generation path, left-padded batches)."""
    out: list[list[int]] = []
    for i in range(0, len(prompt_rows), batch_size):
        items = [Encoded(r, [-100] * len(r), len(r)) for r in prompt_rows[i:i + batch_size]]
        batch = {k: v.to(base.device) for k, v in collate(items, base.tokenizer.pad_token_id, left=True).items()}
        out += generate_ids(base.model, prompt, batch, SamplingParams(max_new_tokens), base.eos_ids(), bf16=bf16)
    return out


def agreement_counts(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[int, int, int]:
    """(positions where the two top tokens agree, positions where the teacher's top token has
    probability >= 0.5, agreeing positions among those) over ``[n, vocab]`` logits."""
    hit = student_logits.argmax(-1) == teacher_logits.argmax(-1)
    confident = torch.log_softmax(teacher_logits.float(), -1).max(-1).values >= CONFIDENT_LOGP
    return int(hit.sum()), int(confident.sum()), int((hit & confident).sum())


def fidelity(base, prompt, prompt_rows: list[list[int]], conts: list[list[int]], teacher_logits: list[torch.Tensor],
             teacher_texts: list[str], max_new_tokens: int, answers: list[tuple[str, ...]] | None = None,
             bf16: bool = False) -> dict:
    """Held-out fidelity of one variant against the full-context teacher."""
    tok = base.tokenizer
    logits = forced_logits(base.model, prompt, prompt_rows, conts, tok.pad_token_id, bf16)
    kl_sum, agree, n = 0.0, 0, 0
    sure, sure_agree = 0, 0  # positions where the teacher's top token has probability >= 0.5
    for s, t in zip(logits, teacher_logits):
        kl_sum += float(kl_loss(s, TeacherDists(full=torch.log_softmax(t.float(), -1))))
        counts = agreement_counts(s, t)
        agree, sure, sure_agree, n = agree + counts[0], sure + counts[1], sure_agree + counts[2], n + len(t)
    texts = [decode(tok, ids) for ids in greedy(base, prompt, prompt_rows, max_new_tokens, bf16)]
    res = {"kl_per_token": kl_sum / max(n, 1), "top1_agreement": agree / max(n, 1),
           "teacher_confident_share": sure / max(n, 1), "top1_when_confident": sure_agree / max(sure, 1),
           "top1_when_unsure": (agree - sure_agree) / max(n - sure, 1),
           "exact_match": sum(a == b for a, b in zip(texts, teacher_texts)) / max(len(texts), 1),
           "rouge_l": rouge_l(texts, [[t] for t in teacher_texts]), "tokens": n}
    if answers and any(answers):
        scored = [(x, a) for x, a in zip(texts, answers) if a]
        res["answer_f1"] = sum(answer_f1(x, list(a)) for x, a in scored) / len(scored)
    res["outputs"] = texts
    return res


def kv_bytes(cache) -> int:
    """Bytes held by a transformers cache's key/value tensors."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def prefill_cost(base, prompt, rows: list[list[int]], repeats: int = 3, bf16: bool = False) -> dict:
    """Median time to first token (prefill of the whole prompt plus the first argmax) and mean KV-cache
    bytes, one query at a time, no cache reuse."""
    model, device = base.model, base.device
    times, sizes = [], []
    for r in rows:
        batch = {"input_ids": torch.tensor([r], device=device), "attention_mask": torch.ones(1, len(r), dtype=torch.long, device=device)}
        for _ in range(repeats):
            t0 = time.perf_counter()
            inputs = as_prompt(prompt).model_inputs(model, batch["input_ids"], batch["attention_mask"])
            with autocast(device, bf16):
                out = model(**inputs, use_cache=True)
            int(out.logits[0, -1].argmax())
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        sizes.append(kv_bytes(cache_of(out)))
    return {"prompt_tokens": statistics.mean(len(r) for r in rows), "ttft_ms": 1000 * statistics.median(times),
            "kv_bytes": statistics.mean(sizes)}


# -- formatting ------------------------------------------------------------------------------------
def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def tables(report: dict) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    fid = report["fidelity"]
    has_f1 = any("answer_f1" in v for v in fid.values())
    head = ["variant", "KL/token", "top-1 agree", "exact match", "ROUGE-L"] + (["answer F1"] if has_f1 else [])
    rows = []
    for key in ("soft", "truncated", "none", "teacher"):
        if key not in fid:
            continue
        v = fid[key]
        label = {"teacher": "full context (teacher)"}.get(key, VARIANTS.get(key, key))
        rows.append([label, _fmt(v.get("kl_per_token")), _fmt(v.get("top1_agreement")), _fmt(v.get("exact_match")),
                     _fmt(v.get("rouge_l"))] + ([_fmt(v.get("answer_f1"))] if has_f1 else []))
    c = report["cost"]
    chead = ["prompt", "tokens (mean)", "TTFT ms (median)", "KV cache"]
    crows = [[name, f"{c[k]['prompt_tokens']:.0f}", f"{c[k]['ttft_ms']:.1f}", _human_bytes(c[k]["kv_bytes"])]
             for k, name in (("full", "full context"), ("soft", "soft prompt"))]
    return head, rows, chead, crows


def _text_table(head, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _md_table(head, rows) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows])


def summary_line(report: dict) -> str:
    return (f"context {report['context_tokens']} tokens -> {report['soft_tokens']} soft tokens "
            f"(compression {report['compression_ratio']:.1f}x); held-out queries: {report['n_heldout']}")


def format_text(report: dict) -> str:
    head, rows, chead, crows = tables(report)
    return "\n".join([summary_line(report), "", _text_table(head, rows), "", _text_table(chead, crows)])


def format_markdown(report: dict) -> str:
    head, rows, chead, crows = tables(report)
    c = report["cost"]
    lines = ["# Compression report", "", summary_line(report) + ".", "",
             f"Objective `{report['objective']}`, temperature {report['temperature']}, "
             f"teacher distributions {'full vocabulary' if not report['topk'] else 'top-' + str(report['topk']) + ' + remainder'}, "
             f"{report['train']['steps']} steps, init `{report['init']}`, layout `{report['placement']}`.", "",
             "## Fidelity on held-out queries (against the full-context teacher's greedy outputs)", "",
             _md_table(head, rows), "",
             "KL/token: exact full-vocabulary KL(teacher || variant) per continuation token; top-1 agree: the "
             "variant's most likely next token equals the teacher's along the teacher's continuation; exact "
             "match / ROUGE-L: the variant's own greedy continuation against the teacher's.", "",
             "## Cost", "", _md_table(chead, crows), "",
             f"KV cache {c['kv_ratio']:.1f}x smaller, time to first token {c['ttft_speedup']:.2f}x faster with the soft prompt "
             f"(device {c['device']}, {'bf16' if c['bf16'] else 'fp32'}; timings on a shared machine are noisy).", ""]
    t = report.get("time") or {}
    if "compress_s" in t:
        lines += [f"Compressed in {t['compress_s']:.0f} s (queries {t['queries_s']:.0f} s, teacher {t['teacher_s']:.0f} s, "
                  f"training {t['train_s']:.0f} s); this report took {t['report_s']:.0f} s more.", ""]
    if report.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    if report.get("examples"):
        lines += ["## Examples", ""]
        for ex in report["examples"]:
            lines += [f"**{ex['query']}**", ""] + [f"- {k}: {v!r}" for k, v in ex.items() if k != "query"] + [""]
    return "\n".join(lines)


def write_report(report: dict, out: str | Path) -> None:
    out = Path(out)
    atomic_write_json(out / "compression_report.json", report)
    atomic_write_text(out / "compression_report.md", format_markdown(report))


