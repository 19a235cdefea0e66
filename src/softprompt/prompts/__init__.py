"""Kinds of soft prompt, by name. Each kind lives in its own module and registers itself."""
from __future__ import annotations

from softprompt.errors import SoftPromptError
from softprompt.prompts.base import SoftPrompt, marker
from softprompt.prompts.prompt_tuning import PromptTuning

KINDS: dict[str, type[SoftPrompt]] = {PromptTuning.kind: PromptTuning}


def register(cls: type[SoftPrompt]) -> type[SoftPrompt]:
    KINDS[cls.kind] = cls
    return cls


def kind_class(kind: str) -> type[SoftPrompt]:
    if kind not in KINDS:
        raise SoftPromptError(f"unknown prompt kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    return KINDS[kind]


from softprompt.prompts.p_tuning import PTuning  # noqa: E402  (registers itself)
from softprompt.prompts.prefix import PrefixTuning  # noqa: E402
from softprompt.prompts.null import NO_PROMPT, NoPrompt, as_prompt  # noqa: E402  (not a kind: never saved)

__all__ = ["SoftPrompt", "PromptTuning", "PTuning", "PrefixTuning", "KINDS", "register", "kind_class", "marker",
           "NoPrompt", "NO_PROMPT", "as_prompt"]
