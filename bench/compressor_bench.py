"""The amortized compressor on held-out SQuAD paragraphs (SmolLM2-135M-Instruct).

For each held-out paragraph of 150-500 tokens (the ``eval`` split by context hash, which training never
sees: checked against every compressor's list of training and dev contexts), against the frozen model
reading the whole paragraph (the teacher), on the paragraph's own SQuAD questions (+ " Answer in a
few words.", never generated, never trained on):

- one forward of each compressor: KL per token along the teacher's greedy answer, the fraction of the
  no-context KL gap it closes, top-1 agreement, ROUGE-L and answer F1; the truncated context at the same
  budget (the template's head plus the first m context tokens) and no context beside it; the time of
  the forward;
- on the first ``--refine-contexts`` paragraphs, with the first compressor: per-context compression
  of the same kind (self-study queries, teacher, ``--per-context-steps`` steps; the loop of
  ``softprompt compress``), timed, and ``--refine`` from the compressor's prompt for a quarter and an
  eighth of those steps on the same queries: does it reach the per-context fidelity in a quarter?

    python bench/compressor_bench.py --compressor runs/kv [--compressor runs/projector] [--contexts 6]
Results: bench/results/compressor_bench.{json,md} (``--name`` another stem), written after every context.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "src"))

from softprompt.hardware import hardware_line, hardware_report  # noqa: E402

NAME = "compressor_bench"
GOALS = {"gap": 0.5, "speedup": 100.0, "refine_share": 0.25}
METRICS = ("kl_per_token", "kl_gap_closed", "top1_agreement", "rouge_l", "answer_f1")


def eval_contexts(tokenizer, lo: int, hi: int, count: int, seed: int) -> list:
    from softprompt.compress.amortized.contexts import filter_length, read_shared, split_contexts

    ctx = split_contexts(read_shared(DATA, ("squad",)))["eval"]
    ctx = sorted(ctx, key=lambda c: c.sha)
    random.Random(seed).shuffle(ctx)
    return filter_length(ctx[:count * 6], tokenizer, lo, hi)[:count]


def held_queries(ctx, n: int):
    from softprompt.data.queries import Query

    return [Query(q + " Answer in a few words.", tuple(dict.fromkeys(a))) for q, a in ctx.questions[:n]]


def fid(rep: dict) -> dict:
    return {k: {m: v.get(m) for m in METRICS} for k, v in rep["fidelity"].items() if k != "teacher"}


def one_forward(comp, ctx, held, work: Path, args) -> dict:
    job = comp.job(ctx.text, work, baselines=("truncated", "none"), max_new_tokens=args.max_new_tokens, timing_repeats=1,
                   timing_queries=2, cache_dir=str(work / "teacher_cache"))
    job.heldout_q, job.fit_q, job.dev_q, job.history, job.queries = held, [], [], [], held
    job._check_window()
    entries, _ = job.teacher_entries("heldout", held)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        job.prompt = comp.prompt(ctx.text, job)
        times.append(time.perf_counter() - t0)
    rep = job.evaluate(entries)
    return {"forward_s": statistics.median(times), "fidelity": fid(rep), "positions": job.n_positions}


def per_context_and_refine(comp, ctx, held, work: Path, args) -> dict:
    from softprompt.base_model import BaseModel  # noqa: F401 - the job's base is the compressor's
    from softprompt.compress.amortized.refine import RefineJob
    from softprompt.compress.compressor import CompressConfig, Compressor

    S = args.per_context_steps
    common = dict(max_new_tokens=args.max_new_tokens, baselines=("truncated", "none"), timing_repeats=1, timing_queries=2,
                  cache_dir=str(work / "teacher_cache"), patience=0, batch_size=8)
    cfg = CompressConfig(model=comp.base.name, tokens=comp.memory, kind="prefix" if comp.form == "kv" else "prompt-tuning",
                         steps=S, eval_every=max(1, S // 4), n_queries=args.train_queries, n_heldout=0,
                         precision="bf16" if comp.precision.bf16 else "fp32", **common)
    job = Compressor(ctx.text, cfg, None, work / "per-context", base=comp.base, progress=not args.quiet, heldout_queries=held)
    t0 = time.perf_counter()
    job.split()
    t_q = time.perf_counter() - t0
    fit, _ = job.teacher_entries("train", job.fit_q)
    dev, _ = job.teacher_entries("dev", job.dev_q) if job.dev_q else ([], True)
    t_t = time.perf_counter() - t0 - t_q
    job.train(fit, dev)
    t_train = time.perf_counter() - t0 - t_q - t_t
    held_e, _ = job.teacher_entries("heldout", held)
    out = {"per_context": {"steps": S, "queries_s": t_q, "teacher_s": t_t, "train_s": t_train, "total_s": t_q + t_t + t_train,
                           "n_train_queries": len(job.fit_q), "fidelity": fid(job.evaluate(held_e))["soft"]}, "refine": []}
    for k in sorted({max(1, S // 8), max(1, S // 4)}):
        rj = comp.job(ctx.text, work / f"refine-{k}", cls=RefineJob, steps=k, eval_every=max(1, k // 2),
                      queries=list(job.train_q), **common)
        rj.fixed_heldout = held
        rj.start = comp.prompt(ctx.text, rj)
        t0 = time.perf_counter()
        rj.split()
        rf, _ = rj.teacher_entries("train", rj.fit_q)
        rd, _ = rj.teacher_entries("dev", rj.dev_q) if rj.dev_q else ([], True)
        rj.train(rf, rd)
        t_r = time.perf_counter() - t0
        rh, _ = rj.teacher_entries("heldout", held)
        out["refine"].append({"steps": k, "train_s": t_r, "fidelity": fid(rj.evaluate(rh))["soft"]})
    return out


def _f(x, d=3):
    return "-" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))


def summarize(rows: list[dict], names: list[str]) -> dict:
    s = {}
    for n in names:
        one = [r["compressors"][n] for r in rows]

        def mean(key, var="soft", one=one):
            return statistics.mean(o["fidelity"][var][key] for o in one)
        s[n] = {"contexts": len(one), "kl": mean("kl_per_token"), "gap_closed": mean("kl_gap_closed"),
                "truncated_kl": mean("kl_per_token", "truncated"), "truncated_gap_closed": mean("kl_gap_closed", "truncated"),
                "none_kl": mean("kl_per_token", "none"), "top1": mean("top1_agreement"),
                "truncated_top1": mean("top1_agreement", "truncated"), "forward_s": statistics.median(o["forward_s"] for o in one)}
    pc = [r for r in rows if r.get("refine_bench")]
    if pc:
        b = [r["refine_bench"] for r in pc]
        s["per_context"] = {"contexts": len(b), "total_s": statistics.mean(x["per_context"]["total_s"] for x in b),
                            "kl": statistics.mean(x["per_context"]["fidelity"]["kl_per_token"] for x in b),
                            "steps": b[0]["per_context"]["steps"],
                            "speedup_vs_first": statistics.mean(x["per_context"]["total_s"] / r["compressors"][names[0]]["forward_s"]
                                                                for x, r in zip(b, pc)),
                            "refine": [{"steps": k["steps"], "kl": statistics.mean(x["refine"][i]["fidelity"]["kl_per_token"] for x in b)}
                                       for i, k in enumerate(b[0]["refine"])]}
    return s


def write(rows: list[dict], names: list[str], meta: dict, hw_line: str, name: str = NAME) -> None:
    from softprompt.atomic import atomic_write_json, atomic_write_text

    summary = summarize(rows, names) if rows else {}
    atomic_write_json(RESULTS / f"{name}.json", {**meta, "rows": rows, "summary": summary})
    lines = ["# Amortized compressor: held-out SQuAD paragraphs", "", hw_line, "",
             f"Settings: `{json.dumps(meta['settings'])}`", ""]
    for n in names:
        lines += [f"Compressor `{n}`: {json.dumps(meta['compressors'][n])}", ""]
    lines += ["## One forward vs truncation and no context (per paragraph)", "",
              "| paragraph | tokens | compressor | KL soft | KL truncated | KL none | gap closed soft | gap closed truncated | "
              "top-1 soft | top-1 truncated | answer F1 soft / trunc / none | forward ms |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for n in names:
            o = r["compressors"][n]
            f = o["fidelity"]
            lines.append(f"| {r['sha']} | {r['tokens']} | {n} | {_f(f['soft']['kl_per_token'])} | {_f(f['truncated']['kl_per_token'])} | "
                         f"{_f(f['none']['kl_per_token'])} | {_f(f['soft']['kl_gap_closed'])} | {_f(f['truncated']['kl_gap_closed'])} | "
                         f"{_f(f['soft']['top1_agreement'])} | {_f(f['truncated']['top1_agreement'])} | "
                         f"{_f(f['soft'].get('answer_f1'), 2)} / {_f(f['truncated'].get('answer_f1'), 2)} / {_f(f['none'].get('answer_f1'), 2)} | "
                         f"{o['forward_s'] * 1000:.0f} |")
    lines += ["", "## Means", "", "| compressor | contexts | KL soft | KL truncated | KL none | gap closed | truncated gap closed | "
              "top-1 soft | top-1 truncated | forward ms (median) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in names:
        if n in summary:
            s = summary[n]
            lines.append(f"| {n} | {s['contexts']} | {_f(s['kl'])} | {_f(s['truncated_kl'])} | {_f(s['none_kl'])} | {_f(s['gap_closed'])} | "
                         f"{_f(s['truncated_gap_closed'])} | {_f(s['top1'])} | {_f(s['truncated_top1'])} | {s['forward_s'] * 1000:.0f} |")
    pcs = [r for r in rows if r.get("refine_bench")]
    if pcs:
        lines += ["", f"## Per-context compression vs one forward and --refine (compressor `{names[0]}`)", "",
                  "| paragraph | per-context steps | per-context s (queries + teacher + train) | per-context KL | one-forward KL | "
                  "speedup of one forward | refine steps: KL |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in pcs:
            b = r["refine_bench"]
            p = b["per_context"]
            fw = r["compressors"][names[0]]
            ref = ", ".join(f"{x['steps']}: {_f(x['fidelity']['kl_per_token'])}" for x in b["refine"])
            lines.append(f"| {r['sha']} | {p['steps']} | {p['total_s']:.0f} ({p['queries_s']:.0f} + {p['teacher_s']:.0f} + "
                         f"{p['train_s']:.0f}) | {_f(p['fidelity']['kl_per_token'])} | {_f(fw['fidelity']['soft']['kl_per_token'])} | "
                         f"{p['total_s'] / fw['forward_s']:.0f}x | {ref} |")
    atomic_write_text(RESULTS / f"{name}.md", "\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compressor", action="append", required=True, help="a trained compressor directory (repeatable)")
    ap.add_argument("--contexts", type=int, default=6, help="held-out paragraphs (default 6)")
    ap.add_argument("--min-tokens", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=500)
    ap.add_argument("--questions", type=int, default=6, help="held-out SQuAD questions per paragraph (default 6)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--refine-contexts", type=int, default=2, help="paragraphs with per-context compression and refine")
    ap.add_argument("--per-context-steps", type=int, default=40)
    ap.add_argument("--train-queries", type=int, default=16, help="self-study queries for per-context compression / refine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/compressor_bench")
    ap.add_argument("--name", default=NAME, help=f"results file stem under bench/results (default {NAME})")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    from softprompt.base_model import load_base
    from softprompt.compress.amortized import Compressor

    base = load_base("smollm2", device="cpu")
    comps = {Path(p).name: Compressor.load(p, base=base) for p in args.compressor}
    names = list(comps)
    seen = set()
    for c in comps.values():
        seen |= set(c.meta.get("contexts", {}).get("train", [])) | set(c.meta.get("contexts", {}).get("dev", []))
    ctxs = eval_contexts(base.tokenizer, args.min_tokens, args.max_tokens, args.contexts, args.seed)
    leaked = [c.sha for c in ctxs if c.sha in seen]
    if leaked:
        raise SystemExit(f"held-out paragraphs {leaked} were used in training: refusing to benchmark on them")
    hw = hardware_report()
    meta = {"settings": {k: v for k, v in vars(args).items() if k not in ("quiet", "name")}, "hardware": hw,
            "compressors": {n: {"form": c.form, "memory": c.memory, "metrics": c.meta.get("metrics"),
                                "train_contexts": len(c.meta.get("contexts", {}).get("train", [])),
                                "train_config": {k: c.meta.get("train_config", {}).get(k) for k in
                                                 ("queries_per_context", "query_source", "steps", "contexts_per_step", "lr")}}
                            for n, c in comps.items()},
            "goals": GOALS, "leak_check": f"{len(ctxs)} held-out paragraphs, none among {len(seen)} training/dev contexts"}
    rows: list[dict] = []
    work = Path(args.work)
    for i, ctx in enumerate(ctxs):
        held = held_queries(ctx, args.questions)
        row = {"sha": ctx.sha, "tokens": len(base.tokenizer(ctx.text, add_special_tokens=False).input_ids),
               "questions": len(held), "compressors": {}}
        for n, c in comps.items():
            row["compressors"][n] = one_forward(c, ctx, held, work / ctx.sha / n, args)
            print(f"[{i + 1}/{len(ctxs)}] {ctx.sha} {n}: {json.dumps(row['compressors'][n]['fidelity']['soft'])}", flush=True)
        rows.append(row)
        write(rows, names, meta, hardware_line(hw), args.name)
    for i, (row, ctx) in enumerate(zip(rows[:args.refine_contexts], ctxs)):
        row["refine_bench"] = per_context_and_refine(comps[names[0]], ctx, held_queries(ctx, args.questions),
                                                     work / ctx.sha / "per-context-bench", args)
        print(f"[per-context {i + 1}] {json.dumps(row['refine_bench'])}", flush=True)
        write(rows, names, meta, hardware_line(hw), args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
