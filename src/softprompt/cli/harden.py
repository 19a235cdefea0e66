"""softprompt harden: search a readable hard prompt that behaves like a soft prompt."""
from __future__ import annotations

import argparse
from pathlib import Path

from softprompt.cli.common import add_model_args, load_prompt_and_base


def register(sub) -> None:
    p = sub.add_parser("harden", help="find a readable hard prompt that behaves like a soft prompt",
                       description="Search vocabulary tokens for the soft slots that minimize the KL divergence from "
                                   "the soft-prompted model (or the task loss) on --data: PEZ projected gradients "
                                   "and/or a greedy coordinate search. Reports each result's fidelity and task metric "
                                   "beside the soft prompt, its plain projection and an optional hand-written prompt.")
    p.add_argument("prompt", help="prompt artifact directory")
    p.add_argument("--data", required=True, help="examples (.jsonl/.csv/.tsv with the template's fields)")
    p.add_argument("--target-field", default="target")
    p.add_argument("--limit", type=int, default=32, help="examples used by the search")
    p.add_argument("--eval-data", help="held-out examples for the report (default: --data)")
    p.add_argument("--method", default="both", choices=["pez", "greedy", "both"])
    p.add_argument("--objective", default="kl", choices=["kl", "task"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.1, help="PEZ step size")
    p.add_argument("--hard-prompt", help="a hand-written template to report beside, e.g. 'Review: {input}\\nSentiment:'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="report directory (default: PROMPT/harden)")
    add_model_args(p, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softprompt.atomic import atomic_write_json, atomic_write_text
    from softprompt.data.readers import read_examples
    from softprompt.errors import SoftPromptError
    from softprompt.interpret.fidelity import divergence, hard_prompt, next_token_logits, project, task_score
    from softprompt.interpret.harden import harden

    if args.steps < 1:
        raise SoftPromptError("--steps must be >= 1")
    art, base = load_prompt_and_base(args.prompt, args.model, args.device)
    fields = art.template.fields
    train = read_examples(args.data, fields, args.target_field, require_target=False)[: args.limit]
    held = read_examples(args.eval_data, fields, args.target_field, require_target=False) if args.eval_data else train
    labels = art.meta.get("labels") if all(e.target is not None for e in held) else None
    fmt = art.prompt_format(base)
    soft_logits = next_token_logits(base.model, art.prompt, fmt, held)

    def row(name: str, prompt, f, text: str) -> dict:
        d = divergence(soft_logits, next_token_logits(base.model, prompt, f, held))
        return {"name": name, "text": text, "kl": d["kl"], "top1_agreement": d["top1_agreement"],
                **{"metric": (s := task_score(base.model, prompt, f, held, labels))["metric"], "value": s["value"]}}

    rows = [row("soft prompt", art.prompt, fmt, "(soft)")]
    proj, ids = project(art.prompt, base.embedding)
    rows.append(row("nearest-token projection", proj, fmt, base.tokenizer.decode(ids)))
    results = []
    for method in (["pez", "greedy"] if args.method == "both" else [args.method]):
        res = harden(base, art.prompt, fmt, train, method, args.steps, args.objective, args.lr, seed=args.seed, progress=True)
        results.append({"method": res.method, "ids": res.ids, "tokens": res.tokens, "start_loss": res.start_loss,
                        "loss": res.loss, "history": res.history})
        rows.append(row(f"hardened ({method})", hard_prompt(res.ids, base.embedding), fmt, base.tokenizer.decode(res.ids)))
    if args.hard_prompt:
        from softprompt.encoding import PromptFormat
        from softprompt.template import parse_template

        f = PromptFormat(base.tokenizer, parse_template(args.hard_prompt), chat=art.chat, system=art.system,
                         max_length=base.max_positions)
        rows.append(row("hand-written", None, f, args.hard_prompt))
    metric = rows[0]["metric"]
    md = ["# Hardened prompts for `" + str(args.prompt) + "`", "",
          f"Search on {len(train)} examples ({args.objective} objective, {args.steps} steps); report on {len(held)} examples. "
          "KL is from the soft-prompted model's next-token distributions, nats per position.", "",
          f"| Prompt | Tokens in the soft slots | KL | Top-1 agreement | {metric} |", "|---|---|---|---|---|"]
    md += [f"| {r['name']} | `{r['text']!r}` | {r['kl']:.4f} | {r['top1_agreement']:.3f} | {r['value']:.4f} |" for r in rows]
    md.append("")
    for r in results:
        md.append(f"- {r['method']}: search objective {r['start_loss']:.4f} at the projection -> {r['loss']:.4f}")
    text = "\n".join(md) + "\n"
    print(text)
    out = Path(args.out) if args.out else Path(args.prompt) / "harden"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "harden.json", {"prompt": str(args.prompt), "objective": args.objective, "steps": args.steps,
                                            "n_search": len(train), "n_report": len(held), "rows": rows, "searches": results})
    atomic_write_text(out / "harden.md", text)
    print(f"wrote {out / 'harden.json'}, {out / 'harden.md'}")
    return 0
