"""Context compression on SmolLM2: SQuAD contexts of about 128/256/512/1024 tokens (their questions as
queries, also scored by answer F1 against the gold answers) and a ~560-token instruction set, each
compressed into soft prompts of 4/8/16/32 tokens. Prints a fidelity and cost table, saves JSON +
Markdown + a plot of top-1 agreement against compression ratio under bench/results/.

    python bench/compress_bench.py [--quick] [--steps 30] [--sizes 128,256,512,1024] [--tokens 4,8,16,32]

Budget (full run): one context per size, 20 distillation steps of batch 4, 12-token teacher
continuations, bf16 autocast, teacher outputs computed once per context and shared by all soft-prompt
sizes; a context-initialized vs randomly initialized comparison at 16 soft tokens on squad-256 and
the instruction set; one timing repeat on 2 held-out queries. On a 2-core machine shared with
other jobs use --threads 1 (two threads contending for one free core ran 5-20x slower).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from softprompt.hardware import hardware_line, hardware_report
from softprompt.precision import resolve_precision

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "src"))


def squad_contexts(tokenizer, targets: list[int], seed: int, max_questions: int) -> list[dict]:
    """For each target length, one context of consecutive paragraphs of one article whose token count
    is within 25% of the target (articles in seeded order), with those paragraphs' questions."""
    doc = json.loads((DATA / "squad-v1.1" / "dev-v1.1.json").read_text())["data"]
    order = list(range(len(doc)))
    random.Random(seed).shuffle(order)
    out = []
    lengths: dict[int, list[int]] = {}
    for target in targets:
        found = None
        for a in order:
            paras = doc[a]["paragraphs"]
            if a not in lengths:
                lengths[a] = [len(ids) for ids in tokenizer([p["context"] for p in paras], add_special_tokens=False).input_ids]
            lens = lengths[a]
            for i in range(len(paras)):
                total = 0
                for j in range(i, len(paras)):
                    total += lens[j] + 1
                    if abs(total - target) <= 0.25 * target:
                        found = (a, i, j)
                        break
                    if total > 1.25 * target:
                        break
                if found:
                    break
            if found:
                break
        a, i, j = found
        paras = doc[a]["paragraphs"][i:j + 1]
        qs, seen = [], set()
        for p in paras:
            for qa in p["qas"]:
                if qa["question"].strip() not in seen:
                    seen.add(qa["question"].strip())
                    qs.append((qa["question"].strip(), tuple(dict.fromkeys(x["text"].strip() for x in qa["answers"]))))
        random.Random(seed + target).shuffle(qs)
        out.append({"name": f"squad-{target}", "kind": "squad", "target": target, "title": doc[a]["title"],
                    "text": "\n".join(p["context"] for p in paras), "questions": qs[:max_questions]})
    return out


def split_squad(ctx: dict, n_train: int, n_held: int, suffix: str = ""):
    from softprompt.compress import Query
    from softprompt.compress.queries import PROBES

    qs = [Query(q + suffix, answers) for q, answers in ctx["questions"]]
    k = min(n_held, max(1, len(qs) // 2))
    held, train = qs[:k], qs[k:k + n_train]
    train += [Query(p) for p in PROBES[: max(0, n_train - len(train))]]  # too few questions: generic probes
    return train, held


def instruction_context(n_train: int, n_held: int, seed: int) -> tuple[dict, list, list]:
    from softprompt.compress import Query, read_queries

    qs = read_queries(REPO / "bench" / "data" / "compress_instruction_queries.txt")
    random.Random(seed).shuffle(qs)
    ctx = {"name": "instructions", "kind": "instructions", "target": None, "title": "bike-shop assistant rules",
           "text": (REPO / "bench" / "data" / "compress_instructions.txt").read_text()}
    return ctx, [Query(q.text) for q in qs[n_held:n_held + n_train]], [Query(q.text) for q in qs[:n_held]]


def run_one(base, ctx: dict, train, held, tokens: int, init: str, args, cache: Path, out: Path) -> dict:
    from softprompt.compress import CompressConfig, Compressor

    cfg = CompressConfig(tokens=tokens, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         max_new_tokens=args.max_new_tokens, topk=args.topk, init=init, precision=args.precision,
                         device="cpu", cache_dir=str(cache), timing_repeats=args.repeats, timing_queries=args.timed_queries,
                         seed=args.seed)
    t0 = time.perf_counter()
    job = Compressor(ctx["text"], cfg, train, out, base=base, progress=False, heldout_queries=held)
    res = job.run()
    r = res.report
    row = {"context": ctx["name"], "kind": ctx["kind"], "context_tokens": r["context_tokens"], "soft_tokens": tokens,
           "ratio": r["compression_ratio"], "init": init, "n_train": r["n_train"], "n_heldout": r["n_heldout"],
           "train_loss_first": r["train"]["first_loss"], "train_loss_final": r["train"]["final_loss"],
           "train_s": r["train"]["time_s"], "teacher_s": r["teacher"]["time_s"], "teacher_cache": r["teacher"]["cache"],
           "teacher_forwards": r["teacher"]["forwards"], "wall_s": time.perf_counter() - t0,
           "ttft_full_ms": r["cost"]["full"]["ttft_ms"], "ttft_soft_ms": r["cost"]["soft"]["ttft_ms"],
           "kv_full": r["cost"]["full"]["kv_bytes"], "kv_soft": r["cost"]["soft"]["kv_bytes"],
           "prompt_tokens_full": r["cost"]["full"]["prompt_tokens"], "prompt_tokens_soft": r["cost"]["soft"]["prompt_tokens"]}
    for v in ("soft", "truncated", "none"):
        for m in ("kl_per_token", "top1_agreement", "exact_match", "rouge_l", "answer_f1"):
            if m in r["fidelity"][v]:
                row[f"{v}_{m}"] = r["fidelity"][v][m]
    if "teacher" in r["fidelity"]:
        row["teacher_answer_f1"] = r["fidelity"]["teacher"]["answer_f1"]
    row["examples"] = r["examples"][:1]
    return row


COLS = [("context", "context", "{}"), ("ctx tok", "context_tokens", "{}"), ("soft", "soft_tokens", "{}"),
        ("ratio", "ratio", "{:.0f}x"), ("init", "init", "{}"),
        ("KL soft", "soft_kl_per_token", "{:.3f}"), ("KL trunc", "truncated_kl_per_token", "{:.3f}"),
        ("KL none", "none_kl_per_token", "{:.3f}"),
        ("top1 soft", "soft_top1_agreement", "{:.3f}"), ("top1 trunc", "truncated_top1_agreement", "{:.3f}"),
        ("top1 none", "none_top1_agreement", "{:.3f}"),
        ("EM soft", "soft_exact_match", "{:.2f}"), ("RL soft", "soft_rouge_l", "{:.3f}"), ("RL trunc", "truncated_rouge_l", "{:.3f}"),
        ("RL none", "none_rouge_l", "{:.3f}"),
        ("F1 full", "teacher_answer_f1", "{:.3f}"), ("F1 soft", "soft_answer_f1", "{:.3f}"), ("F1 trunc", "truncated_answer_f1", "{:.3f}"),
        ("F1 none", "none_answer_f1", "{:.3f}"),
        ("TTFT full ms", "ttft_full_ms", "{:.0f}"), ("TTFT soft ms", "ttft_soft_ms", "{:.0f}"),
        ("KV full KiB", "kv_full", "{:.0f}"), ("KV soft KiB", "kv_soft", "{:.0f}"), ("train s", "train_s", "{:.1f}")]


def cell(row: dict, key: str, fmt: str) -> str:
    if key not in row or row[key] is None:
        return "-"
    v = row[key] / 1024 if key.startswith("kv_") else row[key]
    return fmt.format(v)


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    return [c[0] for c in COLS], [[cell(r, k, f) for _, k, f in COLS] for r in rows]


def text_table(head, body) -> str:
    w = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.rjust(n) for x, n in zip(r, w)) for r in [head] + body)


def findings(rows: list[dict]) -> list[str]:
    """Sentences computed from the rows (no hand-written numbers)."""
    main = [r for r in rows if r["init"] == "context"]
    out = []
    n = len(main)
    beat_t = sum(r["soft_kl_per_token"] < r["truncated_kl_per_token"] for r in main)
    beat_n = sum(r["soft_kl_per_token"] < r["none_kl_per_token"] for r in main)
    agree_t = sum(r["soft_top1_agreement"] > r["truncated_top1_agreement"] for r in main)
    out.append(f"The soft prompt has lower held-out KL than the truncated context in {beat_t}/{n} settings and than "
               f"no context in {beat_n}/{n}; higher top-1 agreement than the truncated context in {agree_t}/{n}.")
    for name in dict.fromkeys(r["context"] for r in main):
        rs = sorted((r for r in main if r["context"] == name), key=lambda r: r["soft_tokens"])
        gap = [(r["none_kl_per_token"] - r["soft_kl_per_token"]) / max(r["none_kl_per_token"], 1e-9) for r in rs]
        out.append(f"{name} ({rs[0]['context_tokens']} tokens): soft KL " + ", ".join(f"{r['soft_kl_per_token']:.3f}@{r['soft_tokens']}" for r in rs)
                   + f" vs no context {rs[0]['none_kl_per_token']:.3f}; share of the no-context KL gap closed: "
                   + ", ".join(f"{g:.0%}" for g in gap) + ".")
    pairs = [(c, r) for c in rows if c["init"] == "context" for r in rows
             if r["init"] == "random" and r["context"] == c["context"] and r["soft_tokens"] == c["soft_tokens"]]
    if pairs:
        better = sum(c["soft_kl_per_token"] < r["soft_kl_per_token"] for c, r in pairs)
        out.append(f"Initialization from the context text gives lower KL than random initialization in {better}/{len(pairs)} "
                   "paired runs ("
                   + ", ".join(f"{c['context']}: {c['soft_kl_per_token']:.3f} vs {r['soft_kl_per_token']:.3f}" for c, r in pairs)
                   + ").")
    kv = [r["kv_full"] / r["kv_soft"] for r in main]
    tt = [r["ttft_full_ms"] / r["ttft_soft_ms"] for r in main]
    out.append(f"KV cache per query shrinks {min(kv):.1f}x to {max(kv):.1f}x; measured time to first token "
               f"{min(tt):.2f}x to {max(tt):.2f}x faster (shared CPU: noisy).")
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Left: top-1 agreement vs compression ratio; right: held-out KL vs compression ratio. Solid: soft
    prompt, dashed: truncated context, dotted: no context."""
    from softprompt.plots import _plt, save_figure

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    main = [r for r in rows if r["init"] == "context"]
    for i, name in enumerate(dict.fromkeys(r["context"] for r in main)):
        rs = sorted((r for r in main if r["context"] == name), key=lambda r: r["ratio"])
        x, color = [r["ratio"] for r in rs], f"C{i}"
        for ax, metric in zip(axes, ("top1_agreement", "kl_per_token")):
            ax.plot(x, [r[f"soft_{metric}"] for r in rs], "o-", color=color, label=f"{name} ({rs[0]['context_tokens']} tok)")
            ax.plot(x, [r[f"truncated_{metric}"] for r in rs], "x--", color=color, alpha=0.6)
            ax.axhline(rs[0][f"none_{metric}"], color=color, ls=":", lw=1, alpha=0.6)
    for ax, label in zip(axes, ("top-1 agreement with the full-context teacher", "KL(teacher || variant) per token")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio (context tokens / soft tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("held-out agreement (solid: soft, dashed: truncated, dotted: none)", fontsize=9)
    axes[1].set_title("held-out KL, lower is better", fontsize=9)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: one 128-token context, 4 and 16 soft tokens, 4 steps")
    ap.add_argument("--sizes", default="128,256,512,1024")
    ap.add_argument("--tokens", default="4,8,16,32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--query-suffix", default=" Answer in a few words.", help="appended to each SQuAD question")
    ap.add_argument("--train-queries", type=int, default=12)
    ap.add_argument("--heldout-queries", type=int, default=6)
    ap.add_argument("--init-compare", type=int, default=16, help="soft size for the context-vs-random init comparison (0: skip)")
    ap.add_argument("--init-compare-on", default="squad-256,instructions", help="contexts for the init comparison")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 avoids "
                    "oversubscription collapse when other jobs share the cores)")
    ap.add_argument("--no-instructions", dest="instructions", action="store_false")
    ap.add_argument("--repeats", type=int, default=1, help="timing repeats per query")
    ap.add_argument("--timed-queries", type=int, default=2, help="held-out queries timed per run")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 where the CPU runs it natively, else fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="compress_bench")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from the saved JSON")
    args = ap.parse_args()
    hw = hardware_report()  # recorded with the results, measured in the same run
    print(hardware_line(hw))
    if args.replot:
        plot(json.loads((RESULTS / f"{args.name}.json").read_text())["rows"], RESULTS / f"{args.name}.png")
        return 0
    if args.quick:
        args.sizes, args.tokens, args.steps, args.instructions, args.name = "128", "4,16", 4, False, args.name + "_quick"
        args.max_new_tokens, args.train_queries, args.heldout_queries, args.init_compare = 6, 4, 2, 16
        args.init_compare_on = "squad-128"

    import torch

    from softprompt.base_model import load_base

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    base = load_base("smollm2", device="cpu")
    sizes = [int(x) for x in args.sizes.split(",") if x]
    token_sizes = [int(x) for x in args.tokens.split(",") if x]
    jobs = []
    for ctx in squad_contexts(base.tokenizer, sizes, args.seed, args.train_queries + args.heldout_queries):
        jobs.append((ctx, *split_squad(ctx, args.train_queries, args.heldout_queries, args.query_suffix)))
    if args.instructions:
        jobs.append(instruction_context(args.train_queries, args.heldout_queries, args.seed))
    rows = []
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmp:
        cache = Path(tmp) / "teacher_cache"
        for ctx, train, held in jobs:
            plan = [(n, "context") for n in token_sizes]
            if args.init_compare and args.init_compare in token_sizes and ctx["name"] in args.init_compare_on.split(","):
                plan.append((args.init_compare, "random"))
            for n, init in plan:
                row = run_one(base, ctx, train, held, n, init, args, cache, Path(tmp) / f"{ctx['name']}-{n}-{init}")
                rows.append(row)
                print(f"[{time.perf_counter() - t_start:6.0f}s] {ctx['name']} ({row['context_tokens']} tok) soft={n} init={init}: "
                      f"KL soft {row['soft_kl_per_token']:.3f} trunc {row['truncated_kl_per_token']:.3f} none {row['none_kl_per_token']:.3f}; "
                      f"top1 soft {row['soft_top1_agreement']:.3f} trunc {row['truncated_top1_agreement']:.3f}", flush=True)
    total = time.perf_counter() - t_start
    head, body = table(rows)
    print()
    print(text_table(head, body))
    notes = findings(rows)
    print()
    for s in notes:
        print("- " + s)
    print(f"\ntotal wall time {total:.0f} s")
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
           "machine": platform.machine(), "precision": resolve_precision(args.precision, "cpu").dtype, "hardware": hw}
    RESULTS.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items()}
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"settings": settings, "env": env, "total_s": total,
                                                            "contexts": [{k: c[k] for k in ("name", "title", "target")} for c, _, _ in jobs],
                                                            "rows": rows, "findings": notes}, indent=2) + "\n")
    md = [f"# Context compression on SmolLM2-135M-Instruct ({'quick' if args.quick else 'full'} run)", "",
          f"Settings: {args.steps} steps x batch {args.batch_size}, lr {args.lr}, teacher top-{args.topk} + remainder, "
          f"{args.max_new_tokens}-token greedy teacher continuations, {args.train_queries} training / "
          f"{args.heldout_queries} held-out queries per context, {env['precision']} on CPU "
          f"({env['cpu_threads']} threads, shared with other jobs: timings are noisy). Total wall time {total:.0f} s.", "", hardware_line(hw), "",
          "Fidelity columns are on held-out queries against the full-context teacher: KL = exact full-vocabulary "
          "KL(teacher || variant) per token, top1 = next-token agreement along the teacher's continuation, EM/RL = exact "
          "match / ROUGE-L of the variant's greedy continuation vs the teacher's; F1 = SQuAD answer F1 vs the gold answers. "
          "'trunc' is the context cut to the soft prompt's length, 'none' no context at all.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]
    md += ["", "## Computed findings", ""] + [f"- {s}" for s in notes] + ["", f"![agreement vs compression]({args.name}.png)", ""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md))
    plot(rows, RESULTS / f"{args.name}.png")
    print(f"saved {RESULTS / args.name}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
