"""Training speed: our prompt tuning beside HF PEFT's PromptTuning on SmolLM2, same data, batch size,
steps and number of virtual tokens. Each variant runs in a fresh subprocess of this script (so its
peak resident memory is its own); the parent prints a table and saves JSON + Markdown.

    python bench/prompt_tuning_vs_peft.py [--steps 8] [--batch-size 8] [--examples 64]
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# ours-*-unpacked: our trainer on the base model as loaded (pack_weights off), which isolates what the
# frozen prepacked copy (softprompt/frozen.py) buys; noshare: without running the shared prefix once;
# ours-bf16-sdpa: with PyTorch's SDPA kernel instead of the eager attention bf16 on CPU defaults to.
# peft-bf16-eager: PEFT with transformers' eager attention, the faster kernel for it too in bf16 here.
# ours-bf16-compile: torch.compile of the backbone (TrainConfig.compile) on a copy whose linear weights are
# cast to bf16 once (softprompt/frozen.py cast_frozen_copy; inductor cannot trace the prepacked copy);
# ours-bf16-compile-unpacked: compiled on the base as loaded, autocasting its fp32 weights at every step;
# ours-fp32-compile: compiled in fp32 (on the base as loaded).
# Not in the default set: run them with --variants ours-bf16,ours-bf16-compile,...
VARIANTS = ["ours-fp32", "ours-fp32-unpacked", "ours-bf16", "ours-bf16-sdpa", "ours-bf16-unpacked", "ours-bf16-noshare",
            "peft-fp32", "peft-bf16", "peft-bf16-eager"]
EXTRA = ["ours-bf16-compile", "ours-bf16-compile-unpacked", "ours-fp32-compile"]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def examples(n: int, data_dir: Path):
    from softprompt.data import load_recipe, load_split

    return load_split(load_recipe("sst2"), str(data_dir), "train", limit=n, seed=0)


def dev_examples(n: int, data_dir: Path):
    from softprompt.data import load_recipe, load_split

    recipe = load_recipe("sst2")
    return load_split(recipe, str(data_dir), "dev", limit=n, seed=0), recipe.label_words


def run_variant(name: str, args) -> dict:
    import torch
    from flops import model_dims, train_step_flops
    from peers import peft_accuracy

    from softprompt.base_model import load_base
    from softprompt.encoding import IGNORE, collate
    from softprompt.objectives import shared_prefix_len
    from softprompt.train import TrainConfig, Trainer

    torch.manual_seed(0)
    base = load_base("smollm2", device="cpu")
    exs = examples(args.examples, Path(args.data_dir))
    bf16 = "bf16" in name
    cfg = TrainConfig(model="smollm2", template=f"[soft:{args.tokens}] Review: {{sentence}}\nSentiment:", steps=args.steps + args.warmup,
                      batch_size=args.batch_size, lr=0.03, init="vocab", precision="bf16" if bf16 else "fp32", device="cpu", seed=0,
                      share_prefix=not name.endswith("noshare"),
                      pack_weights=name.startswith("ours") and not name.endswith("unpacked"),
                      attention="sdpa" if name.endswith("sdpa") else "auto", compile="compile" in name)
    dev, label_words = dev_examples(args.dev, Path(args.data_dir)) if args.dev else ([], None)
    trainer = Trainer(cfg, exs, None, out=Path(args.tmp) / name, base=base, progress=False)
    times, tokens, losses, flops, warm = [], [], [], [], []
    dims = model_dims(base.model)
    if name.startswith("ours"):
        for i in range(args.steps + args.warmup):
            rec = trainer.train_step()
            if i < args.warmup:
                warm.append(rec["time_s"])
            else:
                times.append(rec["time_s"])
                tokens.append(rec["tokens"])
                rows = [trainer.encoded[j] for j in trainer.plan[i]]  # the head runs at target positions only
                heads = sum(1 for e in rows for x in e.labels[1:] if x != IGNORE)
                shared = shared_prefix_len(collate(rows, base.tokenizer.pad_token_id)) if cfg.share_prefix else 0
                flops.append(train_step_flops(dims, [len(e.ids) for e in rows], heads, shared).total)
            losses.append(rec["loss"])
        from softprompt.scoring import label_accuracy

        trainer.prompt.eval()
        acc = label_accuracy(base.model, trainer.prompt, trainer.fmt, dev, label_words, bf16=bf16) if dev else None
    else:
        from peft import PromptTuningConfig, TaskType, get_peft_model

        if name.endswith("eager"):
            base.model.set_attn_implementation("eager")
        model = get_peft_model(base.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.tokens))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.03)
        pad = base.tokenizer.pad_token_id
        for i in range(args.steps + args.warmup):
            idx = trainer.plan[i]  # the same batches our trainer sees
            rows = [[t for t in trainer.encoded[j].ids if t >= 0] for j in idx]
            labs = [[t for t, x in zip(trainer.encoded[j].labels, trainer.encoded[j].ids) if x >= 0] for j in idx]
            width = max(map(len, rows))
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            labels = torch.tensor([r + [IGNORE] * (width - len(r)) for r in labs])
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if i < args.warmup:
                warm.append(dt)
            else:
                times.append(dt)
                tokens.append(int(mask.sum()) + args.tokens * len(rows))
                lens = [len(r) + args.tokens for r in rows]  # PEFT runs the head at every position
                flops.append(train_step_flops(dims, lens, sum(lens)).total)
            losses.append(float(loss.detach()))
        model.eval()
        acc = peft_accuracy(model, trainer.fmt, dev, label_words, bf16) if dev else None
    step = sum(times) / len(times)
    return {"variant": name, "step_s": step, "tokens_per_s": sum(tokens) / sum(times), "peak_rss_mb": peak_rss_mb(),
            "first_loss": losses[0], "last_loss": losses[-1], "steps_timed": len(times), "dev_accuracy": acc, "warmup_s": sum(warm),
            "gflop_per_step": sum(flops) / len(flops) / 1e9, "achieved_gflop_s": sum(flops) / sum(times) / 1e9}


def markdown(env: dict, rows: list[dict]) -> str:
    from softprompt.hardware import hardware_line

    hw = env["hardware"]
    md = ["# Prompt tuning: softprompt vs HF PEFT (training steps on CPU)", ""] + [f"- {k}: {v}" for k, v in env.items() if k != "hardware"] + [
        "", "| variant | s/step (median) | s/step per round | tokens/s | peak RSS (MB) | x PEFT fp32 (per-round median) | "
        "x best PEFT bf16 (per-round median) | SST-2 dev accuracy after training | loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['variant']} | {r['step_s']:.3f} | {', '.join(f'{x:.3f}' for x in r['step_s_rounds'])} | {r['tokens_per_s']:.0f} | "
           f"{r['peak_rss_mb']:.0f} | {statistics.median(r['speedup_vs_peft_fp32_rounds']):.2f} | "
           f"{statistics.median(r['speedup_vs_best_peft_bf16_rounds']):.2f} | "
           f"{r['dev_accuracy']:.3f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |" for r in rows]
    md += ["", hardware_line(hw), "", "| variant | GFLOP/step | achieved GFLOP/s | share of the same-precision matmul peak |",
           "|---|---|---|---|"]
    md += [f"| {r['variant']} | {r['gflop_per_step']:.1f} | {r['achieved_gflop_s']:.1f} | {r['share_of_peak']:.1%} |" for r in rows]
    md += ["", "FLOPs are counted by `bench/flops.py` (matmuls only, real tokens only, so padding counts as overhead): "
           "2 x linear weights x tokens computed forward and again backward (ours counts the batch's shared prefix once, as it runs) "
           "(activation gradients only, the base is frozen), attention "
           "over the full score matrix, and the LM head where each side runs it (ours: target positions; PEFT: every position).",
           "", "Both sides train on the same batches (our seeded, length-bucketed plan) with the same token sequences; "
           "PEFT prepends its virtual tokens, ours sit in the template slot. Tokens/s counts non-pad tokens including the "
           "virtual ones. Our loss is computed with the LM head only at target positions; PEFT runs it at every position. "
           "Losses differ in scale: ours is the per-token mean of the accumulated step, PEFT's its own mean; both fall."]
    by = {r["variant"]: r for r in rows}
    med = statistics.median

    def ratio(a: str, b: str) -> float:  # per-round median of a's step time over b's
        return med(x / y for x, y in zip(by[a]["step_s_rounds"], by[b]["step_s_rounds"]))

    # The defaults: TrainConfig.pack_weights is on in bf16 only (in fp32 the packed copy bought no speed
    # and cost memory), and bf16 on CPU trains with eager attention; so ours in fp32 is the -unpacked
    # row and ours in bf16 the ours-bf16 row.
    f32, b16 = by["ours-fp32-unpacked"], by["ours-bf16"]
    md += ["", f"Ratios are medians over the {env['rounds']} rounds of the ratio within each round (the host drifts "
           "between rounds). With our defaults (fp32: the base as loaded; bf16: the frozen prepacked copy with eager "
           f"attention) ours is {ratio('peft-fp32', 'ours-fp32-unpacked'):.2f}x PEFT in fp32, "
           f"{ratio('peft-bf16', 'ours-bf16'):.2f}x PEFT under bf16 autocast with its default (SDPA) attention and "
           f"{med(b16['speedup_vs_best_peft_bf16_rounds']):.2f}x the faster of PEFT's two bf16 runs in each round "
           f"(PEFT with eager attention is {ratio('peft-bf16', 'peft-bf16-eager'):.2f}x PEFT with SDPA); ours in bf16 is "
           f"{ratio('peft-fp32', 'ours-bf16'):.2f}x PEFT's default fp32. "
           f"Eager attention instead of SDPA gives ours {ratio('ours-bf16-sdpa', 'ours-bf16'):.2f}x in bf16 (PyTorch's CPU "
           "flash-attention backward is slow on these short rows). Running the batch's shared "
           f"prefix once (chat header, soft tokens, template text) accounts for {ratio('ours-bf16-noshare', 'ours-bf16'):.2f}x "
           f"of ours in bf16 (ours-bf16-noshare turns it off). Training on the frozen prepacked copy of the base "
           f"(softprompt/frozen.py) gives {ratio('ours-bf16-unpacked', 'ours-bf16'):.2f}x in bf16 "
           f"({by['ours-bf16-unpacked']['step_s']:.3f} -> {b16['step_s']:.3f} s/step) and "
           f"{ratio('ours-fp32-unpacked', 'ours-fp32'):.2f}x in fp32 ({f32['step_s']:.3f} -> {by['ours-fp32']['step_s']:.3f} s/step, "
           f"for {by['ours-fp32']['peak_rss_mb'] - f32['peak_rss_mb']:.0f} MB more memory), hence on in bf16 only. "
           f"Dev accuracy (label ranking on {env['dev_examples']} SST-2 dev "
           f"sentences after the same steps): ours fp32 {f32['dev_accuracy']:.3f}, ours bf16 {b16['dev_accuracy']:.3f}, PEFT fp32 "
           f"{by['peft-fp32']['dev_accuracy']:.3f}, PEFT bf16 {by['peft-bf16']['dev_accuracy']:.3f} (eager attention "
           f"{by['peft-bf16-eager']['dev_accuracy']:.3f}). Peak RSS: ours "
           f"{f32['peak_rss_mb']:.0f} MB vs PEFT {by['peft-fp32']['peak_rss_mb']:.0f} MB (fp32), "
           "which is consistent with (not separately measured) the "
           "full-vocabulary logits PEFT materializes at every position. Figures from a shared 2-core machine."]
    return "\n".join(md) + "\n"


def run_env(args) -> dict:
    import torch

    from softprompt.hardware import hardware_report

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "model": "SmolLM2-135M-Instruct (embedded)",
            "data": "SST-2 sentences (sst2 recipe), chat template", "batch_size": args.batch_size, "virtual_tokens": args.tokens,
            "steps_timed": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds, "examples": args.examples,
            "dev_examples": args.dev, "hardware": hardware_report(),  # measured in the same run as the variants
            "command": " ".join(["python", "bench/prompt_tuning_vs_peft.py"] + sys.argv[1:])}


def save_subset(args, rows: list[dict]) -> None:
    """A side-by-side run of a few variants: per-round step-time ratios against the first one."""
    env = run_env(args)
    ref = rows[0]
    for r in rows:
        r["speedup_vs_ref_rounds"] = [a / b for a, b in zip(ref["step_s_rounds"], r["step_s_rounds"])]
        r["speedup_vs_ref"] = statistics.median(r["speedup_vs_ref_rounds"])
        r["share_of_peak"] = r["achieved_gflop_s"] / env["hardware"]["matmul_gflops"]["bf16" if "bf16" in r["variant"] else "fp32"]
    for r in rows:
        print(f"{r['variant']:<20} {r['step_s']:8.3f} s/step  x{r['speedup_vs_ref']:.2f}  dev {r['dev_accuracy']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(subset_markdown(env, rows))


def subset_markdown(env: dict, rows: list[dict]) -> str:
    from softprompt.hardware import hardware_line

    ref = rows[0]
    acc = (lambda r: f"{r['dev_accuracy']:.3f}" if r["dev_accuracy"] is not None else "-")
    md = [f"# Prompt tuning speed: {', '.join(r['variant'] for r in rows)}", ""] + [
        f"- {k}: {v}" for k, v in env.items() if k != "hardware"] + ["", hardware_line(env["hardware"]), "",
        f"| variant | s/step (median) | s/step per round | x {ref['variant']} (per-round median) | share of matmul peak | "
        "dev accuracy | loss first -> last |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['variant']} | {r['step_s']:.3f} | {', '.join(f'{x:.3f}' for x in r['step_s_rounds'])} | {r['speedup_vs_ref']:.2f} | "
           f"{r['share_of_peak']:.1%} | {acc(r)} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |" for r in rows]
    md += ["", "Speed of the row over the column: the per-round median of the column's step time over the row's.", "",
           "| | " + " | ".join(r["variant"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    md += [f"| {r['variant']} | " + " | ".join(f"{statistics.median(c / o for c, o in zip(col['step_s_rounds'], r['step_s_rounds'])):.2f}"
                                               for col in rows) + " |" for r in rows]
    md += ["", "| variant | warm-up s per round (a compiled variant's first round starts from an empty inductor cache) |", "|---|---|"]
    md += [f"| {r['variant']} | {', '.join(f'{x:.1f}' for x in r['warmup_s_rounds'])} |" for r in rows]
    md += ["", f"Each variant runs in its own process, {env['rounds']} rounds in rotated order; a ratio is the median "
           "over rounds of the ratio within each round. Timed steps exclude the warm-up steps (for a compiled variant, "
           "the warm-up includes the compilation)."]
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--dev", type=int, default=200, help="SST-2 dev examples scored after training")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="run every variant this many times (rotated order); medians")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--examples", type=int, default=960)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--variant", choices=VARIANTS + EXTRA)
    ap.add_argument("--variants", help="comma-separated subset (the first is the reference of the ratios); saved as --name")
    ap.add_argument("--name", default="prompt_tuning_vs_peft", help="results file stem")
    ap.add_argument("--tmp", default="/tmp/softprompt-bench")
    ap.add_argument("--render", action="store_true", help="rewrite the Markdown from the saved JSON")
    args = ap.parse_args()
    if args.render:  # the subset files are told apart by their own --name
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        render = markdown if args.name == "prompt_tuning_vs_peft" else subset_markdown
        (RESULTS / f"{args.name}.md").write_text(render(saved["env"], saved["results"]))
        return
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    variants = args.variants.split(",") if args.variants else VARIANTS
    for v in variants:
        if v not in VARIANTS + EXTRA:
            ap.error(f"--variants: unknown variant {v!r}; expected some of {', '.join(VARIANTS + EXTRA)}")
    if args.variants and args.name == "prompt_tuning_vs_peft":
        ap.error("--variants: give the subset its own --name (prompt_tuning_vs_peft holds the full comparison)")
    per_round: dict[str, list[dict]] = {v: [] for v in variants}
    # a fresh inductor cache: a compiled variant's first round pays the whole compilation, later rounds reuse it
    child_env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-")}
    for r in range(args.rounds):  # the order rotates, so no variant always runs first or last
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            dev = args.dev if r == 0 else 0  # accuracy is deterministic: scored in the first round only
            cmd = [sys.executable, __file__, "--variant", v, f"--dev={dev}"] + [
                f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("steps", "warmup", "batch_size", "examples", "tokens", "data_dir", "tmp")]
            out = subprocess.run(cmd, capture_output=True, text=True, env=child_env)
            if out.returncode != 0:
                sys.exit(f"{v} failed:\n{out.stderr[-3000:]}")
            per_round[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {v}: {per_round[v][-1]['step_s']:.3f} s/step", file=sys.stderr)
    rows = []
    for v in variants:
        runs = per_round[v]
        row = dict(runs[0])
        for k in ("step_s", "tokens_per_s", "achieved_gflop_s", "peak_rss_mb"):
            row[k] = statistics.median(x[k] for x in runs)
        row["step_s_rounds"] = [x["step_s"] for x in runs]
        row["warmup_s_rounds"] = [x["warmup_s"] for x in runs]
        rows.append(row)
    if args.variants:
        return save_subset(args, rows)
    ref = next(r for r in rows if r["variant"] == "peft-fp32")
    for r in rows:
        r["speedup_vs_peft_fp32"] = ref["step_s"] / r["step_s"]
        # within each round, against that round's PEFT runs (the host drifts between rounds)
        r["speedup_vs_peft_fp32_rounds"] = [p / o for p, o in zip(ref["step_s_rounds"], r["step_s_rounds"])]
        peft_bf16 = [min(a, b) for a, b in zip(*(next(x for x in rows if x["variant"] == n)["step_s_rounds"]
                                                 for n in ("peft-bf16", "peft-bf16-eager")))]
        r["speedup_vs_best_peft_bf16_rounds"] = [p / o for p, o in zip(peft_bf16, r["step_s_rounds"])]
    env = run_env(args)
    peak = env["hardware"]["matmul_gflops"]
    for r in rows:
        r["peak_matmul_gflop_s"] = peak["bf16" if "bf16" in r["variant"] else "fp32"]
        r["share_of_peak"] = r["achieved_gflop_s"] / r["peak_matmul_gflop_s"]
    head = f"{'variant':<20} {'s/step':>8} {'tokens/s':>9} {'peak RSS MB':>12} {'x PEFT fp32':>12} {'dev acc':>8} {'GFLOP/s':>8} {'of peak':>8}"
    lines = [head] + [f"{r['variant']:<20} {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} {r['peak_rss_mb']:12.0f} {r['speedup_vs_peft_fp32']:12.2f} "
                      f"{r['dev_accuracy']:8.3f} {r['achieved_gflop_s']:8.1f} {r['share_of_peak']:8.1%}" for r in rows]
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prompt_tuning_vs_peft.json").write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")
    (RESULTS / "prompt_tuning_vs_peft.md").write_text(markdown(env, rows))


if __name__ == "__main__":
    main()
