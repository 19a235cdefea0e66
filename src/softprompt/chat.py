"""A conversation as token ids for the bare model (no soft prompt): the tokenizer's chat template
with the generation prompt when it has one, else the turns' texts joined by newlines. A prompt's
own conversations go through :meth:`softprompt.encoding.PromptFormat.prompt_ids` instead."""
from __future__ import annotations

from softprompt.errors import SoftPromptError


def refusal(e: Exception) -> SoftPromptError:
    """The error for a conversation the chat template refused with ``e``."""
    return SoftPromptError(f"the chat template refused this conversation: {e}")


def chat_ids(tokenizer, turns: list[dict]) -> list[int]:
    """Token ids for ``turns`` (``{"role", "content"}`` dicts). A chat template that refuses the
    conversation (jinja ``raise_exception``) raises :class:`SoftPromptError` with its reason."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - jinja templates raise on conversations they refuse
            raise refusal(e) from None
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer("\n".join(t["content"] for t in turns)).input_ids
