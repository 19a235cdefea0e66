"""softprompt generate"""
from __future__ import annotations

import argparse
import sys

from softprompt.cli.common import add_model_args, load_prompt_and_base, resolve


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate with a soft prompt", description="Generate with a soft prompt (streamed for one input).")
    p.add_argument("prompt", help="prompt artifact directory")
    p.add_argument("inputs", nargs="*", help="input texts (default: one per line on stdin)")
    add_model_args(p, default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softprompt.errors import SoftPromptError
    from softprompt.generate import SamplingParams, generate

    inputs = args.inputs or [ln.rstrip("\n") for ln in sys.stdin if ln.strip()]
    if not inputs:
        raise SoftPromptError("no input: give texts as arguments or on stdin")
    if args.max_new_tokens < 1:
        raise SoftPromptError("--max-new-tokens must be >= 1")
    art, base = load_prompt_and_base(args.prompt, args.model, args.device)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed, tuple(args.stop))
    fmt = art.prompt_format(base)
    bf16 = resolve(args, base.device)
    if len(inputs) == 1:
        generate(base, art.prompt, fmt, inputs, params, bf16=bf16, stream=lambda i, piece: print(piece, end="", flush=True))
        print()
    else:
        for text, out in zip(inputs, generate(base, art.prompt, fmt, inputs, params, args.batch_size, bf16)):
            print(f"{text}\t{out}")
    return 0
