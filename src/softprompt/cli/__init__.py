"""The ``softprompt`` command: a thin layer over the Python API.

Each subcommand lives in its own module under ``softprompt.cli`` and exposes ``register(subparsers)``.
User errors (:class:`SoftPromptError`) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from softprompt import __version__
from softprompt.errors import SoftPromptError

COMMANDS = ["train", "generate", "info", "export_import", "eval", "compress", "compressor", "convert", "inspect", "harden",
            "serve", "harness"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softprompt", description="Learn, evaluate, inspect, compress and serve soft prompts for frozen LLMs.")
    parser.add_argument("--version", action="version", version=f"softprompt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (and show tracebacks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"softprompt.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"softprompt.cli.{name}":
                continue  # command not built into this version
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("softprompt.precision").setLevel(logging.INFO)  # one line: which precision, and why
    if not args.command:
        parser.print_help()
        return 2
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:
            pass
    try:
        return int(args.func(args) or 0)
    except SoftPromptError as e:
        if args.verbose:
            raise
        print(f"softprompt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softprompt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
