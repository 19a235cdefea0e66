"""Kinds of soft prompt, by name. Each kind lives in its own module."""
from __future__ import annotations

from softprompt.errors import SoftPromptError
from softprompt.prompts.base import SoftPrompt, marker
from softprompt.prompts.prompt_tuning import PromptTuning

KINDS: dict[str, type[SoftPrompt]] = {PromptTuning.kind: PromptTuning}


def register(cls: type[SoftPrompt]) -> type[SoftPrompt]:
    KINDS[cls.kind] = cls
    return cls


def kind_class(kind: str) -> type[SoftPrompt]:
    _load_optional_kinds()
    if kind not in KINDS:
        raise SoftPromptError(f"unknown prompt kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    return KINDS[kind]


def _load_optional_kinds() -> None:
    import importlib

    for mod in ("softprompt.prompts.prefix", "softprompt.prompts.p_tuning"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


__all__ = ["SoftPrompt", "PromptTuning", "KINDS", "register", "kind_class", "marker"]
