"""softprompt compressor train, and compress --compressor (one forward, optionally --refine N)."""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from softprompt.cli.common import add_model_args
from softprompt.errors import SoftPromptError


def register(sub) -> None:
    p = sub.add_parser("compressor", help="train an amortized compressor (any context into soft tokens in one forward)",
                       description="Amortized context compression: train memory tokens (and a projector) so that the "
                                   "frozen model turns a context it has never seen into a prompt in one forward.")
    s = p.add_subparsers(dest="compressor_command", metavar="ACTION", required=True)
    t = s.add_parser("train", help="train a compressor on many contexts")
    add_model_args(t)
    t.add_argument("--contexts", nargs="+", required=True, help="directories or files of contexts: .txt (one context per "
                   "file), .jsonl (field context/passage/text), a SQuAD .json, or a directory of the shared datasets")
    t.add_argument("--memory", type=int, default=16, help="memory tokens, the prompt's length (default 16)")
    t.add_argument("--form", choices=["kv", "projector"], default="kv",
                   help="kv (default): the memory's keys/values are a prefix prompt; projector: its final hidden states "
                        "go through a trained MLP into prompt-tuning vectors")
    t.add_argument("--out", required=True, help="compressor directory to write")
    t.add_argument("--overwrite", action="store_true", help="replace a compressor in --out")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its checkpoint")
    d = t.add_argument_group("data")
    d.add_argument("--queries-per-context", type=int, default=4, help="training queries per context (default 4)")
    d.add_argument("--query-source", choices=["selfstudy", "sentences", "dataset"], default="selfstudy",
                   help="selfstudy (the model writes them, default), sentences (built from the context's sentences, "
                        "cheap) or dataset (the dataset's own questions, e.g. SQuAD's)")
    d.add_argument("--max-contexts", type=int, default=None, help="at most this many training contexts (seeded sample)")
    d.add_argument("--max-dev", type=int, default=16, help="at most this many dev contexts for early stopping (default 16)")
    d.add_argument("--min-tokens", type=int, default=32, help="skip contexts shorter than this (default 32)")
    d.add_argument("--max-tokens", type=int, default=512, help="skip contexts longer than this (default 512)")
    d.add_argument("--eval-share", type=float, default=0.1, help="share of contexts (by hash) reserved for evaluation and "
                                                                 "never trained on (default 0.1)")
    d.add_argument("--dev-share", type=float, default=0.05, help="share of contexts (by hash) for early stopping (0.05)")
    d.add_argument("--max-new-tokens", type=int, default=16, help="teacher continuation length (default 16)")
    d.add_argument("--cache-dir", help="where queries and teacher targets are cached (default: --out); runs on the same "
                                       "contexts can share it")
    d.add_argument("--chunk-tokens", type=int, default=256, help="self-study chunk length (default 256)")
    o = t.add_argument_group("optimization")
    o.add_argument("--steps", type=int, default=200, help="at most this many steps (default 200; early stopping)")
    o.add_argument("--contexts-per-step", type=int, default=4, help="contexts per step (default 4)")
    o.add_argument("--lr", type=float, default=0.01, help="learning rate of the memory embeddings (default 0.01)")
    o.add_argument("--projector-lr", type=float, default=1e-3, help="learning rate of the projector (default 1e-3)")
    o.add_argument("--encoder-lora", type=int, default=0, metavar="R",
                   help="also train a LoRA of rank R (peft) on the encoder pass only (the frozen model reading context + "
                        "memory); the student and teacher passes run the plain base, which is never changed (default 0: none)")
    o.add_argument("--lora-targets", default="q_proj,v_proj", help="modules the encoder LoRA wraps (default q_proj,v_proj)")
    o.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    o.add_argument("--lora-lr", type=float, default=1e-3, help="learning rate of the encoder LoRA (default 1e-3)")
    o.add_argument("--eval-every", type=int, default=10, help="steps between dev evaluations (default 10)")
    o.add_argument("--patience", type=int, default=4, help="evaluations without improvement before stopping (0: never)")
    o.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=run_train)


def select(contexts, tokenizer, args) -> tuple[list, list, int]:
    """Training and dev contexts: eval-split contexts are dropped, the rest split by hash (dev falls back
    to a seeded tenth of the training contexts when the hash gives none)."""
    from softprompt.compress.amortized.contexts import filter_length, split_contexts

    kept = filter_length(contexts, tokenizer, args.min_tokens, args.max_tokens)
    if not kept:
        raise SoftPromptError(f"no context has between {args.min_tokens} and {args.max_tokens} tokens "
                              f"({len(contexts)} read): change --min-tokens/--max-tokens or pass other --contexts")
    sp = split_contexts(kept, args.eval_share, args.dev_share)
    train = sorted(sp["train"], key=lambda c: c.sha)
    dev = sorted(sp["dev"], key=lambda c: c.sha)
    random.Random(args.seed).shuffle(train)
    random.Random(args.seed + 1).shuffle(dev)
    if not dev and len(train) >= 2:
        k = max(1, len(train) // 10)
        dev, train = train[:k], train[k:]
    if args.max_contexts:
        train = train[:args.max_contexts]
    return train, dev[:args.max_dev], len(sp["eval"])


def run_train(args: argparse.Namespace) -> int:
    from softprompt.base_model import load_base
    from softprompt.compress.amortized.contexts import read_contexts
    from softprompt.compress.amortized.store import META
    from softprompt.compress.amortized.trainer import TrainConfig, Trainer

    if args.memory < 1:
        raise SoftPromptError(f"--memory must be >= 1 (got {args.memory})")
    if args.encoder_lora < 0:
        raise SoftPromptError(f"--encoder-lora must be a rank >= 1, or 0 for none (got {args.encoder_lora})")
    out = Path(args.out)
    if (out / META).exists() and not (args.overwrite or args.resume):
        raise SoftPromptError(f"{out} already holds a compressor: pass --overwrite to replace it")
    from softprompt.compress.amortized.trainer import CHECKPOINT

    if args.resume and not (out / CHECKPOINT).exists():
        raise SoftPromptError(f"--resume: no checkpoint in {out} (nothing to resume)")
    contexts = read_contexts(args.contexts)
    if not contexts:
        raise SoftPromptError(f"no contexts found in {' '.join(args.contexts)}")
    cfg = TrainConfig(model=args.model, memory=args.memory, form=args.form, queries_per_context=args.queries_per_context,
                      query_source=args.query_source, chunk_tokens=args.chunk_tokens, max_new_tokens=args.max_new_tokens,
                      steps=args.steps, contexts_per_step=args.contexts_per_step, lr=args.lr, projector_lr=args.projector_lr,
                      eval_every=args.eval_every, patience=args.patience, seed=args.seed, precision=args.precision,
                      encoder_lora=args.encoder_lora, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                      lora_lr=args.lora_lr,
                      device=args.device, resume=args.resume, cache_dir=args.cache_dir)
    base = load_base(args.model, device=args.device)
    args.min_tokens = max(args.min_tokens, args.memory)  # a kv prompt keeps no more positions than the context has
    train, dev, n_eval = select(contexts, base.tokenizer, args)
    say = (lambda m: print(f"softprompt: {m}", file=sys.stderr))
    trainer = Trainer(cfg, train, dev, out, base=base, progress=not args.quiet, say=say)  # validates first
    say(f"{len(contexts)} contexts read; {n_eval} reserved for evaluation (never trained on)")
    comp = trainer.run()
    m = comp.meta["metrics"]
    print(f"saved compressor {out}: {comp.form} form, {comp.memory} memory tokens, {m['steps']} steps, "
          f"dev KL {m['first_dev_kl']:.4f} -> best {m['best_dev_kl']:.4f} (step {m['best_step']})")
    return 0


def run_compress(args: argparse.Namespace, context: str, baselines: tuple[str, ...]) -> int:
    """``softprompt compress --compressor DIR`` on the context read by ``compress``: one forward (and
    ``--refine N`` steps of distillation)."""
    from softprompt.base_model import load_base
    from softprompt.compress.amortized.store import AmortizedCompressor
    from softprompt.compress.report import format_text
    from softprompt.data.queries import read_queries

    out = Path(args.out)
    if not args.overwrite and not args.resume and (out / "prompt.json").exists():
        raise SoftPromptError(f"{out} already holds a prompt: pass --overwrite to replace it")
    if args.refine < 0:
        raise SoftPromptError(f"--refine must be >= 0 (got {args.refine})")
    base = load_base(args.model, device=args.device) if args.model else None
    comp = AmortizedCompressor.load(args.compressor, base=base, device=args.device, precision=args.precision)
    if not args.refine:
        path, prompt, seconds = comp.compress(context, out)
        print(f"saved {path}: {prompt.kind} prompt of {prompt.n_virtual} positions from one forward ({seconds * 1000:.0f} ms)")
        return 0
    from softprompt.compress.amortized.refine import refine

    queries = read_queries(args.queries) if args.queries else None
    res = refine(comp, context, out, args.refine, queries, progress=not args.quiet,
                 warn=lambda m: print(f"softprompt: warning: {m}", file=sys.stderr), n_queries=args.n_queries,
                 n_heldout=args.n_heldout, max_new_tokens=args.max_new_tokens, lr=args.lr, batch_size=args.batch_size,
                 seed=args.seed, baselines=baselines, patience=args.patience, topk=args.topk)
    print(format_text(res.report))
    print(f"\nsaved {res.out} (report: {res.out / 'compression_report.md'})")
    return 0
