"""softprompt compress"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from softprompt.cli.common import add_model_args
from softprompt.errors import DataError, SoftPromptError


def register(sub) -> None:
    p = sub.add_parser("compress", help="distill a long context into a few soft tokens",
                       description="Distill a long context (system prompt, instructions, a document) into a soft "
                                   "prompt: the model with the soft prompt should answer queries as it does with "
                                   "the full context. Writes an ordinary prompt artifact and compression_report.json/.md.")
    add_model_args(p)
    p.add_argument("--context", required=True, help="text file holding the context to compress")
    p.add_argument("--tokens", type=int, default=16, help="soft tokens (default: 16)")
    p.add_argument("--queries", help="queries: one per line, or JSONL with 'query' (and optional 'answers'); "
                                     "default: generated from the model and generic probes")
    p.add_argument("--n-queries", type=int, default=256, help="self-study training queries to generate when --queries is "
                                                              "not given (or with --mix-queries); default 256")
    p.add_argument("--n-heldout", type=int, default=24, help="held-out queries to generate (other samples, in the training batches); default 24")
    p.add_argument("--mix-queries", action="store_true", help="with --queries: add generated self-study queries")
    p.add_argument("--chunk-tokens", type=int, default=128, help="self-study chunk length in tokens (default 128)")
    p.add_argument("--heldout", type=float, default=0.2, help="share of queries held out for the report (default 0.2)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prompt in --out")
    p.add_argument("--resume", action="store_true", help="continue an interrupted compression in --out (its queries, "
                                                          "teacher cache and training checkpoint)")
    st = p.add_argument_group("student")
    st.add_argument("--kind", default="prompt-tuning", help="prompt-tuning (soft input vectors, default) or prefix "
                                                            "(per-layer keys/values initialized from the context's own)")
    st.add_argument("--positions", default="first", help="prefix: context positions that start the prefix: first | even | "
                                                         "attention (most attended by the training queries)")
    st.add_argument("--no-freeze-first", dest="freeze_first", action="store_false",
                    help="prefix: train the first position too (default: frozen, the attention sink)")
    st.add_argument("--baselines", default="truncated,none,llmlingua",
                    help="comma-separated report baselines among truncated, none, llmlingua (default: all)")
    lay = p.add_argument_group("layout")
    lay.add_argument("--placement", choices=["system", "user"], default="system",
                     help="where the context sits for the teacher (and the soft prompt for the student): the chat "
                          "system message (default) or before the query in the user message")
    lay.add_argument("--template", help="custom layout with one soft span and {input}, e.g. '[soft:16]\\nQuestion: {input}'")
    lay.add_argument("--no-chat", dest="chat", action="store_false", help="no chat template (implies --placement user)")
    d = p.add_argument_group("distillation")
    d.add_argument("--teacher", help="teacher model sharing the tokenizer (default: the same model)")
    d.add_argument("--objective", choices=["forward_kl", "reverse_kl", "loglik"], default="forward_kl")
    d.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    d.add_argument("--mode-weight", type=float, default=0.0, metavar="W", help="add W x the cross-entropy of the teacher's "
                   "top token at every distilled position (pulls the student's argmax; default 0: off)")
    d.add_argument("--topk", type=int, default=64, help="keep the teacher's top-k log-probs + remainder (0: exact full-vocabulary KL)")
    d.add_argument("--max-new-tokens", type=int, default=32, help="teacher continuation length (default 32)")
    d.add_argument("--sample", type=float, default=0.0, metavar="T", help="sample teacher continuations at temperature T (default: greedy)")
    d.add_argument("--init", default="context", help="context | random | vocab | text:TEXT (default: context)")
    d.add_argument("--cache-dir", help="teacher cache directory (default: OUT/teacher_cache)")
    o = p.add_argument_group("optimization")
    o.add_argument("--steps", type=int, default=400, help="at most this many steps (default 400; early stopping)")
    o.add_argument("--eval-every", type=int, default=10, help="steps between dev-KL evaluations (default 10)")
    o.add_argument("--patience", type=int, default=4, help="dev evaluations without improvement before stopping "
                                                           "(default 4; 0: never)")
    o.add_argument("--loss-positions", choices=["all", "continuation"], default="all",
                   help="distill at every position after the context (default) or only along the continuation")
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--no-bucket", dest="bucket", action="store_false",
                   help="batches drawn at random (default: batches of similar lengths, less padding)")
    o.add_argument("--lr", type=float, default=None, help="learning rate (default 0.03 for prompt tuning, 0.005 for --kind prefix)")
    o.add_argument("--seed", type=int, default=0)
    p.add_argument("--compressor", help="a trained compressor (softprompt compressor train): one forward instead of "
                                        "training; --tokens and the student options come from it")
    p.add_argument("--refine", type=int, default=0, metavar="N", help="with --compressor: N steps of per-context "
                                                                      "distillation from its prompt (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def read_context(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise DataError("context file does not exist" if not p.exists() else "context path is not a file", str(p))
    try:
        text = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read context file ({e.__class__.__name__})", str(p)) from None
    if not text.strip():
        raise DataError("the context is empty: nothing to compress", str(p))
    return text


def _baselines(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in ("truncated", "none", "llmlingua")]
    if bad:
        raise SoftPromptError(f"--baselines: unknown {', '.join(bad)} (expected truncated, none, llmlingua)")
    return names


def run(args: argparse.Namespace) -> int:
    from softprompt.compress import CompressConfig, Compressor, read_queries
    from softprompt.compress.report import format_text

    if args.compressor:
        from softprompt.cli.compressor import run_compress

        return run_compress(args, read_context(args.context), _baselines(args.baselines))
    out = Path(args.out)
    if not args.overwrite and not args.resume and (out / "prompt.json").exists():
        raise SoftPromptError(f"{out} already holds a prompt: pass --overwrite to replace it")
    context = read_context(args.context)
    queries = read_queries(args.queries) if args.queries else None
    cfg = CompressConfig(model=args.model, teacher=args.teacher, tokens=args.tokens, placement=args.placement,
                         template=args.template, chat=args.chat, objective=args.objective, temperature=args.temperature, mode_weight=args.mode_weight,
                         topk=args.topk, init=args.init, steps=args.steps, batch_size=args.batch_size, bucket=args.bucket, lr=args.lr,
                         max_new_tokens=args.max_new_tokens, sample_temperature=args.sample, n_queries=args.n_queries,
                         heldout=args.heldout, seed=args.seed, precision=args.precision, device=args.device, cache_dir=args.cache_dir,
                         kind=args.kind, positions=args.positions, freeze_first=args.freeze_first, loss_positions=args.loss_positions,
                         eval_every=args.eval_every, patience=args.patience, n_heldout=args.n_heldout, chunk_tokens=args.chunk_tokens,
                         query_mix=args.mix_queries, baselines=_baselines(args.baselines), resume=args.resume)
    job = Compressor(context, cfg, queries, out, progress=not args.quiet,
                     warn=lambda m: print(f"softprompt: warning: {m}", file=sys.stderr))
    res = job.run()
    print(format_text(res.report))
    print(f"\nsaved {res.out} (report: {res.out / 'compression_report.md'})")
    return 0
