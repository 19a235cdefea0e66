"""Choose a task's training configuration on its dev split, never looking at test.

    python bench/dev_sweep.py --task sst2 --steps 200 [--seeds 3] [--configs NAME,...]   # writes bench/results/<task>_dev_sweep/
    python bench/dev_sweep.py --render --out DIR                                         # Markdown from the saved JSON

Each configuration (init x learning rate x training-pool size x batch size, at a fixed token count
and step budget) is one bench/tasks.py run with ``--eval-split dev --methods ours`` into OUT/NAME/; this
script collects them into OUT/sweep.{json,md} and names the configuration with the best mean dev
score. Re-running skips the configurations already measured (tasks.py ``--resume``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks  # noqa: E402

from softprompt.atomic import atomic_write_json, atomic_write_text  # noqa: E402

# name: (init, lr, training examples (0: the whole split), batch size[, {"objective": lm | classify,
# "template": T, "kind": K}]). A template's [soft:N] takes --tokens; the default is the recipe's soft
# template; the kind's default is prompt tuning. The template configurations are SST-2's (its field
# and its hand-written instruction).
SST2_INSTRUCTION = "Is the sentiment of this movie review positive or negative?"
CONFIGS = {
    "vocab-lr0.03-n1000": ("vocab", 0.03, 1000, 8),
    "labels-lr0.03-n1000": ("labels", 0.03, 1000, 8),
    "vocab-lr0.1-n1000": ("vocab", 0.1, 1000, 8),
    "vocab-lr0.03-nall": ("vocab", 0.03, 0, 8),
    "labels-lr0.1-nall": ("labels", 0.1, 0, 8),
    "text-lr0.03-n1000": ("text:Is the sentiment of this movie review positive or negative?", 0.03, 1000, 8),
    "vocab-lr0.03-nall-b32": ("vocab", 0.03, 0, 32),
    "vocab-lr0.1-nall-b32": ("vocab", 0.1, 0, 32),
    "classify-vocab-lr0.03-n1000": ("vocab", 0.03, 1000, 8, {"objective": "classify"}),
    "classify-vocab-lr0.03-nall-b32": ("vocab", 0.03, 0, 32, {"objective": "classify"}),
    # the soft span before the hand-written instruction (a hybrid hard/soft template)
    "hybrid-instruction": ("vocab", 0.03, 1000, 8, {"template": f"[soft:N] {SST2_INSTRUCTION}\nReview: {{sentence}}\nSentiment:"}),
    # the soft span after the review, where its positions can attend to the sentence
    "soft-after-review": ("vocab", 0.03, 1000, 8, {"template": "Review: {sentence}\n[soft:N]\nSentiment:"}),
    # 10 before and 10 after the review
    "split-10-10": ("vocab", 0.03, 1000, 8, {"template": "[soft:10] Review: {sentence}\n[soft:10]\nSentiment:"}),
    # 20 prefix positions: per-layer keys and values (the learning rate of bench/kinds_sst2.py)
    "prefix-lr0.01": ("vocab", 0.01, 1000, 8, {"kind": "prefix"}),
    # the same, started from the model's own keys/values of the hand-written instruction (PEFT's
    # prefix tuning from a system prompt's KV; the CARTRIDGE initialization)
    "prefix-text-lr0.01": (f"text:{SST2_INSTRUCTION}", 0.01, 1000, 8, {"kind": "prefix"}),
}


def run(args) -> None:
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    for name in names:
        init, lr, n_train, batch, *rest = CONFIGS[name]
        extra = {"objective": "lm", "template": "", "kind": "prompt-tuning", **(rest[0] if rest else {})}
        argv = ["--model", args.model, "--tasks", args.task, "--steps", str(args.steps), "--batch-size", str(batch),
                "--seeds", str(args.seeds), "--methods", "ours",
                "--eval-split", "dev", "--eval", str(args.eval), "--init", init, "--lr", str(lr),
                "--train", str(n_train or 10**9), "--objective", extra["objective"], "--kind", extra["kind"],
                *(["--template", extra["template"]] if extra["template"] else []),
                "--tokens", str(args.tokens), "--precision", args.precision, "--no-zero-shot", "--fewshot-draws", "0", "--fewshot-seeds", "0",
                "--data-dir", str(args.data_dir), "--out", str(args.out / name), "--resume", "--no-inner-progress",
                "--budget", f"dev sweep, {args.steps} steps"]
        print(f"== {name}: python bench/tasks.py {' '.join(argv)}", flush=True)
        tasks.main(argv)
        render(args.out)


def tmpl(t: str) -> str:
    """A template as a Markdown table cell: code, newlines shown as ⏎."""
    return t if t == "the recipe's" else "`" + t.replace("\n", "⏎").replace("|", "\\|") + "`"


def render(out: Path) -> None:
    rows = []
    for d in sorted(p for p in out.iterdir() if (p / "tasks.json").exists()):
        doc = json.loads((d / "tasks.json").read_text())
        ours = sorted((r for r in doc["rows"] if r["method"] == "ours"), key=lambda r: r["seed"])
        if not ours:
            continue
        vals = [r[r["metric"]] for r in ours]
        lo, hi = tasks.t_interval(vals) if len(vals) > 1 else (vals[0], vals[0])
        st = doc["setup"]
        rows.append({"config": d.name, "init": st["init"], "lr": st["lr"],
                     "objective": st.get("objective", "lm"), "template": st.get("template", "the recipe's"),
                     "kind": st.get("kind", "prompt-tuning"),
                     "batch_size": st["batch_size"], "train_examples": ours[0]["n_train"],
                     "steps": st["steps"], "tokens": st["tokens"], "precision": st["precision"], "n_dev": ours[0]["n_eval"],
                     "seeds": [r["seed"] for r in ours], "scores": vals, "mean": statistics.mean(vals), "ci": [lo, hi],
                     "hardware": doc["hardware"]})
    if not rows:
        return
    best = max(rows, key=lambda r: r["mean"])
    atomic_write_json(out / "sweep.json", {"rows": rows, "best": best["config"]})
    lines = [f"# Dev sweep: {rows[0]['tokens']} virtual tokens, {rows[0]['steps']} steps, {rows[0]['precision']}",
             "",
             f"Each configuration is a bench/tasks.py run scored on {rows[0]['n_dev']} dev examples (the test split is not read). "
             "Mean over seeds [95% t-interval over seeds]; per-seed scores beside it.",
             "", tasks.hardware_line(rows[0]["hardware"]), "",
             "| configuration | kind | init | lr | objective | batch | training pool | template | dev mean [95% CI] | per seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **(best)**" if r is best else ""
        lines.append(f"| {r['config']}{mark} | {r['kind']} | `{r['init']}` | {r['lr']} | {r['objective']} | {r['batch_size']} "
                     f"| {r['train_examples']} "
                     f"| {tmpl(r['template'])} | {r['mean']:.3f} "
                     f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {', '.join(f'{v:.3f}' for v in r['scores'])} |")
    lines += ["", f"Chosen for the test run: **{best['config']}** (highest dev mean)."]
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--eval", type=int, default=872, help="dev examples scored (a fixed sample)")
    ap.add_argument("--configs", default="", help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    ap.add_argument("--data-dir", type=Path, default=tasks.DATA)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto",
                    help="auto: bf16 where this CPU runs it natively, else fp32 (bf16 is ~10x slower without)")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args(argv)
    args.out = args.out or tasks.RESULTS / f"{args.task}_dev_sweep"
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        run(args)
    render(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
