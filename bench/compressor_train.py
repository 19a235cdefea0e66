"""Summarize SmolLM2 compressor training runs (compressor.json + history.json of each run directory)
into bench/results/compressor_train.{json,md}, and copy each run's loss curve beside them.

The runs themselves are made with ``softprompt compressor train`` (the exact commands are in
docs/compressor.md and recorded in the JSON):

    python bench/compressor_train.py RUN_DIR [RUN_DIR ...] [--initial NAME=KL]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "src"))


def main() -> int:
    from softprompt.atomic import atomic_write_json, atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--initial", action="append", default=[],
                    help="NAME=KL: the initial dev KL of a run made before step-0 evaluation was recorded")
    ap.add_argument("--command", action="append", default=[], help="NAME=COMMAND: the command that made a run")
    ap.add_argument("--wall", action="append", default=[], help="NAME=SECONDS: the run's wall time")
    ap.add_argument("--prepare", action="append", default=[],
                    help="NAME=SECONDS: the preparation (queries + teacher) time of a run whose cache an earlier launch filled")
    ap.add_argument("--name", default="compressor_train", help="results file name under bench/results/")
    ap.add_argument("--title", default="small runs")
    args = ap.parse_args()
    prepared = dict(x.split("=", 1) for x in args.prepare)
    initial = dict(x.split("=", 1) for x in args.initial)
    commands = dict(x.split("=", 1) for x in args.command)
    walls = dict(x.split("=", 1) for x in args.wall)
    runs = {}
    for r in map(Path, args.runs):
        meta = json.loads((r / "compressor.json").read_text())
        hist = json.loads((r / "history.json").read_text())
        evals = [(h["step"], h["dev_kl"]) for h in hist if h["type"] == "eval"]
        start = float(initial[r.name]) if r.name in initial else (evals[0][1] if evals and evals[0][0] == 0 else None)
        m = meta["metrics"]
        runs[r.name] = {"form": meta["form"], "memory": meta["memory"], "train_contexts": len(meta["contexts"]["train"]),
                        "dev_contexts": len(meta["contexts"]["dev"]), "sources": meta["contexts"]["sources"],
                        "train_config": meta["train_config"], "precision": meta.get("precision"),
                        "tensor_bytes": (r / "compressor.safetensors").stat().st_size,
                        "initial_dev_kl": start, "best_dev_kl": m["best_dev_kl"], "best_step": m["best_step"],
                        "dev_kl_drop": (1 - m["best_dev_kl"] / start) if start else None,
                        "prepare_s": float(prepared[r.name]) if r.name in prepared else m["prepare_s"],
                        "prepare_note": "as read from the progress bar of the launch that filled the shared cache" if r.name in prepared else None,
                        "train_s": m["train_s"], "wall_s": float(walls[r.name]) if r.name in walls else None,
                        "command": commands.get(r.name), "dev_curve": evals,
                        "train_loss": [h["loss"] for h in hist if h["type"] == "train"]}
        shutil.copyfile(r / "loss.png", RESULTS / f"compressor_train_{r.name}.png")
    atomic_write_json(RESULTS / f"{args.name}.json", runs)
    lines = [f"# Compressor training on SmolLM2-135M-Instruct ({args.title})", "",
             "| run | form | bytes | train / dev contexts | steps x contexts | queries/context | dev KL start | dev KL best (step) | "
             "drop | prepare s | train s | wall s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, r in runs.items():
        c = r["train_config"]
        lines.append(f"| {n} | {r['form']} | {r['tensor_bytes']:,} | {r['train_contexts']} / {r['dev_contexts']} | {c['steps']} x "
                     f"{c['contexts_per_step']} | {c['queries_per_context']} ({c['query_source']}) | {r['initial_dev_kl']:.4f} | "
                     f"{r['best_dev_kl']:.4f} ({r['best_step']}) | {100 * r['dev_kl_drop']:.1f} % | {r['prepare_s']:.0f} | "
                     f"{r['train_s']:.0f} | {r['wall_s'] or '-'} |")
    lines += [""] + [f"- `{n}`: `{r['command']}`" for n, r in runs.items() if r["command"]]
    lines += ["", "Dev curves (step, KL): " + "; ".join(f"{n}: " + ", ".join(f"{s} {k:.3f}" for s, k in r["dev_curve"])
                                                       for n, r in runs.items())]
    lines += [f"- `{n}`: preparation {r['prepare_s']:.0f} s {r['prepare_note']}." for n, r in runs.items() if r["prepare_note"]]
    atomic_write_text(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
