"""softprompt inspect: nearest tokens, norms, projection fidelity, prompt similarity, context coverage."""
from __future__ import annotations

import argparse
from pathlib import Path

from softprompt.cli.common import add_model_args, load_prompt_and_base, resolve


def register(sub) -> None:
    p = sub.add_parser("inspect", help="read a soft prompt: nearest tokens, fidelity, similarity",
                       description="Nearest vocabulary tokens of each virtual token (cosine, dot product, L2), norms "
                                   "against the vocabulary's, and with --data the projection fidelity (what is lost "
                                   "when each virtual token is replaced by its nearest token). With a second prompt: "
                                   "how similar the two are. With --context and --queries: which parts of a "
                                   "compressed context the prompt keeps.")
    p.add_argument("prompt", help="prompt artifact directory")
    p.add_argument("other", nargs="?", help="a second prompt to compare with")
    p.add_argument("--k", type=int, default=10, help="nearest tokens per virtual token")
    p.add_argument("--data", help="dev examples for projection fidelity (.jsonl/.csv/.tsv with the template's fields)")
    p.add_argument("--target-field", default="target")
    p.add_argument("--limit", type=int, default=64, help="examples used for fidelity")
    p.add_argument("--projection", default="l2", choices=["l2", "cosine", "dot"], help="nearest-token metric for the projection")
    p.add_argument("--context", help="the original context of a compressed prompt")
    p.add_argument("--queries", help="queries (lines, or JSONL with 'query' and optional 'tag') for context coverage")
    p.add_argument("--out", help="report directory (default: PROMPT/inspect)")
    add_model_args(p, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softprompt.artifact import load_artifact
    from softprompt.errors import SoftPromptError
    from softprompt.interpret.report import fidelity_warning, nearest_report, write_report

    art, base = load_prompt_and_base(args.prompt, args.model, args.device)
    report: dict = {"prompt": str(args.prompt), "kind": art.kind, "n_virtual": art.prompt.n_virtual,
                    "base": art.base_id, "template": art.meta["template"]}
    if art.prompt.input_level:
        from softprompt.interpret.fidelity import input_vectors

        report["nearest"] = nearest_report(input_vectors(art.prompt), base.embedding.weight, base.tokenizer, args.k)
    else:
        print(f"{args.prompt}: a {art.kind} prompt acts on keys and values, not input vectors: nearest tokens "
              "and projections do not apply")
    if args.other:
        from softprompt.interpret.fidelity import input_vectors
        from softprompt.interpret.nearest import compare_prompts

        other = load_artifact(args.other, base=base)
        report["other"] = str(args.other)
        report["comparison"] = compare_prompts(input_vectors(art.prompt), input_vectors(other.prompt))
    fmt = art.prompt_format(base)
    if args.data:
        from softprompt.data.readers import read_examples
        from softprompt.interpret.fidelity import projection_fidelity

        examples = read_examples(args.data, art.template.fields, args.target_field, require_target=False)[: args.limit]
        labels = art.meta.get("labels") if all(e.target is not None for e in examples) else None
        report["n_examples"] = len(examples)
        report["fidelity"] = projection_fidelity(base, art.prompt, fmt, examples, labels, args.projection, resolve(args, base.device))
    if bool(args.context) != bool(args.queries):
        raise SoftPromptError("context coverage needs both --context and --queries")
    if args.context:
        from softprompt.data.queries import read_queries
        from softprompt.interpret.coverage import coverage_table, query_agreement, split_parts

        try:
            context = Path(args.context).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SoftPromptError(f"{args.context}: cannot read the context ({e})") from None
        if not context.strip():
            raise SoftPromptError(f"{args.context}: the context is empty")
        queries = read_queries(args.queries)
        field = art.template.fields[0]
        agree = query_agreement(base, art.prompt, fmt, context, queries, field=field)
        report["queries"] = [{"query": q.text, "tag": q.tag, "agreement": a} for q, a in zip(queries, agree)]
        report["coverage"] = coverage_table(queries, agree, split_parts(context))
    _print(report)
    out = Path(args.out) if args.out else Path(args.prompt) / "inspect"
    written = write_report(report, out)
    if "fidelity" in report:
        print(fidelity_warning(report["fidelity"]))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _print(report: dict) -> None:
    nb = report.get("nearest")
    if nb:
        for r in nb["tokens"]:
            near = " ".join(repr(c["token"]) for c in r["cosine"][:5])
            print(f"v{r['index']:<3} norm {r['norm']:.3f} ({r['norm_percentile']:3.0f}th pct)  cosine: {near}")
    fid = report.get("fidelity")
    if fid:
        print(f"projection {''.join(fid['projected_tokens'])!r}: {fid['soft']['metric']} soft {fid['soft']['value']:.4f} "
              f"-> projected {fid['projected']['value']:.4f}; KL {fid['kl']:.4f}, top-1 agreement {fid['top1_agreement']:.3f}")
    cmp = report.get("comparison")
    if cmp:
        print(f"similarity to {report['other']}: mean best-match cosine {cmp['mean_best_match']:.3f}, "
              f"mean-vector cosine {cmp['mean_vector_cosine']:.3f}"
              + (f", position-wise {cmp['mean_positionwise_cosine']:.3f}" if "mean_positionwise_cosine" in cmp else ""))
    for r in report.get("coverage", []):
        print(f"{r['part'][:70]:<70} {r['queries']:>3} queries  agreement {r['mean_agreement']:.3f}")
