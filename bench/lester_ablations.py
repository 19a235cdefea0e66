"""Lester et al. (2021) ablations, in spirit, on SmolLM2-135M + SST-2: prompt length x initialization
at a fixed step budget, scored by dev accuracy (label ranking) on a fixed dev subset.

    python bench/lester_ablations.py [--quick] [--steps 30] [--batch-size 8] [--dev 200]

One process loads the base once and trains every (length, init) pair from the same seed on the same
batches; a hand-written prompt (the recipe's) is scored on the same dev subset as a reference.
Saves bench/results/lester_ablations.{json,md,png}.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from softprompt.hardware import hardware_line, hardware_report

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
RESULTS = REPO / "bench" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1,5,20,100")
    ap.add_argument("--inits", default="random,vocab,labels")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--dev", type=int, default=200, help="size of the fixed dev subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=str(RESULTS), help="directory for the results")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 lengths x 2 inits, 3 steps, 16 dev examples")
    args = ap.parse_args()
    hw = hardware_report()  # recorded with the results, measured in the same run
    print(hardware_line(hw))
    if args.quick:
        args.lengths, args.inits, args.steps, args.dev = "1,5", "random,labels", 3, 16
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch

    from softprompt.base_model import load_base
    from softprompt.data import load_recipe, load_split
    from softprompt.evaluate import hard_contender
    from softprompt.scoring import classify
    from softprompt.task_metrics import bootstrap_ci
    from softprompt.train import TrainConfig, Trainer

    bf16 = not args.fp32
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    inits = args.inits.split(",")
    recipe = load_recipe("sst2")
    base = load_base("smollm2", device="cpu")
    train = load_split(recipe, args.data_dir, "train", limit=args.steps * args.batch_size, seed=args.seed)
    dev = load_split(recipe, args.data_dir, "dev", limit=args.dev, seed=args.seed)
    labels = sorted(set(recipe.labels.values()))
    gold = [e.target for e in dev]

    def score(prompt, fmt) -> dict:
        t0 = time.perf_counter()
        preds = classify(base.model, prompt, fmt, dev, labels, bf16=bf16)
        acc = sum(p == g for p, g in zip(preds, gold)) / len(gold)
        lo, hi = bootstrap_ci("accuracy", preds, [[g] for g in gold], resamples=1000)
        return {"accuracy": acc, "ci95": [lo, hi], "eval_s": time.perf_counter() - t0,
                "predicted_positive": sum(p == "positive" for p in preds) / len(preds)}

    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
           "python": platform.python_version(), "model": "SmolLM2-135M-Instruct (embedded)",
           "data": f"SST-2 sentences (sst2 recipe): {len(train)} training sentences, fixed dev subset of {len(dev)}",
           "template": recipe.soft_template, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
           "optimizer": "AdamW, 6% warmup, linear decay", "precision": "bf16 autocast" if bf16 else "fp32",
           "hardware": hw, "seed": args.seed, "threads": torch.get_num_threads(), "dev_examples": len(dev),
           "command": " ".join(["python", "bench/lester_ablations.py"] + sys.argv[1:])}
    out, started = Path(args.out), time.perf_counter()
    hard = hard_contender(base, "hand-written", recipe.hard_prompt, chat=recipe.chat)
    reference = {"template": recipe.hard_prompt, **score(None, hard.fmt)}
    print(f"hand-written prompt: accuracy {reference['accuracy']:.3f}", file=sys.stderr)
    runs = []
    for n in lengths:
        for init in inits:
            cfg = TrainConfig(model="smollm2", template=recipe.soft_template_for(n), steps=args.steps,
                              batch_size=args.batch_size, lr=args.lr, init=init, seed=args.seed, precision="bf16" if bf16 else "fp32",
                              chat=recipe.chat, device="cpu")
            t = Trainer(cfg, train, None, out=Path("/tmp/softprompt-lester") / f"{n}-{init}", base=base, progress=False)
            t0 = time.perf_counter()
            losses = [t.train_step()["loss"] for _ in range(args.steps)]
            train_s = time.perf_counter() - t0
            t.prompt.eval()
            with torch.no_grad():
                ev = score(t.prompt, t.fmt)
            runs.append({"length": n, "init": init, **ev, "first_loss": losses[0], "last_loss": losses[-1],
                         "mean_loss_last5": sum(losses[-5:]) / len(losses[-5:]), "train_s": train_s})
            print(f"length {n:>3} init {init:<6}: accuracy {ev['accuracy']:.3f}  loss {losses[0]:.3f} -> "
                  f"{losses[-1]:.3f}  train {train_s:.0f}s eval {ev['eval_s']:.0f}s", file=sys.stderr)
        done = lengths[:lengths.index(n) + 1]  # partial results after each length, in case the run is cut short
        write_results(out, {**env, "complete": False, "total_s": time.perf_counter() - started}, reference, runs, done, inits)

    env["complete"] = True
    env["total_s"] = time.perf_counter() - started
    write_results(out, env, reference, runs, lengths, inits)


def write_results(out: Path, env: dict, reference: dict, runs: list[dict], lengths: list[int], inits: list[str]) -> None:
    from softprompt.atomic import atomic_write_json, atomic_write_text
    from softprompt.plots import _plt, save_figure

    out.mkdir(parents=True, exist_ok=True)
    acc = {(r["length"], r["init"]): r for r in runs}
    head = "length | " + " | ".join(inits)
    table = [head] + [f"{n:>6} | " + " | ".join(f"{acc[n, i]['accuracy']:.3f}" for i in inits) for n in lengths]
    print("\n".join(table))
    print(f"hand-written prompt: {reference['accuracy']:.3f}")
    atomic_write_json(out / "lester_ablations.json", {"env": env, "hand_written": reference, "runs": runs})

    md = ["# Prompt length x initialization (Lester et al. 2021, in spirit): SmolLM2-135M on SST-2", ""]
    md += ([f"- {k}: {v!r}" if isinstance(v, str) and "\n" in v else f"- {k}: {v}" for k, v in env.items() if k != "hardware"]
           + [hardware_line(env["hardware"])])
    md += ["", "Dev accuracy (label ranking; 95% bootstrap interval in brackets) after the fixed budget:", "",
           "| length | " + " | ".join(inits) + " |", "|---" * (len(inits) + 1) + "|"]
    for n in lengths:
        md.append(f"| {n} | " + " | ".join(f"{acc[n, i]['accuracy']:.3f} [{acc[n, i]['ci95'][0]:.2f}, {acc[n, i]['ci95'][1]:.2f}]"
                                          for i in inits) + " |")
    md += ["", f"Hand-written prompt (`{reference['template']!r}`, no training): {reference['accuracy']:.3f} "
           f"[{reference['ci95'][0]:.2f}, {reference['ci95'][1]:.2f}].", "",
           "| length | init | train loss first -> last (mean of last 5) | share predicted positive | train s | eval s |",
           "|---|---|---|---|---|---|"]
    md += [f"| {r['length']} | {r['init']} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} ({r['mean_loss_last5']:.3f}) | "
           f"{r['predicted_positive']:.2f} | {r['train_s']:.0f} | {r['eval_s']:.0f} |" for r in runs]
    md += ["", "Timings are from a CPU shared with other jobs; they are not a speed benchmark.", ""]
    notes = out / "lester_ablations_notes.md"
    if notes.exists():  # the written discussion of the figures (kept apart so a re-run does not erase it)
        md += [notes.read_text().strip(), ""]
    atomic_write_text(out / "lester_ablations.md", "\n".join(md))

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i in inits:
        ys = [acc[n, i]["accuracy"] for n in lengths]
        lo = [acc[n, i]["accuracy"] - acc[n, i]["ci95"][0] for n in lengths]
        hi = [acc[n, i]["ci95"][1] - acc[n, i]["accuracy"] for n in lengths]
        ax.errorbar(lengths, ys, yerr=[lo, hi], marker="o", capsize=3, label=f"init: {i}")
    ax.axhline(reference["accuracy"], color="grey", ls="--", lw=1, label="hand-written prompt")
    ax.set_xscale("log")
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(n) for n in lengths])
    ax.set_xlabel("prompt length (virtual tokens)")
    ax.set_ylabel(f"dev accuracy (n={env['dev_examples']})")
    ax.set_title(f"SmolLM2-135M, SST-2, {env['steps']} steps x batch {env['batch_size']}")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, out / "lester_ablations.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
