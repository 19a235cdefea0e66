"""Prepacked oneDNN weights (softprompt/serve/packed.py) with and without row buckets, on SmolLM2 in
fp32: milliseconds per forward of M packed tokens, and the process's resident memory after forwards
of every row count from 1 to 512 (what a long-running server sees). Side by side in one run, each
time the median of ``--repeats``; plain ``nn.Linear`` (no packing) as the reference.

    python bench/packed_buckets.py [--repeats 7]     # -> bench/results/packed_buckets.{json,md}
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from softprompt import onednn  # noqa: E402
from softprompt.base_model import load_base  # noqa: E402
from softprompt.hardware import hardware_line, hardware_report  # noqa: E402
from softprompt.serve import packed  # noqa: E402

ROWS = [1, 3, 16, 40, 100, 300, 512]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@torch.no_grad()
def time_forward(model, m: int, hidden: int, repeats: int) -> float:
    x = torch.randn(1, m, hidden)
    pos = torch.arange(m).unsqueeze(0)
    model(inputs_embeds=x, position_ids=pos, logits_to_keep=1)  # warm: oneDNN builds its primitive for m rows
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(inputs_embeds=x, position_ids=pos, logits_to_keep=1)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


@torch.no_grad()
def sweep_memory(model, hidden: int) -> float:
    """RSS growth (MB) after one forward of every row count 1..512."""
    before = rss_mb()
    for m in range(1, 513):
        model(inputs_embeds=torch.randn(1, m, hidden), position_ids=torch.arange(m).unsqueeze(0), logits_to_keep=1)
    return rss_mb() - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--note", default="", help="a sentence on the run's conditions, saved with the results")
    ap.add_argument("--render", action="store_true", help="rewrite the Markdown from the saved JSON (with --note)")
    args = ap.parse_args()
    out = REPO / "bench" / "results" / "packed_buckets"
    if args.render:
        res = json.loads(out.with_suffix(".json").read_text())
        if args.note:
            res["note"] = args.note
        if "hardware" not in res:
            res["hardware"] = hardware_report(measure=False)
            res["hardware_recorded"] = "when the results were rendered, on the machine (same boot) that ran them"
        out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(res))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.model, device="cpu")
    hidden = base.model.config.hidden_size
    plain = base.model.eval()
    pk = copy.deepcopy(plain)
    packed.pack_linears(pk)
    exact_bucket = onednn.bucket
    res: dict = {"model": args.model, "threads": torch.get_num_threads(), "cpu": _cpu(), "repeats": args.repeats,
                 "load_avg_start": os.getloadavg()[0], "note": args.note,
                 "hardware": hardware_report(measure=False), "ms_per_forward": {}}
    for m in ROWS:
        row = {"plain": time_forward(plain, m, hidden, args.repeats)}
        onednn.bucket = lambda r: r  # noqa: E731 - packing without buckets, as before
        row["packed_exact"] = time_forward(pk, m, hidden, args.repeats)
        onednn.bucket = exact_bucket
        row["packed_bucketed"] = time_forward(pk, m, hidden, args.repeats)
        row["bucket"] = exact_bucket(m)
        res["ms_per_forward"][str(m)] = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
        print(m, res["ms_per_forward"][str(m)], flush=True)
    # Memory: buckets first (they touch at most ~21 row counts), then every row count unbucketed.
    res["rss_growth_mb_after_rows_1_to_512"] = {"packed_bucketed": round(sweep_memory(pk, hidden), 1)}
    onednn.bucket = lambda r: r  # noqa: E731
    res["rss_growth_mb_after_rows_1_to_512"]["packed_exact"] = round(sweep_memory(pk, hidden), 1)
    onednn.bucket = exact_bucket
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


def markdown(r: dict) -> str:
    lines = [f"# Prepacked weights with and without row buckets ({r['model']}, fp32, {r['threads']} threads)", "",
             f"CPU: {r['cpu']}; load average at the start {r['load_avg_start']:.2f}; medians of {r['repeats']} forwards.", "",
             *([hardware_line(r["hardware"]) + (f" (recorded {r['hardware_recorded']})" if r.get("hardware_recorded") else ""), ""]
               if r.get("hardware") else []),
             "| tokens in the forward | padded to | plain nn.Linear (ms) | packed, exact rows (ms) | packed, bucketed (ms) |",
             "|---|---|---|---|---|"]
    for m, row in r["ms_per_forward"].items():
        lines.append(f"| {m} | {row['bucket']} | {row['plain']} | {row['packed_exact']} | {row['packed_bucketed']} |")
    g = r["rss_growth_mb_after_rows_1_to_512"]
    lines += ["", "Resident memory after one forward of every row count from 1 to 512 (oneDNN keeps a primitive per row count):",
              "", "| packing | RSS growth (MB) |", "|---|---|",
              f"| bucketed | {g['packed_bucketed']} |", f"| exact rows | {g['packed_exact']} |", ""]
    if r.get("note"):
        lines += [r["note"], ""]
    return "\n".join(lines)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


if __name__ == "__main__":
    main()
