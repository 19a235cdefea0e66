"""softprompt convert on a real task: a prefix-tuning prompt trained on SST-2 (SmolLM2) distilled into
prompt tuning, with its fidelity report (held-out KL, top-1 agreement, accuracy before and after).

The prefix is trained as in bench/kinds_sst2.py (20 positions, template "Review: {sentence}\\nSentiment:",
40 steps of batch 8, lr 0.01); the conversion uses the recipe's train split as queries (--queries
examples, at most --n-queries) and 200 dev examples held out. Results: bench/results/convert_prefix.{json,md}.

    python bench/convert_prefix.py [--steps 150] [--n-queries 512]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA = REPO.parent / "shared" / "data"
BODY = "Review: {sentence}\nSentiment:"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefix-steps", type=int, default=40)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--n-queries", type=int, default=512)
    ap.add_argument("--n-heldout", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--note", default="")
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown from bench/results/convert_prefix.json")
    args = ap.parse_args()
    if args.render:
        render(json.loads((RESULTS / "convert_prefix.json").read_text()))
        return 0

    from softprompt.base_model import load_base
    from softprompt.compress.convert import ConvertConfig, convert_prompt
    from softprompt.data import load_recipe, load_split
    from softprompt.hardware import hardware_line, hardware_report
    from softprompt.train import TrainConfig, Trainer

    base = load_base("smollm2", device="cpu")
    recipe = load_recipe("sst2")
    train = load_split(recipe, DATA, "train", limit=960, seed=0)
    dev = load_split(recipe, DATA, "dev", limit=args.n_heldout, seed=0)
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    t0 = time.perf_counter()
    cfg = TrainConfig(model="smollm2", kind="prefix", template=BODY, tokens=20, init="vocab", steps=args.prefix_steps,
                      batch_size=8, lr=0.01, chat=recipe.chat, seed=0)
    prefix = Trainer(cfg, train, None, work / "prefix", base=base).run().out
    prefix_s = time.perf_counter() - t0
    queries = load_split(recipe, DATA, "train", limit=args.n_queries, seed=1)
    t0 = time.perf_counter()
    res = convert_prompt(prefix, work / "prompt-tuning", ConvertConfig(steps=args.steps, lr=args.lr, n_queries=args.n_queries,
                                                                        n_heldout=args.n_heldout, max_new_tokens=4),
                         queries, dev, base=base, labels=recipe.label_words)
    convert_s = time.perf_counter() - t0
    hw = hardware_line(hardware_report(measure=False))
    report = {**res.report, "bench": {"hardware": hw, "note": args.note, "prefix_train_s": round(prefix_s, 1),
                                      "convert_s": round(convert_s, 1), "prefix_steps": args.prefix_steps, "steps": args.steps,
                                      "lr": args.lr, "n_queries": args.n_queries, "n_heldout": args.n_heldout}}
    (RESULTS / "convert_prefix.json").write_text(json.dumps(report, indent=2) + "\n")
    render(report)
    return 0


def render(report: dict) -> None:
    """bench/results/convert_prefix.md from the report (``--render`` redoes it from the JSON)."""
    from softprompt.compress.convert import format_convert_report

    b = report["bench"]
    md = (f"# bench/convert_prefix.py\n\n{b['hardware']}\n\n" + (f"{b['note']}\n\n" if b["note"] else "")
          + f"A prefix-tuning prompt (20 positions, {b['prefix_steps']} steps of batch 8 on SST-2, SmolLM2) converted into "
          f"prompt tuning with `softprompt.compress.convert_prompt` ({b['steps']} steps at most, lr {b['lr']}, "
          f"{b['n_queries']} SST-2 training sentences as queries, {b['n_heldout']} dev sentences held out). Prefix training "
          f"took {b['prefix_train_s']:.0f} s, the conversion {b['convert_s']:.0f} s.\n\n"
          + format_convert_report(report).split("\n", 2)[2])
    (RESULTS / "convert_prefix.md").write_text(md)
    print(md)


if __name__ == "__main__":
    raise SystemExit(main())
