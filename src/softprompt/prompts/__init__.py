"""Kinds of soft prompt, by name. Each kind lives in its own module and registers itself."""
from __future__ import annotations

from softprompt.errors import SoftPromptError
from softprompt.prompts.null import NO_PROMPT, NoPrompt, as_prompt  # not a kind: never saved
from softprompt.prompts.p_tuning import PTuning
from softprompt.prompts.prefix import PrefixTuning
from softprompt.prompts.prompt_tuning import PromptTuning
from softprompt.prompts.soft_prompt import SoftPrompt, marker

KINDS: dict[str, type[SoftPrompt]] = {cls.kind: cls for cls in (PromptTuning, PTuning, PrefixTuning)}


def kind_class(kind: str) -> type[SoftPrompt]:
    if kind not in KINDS:
        raise SoftPromptError(f"unknown prompt kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    return KINDS[kind]


__all__ = ["SoftPrompt", "PromptTuning", "PTuning", "PrefixTuning", "KINDS", "kind_class", "marker",
           "NoPrompt", "NO_PROMPT", "as_prompt"]
