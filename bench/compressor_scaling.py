"""How the amortized compressor's one-forward fidelity scales with context length and memory size,
and where it breaks (SmolLM2-135M-Instruct, one CPU thread).

- **Context length**: a compressor (``--compressor``, default examples/compressors/smollm2-kv16) on held-out SQuAD
  paragraphs (the ``eval`` split by context hash, never trained on: checked against the compressor's
  list of training/dev contexts) bucketed by length in tokens; past the longest paragraphs, contexts
  made of 2-5 held-out paragraphs joined (their questions together), up to about 1,200 tokens, past
  the 100-500 tokens the compressor was trained on.
- **Memory size**: compressors with 4, 8, 16 and 32 memory tokens trained here with one fixed small
  budget (the same training and dev contexts, dataset questions, steps and learning rate), evaluated
  on the same held-out paragraphs.

Each variant is scored as in bench/compressor_bench.py: KL per token along the teacher's greedy answer
to the paragraph's own SQuAD questions, the fraction of the no-context KL gap closed, top-1
agreement, against truncation at the same budget (head + the first m context tokens).

    python bench/compressor_scaling.py [--part length|memory|both] [--render]
    python bench/compressor_scaling.py --part memory --memories 16 --encoder-lora 8 --add   # + an encoder LoRA
Results: bench/results/compressor_scaling.{json,md}, written after every measurement.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA = REPO.parent / "shared" / "data"
SHIPPED = REPO / "examples" / "compressors" / "smollm2-kv16"
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from compressor_bench import held_queries, one_forward  # noqa: E402

from softprompt.hardware import hardware_line, hardware_report  # noqa: E402

NAME = "compressor_scaling"
BUCKETS = [(30, 100), (100, 200), (200, 300), (300, 500)]
JOINED = [(500, 800), (800, 1300)]  # contexts of several held-out paragraphs joined


def _tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False).input_ids)


def eval_pool(tok, seed: int) -> list:
    from softprompt.compress.amortized.contexts import read_shared, split_contexts

    ctx = sorted(split_contexts(read_shared(DATA, ("squad",)))["eval"], key=lambda c: c.sha)
    random.Random(seed).shuffle(ctx)
    return [(c, _tokens(tok, c.text)) for c in ctx if c.questions]


def length_contexts(tok, pool: list, per_bucket: int, seed: int) -> list[tuple[str, object]]:
    """``per_bucket`` held-out paragraphs per length bucket, then joined paragraphs per long bucket."""
    from softprompt.compress.amortized.contexts import Context

    out = []
    for lo, hi in BUCKETS:
        got = [c for c, n in pool if lo <= n < hi][:per_bucket]
        out += [(f"{lo}-{hi}", c) for c in got]
    rng = random.Random(seed + 1)
    mid = [c for c, n in pool if 150 <= n < 300]
    for lo, hi in JOINED:
        made = 0
        for _ in range(200):
            if made == per_bucket:
                break
            parts, n = [], 0
            while n < lo:
                c = rng.choice(mid)
                if c in parts:
                    continue
                parts.append(c)
                n = _tokens(tok, " ".join(p.text for p in parts))
            if n < hi:
                qs = tuple(q for pair in zip(*(p.questions for p in parts)) for q in pair)  # interleaved, every part asked
                out.append((f"{lo}-{hi} (joined)", Context(" ".join(p.text for p in parts), "squad-joined", qs)))
                made += 1
    return out


def train_compressor(base, memory: int, train, dev, out: Path, args):
    from softprompt.compress.amortized import TrainConfig, Trainer

    cfg = TrainConfig(model="smollm2", memory=memory, form="kv", queries_per_context=3, query_source="dataset",
                      max_new_tokens=8, steps=args.steps, contexts_per_step=2, lr=0.03, eval_every=args.eval_every,
                      patience=0, seed=0, cache_dir=str(Path(args.work) / "train_cache"), encoder_lora=args.encoder_lora,
                      lora_lr=args.lora_lr)
    t0 = time.perf_counter()
    tr = Trainer(cfg, train, dev, out, base=base, progress=not args.quiet)
    comp = tr.run()
    return comp, time.perf_counter() - t0


def _memory_order(kv):
    """``4``, ``8``, ``16``, ``16+lora8``, ``32``: by memory size, then the plain compressor first."""
    return int(kv[0].split("+")[0]), kv[0]


def _f(x, d=3):
    return "-" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))


def _row_line(label: str, r: dict) -> str:
    f = r["fidelity"]
    return (f"| {label} | {r['sha']} | {r['tokens']} | {r['questions']} | {_f(f['soft']['kl_per_token'])} | "
            f"{_f(f['truncated']['kl_per_token'])} | {_f(f['none']['kl_per_token'])} | {_f(f['soft']['kl_gap_closed'])} | "
            f"{_f(f['truncated']['kl_gap_closed'])} | {_f(f['soft']['top1_agreement'])} | {r['forward_s'] * 1000:.0f} |")


def _mean(rows: list[dict], var: str, key: str):
    vals = [r["fidelity"][var][key] for r in rows if r["fidelity"][var].get(key) is not None]
    return statistics.mean(vals) if vals else None


def _fidelity(rows: list[dict]) -> dict:
    """Mean fidelity of a cell's rows, and on how many the compressor beats truncation."""
    return {"kl": _mean(rows, "soft", "kl_per_token"), "truncated_kl": _mean(rows, "truncated", "kl_per_token"),
            "none_kl": _mean(rows, "none", "kl_per_token"), "gap_closed": _mean(rows, "soft", "kl_gap_closed"),
            "truncated_gap_closed": _mean(rows, "truncated", "kl_gap_closed"), "top1": _mean(rows, "soft", "top1_agreement"),
            "beats_truncation": sum(r["fidelity"]["soft"]["kl_per_token"] < r["fidelity"]["truncated"]["kl_per_token"] for r in rows)}


def summarize(res: dict) -> dict:
    s: dict = {"length": [], "memory": []}
    groups: dict[str, list] = {}
    for r in res.get("length", []):
        groups.setdefault(r["bucket"], []).append(r)
    for b, rows in groups.items():
        s["length"].append({"bucket": b, "contexts": len(rows), "tokens": statistics.mean(r["tokens"] for r in rows), **_fidelity(rows)})
    for m, block in sorted(res.get("memory", {}).items(), key=_memory_order):
        rows = block["rows"]
        if not rows:
            continue
        s["memory"].append({"memory": m, "contexts": len(rows), "first_dev_kl": block["train"]["first_dev_kl"],
                            "best_dev_kl": block["train"]["best_dev_kl"], "train_s": block["train"]["wall_s"], **_fidelity(rows)})
    return s


def render(res: dict) -> str:
    s = summarize(res)
    head = ("| {} | paragraph | tokens | questions | KL soft | KL truncated | KL none | gap closed soft | gap closed truncated | "
            "top-1 soft | forward ms |")
    sep = "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    lines = ["# Amortized compressor: fidelity vs context length and memory size", "", res["hardware_line"], "",
             f"Settings: `{json.dumps(res['settings'])}`", "", f"Leak check: {res.get('leak_check', '-')}", ""]
    if s["length"]:
        comp = Path(res["settings"].get("compressor") or SHIPPED).name
        mem = res.get("length_memory", 16)
        lines += [f"## Context length (compressor `{comp}`, {mem} memory tokens)", "",
                  "| bucket (tokens) | contexts | mean tokens | KL soft | KL truncated | KL none | gap closed soft | "
                  "gap closed truncated | top-1 soft | soft beats truncation |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for b in s["length"]:
            lines.append(f"| {b['bucket']} | {b['contexts']} | {b['tokens']:.0f} | {_f(b['kl'])} | {_f(b['truncated_kl'])} | "
                         f"{_f(b['none_kl'])} | {_f(b['gap_closed'])} | {_f(b['truncated_gap_closed'])} | {_f(b['top1'])} | "
                         f"{b['beats_truncation']} of {b['contexts']} |")
        lines += ["", "Per context:", "", head.format("bucket"), sep]
        lines += [_row_line(r["bucket"], r) for r in res["length"]]
        lines.append("")
    if s["memory"]:
        t = res["memory_settings"]
        lines += [f"## Memory size (kv compressors trained here: {t['train_contexts']} training / {t['dev_contexts']} dev contexts, "
                  f"{t['steps']} steps x 2 contexts, 3 dataset questions per context, lr 0.03; held-out paragraphs "
                  f"{t['min_tokens']}-{t['max_tokens']} tokens)", "",
                  "| memory | dev KL start | dev KL best | training wall s (memory 4: with the shared queries + teacher) | contexts | "
                  "KL soft | KL truncated | KL none | gap closed soft | "
                  "gap closed truncated | top-1 soft | soft beats truncation |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m in s["memory"]:
            lines.append(f"| {m['memory']} | {_f(m['first_dev_kl'])} | {_f(m['best_dev_kl'])} | {m['train_s']:.0f} | {m['contexts']} | "
                         f"{_f(m['kl'])} | {_f(m['truncated_kl'])} | {_f(m['none_kl'])} | {_f(m['gap_closed'])} | "
                         f"{_f(m['truncated_gap_closed'])} | {_f(m['top1'])} | {m['beats_truncation']} of {m['contexts']} |")
        lines += ["", "Per context:", "", head.format("memory"), sep]
        for m, block in sorted(res["memory"].items(), key=_memory_order):
            lines += [_row_line(m, r) for r in block["rows"]]
        lines.append("")
    if res.get("wall_s"):
        lines += [f"Wall time of the whole run: {res['wall_s']:.0f} s.", ""]
    for run in res.get("added_runs", []):
        lines += [f"Added later: `{json.dumps(run['settings'])}`" + (f", {run['wall_s']:.0f} s wall" if run.get("wall_s") else "") +
                  f". {run['hardware_line']}", ""]
    return "\n".join(lines)


def write(res: dict, name: str = NAME) -> None:
    from softprompt.atomic import atomic_write_json, atomic_write_text

    res["summary"] = summarize(res)
    atomic_write_json(RESULTS / f"{name}.json", res)
    atomic_write_text(RESULTS / f"{name}.md", render(res))


def measure(comp, ctx, work: Path, args) -> dict:
    held = held_queries(ctx, args.questions)
    r = one_forward(comp, ctx, held, work, args)
    return {"sha": ctx.sha, "tokens": _tokens(comp.base.tokenizer, ctx.text), "questions": len(held), **r}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["length", "memory", "both"], default="both")
    ap.add_argument("--per-bucket", type=int, default=3, help="held-out contexts per length bucket (default 3)")
    ap.add_argument("--questions", type=int, default=4, help="held-out SQuAD questions per context (default 4)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--memories", default="4,8,16,32")
    ap.add_argument("--train-contexts", type=int, default=12)
    ap.add_argument("--dev-contexts", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24, help="training steps of every memory size (default 24)")
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--encoder-lora", type=int, default=0, help="train the memory sizes with an encoder LoRA of this rank")
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--add", action="store_true", help="add these runs to the existing results file")
    ap.add_argument("--memory-eval", type=int, default=5, help="held-out paragraphs for the memory sizes (default 5)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/compressor_scaling")
    ap.add_argument("--compressor", default=str(SHIPPED), help="the compressor the length part measures (default: the first shipped one)")
    ap.add_argument("--name", default=NAME, help=f"results file name under bench/results/ (default {NAME})")
    ap.add_argument("--render", action="store_true", help="rewrite the Markdown from the JSON and exit")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.render:
        res = json.loads((RESULTS / f"{args.name}.json").read_text())
        from softprompt.atomic import atomic_write_text

        atomic_write_text(RESULTS / f"{args.name}.md", render(res))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    from softprompt.base_model import load_base
    from softprompt.compress.amortized import Compressor
    from softprompt.compress.amortized.contexts import filter_length, read_shared, split_contexts

    t_start = time.perf_counter()
    base = load_base("smollm2", device="cpu")
    tok = base.tokenizer
    hw = hardware_report()
    settings = {k: v for k, v in vars(args).items() if k not in ("quiet", "render", "add", "name")}
    res: dict = {"settings": settings, "hardware": hw, "hardware_line": hardware_line(hw), "length": [], "memory": {}}
    if args.add:  # a later run on the same machine, same contexts (everything seeded), added beside the first
        res = json.loads((RESULTS / f"{args.name}.json").read_text())
        res.setdefault("added_runs", []).append({"settings": settings, "hardware_line": hardware_line(hw)})
    work = Path(args.work)
    pool = eval_pool(tok, args.seed)
    shipped = Compressor.load(Path(args.compressor), base=base)
    res["length_memory"] = shipped.meta["memory"]
    seen = set(shipped.meta["contexts"]["train"]) | set(shipped.meta["contexts"]["dev"])
    if args.part in ("length", "both"):
        ctxs = length_contexts(tok, pool, args.per_bucket, args.seed)
        leaked = [c.sha for c, _ in pool if c.sha in seen]  # every paragraph a context (or a joined one) is made of
        if leaked:
            raise SystemExit(f"held-out contexts {leaked} were used in training: refusing to benchmark on them")
        res["leak_check"] = (f"{len(ctxs)} held-out contexts for length, none among compressor `{Path(args.compressor).name}`'s "
                             f"{len(seen)} training/dev contexts")
        for i, (bucket, ctx) in enumerate(ctxs):
            r = measure(shipped, ctx, work / "length" / ctx.sha, args)
            res["length"].append({"bucket": bucket, **r})
            print(f"[length {i + 1}/{len(ctxs)}] {bucket} {r['tokens']} tok: gap {r['fidelity']['soft']['kl_gap_closed']}", flush=True)
            write(res, args.name)
    if args.part in ("memory", "both"):
        shared = read_shared(DATA, ("squad", "boolq"))
        sp = split_contexts(filter_length([c for c in shared if c.questions], tok, 100, 400))
        train = sorted(sp["train"], key=lambda c: c.sha)
        dev = sorted(sp["dev"], key=lambda c: c.sha)
        random.Random(args.seed).shuffle(train)
        random.Random(args.seed + 1).shuffle(dev)
        train, dev = train[:args.train_contexts], dev[:args.dev_contexts]
        held = [c for c, n in pool if 150 <= n < 350][:args.memory_eval]
        res["memory_settings"] = {"train_contexts": len(train), "dev_contexts": len(dev), "steps": args.steps,
                                  "min_tokens": 150, "max_tokens": 350}
        for m in [int(x) for x in args.memories.split(",")]:
            key = f"{m}+lora{args.encoder_lora}" if args.encoder_lora else str(m)
            comp, wall = train_compressor(base, m, train, dev, work / f"m{key}", args)
            mt = comp.meta["metrics"]
            used = set(comp.meta["contexts"]["train"]) | set(comp.meta["contexts"]["dev"])
            assert not used & {c.sha for c in held}, "a held-out paragraph was trained on"
            block = {"train": {"first_dev_kl": mt["first_dev_kl"], "best_dev_kl": mt["best_dev_kl"], "best_step": mt["best_step"],
                               "wall_s": wall, "train_s": mt["train_s"], "prepare_s": mt["prepare_s"]}, "rows": []}
            res["memory"][key] = block
            for ctx in held:
                block["rows"].append(measure(comp, ctx, work / "memory" / ctx.sha, args))  # the teacher's cache is shared
                write(res, args.name)
            print(f"[memory {key}] dev KL {mt['first_dev_kl']:.4f} -> {mt['best_dev_kl']:.4f}; "
                  f"held-out gap {statistics.mean(r['fidelity']['soft']['kl_gap_closed'] for r in block['rows']):.3f}", flush=True)
    if args.add:
        res["added_runs"][-1]["wall_s"] = time.perf_counter() - t_start
    else:
        res["wall_s"] = time.perf_counter() - t_start
    write(res, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
