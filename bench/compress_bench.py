"""Context compression on SmolLM2-135M-Instruct: prompt tuning vs KV-prefix students, against the
truncated context, no context and LLMLingua at the same token budget.

Contexts: the 557-token bike-shop instruction set (bench/data) and SQuAD paragraphs of 500-900 tokens.
Training queries are self-study queries generated from each context (softprompt.compress.selfstudy);
held-out queries are never generated: the 28 user queries of bench/data for the instructions, the
paragraphs' own SQuAD questions (+ " Answer in a few words.", scored also by answer F1) for SQuAD.
Each context's teacher outputs are computed once and shared by every student (the cache key holds no
student setting).

Runs per context (N soft positions, default 32):
- prompt tuning, N tokens (context-text init);
- KV prefix, N context positions, first / even / attention (equal positions with prompt tuning);
- equal bytes: KV prefix with 1 context position (plus the template's head) vs prompt tuning with as
  many tokens as that prefix has floats / hidden size;
- on the instruction set, fidelity vs the number of training queries (--curve 16,64,256) for the prefix.

    python bench/compress_bench.py [--quick] [--tokens 32] [--queries 256] [--curve 16,64,256]
Results: bench/results/compress_bench.{json,md}, written after every run.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "src"))

from softprompt.hardware import hardware_line, hardware_report  # noqa: E402

NAME = "compress_bench"
GOALS = {"top1": 0.90, "gap": 0.80, "rouge_l": 0.6}


def squad_contexts(tokenizer, lo: int, hi: int, count: int, seed: int) -> list[dict]:
    """``count`` SQuAD dev paragraphs (single paragraphs, else runs of consecutive ones of one article)
    of ``lo``-``hi`` tokens, from different articles in seeded order, with their questions."""
    doc = json.loads((DATA / "squad-v1.1" / "dev-v1.1.json").read_text())["data"]
    order = list(range(len(doc)))
    random.Random(seed).shuffle(order)
    out = []
    for a in order:
        paras = doc[a]["paragraphs"]
        lens = [len(x) for x in tokenizer([p["context"] for p in paras], add_special_tokens=False).input_ids]
        for i in range(len(paras)):
            total, j = 0, i
            while j < len(paras) and total < lo:
                total += lens[j] + 1
                j += 1
            if lo <= total <= hi:
                ps = paras[i:j]
                qs = list(dict.fromkeys((qa["question"].strip(), tuple(dict.fromkeys(x["text"].strip() for x in qa["answers"])))
                                        for p in ps for qa in p["qas"]))
                out.append({"name": f"squad-{doc[a]['title'][:18]}", "kind": "squad", "title": doc[a]["title"],
                            "text": "\n".join(p["context"] for p in ps), "questions": qs})
                break
        if len(out) == count:
            break
    return out


def heldout_for(ctx: dict, n: int, seed: int):
    from softprompt.compress import Query, read_queries

    if ctx["kind"] == "squad":
        qs = [Query(q + " Answer in a few words.", answers) for q, answers in ctx["questions"]]
    else:
        qs = [Query(q.text) for q in read_queries(REPO / "bench" / "data" / "compress_instruction_queries.txt")]
    random.Random(seed).shuffle(qs)
    return qs[:n]


def run_one(base, ctx: dict, train, held, label: str, kind: str, tokens: int, positions: str, args, cache: Path,
            out: Path, extra: dict, objective: str = "forward_kl", ss_held=()) -> dict:
    from softprompt.compress import CompressConfig, Compressor

    cfg = CompressConfig(tokens=tokens, kind=kind, positions=positions, steps=args.steps, eval_every=args.eval_every,
                         patience=args.patience, batch_size=args.batch_size, lr=args.lr_prefix if kind == "prefix" else args.lr,
                         max_new_tokens=args.max_new_tokens, topk=args.topk, precision=args.precision, device="cpu",
                         cache_dir=str(cache), timing_repeats=1, timing_queries=2, seed=args.seed,
                         baselines=("truncated", "none", "llmlingua"), objective=objective, temperature=args.temperature,
                         mode_weight=args.mode_weight)
    t0 = time.perf_counter()
    job = Compressor(ctx["text"], cfg, train, out, base=base, progress=not args.quiet, heldout_queries=held)
    res = job.run()
    r = res.report
    row = {"context": ctx["name"], "context_tokens": r["context_tokens"], "run": label, "kind": kind, "soft_tokens": tokens, "objective": objective,
           "student_positions": r["student_positions"], "positions": positions if kind == "prefix" else None,
           "prompt_bytes": r["cost"]["prompt_param_bytes"], "n_train": r["n_train"], "n_dev": r["n_dev"],
           "n_heldout": r["n_heldout"], "steps": r["train"]["steps"], "best_step": r["train"]["best_step"],
           "stopped_early": r["train"]["stopped_early"], "curve": r["train"]["curve"], "train_s": r["train"]["time_s"],
           "teacher_s": r["teacher"]["time_s"], "teacher_cache": r["teacher"]["cache"], "wall_s": time.perf_counter() - t0,
           "kv_full": r["cost"]["full"]["kv_bytes"], "kv_soft": r["cost"]["soft"]["kv_bytes"],
           "llmlingua_tokens": len(base.tokenizer(r["llmlingua_text"], add_special_tokens=False).input_ids)
           if r.get("llmlingua_text") else None, **extra}
    fids = {"": r["fidelity"]}
    if ss_held:  # the same student scored on held-out queries of the training distribution (self-study, another seed)
        fids["ss_"] = job.evaluate(job.teacher_entries("heldout", list(ss_held))[0])["fidelity"]
        row["n_ss_heldout"] = len(ss_held)
    for pre, fid in fids.items():
        for v, f in fid.items():
            for m in ("kl_per_token", "top1_agreement", "rouge_l", "exact_match", "answer_f1", "kl_gap_closed",
                      "teacher_confident_share", "top1_when_confident", "top1_when_unsure"):
                if m in f:
                    row[f"{pre}{v}_{m}"] = f[m]
    row["example"] = r["examples"][:1]
    return row


COLS = [("context", "context", "{}"), ("ctx tok", "context_tokens", "{}"), ("run", "run", "{}"), ("N", "soft_tokens", "{}"),
        ("pos", "student_positions", "{}"), ("KiB", "prompt_bytes", "{:.0f}"), ("train q", "n_train", "{}"),
        ("steps", "steps", "{}"), ("best", "best_step", "{}"),
        ("KL soft", "soft_kl_per_token", "{:.3f}"), ("gap soft", "soft_kl_gap_closed", "{:.0%}"),
        ("KL trunc", "truncated_kl_per_token", "{:.3f}"), ("KL lingua", "llmlingua_kl_per_token", "{:.3f}"),
        ("KL none", "none_kl_per_token", "{:.3f}"),
        ("top1 soft", "soft_top1_agreement", "{:.3f}"), ("top1 trunc", "truncated_top1_agreement", "{:.3f}"),
        ("top1 lingua", "llmlingua_top1_agreement", "{:.3f}"), ("top1 none", "none_top1_agreement", "{:.3f}"),
        ("top1 soft, teacher p>=0.5", "soft_top1_when_confident", "{:.3f}"), ("top1 soft, p<0.5", "soft_top1_when_unsure", "{:.3f}"),
        ("share p>=0.5", "soft_teacher_confident_share", "{:.0%}"),
        ("RL soft", "soft_rouge_l", "{:.3f}"), ("RL trunc", "truncated_rouge_l", "{:.3f}"), ("RL lingua", "llmlingua_rouge_l", "{:.3f}"),
        ("F1 soft", "soft_answer_f1", "{:.3f}"), ("lingua tok", "llmlingua_tokens", "{}"), ("train s", "train_s", "{:.0f}"),
        ("self-study held-out: KL soft", "ss_soft_kl_per_token", "{:.3f}"), ("gap soft", "ss_soft_kl_gap_closed", "{:.0%}"),
        ("top1 soft", "ss_soft_top1_agreement", "{:.3f}"), ("top1 trunc", "ss_truncated_top1_agreement", "{:.3f}"),
        ("top1 none", "ss_none_top1_agreement", "{:.3f}"), ("share p>=0.5", "ss_soft_teacher_confident_share", "{:.0%}"),
        ("RL soft", "ss_soft_rouge_l", "{:.3f}")]


def cell(row: dict, key: str, fmt: str) -> str:
    if row.get(key) is None:
        return "-"
    v = row[key] / 1024 if key == "prompt_bytes" else row[key]
    return fmt.format(v)


def findings(rows: list[dict], prep: dict) -> list[str]:
    """Sentences computed from the rows (no hand-written numbers)."""
    out = []
    for name in dict.fromkeys(r["context"] for r in rows):
        rs = [r for r in rows if r["context"] == name and not r["run"].startswith("queries-")]
        if not rs:
            continue
        budget = [r for r in rs if not r["run"].startswith("equal-bytes")]  # the equal-bytes rows break the position budget
        best = min(budget or rs, key=lambda r: r["soft_kl_per_token"])
        b = best
        met = [f"top-1 {b['soft_top1_agreement']:.3f} (goal {GOALS['top1']})", f"KL gap closed {b['soft_kl_gap_closed']:.0%} (goal 80%)",
               f"ROUGE-L {b['soft_rouge_l']:.3f} (goal {GOALS['rouge_l']})"]
        beats = [f"{k} KL {b[f'{k}_kl_per_token']:.3f}" for k in ("truncated", "llmlingua") if f"{k}_kl_per_token" in b]
        out.append(f"{name} ({b['context_tokens']} tokens): best student `{b['run']}` (KL {b['soft_kl_per_token']:.3f}): "
                   + "; ".join(met) + "; vs " + ", ".join(beats) + f", none {b['none_kl_per_token']:.3f}.")
        p = prep.get(name)
        if p:
            teacher_s = max(r["teacher_s"] for r in rs)  # the run that filled the shared cache
            total = p["generate_s"] + teacher_s + best["train_s"]
            out.append(f"{name}: self-study generation {p['generate_s']:.0f} s for {p['n_train']} training queries; "
                       f"teacher {teacher_s:.0f} s (first run); best run trained {best['train_s']:.0f} s; "
                       f"end to end {total:.0f} s (goal 600 s).")
        for r in rs:
            if "ss_soft_kl_per_token" in r:
                out.append(f"{name} / {r['run']}: on {r['n_ss_heldout']} held-out self-study queries (the training distribution) "
                           f"KL {r['ss_soft_kl_per_token']:.3f}, gap {r['ss_soft_kl_gap_closed']:.0%}, top-1 {r['ss_soft_top1_agreement']:.3f}, "
                           f"ROUGE-L {r['ss_soft_rouge_l']:.3f}; on the {r['n_heldout']} held-out queries that are never generated KL "
                           f"{r['soft_kl_per_token']:.3f}, gap {r['soft_kl_gap_closed']:.0%}, top-1 {r['soft_top1_agreement']:.3f}, "
                           f"ROUGE-L {r['soft_rouge_l']:.3f}.")
        pos = {r["run"]: r["soft_kl_per_token"] for r in rs}
        if "prompt-tuning" in pos and any(k.startswith("prefix-") for k in pos):
            out.append(f"{name}, equal positions ({rs[0]['soft_tokens']}): " + ", ".join(f"{k} KL {v:.3f}" for k, v in pos.items()
                                                                                     if not k.startswith("equal-bytes")) + ".")
        eb = [r for r in rs if r["run"].startswith("equal-bytes")]
        if len(eb) == 2:
            out.append(f"{name}, equal bytes: " + ", ".join(f"{r['run']} ({r['prompt_bytes'] / 1024:.0f} KiB, {r['student_positions']} "
                                                             f"positions) KL {r['soft_kl_per_token']:.3f}" for r in eb) + ".")
        curve = sorted((r for r in rows if r["context"] == name and r["run"].startswith("queries-")), key=lambda r: r["n_train"])
        kind = curve[0]["kind"] if curve else None
        full = next((r for r in rs if r["run"] == ("prompt-tuning" if kind == "prompt-tuning" else "prefix-first")), None)
        if curve and full:
            pts = [(r["n_train"] + r["n_dev"], r) for r in curve] + [(full["n_train"] + full["n_dev"], full)]
            out.append(f"{name}, fidelity vs training queries ({full['run']}): "
                       + ", ".join(f"{q}: KL {r['soft_kl_per_token']:.3f} / top-1 {r['soft_top1_agreement']:.3f}" for q, r in pts) + ".")
    return out


def write(rows, prep, meta, hw_line) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps({"meta": meta, "prep": prep, "rows": rows}, indent=1))
    head = [c[0] for c in COLS]
    body = [[cell(r, k, f) for _, k, f in COLS] for r in rows]
    md = ["# Context compression on SmolLM2-135M-Instruct", "", hw_line, "",
          f"Settings: {json.dumps(meta['settings'])}. Total wall time {meta.get('total_s', 0):.0f} s.", "",
          "Held-out queries are never generated (instructions: the 28 user queries of bench/data; SQuAD: the paragraphs' "
          "own questions). KL = exact full-vocabulary KL(teacher || variant) per token along the teacher's greedy "
          "continuation; gap = share of the no-context KL closed; top1 = next-token agreement; RL = ROUGE-L of the "
          "variant's greedy continuation vs the teacher's; lingua = LLMLingua (same model as scorer) asked for N tokens "
          "('lingua tok': what it returned); KiB = trained prompt size (fp32); pos = KV positions the prompt occupies.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]
    md += ["", "## Computed findings", ""] + [f"- {x}" for x in findings(rows, prep)]
    md += ["", "## Dev-KL curves (step: dev KL)", ""]
    for r in rows:
        md.append(f"- {r['context']} / {r['run']}: " + ", ".join(f"{c['step']}: {c['dev_kl']:.3f}" for c in r["curve"]))
    (RESULTS / f"{NAME}.md").write_text("\n".join(md) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--queries", type=int, default=256, help="self-study training queries per context")
    ap.add_argument("--squad-queries", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--selfstudy-heldout", type=int, default=0,
                    help="also score every student on this many held-out self-study queries (another seed): the training "
                         "distribution, never trained on, against the user/SQuAD queries' distribution")
    ap.add_argument("--squad", type=int, default=2, help="SQuAD contexts of 500-900 tokens")
    ap.add_argument("--squad-skip", type=int, default=0, help="skip the first K of those SQuAD contexts (run the later ones alone)")
    ap.add_argument("--contexts", default="instructions,squad", help="which contexts: instructions, squad or both")
    ap.add_argument("--curve", default="16,64", help="query counts for the fidelity-vs-queries curve (instructions, prefix)")
    ap.add_argument("--curve-kind", default="prompt-tuning", choices=["prompt-tuning", "prefix"], help="the student of the queries curve")
    ap.add_argument("--runs", default="prompt-tuning,prefix-first,prefix-even,prefix-attention,equal-bytes",
                    help="also RUN:OBJECTIVE (e.g. prompt-tuning:reverse_kl) for a run with another distillation objective")
    ap.add_argument("--temperature", type=float, default=1.0, help="distillation temperature of every run")
    ap.add_argument("--mode-weight", type=float, default=0.0, help="every run: weight of the cross-entropy on the teacher's top token")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--lr-prefix", type=float, default=0.005)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--name", default="compress_bench", help="results file name under bench/results/")
    args = ap.parse_args()
    global NAME
    NAME = args.name
    if args.quick:
        args.queries, args.squad_queries, args.heldout, args.squad, args.steps, args.curve = 16, 16, 4, 1, 6, ""
        args.eval_every = 3
    import tempfile

    import torch

    from softprompt.base_model import load_base
    from softprompt.compress.selfstudy import self_study
    from softprompt.precision import resolve_precision

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    hw = hardware_report()
    base = load_base("smollm2", device="cpu")
    tok = base.tokenizer
    ctxs = [{"name": "instructions", "kind": "instructions", "text": (REPO / "bench" / "data" / "compress_instructions.txt").read_text()}]
    squad = squad_contexts(tok, 500, 900, args.squad_skip + args.squad, args.seed)[args.squad_skip:] if "squad" in args.contexts else []
    ctxs = (ctxs if "instructions" in args.contexts else []) + squad
    meta = {"settings": {k: v for k, v in vars(args).items() if k != "quiet"}, "hardware": hw}
    rows, prep = [], {}
    runs = [x for x in args.runs.split(",") if x]
    n = args.tokens
    bf16 = resolve_precision(args.precision, "cpu", announce=False).bf16
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        state = {}
        for ctx in ctxs:  # self-study queries first: every context's main runs come before any secondary run
            held = heldout_for(ctx, args.heldout, args.seed)
            nq = args.queries if ctx["kind"] == "instructions" else args.squad_queries
            t0 = time.perf_counter()
            train, _ = self_study(base, tok, ctx["text"], nq, 0, args.seed, bf16=bf16, progress=not args.quiet,
                                  exclude=[q.text for q in held])
            gen_s, t0 = time.perf_counter() - t0, time.perf_counter()
            ss_held = (self_study(base, tok, ctx["text"], args.selfstudy_heldout, 0, args.seed + 7919, bf16=bf16, progress=not args.quiet,
                                  exclude=[q.text for q in held + train])[0] if args.selfstudy_heldout else [])
            prep[ctx["name"]] = {"generate_s": gen_s, "n_train": len(train), "n_ss_heldout": len(ss_held),
                                 "ss_heldout_generate_s": time.perf_counter() - t0, "ss_heldout": [q.text for q in ss_held],
                                 "types": {t: sum(q.meta["type"] == t for q in train) for t in dict.fromkeys(q.meta["type"] for q in train)},
                                 "origins": {o: sum(q.meta["origin"] == o for q in train) for o in dict.fromkeys(q.meta["origin"] for q in train)},
                                 "sample_queries": [q.text for q in train[:8]]}
            state[ctx["name"]] = (held, train, ss_held)
        plan = []  # (phase, ctx, label, kind, tokens, positions, train queries)
        for ctx in ctxs:
            held, train, _ = state[ctx["name"]]
            main_runs = [("prompt-tuning", "prompt-tuning", n, "first")] + [(f"prefix-{p}", "prefix", n, p) for p in ("first", "attention", "even")]
            for label, kind, tokens, pos in main_runs:
                for r in runs:
                    name, _, objective = r.partition(":")
                    if name == label and (ctx["kind"] == "instructions" or label != "prefix-even"):
                        plan.append((0, ctx, r, kind, tokens, pos, train, objective or "forward_kl"))
            if "equal-bytes" in runs and ctx["kind"] == "instructions":
                layers, kvh, hd = 30, 3, 64  # SmolLM2-135M: the prefix's floats per position
                head = 3
                pt_tokens = (head + 1) * layers * 2 * kvh * hd // base.hidden_size
                plan.append((1, ctx, "equal-bytes-prefix-1", "prefix", 1, "attention", train, "forward_kl"))
                plan.append((1, ctx, f"equal-bytes-prompt-tuning-{pt_tokens}", "prompt-tuning", pt_tokens, "first", train, "forward_kl"))
            if ctx["kind"] == "instructions":
                for q in [int(x) for x in args.curve.split(",") if x]:
                    if q < len(train):
                        plan.append((1, ctx, f"queries-{q}", args.curve_kind, n, "first", train[:q], "forward_kl"))
        plan.sort(key=lambda p: p[0])
        for _, ctx, label, kind, tokens, pos, tq, objective in plan:
            held, _, ss_held = state[ctx["name"]]
            cache = tmp / ctx["name"] / "cache"
            print(f"== {ctx['name']} {label}", flush=True)
            try:
                row = run_one(base, ctx, tq, held, label, kind, tokens, pos, args, cache if not label.startswith("queries-")
                              else tmp / ctx["name"] / label, tmp / ctx["name"] / label, {}, objective,
                              ss_held if not label.startswith("queries-") else ())
            except Exception as e:  # noqa: BLE001 - record and go on
                print(f"   failed: {e!r}", flush=True)
                continue
            rows.append(row)
            print(f"   KL {row['soft_kl_per_token']:.3f} (trunc {row.get('truncated_kl_per_token', 0):.3f}, lingua "
                  f"{row.get('llmlingua_kl_per_token', 0):.3f}, none {row['none_kl_per_token']:.3f}) top1 "
                  f"{row['soft_top1_agreement']:.3f} steps {row['steps']} {row['wall_s']:.0f}s", flush=True)
            meta["total_s"] = time.perf_counter() - t_all
            write(rows, prep, meta, hardware_line(hw))
    meta["total_s"] = time.perf_counter() - t_all
    write(rows, prep, meta, hardware_line(hw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
