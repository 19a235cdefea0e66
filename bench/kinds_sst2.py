"""Kinds of soft prompt side by side on SST-2 with SmolLM2: the same examples, batch size, step budget
and dev subset for each. Reports dev accuracy (label ranking), trainable parameters, the size of the
inference tensors, median step time and peak resident memory. Each kind trains in a fresh subprocess
of this script, so its peak memory is its own; the parent prints a table and saves JSON, Markdown and
a plot under bench/results/.

    python bench/kinds_sst2.py [--steps 60] [--dev 200] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from softprompt.hardware import hardware_line, hardware_report

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA = REPO.parent / "shared" / "data"
BODY = "Review: {sentence}\nSentiment:"

# name -> (kind, template, kind options, init, learning rate)
KINDS: dict[str, tuple[str, str | None, dict, str, float]] = {
    "prompt-tuning": ("prompt-tuning", f"[soft:20] {BODY}", {}, "vocab", 0.03),
    "hybrid": ("prompt-tuning", f'[soft:10 "Classify the sentiment of this movie review."] {BODY}[soft:2]', {}, "vocab", 0.03),
    "p-tuning-lstm": ("p-tuning", f"[soft:20] {BODY}", {"encoder": "lstm"}, "vocab", 0.01),
    "p-tuning-mlp": ("p-tuning", f"[soft:20] {BODY}", {"encoder": "mlp"}, "vocab", 0.01),
    "prefix": ("prefix", BODY, {}, "vocab", 0.01),
    "prefix-reparam": ("prefix", BODY, {"reparam": True, "reparam_hidden": 256}, "vocab", 0.003),
}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _splits(args):
    from softprompt.data import load_recipe, load_split

    recipe = load_recipe("sst2")
    train = load_split(recipe, str(args.data_dir), "train", limit=args.examples, seed=0)
    dev = load_split(recipe, str(args.data_dir), "dev", limit=args.dev, seed=0)
    return recipe, train, dev


def run_kind(name: str, args) -> dict:
    import torch

    from softprompt.base_model import load_base
    from softprompt.scoring import label_accuracy
    from softprompt.train import TrainConfig, Trainer

    kind, template, options, init, lr = KINDS[name]
    recipe, train, dev = _splits(args)
    base = load_base("smollm2", device="cpu")
    cfg = TrainConfig(model="smollm2", kind=kind, template=template, tokens=20, init=init, kind_options=options,
                      steps=args.steps, batch_size=args.batch_size, lr=lr, precision="bf16", device="cpu", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, train, None, Path(tmp) / name, base=base, progress=False)
        times, losses = [], []
        for _ in range(args.steps):
            rec = trainer.train_step()
            times.append(rec["time_s"])
            losses.append(rec["loss"])
        trainer.prompt.eval()
        acc = label_accuracy(base.model, trainer.prompt, trainer.fmt, dev, recipe.label_words, bf16=True)
        trainer._finish({"loss": losses[-1]}, False)  # write the artifact: its inference size is measured
        tensors = trainer.prompt.export_tensors()
        infer_key = "prefix_key_values" if kind == "prefix" else "prompt_embeddings"
        size = tensors[infer_key].numel() * 4
    return {"name": name, "kind": kind, "template": template, "options": options, "lr": lr,
            "trainable_params": trainer.prompt.num_trainable(), "inference_bytes": size,
            "dev_accuracy": acc, "first_loss": statistics.mean(losses[:5]), "last_loss": statistics.mean(losses[-5:]),
            "step_time_s": statistics.median(times[2:] or times), "peak_rss_mb": peak_rss_mb(), "torch_threads": torch.get_num_threads()}


def run_hand_prompt(args) -> dict:
    from softprompt.base_model import load_base
    from softprompt.evaluate import hard_contender

    recipe, _, dev = _splits(args)
    base = load_base("smollm2", device="cpu")
    from softprompt.scoring import label_accuracy

    c = hard_contender(base, "hand-written", recipe.hard_prompt, recipe.chat)
    acc = label_accuracy(base.model, None, c.fmt, dev, recipe.label_words, bf16=True)
    return {"name": "hand-written (untrained)", "kind": "hard", "template": recipe.hard_prompt, "trainable_params": 0,
            "inference_bytes": 0, "dev_accuracy": acc, "step_time_s": None, "peak_rss_mb": peak_rss_mb()}


def table(rows: list[dict]) -> str:
    head = ("| Prompt | Kind | Dev accuracy | Trainable params | Inference size | Loss first5 -> last5 | Step time | Peak RSS |\n"
            "|---|---|---|---|---|---|---|---|\n")
    out = []
    for r in rows:
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if "first_loss" in r else "—"
        step = f"{r['step_time_s']:.2f} s" if r.get("step_time_s") else "—"
        out.append(f"| {r['name']} | {r['kind']} | {r['dev_accuracy']:.3f} | {r['trainable_params']:,} | "
                   f"{r['inference_bytes'] / 1024:.1f} KiB | {loss} | {step} | {r['peak_rss_mb']:.0f} MB |")
    return head + "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    from softprompt.plots import _plt, save_figure

    plt = _plt()
    trained = [r for r in rows if r.get("step_time_s")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["name"] for r in rows]
    axes[0].barh(names, [r["dev_accuracy"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("SST-2 dev accuracy")
    axes[0].set_xlim(0, 1)
    for r in trained:
        axes[1].scatter(r["trainable_params"], r["dev_accuracy"], s=40)
        axes[1].annotate(r["name"], (r["trainable_params"], r["dev_accuracy"]), fontsize=8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("trainable parameters")
    axes[1].set_ylabel("dev accuracy")
    fig.suptitle("Soft-prompt kinds on SmolLM2-135M, SST-2, equal step budget")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--examples", type=int, default=960, help="training examples drawn from the SST-2 train split")
    ap.add_argument("--dev", type=int, default=200, help="dev examples scored")
    ap.add_argument("--data-dir", type=Path, default=DATA)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 steps, 16 dev examples, nothing saved")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    hw = hardware_report()  # recorded with the results, measured in the same run
    print(hardware_line(hw))
    if args.quick:
        args.steps, args.dev, args.examples = 3, 16, 48
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        res = run_hand_prompt(args) if args.child == "hand" else run_kind(args.child, args)
        print("RESULT " + json.dumps(res))
        return
    rows = []
    for name in ["hand", *args.kinds.split(",")]:
        t0 = time.time()
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--examples", str(args.examples), "--dev", str(args.dev), "--data-dir", str(args.data_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[7:]))
        print(f"{name}: accuracy {rows[-1]['dev_accuracy']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    md = table(rows)
    print(md)
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    setup = {"model": "SmolLM2-135M-Instruct (embedded)", "task": "SST-2 sentences", "steps": args.steps,
             "batch_size": args.batch_size, "train_examples": args.examples, "dev_examples": args.dev, "precision": "bf16",
             "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (RESULTS / "kinds_sst2.json").write_text(json.dumps({"setup": setup, "hardware": hw, "rows": rows}, indent=2))
    (RESULTS / "kinds_sst2.md").write_text(
        "# Soft-prompt kinds on SST-2 (SmolLM2-135M, CPU)\n\n"
        + f"Setup: {json.dumps(setup)}\n\n{hardware_line(hw)}\n\nSame training examples, batch order, step budget and dev subset for every kind. "
        + "Accuracy ranks the label words' log-probabilities. Inference size: the tensors used at inference "
        + "(float32); prefix tuning stores keys and values for every layer.\n\n" + md)
    plot(rows, RESULTS / "kinds_sst2.png")
    print(f"saved {RESULTS / 'kinds_sst2.json'}, .md, .png")


if __name__ == "__main__":
    main()
