"""The compression teacher one query at a time vs 16 at a time (softprompt.compress.teacher), on
SmolLM2 with the 557-token instruction set: seconds for the same queries, side by side in one process,
alternating the order over ``--repeats``, and how far the batched entries are from the one-at-a-time
ones (equal continuations, largest difference of the kept log-probabilities).

    python bench/teacher_batch.py [--queries 48] [--repeats 2] [--precision bf16,fp32]   # -> bench/results/teacher_batch.{json,md}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from softprompt.hardware import hardware_line, hardware_report  # noqa: E402

NAME = "teacher_batch"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--precision", default="bf16,fp32", help="comma-separated precisions to measure")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    import softprompt.compress.compressor as cm
    from softprompt.base_model import load_base
    from softprompt.compress import CompressConfig, Compressor, read_queries
    from softprompt.compress.selfstudy import sentence_queries

    torch.set_num_threads(args.threads)
    hw = hardware_report()
    base = load_base("smollm2", device="cpu")
    text = (REPO / "bench" / "data" / "compress_instructions.txt").read_text()
    user = [q.text for q in read_queries(REPO / "bench" / "data" / "compress_instruction_queries.txt")]
    pool = list(dict.fromkeys(user + [q for _, q in sentence_queries(text)]))[:args.queries]
    from softprompt.compress import Query

    queries = [Query(q) for q in pool]
    res = {"settings": vars(args), "hardware": hw, "queries": len(queries), "runs": {}}
    for precision in [x for x in args.precision.split(",") if x]:
        cfg = CompressConfig(tokens=32, topk=64, max_new_tokens=args.max_new_tokens, precision=precision, device="cpu",
                             baselines=("none",))
        times: dict[str, list[float]] = {"one at a time": [], "16 at a time": []}
        got: dict[str, list] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.repeats):
                order = [("one at a time", 1), ("16 at a time", 16)]
                for label, batch in order if rep % 2 == 0 else order[::-1]:
                    cm.TEACHER_BATCH = batch
                    job = Compressor(text, cfg, queries, Path(tmp) / f"{label}-{rep}", base=base, progress=False)
                    t0 = time.perf_counter()
                    entries, _ = job.teacher_entries("train", queries)
                    times[label].append(time.perf_counter() - t0)
                    got[label] = entries
        one, many = got["one at a time"], got["16 at a time"]
        same = [(a, b) for a, b in zip(one, many) if a.cont == b.cont]
        # where the continuations agree: the largest difference of a kept log-probability, and the
        # probability-weighted mean difference (what the KL target sees)
        top = max(float((a.dists.logp - b.dists.logp).abs().max()) for a, b in same)
        weighted = statistics.mean(float((a.dists.logp.exp() * (a.dists.logp - b.dists.logp).abs()).sum(-1).mean()) for a, b in same)
        med = {k: statistics.median(v) for k, v in times.items()}
        res["context_tokens"] = len(job.ctx_ids)
        res["runs"]["bf16" if job.bf16 else "fp32"] = {
            "seconds": times, "median_s": med, "speedup": med["one at a time"] / med["16 at a time"],
            "equal_continuations": len(same), "max_logp_diff_when_equal": top, "weighted_logp_diff_when_equal": weighted}
    out = REPO / "bench" / "results"
    (out / f"{NAME}.json").write_text(json.dumps(res, indent=1))
    md = ["# Compression teacher: one query at a time vs 16 at a time", "", hardware_line(hw), "",
          f"SmolLM2-135M-Instruct, the {res['context_tokens']}-token instruction set, {len(queries)} queries "
          f"(its user queries, then questions built from its sentences), {args.max_new_tokens}-token greedy continuations with "
          f"top-64 distributions at every query and continuation token; median of {args.repeats} runs, order alternated.", "",
          "| precision | one at a time (s) | 16 at a time (s) | speedup | equal continuations | max logp diff | p-weighted logp diff |",
          "|---|---|---|---|---|---|---|"]
    for prec, r in res["runs"].items():
        md.append(f"| {prec} | {r['median_s']['one at a time']:.1f} | {r['median_s']['16 at a time']:.1f} | {r['speedup']:.2f}x | "
                  f"{r['equal_continuations']}/{len(queries)} | {r['max_logp_diff_when_equal']:.2g} | {r['weighted_logp_diff_when_equal']:.2g} |")
    md += ["", "Diffs are over the queries whose continuations agree. Runs (s): " + "; ".join(
        f"{p} {k}: {', '.join(f'{x:.1f}' for x in v)}" for p, r in res["runs"].items() for k, v in r["seconds"].items()) + "."]
    (out / f"{NAME}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
