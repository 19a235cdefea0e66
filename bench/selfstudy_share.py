"""Self-study query generation with and without the shared prefix (softprompt.compress.selfstudy), on
SmolLM2 with the 557-token instruction set: seconds for the same number of queries, side by side in
one process, alternating the order over ``--repeats``, and how many of the queries are the same (the
same seeds; fp32 should give the same queries, bf16 may round a shared batch differently).

Without sharing, every ask (about 78 per chunk: 13 of each of 6 types) runs its chat header and chunk
again; with it, each batch of asks from one chunk runs them once and only its own instruction after.

    python bench/selfstudy_share.py [--queries 64] [--repeats 2] [--threads 1]   # -> bench/results/selfstudy_share.{json,md}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from softprompt.hardware import hardware_line, hardware_report  # noqa: E402

NAME = "selfstudy_share"
LABELS = {False: "every ask whole", True: "shared prefix"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default=NAME)
    args = ap.parse_args()
    import torch

    from softprompt.base_model import load_base
    from softprompt.compress.selfstudy import chunks, self_study
    from softprompt.precision import resolve_precision

    torch.set_num_threads(args.threads)
    hw = hardware_report()
    bf16 = resolve_precision(args.precision, "cpu", announce=False).bf16
    base = load_base("smollm2", device="cpu")
    text = (REPO / "bench" / "data" / "compress_instructions.txt").read_text()
    times: dict[str, list[float]] = {v: [] for v in LABELS.values()}
    got: dict[str, list[str]] = {}
    for rep in range(args.repeats):
        order = [False, True] if rep % 2 == 0 else [True, False]
        for share in order:
            t0 = time.perf_counter()
            train, _ = self_study(base, base.tokenizer, text, args.queries, 0, seed=0, bf16=bf16, progress=False,
                                  share_prefix=share)
            times[LABELS[share]].append(time.perf_counter() - t0)
            got[LABELS[share]] = [q.text for q in train]
            print(f"rep {rep} {LABELS[share]}: {times[LABELS[share]][-1]:.1f} s, {len(train)} queries", flush=True)
    plain, shared = got[LABELS[False]], got[LABELS[True]]
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"settings": vars(args), "hardware": hw, "precision": "bf16" if bf16 else "fp32",
           "context_tokens": len(base.tokenizer(text).input_ids), "chunks": len(chunks(base.tokenizer, text)),
           "seconds": times, "median_s": med, "speedup": med[LABELS[False]] / med[LABELS[True]],
           "queries": {k: len(v) for k, v in got.items()}, "same_position": sum(a == b for a, b in zip(plain, shared)),
           "same_set": len(set(plain) & set(shared)), "sample": {k: v[:6] for k, v in got.items()}}
    out = REPO / "bench" / "results"
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    md = ["# Self-study generation: every ask whole vs the chunk's prefix shared", "", hardware_line(hw), "",
          f"SmolLM2-135M-Instruct, the {res['context_tokens']}-token instruction set ({res['chunks']} chunks), "
          f"{args.queries} training queries (seed 0, up to 32 sampled tokens per ask, batches of 16), {res['precision']}, "
          f"{args.threads} torch thread(s); median of {args.repeats} runs, order alternated.", "",
          "| generation | median (s) | runs (s) | queries |", "|---|---|---|---|"]
    for k, v in times.items():
        md.append(f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} | {res['queries'][k]} |")
    md += ["", f"Speedup {res['speedup']:.2f}x. The same query at the same index: {res['same_position']} of "
           f"{min(len(plain), len(shared))}; in both sets: {res['same_set']}."]
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
