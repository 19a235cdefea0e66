"""Flags shared by several commands."""
from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, default: str | None = "smollm2") -> None:
    p.add_argument("--model", default=default, help="base model: 'smollm2' (embedded), a local directory or a hub id"
                   + ("" if default else " (default: the one the prompt was trained on)"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (AMX on recent CPUs, tensor cores on GPUs)")


def load_prompt_and_base(path: str, model: str | None, device: str | None):
    """The artifact at ``path`` and its base model (``model`` overrides the recorded one)."""
    from softprompt.artifact import load_artifact, read_meta
    from softprompt.base import load_base

    meta = read_meta(path)
    base = load_base(model or meta["base_model"]["id"], device=device)
    return load_artifact(path, base=base), base
