"""softprompt convert: distill a prefix-tuning prompt into an input-level one (see softprompt.compress.convert)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from softprompt.cli.common import add_model_args
from softprompt.errors import DataError, SoftPromptError


def register(sub) -> None:
    p = sub.add_parser("convert", help="distill a prefix-tuning prompt into prompt tuning (for vLLM)",
                       description="Distill a prefix-tuning prompt (per-layer keys/values, which vLLM cannot take) into an "
                                   "input-level prompt by KL: the base model with the prefix prompt is the teacher. Writes an "
                                   "ordinary prompt artifact and convert_report.json/.md (held-out KL, top-1 agreement, task "
                                   "accuracy before/after) beside it.")
    p.add_argument("prompt", help="prefix-tuning prompt artifact directory")
    p.add_argument("--to", required=True, help="prompt-tuning | p-tuning")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prompt in --out")
    add_model_args(p, default=None)
    q = p.add_argument_group("queries (default: the data the prompt was trained on, else inputs the model writes)")
    q.add_argument("--queries", help="queries: one per line, or .jsonl/.csv/.tsv with the template's fields (and an optional target)")
    q.add_argument("--heldout-queries", help="held-out queries for the report, same formats (default: a share of the training ones)")
    q.add_argument("--task", help="a task recipe (name or YAML path): its train split trains, its dev split is held out")
    q.add_argument("--data-dir", help="directory holding the recipe's datasets")
    q.add_argument("--n-queries", type=int, default=256, help="training queries at most (default 256)")
    q.add_argument("--n-heldout", type=int, default=24, help="held-out queries at most (default 24)")
    s = p.add_argument_group("student")
    s.add_argument("--tokens", type=int, default=None, help="soft rows (default: the prefix's length)")
    s.add_argument("--init", default="vocab", help="vocab | random | text:TEXT (default: vocab)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="kind option, e.g. encoder=mlp (p-tuning)")
    d = p.add_argument_group("distillation")
    d.add_argument("--objective", choices=["forward_kl", "reverse_kl", "loglik"], default="forward_kl")
    d.add_argument("--topk", type=int, default=64, help="teacher's top-k log-probs + remainder (0: exact KL)")
    d.add_argument("--max-new-tokens", type=int, default=32, help="teacher continuation length (default 32)")
    d.add_argument("--steps", type=int, default=300, help="at most this many steps (default 300; early stopping)")
    d.add_argument("--eval-every", type=int, default=10)
    d.add_argument("--patience", type=int, default=4, help="dev evaluations without improvement before stopping (0: never)")
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--lr", type=float, default=0.1)
    d.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def read_inputs(path: str, fields: list[str]):
    """Examples for a template's ``fields`` from a data file with those fields, or (one field) a
    queries file: one per line, or JSONL with query/question/input/prompt/instruction."""
    from softprompt.data.examples import Example
    from softprompt.data.queries import read_queries
    from softprompt.data.readers import read_examples

    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".csv", ".tsv") and p.is_file():
        try:
            return read_examples(p, fields, "target", require_target=False)
        except DataError:
            if len(fields) != 1 or p.suffix.lower() != ".jsonl":
                raise
    if len(fields) != 1:
        raise DataError(f"the prompt's template has fields {', '.join(fields)}: give a .jsonl/.csv/.tsv file with them", str(p))
    return [Example({fields[0]: q.text}, target=q.answers[0] if q.answers else None, source=q.source, line=q.line)
            for q in read_queries(p)]


def run(args: argparse.Namespace) -> int:
    from softprompt.artifact import read_meta
    from softprompt.compress.convert import ConvertConfig, check_convertible, convert_prompt, format_convert_report
    from softprompt.template import parse_template

    meta = read_meta(args.prompt)
    check_convertible(meta, args.to, args.prompt)  # before anything is loaded
    out = Path(args.out)
    if not args.overwrite and (out / "prompt.json").exists():
        raise SoftPromptError(f"{out} already holds a prompt: pass --overwrite to replace it")
    if out.resolve() == Path(args.prompt).resolve():
        raise SoftPromptError(f"--out {out} is the prompt being converted: write the converted prompt elsewhere")
    options = {}
    for item in args.option:
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise SoftPromptError(f"--option {item!r}: expected KEY=VALUE")
        try:
            options[key.replace("-", "_")] = json.loads(val)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = val
    fields = parse_template(meta["template"]).fields
    examples = read_inputs(args.queries, fields) if args.queries else None
    heldout = read_inputs(args.heldout_queries, fields) if args.heldout_queries else None
    labels = None
    if args.task:
        from softprompt.data import load_recipe, load_split

        if not args.data_dir:
            raise SoftPromptError("--task needs --data-dir (the directory holding the datasets, e.g. ../shared/data)")
        recipe = load_recipe(args.task)
        examples = examples or load_split(recipe, args.data_dir, "train", limit=args.n_queries * 2, seed=args.seed)
        split = next((s for s in ("dev", "validation", "test") if s in recipe.splits), None)
        if heldout is None and split:
            heldout = load_split(recipe, args.data_dir, split, limit=args.n_heldout, seed=args.seed)
        labels = recipe.label_words or None
    base = None
    if args.model:
        from softprompt.base_model import load_base

        base = load_base(args.model, device=args.device)
    cfg = ConvertConfig(to=args.to, tokens=args.tokens, init=args.init, kind_options=options, objective=args.objective,
                        topk=args.topk, max_new_tokens=args.max_new_tokens, n_queries=args.n_queries, n_heldout=args.n_heldout,
                        steps=args.steps, eval_every=args.eval_every, patience=args.patience, batch_size=args.batch_size,
                        lr=args.lr, seed=args.seed, precision=args.precision, device=args.device)
    res = convert_prompt(args.prompt, out, cfg, examples, heldout, base=base, labels=labels, progress=not args.quiet)
    print(format_convert_report(res.report), end="")
    print(f"\nsaved {res.out} (report: {res.out / 'convert_report.md'})")
    return 0
