"""softprompt eval"""
from __future__ import annotations

import argparse

from softprompt.cli.common import add_model_args, resolve


def register(sub) -> None:
    p = sub.add_parser("eval", help="score soft prompts against hand-written and few-shot prompts",
                       description="Score one or more soft prompts beside a hand-written zero-shot prompt and a few-shot prompt.")
    p.add_argument("prompts", nargs="*", help="prompt artifact directories")
    add_model_args(p, default=None)
    p.add_argument("--data", help="evaluation data (.jsonl/.csv/.tsv)")
    p.add_argument("--input-field", default="input")
    p.add_argument("--target-field", default="target")
    p.add_argument("--task", help="a task recipe (name or YAML path): data, metric, labels and baselines")
    p.add_argument("--data-dir", help="directory holding the recipe's datasets")
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N examples")
    p.add_argument("--metric", help="accuracy | macro_f1 | exact_match | rouge_l | bleu (default: accuracy for classification, rouge_l otherwise)")
    p.add_argument("--labels", help="comma-separated label words (classification); default: the distinct targets")
    p.add_argument("--hard-prompt", help="hand-written zero-shot template, e.g. 'Review: {input}\\nSentiment:'")
    p.add_argument("--few-shot", type=int, default=None, help="k demonstrations for the few-shot baseline (0 = none)")
    p.add_argument("--train", help="training data to draw few-shot demonstrations from")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", help="directory for eval.json, eval.md and eval.png")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softprompt.artifact import load_artifact, read_meta
    from softprompt.base_model import load_base
    from softprompt.data.readers import read_examples
    from softprompt.errors import SoftPromptError
    from softprompt.evaluate import evaluate, few_shot_contender, format_table, hard_contender, save_report, soft_contender
    from softprompt.scoring import label_set

    model = args.model or (read_meta(args.prompts[0])["base_model"]["id"] if args.prompts else "smollm2")
    hard, k, train, chat = args.hard_prompt, args.few_shot, [], True
    if args.task:
        from softprompt.data import load_recipe, load_split

        if not args.data_dir:
            raise SoftPromptError("--task needs --data-dir (the directory holding the datasets, e.g. ../shared/data)")
        recipe = load_recipe(args.task)
        examples = load_split(recipe, args.data_dir, args.split, limit=args.limit, seed=args.seed)
        labels = recipe.label_words or None
        metric = args.metric or recipe.metric
        hard = hard or recipe.hard_prompt
        k = recipe.few_shot_k if k is None else k
        chat = recipe.chat
        if k:
            train = load_split(recipe, args.data_dir, "train", limit=200, seed=args.seed)
    else:
        if not args.data:
            raise SoftPromptError("give --data DEV.jsonl (or --task NAME --data-dir DIR)")
        examples = read_examples(args.data, [args.input_field], args.target_field)[: args.limit]
        labels = [w.strip() for w in args.labels.split(",")] if args.labels else label_set(examples)
        metric = args.metric or ("accuracy" if labels else "rouge_l")
        if k and not args.train:
            raise SoftPromptError("--few-shot needs --train to draw demonstrations from")
        train = read_examples(args.train, [args.input_field], args.target_field) if args.train else []
    if labels:
        for w in labels:
            if not w.strip():
                raise SoftPromptError("a label word is empty")
    base = load_base(model, device=args.device)
    contenders = []
    if hard:
        contenders.append(hard_contender(base, "hand-written", hard, chat=chat))
        if k:
            contenders.append(few_shot_contender(base, hard, train, k, seed=args.seed, chat=chat))
    for path in args.prompts:
        contenders.append(soft_contender(base, load_artifact(path, base=base)))
    if not contenders:
        raise SoftPromptError("nothing to evaluate: give prompt directories and/or --hard-prompt")
    results = evaluate(base, contenders, examples, metric, labels, args.max_new_tokens, bf16=resolve(args, base.device))
    print(format_table(results))
    if args.out:
        save_report(results, args.out, title=f"evaluation on {args.task or args.data}",
                    meta={"model": model, "examples": len(examples), "metric": metric, "labels": labels})
        print(f"saved {args.out}/eval.json, eval.md, eval.png")
    return 0
