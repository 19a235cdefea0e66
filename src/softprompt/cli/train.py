"""softprompt train"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from softprompt.cli.common import add_model_args
from softprompt.errors import SoftPromptError


def register(sub) -> None:
    p = sub.add_parser("train", help="learn a soft prompt on a frozen model", description="Learn a soft prompt on a frozen base model.")
    add_model_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--data", help="training data (.jsonl, .csv or .tsv)")
    d.add_argument("--dev", help="dev data for evaluation, best-prompt selection and early stopping")
    d.add_argument("--input-field", default="input", help="field with the input text (default: input)")
    d.add_argument("--target-field", default="target", help="field with the target text (default: target)")
    d.add_argument("--task", help="a task recipe (name or YAML path) instead of --data/--dev")
    d.add_argument("--data-dir", help="directory holding the recipe's datasets (e.g. ../shared/data)")
    d.add_argument("--limit", type=int, default=None, help="use at most N training examples")
    k = p.add_argument_group("prompt")
    k.add_argument("--kind", default="prompt-tuning", help="prompt-tuning | prefix | p-tuning")
    k.add_argument("--tokens", type=int, default=None, help="virtual tokens for the default template (default: 8, or the recipe's)")
    k.add_argument("--template", help="hybrid template, e.g. '[soft:8] Review: {input} Sentiment:[soft:2]'")
    k.add_argument("--init", default="vocab", help="random | vocab | text:TEXT | labels[:w1,w2] (default: vocab)")
    k.add_argument("--no-chat", dest="chat", action="store_false", help="do not wrap inputs in the chat template")
    k.add_argument("--system", help="system message when the chat template is used")
    k.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="kind-specific option (repeatable)")
    o = p.add_argument_group("optimization")
    o.add_argument("--objective", choices=["lm", "classify"], default="lm",
                   help="lm: log-likelihood of the target (default); classify: softmax over the label words, "
                        "each scored as eval ranks them (classification data only)")
    o.add_argument("--steps", type=int, default=100)
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--lr", type=float, default=0.03)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--warmup", type=float, default=0.06, help="warmup: fraction of steps, or a step count if >= 1")
    o.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    o.add_argument("--eval-every", type=int, default=0)
    o.add_argument("--patience", type=int, default=0, help="stop after N evaluations without improvement")
    o.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--no-bucket", dest="bucket", action="store_false", help="no length bucketing")
    o.add_argument("--compile", action="store_true", help="torch.compile the base model's forward (pays off on long runs)")
    o.add_argument("--attention", choices=["auto", "sdpa", "eager"], default="auto",
                   help="attention kernel to train with (auto: eager for bf16 on CPU, where it is faster than sdpa)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prompt in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise SoftPromptError(f"--option {item!r}: expected KEY=VALUE")
        try:
            out[key.replace("-", "_")] = json.loads(val)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = val
    return out


def run(args: argparse.Namespace) -> int:
    from softprompt.data.readers import read_examples
    from softprompt.prompts import kind_class
    from softprompt.template import parse_template
    from softprompt.train import TrainConfig, Trainer

    out = Path(args.out)
    if not args.resume and not args.overwrite and ((out / "prompt.json").exists() or (out / "checkpoint").exists()):
        raise SoftPromptError(f"{out} already holds a prompt or checkpoint: pass --resume to continue it or --overwrite to replace it")
    if args.resume:
        from softprompt.train import require_checkpoint

        require_checkpoint(out)  # before the model is loaded
    template = args.template
    parsed = parse_template(template) if template else None
    tokens = args.tokens if args.tokens is not None else 8
    if parsed and parsed.n_virtual and not kind_class(args.kind).input_level:
        raise SoftPromptError(f"--kind {args.kind} puts its virtual tokens in every layer's keys and values: give a "
                              "template without [soft] spans and the prefix length with --tokens N")
    if args.task:
        from softprompt.data import load_recipe, load_split

        if not args.data_dir:
            raise SoftPromptError("--task needs --data-dir (the directory holding the datasets, e.g. ../shared/data)")
        recipe = load_recipe(args.task)
        train = load_split(recipe, args.data_dir, "train", limit=args.limit, seed=args.seed)
        dev = load_split(recipe, args.data_dir, "dev", limit=200, seed=args.seed) if "dev" in recipe.splits else None
        template = template or recipe.soft_template_for(args.tokens)
        tokens = args.tokens if args.tokens is not None else recipe.soft_tokens
        chat = recipe.chat and args.chat
    else:
        if not args.data:
            raise SoftPromptError("give --data TRAIN.jsonl (or --task NAME --data-dir DIR)")
        fields = parsed.fields if parsed else [args.input_field]
        train = read_examples(args.data, fields, args.target_field)[: args.limit]
        dev = read_examples(args.dev, fields, args.target_field) if args.dev else None
        chat = args.chat
    cfg = TrainConfig(model=args.model, kind=args.kind, template=template, tokens=tokens, init=args.init,
                      input_field=args.input_field, target_field=args.target_field, chat=chat, system=args.system,
                      kind_options=_options(args.option), steps=args.steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                      schedule=args.schedule, eval_every=args.eval_every, patience=args.patience,
                      save_every=args.save_every, seed=args.seed, precision=args.precision, bucket=args.bucket, compile=args.compile,
                      attention=args.attention, objective=args.objective,
                      device=args.device)
    trainer = Trainer(cfg, train, dev, out, progress=not args.quiet)
    try:
        res = trainer.run(resume=args.resume)
    finally:
        if trainer.dist.active:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not trainer.dist.is_main:  # rank 0 reports
        return 0
    m = res.metrics
    line = f"saved {res.out} after {res.steps_done} steps: train loss {m['first_train_loss']:.4f} -> {m['final_train_loss']:.4f}"
    if res.best:
        line += f"; best dev loss {res.best['dev_loss']:.4f} at step {res.best['step']}"
        if "dev_accuracy" in res.best:
            line += f", dev accuracy {res.best['dev_accuracy']:.3f}"
    print(line)
    return 0
