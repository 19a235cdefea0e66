"""Flags shared by several commands."""
from __future__ import annotations

import argparse
import os


def add_model_args(p: argparse.ArgumentParser, default: str | None = "smollm2") -> None:
    p.add_argument("--model", default=default, help="base model: 'smollm2' (embedded), a local directory or a hub id"
                   + ("" if default else " (default: the one the prompt was trained on)"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    add_precision_args(p)


def add_precision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=os.environ.get("SOFTPROMPT_PRECISION", "auto"),
                   help="auto (default, or $SOFTPROMPT_PRECISION): bf16 where the hardware runs it natively "
                        "(AMX or AVX-512-BF16 CPUs, bf16-capable GPUs), else fp32")
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="same as --precision bf16")


def resolve(args, device) -> bool:
    """Resolve the command's --precision for ``device``; True for bf16 (logs the choice once)."""
    from softprompt.precision import resolve_precision

    return resolve_precision(args.precision, device).bf16


def load_prompt_and_base(path: str, model: str | None, device: str | None):
    """The artifact at ``path`` and its base model (``model`` overrides the recorded one)."""
    from softprompt.artifact import load_artifact, read_meta
    from softprompt.base_model import load_base

    meta = read_meta(path)
    base = load_base(model or meta["base_model"]["id"], device=device)
    return load_artifact(path, base=base), base
