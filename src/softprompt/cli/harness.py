"""softprompt lm-eval: lm-evaluation-harness's command line with the ``softprompt`` model registered."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    # prefix_chars: lm-eval's --flags must reach it as plain arguments, not be parsed (and refused) here
    p = sub.add_parser("lm-eval", add_help=False, prefix_chars="\x00", help="run lm-evaluation-harness with the softprompt model registered",
                       description="Everything after 'lm-eval' goes to lm-eval's command line, e.g. --model softprompt "
                                   "--model_args model=smollm2,prompt=DIR --tasks softprompt_sst2 --include_path bench/harness_tasks")
    p.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softprompt.harness import main

    return main(args.args or ["--help"])
