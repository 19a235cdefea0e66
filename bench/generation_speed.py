"""Sampling many queries from one model: self-study generation (softprompt.compress.selfstudy) against
the same code at an earlier revision and against transformers' own ``generate``.

Every variant completes the same asks: the first round of self-study for ``--queries`` queries on the
557-token instruction set (each chunk asked for each of the six query types, the same count each),
sampled at temperature 1.0, top-p 0.95, up to 32 new tokens, a row ending at its first usable line.

- ``ours``: this tree's ``selfstudy._sample`` (shared chunk prefix, equal asks run once, KV cache
  written in place, finished rows leave the batch);
- ``ours@REV`` (``--baseline REV``): the same call in a git worktree of REV, in a subprocess;
- ``hf-generate``: ``model.generate(do_sample=True, top_p=0.95, num_return_sequences=k)`` for each
  distinct ask (one prompt, k samples: its strongest batching for this job; no prefix shared across
  types), with a stopping criterion that ends each row at its first usable line.

    python bench/generation_speed.py [--queries 64] [--repeats 2] [--baseline HEAD~1] [--threads 2]
    # -> bench/results/generation_speed.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "generation_speed"
CONTEXT = REPO / "bench" / "data" / "compress_instructions.txt"


def _asks(tokenizer, text: str, queries: int) -> tuple[list[str], list[tuple[int, str]]]:
    """The chunks and the first round's asks of self-study for ``queries`` training queries."""
    from softprompt.compress.selfstudy import TYPES, chunks

    pieces = chunks(tokenizer, text, 128)
    per_chunk = -(-queries // len(pieces))
    per = max(1, -(-per_chunk * 3 // (2 * len(TYPES))))
    kinds = list(TYPES)
    return pieces, [(ci, kinds[(ci + j) % len(kinds)]) for ci in range(len(pieces)) for _ in range(per) for j in range(len(kinds))]


def _worker(queries: int, threads: int) -> dict:
    """Time this interpreter's softprompt ``_sample`` on the asks (run under another tree's src)."""
    import torch

    from softprompt.base_model import load_base
    from softprompt.compress import selfstudy

    torch.set_num_threads(threads)
    base = load_base("smollm2", device="cpu")
    pieces, asks = _asks(base.tokenizer, CONTEXT.read_text(), queries)
    t0 = time.perf_counter()
    got = selfstudy._sample(base, pieces, asks, 0, 32, False, False, "asks")
    return {"s": time.perf_counter() - t0, "asks": len(asks), "usable": sum(bool(q) for _, _, q in got),
            "texts": [q for _, _, q in got], "src": selfstudy.__file__}


def _run_tree(src: Path, queries: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, __file__, "--worker", "--queries", str(queries), "--threads", str(threads)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _hf_generate(base, pieces, asks, threads: int) -> dict:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from softprompt.compress.selfstudy import TYPES, clean, line_done
    from softprompt.encoding import PromptFormat
    from softprompt.template import Template

    torch.set_num_threads(threads)
    tok = base.tokenizer
    fmt = PromptFormat(tok, Template.default(0), chat=True)
    groups: dict[tuple[int, str], int] = {}
    for a in asks:
        groups[a] = groups.get(a, 0) + 1

    class FirstLine(StoppingCriteria):
        def __init__(self, start: int):
            self.start = start

        def __call__(self, input_ids, scores, **kw):
            return torch.tensor([line_done(tok.decode(r[self.start:], skip_special_tokens=True)) for r in input_ids])

    texts: list[str] = []
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for (ci, t), k in groups.items():
        body = pieces[ci] if t != "comparison" or len(pieces) == 1 else f"{pieces[ci]}\n\n{pieces[(ci + 1) % len(pieces)]}"
        from softprompt.data.examples import Example

        ids = fmt.prompt_ids(Example({fmt.template.fields[0]: f"{body}\n\n{TYPES[t]}"}))
        x = torch.tensor([ids])
        with torch.no_grad():
            out = base.model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                                      max_new_tokens=32, num_return_sequences=k, pad_token_id=tok.pad_token_id,
                                      stopping_criteria=StoppingCriteriaList([FirstLine(len(ids))]))
        texts += [clean(tok.decode(r[len(ids):], skip_special_tokens=True)) for r in out]
    return {"s": time.perf_counter() - t0, "asks": len(asks), "usable": sum(bool(q) for q in texts), "texts": texts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline", default="", help="a git revision to time beside this tree (its worktree, a subprocess)")
    ap.add_argument("--no-hf", action="store_true", help="leave transformers' generate out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default=NAME)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.queries, args.threads)))
        return 0
    sys.path.insert(0, str(REPO / "src"))
    from softprompt.atomic import atomic_write_json, atomic_write_text
    from softprompt.hardware import hardware_line, hardware_report

    hw = hardware_report()
    trees = {"ours": REPO / "src"}
    tmp = None
    if args.baseline:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.baseline], capture_output=True, text=True,
                             check=True).stdout.strip()
        tmp = Path(tempfile.mkdtemp()) / "wt"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tmp), rev], check=True)
        trees[f"ours@{rev}"] = tmp / "src"
    base = pieces = asks = None
    if not args.no_hf:
        import torch

        from softprompt.base_model import load_base

        torch.set_num_threads(args.threads)
        base = load_base("smollm2", device="cpu")
        pieces, asks = _asks(base.tokenizer, CONTEXT.read_text(), args.queries)
    names = list(trees) + ([] if args.no_hf else ["hf-generate"])
    runs: dict[str, list[dict]] = {k: [] for k in names}
    try:
        for rep in range(args.repeats):
            for name in (names if rep % 2 == 0 else names[::-1]):
                r = _run_tree(trees[name], args.queries, args.threads) if name in trees else _hf_generate(base, pieces, asks, args.threads)
                runs[name].append(r)
                print(f"rep {rep} {name}: {r['s']:.1f} s, {r['usable']} of {r['asks']} asks usable", flush=True)
    finally:
        if tmp is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp)], check=False)
    med = {k: statistics.median(r["s"] for r in v) for k, v in runs.items()}
    ours = runs["ours"][0]["texts"]
    same = {k: (v[0]["texts"] == ours) for k, v in runs.items() if k.startswith("ours@")}
    res = {"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "hardware": hw,
           "asks": runs["ours"][0]["asks"], "seconds": {k: [r["s"] for r in v] for k, v in runs.items()}, "median_s": med,
           "usable": {k: v[0]["usable"] for k, v in runs.items()},
           "speedup_vs": {k: med[k] / med["ours"] for k in runs if k != "ours"}, "same_texts_as_ours": same,
           "sample": {k: v[0]["texts"][:5] for k, v in runs.items()}}
    out = REPO / "bench" / "results"
    atomic_write_json(out / f"{args.name}.json", res)
    md = ["# Sampling self-study queries: this tree, an earlier revision, transformers' generate", "", hardware_line(hw), "",
          f"SmolLM2-135M-Instruct in fp32, {args.threads} torch threads; the {res['asks']} asks of self-study's first round "
          f"for {args.queries} queries on the 557-token instruction set (temperature 1.0, top-p 0.95, up to 32 new tokens, "
          f"a row ends at its first usable line); median of {args.repeats} runs, order alternated.", "",
          "| variant | median (s) | runs (s) | usable samples | ours is faster by |", "|---|---|---|---|---|"]
    for k in names:
        sp = "" if k == "ours" else f"{res['speedup_vs'][k]:.2f}x"
        md.append(f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in res['seconds'][k])} | {res['usable'][k]} of {res['asks']} | {sp} |")
    for k, v in same.items():
        md += ["", f"{k} draws the same samples as this tree: {'yes' if v else 'no'}."]
    atomic_write_text(out / f"{args.name}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
