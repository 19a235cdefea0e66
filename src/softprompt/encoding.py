"""Turning examples into token ids with soft-slot markers, and batches into padded tensors."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from softprompt.data.examples import Example
from softprompt.errors import DataError, SoftPromptError
from softprompt.prompts.soft_prompt import marker
from softprompt.template import Field, Soft, Template, Text

IGNORE = -100
_MARK = re.compile("\ue000(\\d+)\ue001")


def _plain(text: str) -> str:
    """Text from outside (field values, chat turns) without the private-use characters that mark
    soft slots, so no input can place a soft token."""
    return text.replace("\ue000", "").replace("\ue001", "")


@dataclass
class Encoded:
    ids: list[int]  # negative entries are slot markers
    labels: list[int]  # IGNORE where no loss
    n_prompt: int  # tokens before the target
    example: Example | None = None


class PromptFormat:
    """Renders a template for an example, wraps it in the chat template when asked, and tokenizes.

    With ``chat`` the rendered template becomes the user message (soft tokens inside it) and the
    target is the assistant's reply followed by the end-of-turn token. Without it, the rendered text
    is used as is and the target follows it (a space is inserted between them when neither side has
    one)."""

    def __init__(self, tokenizer, template: Template, chat: bool = True, system: str | None = None,
                 max_length: int | None = None):
        if chat and not getattr(tokenizer, "chat_template", None):
            chat = False
        self.tok, self.template, self.chat, self.system, self.max_length = tokenizer, template, chat, system, max_length
        self._rows = template.slot_rows()
        probe = tokenizer("a").input_ids
        self._bos = [tokenizer.bos_token_id] if (tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id) else []
        eos = tokenizer.eos_token_id
        self._eos = [eos] if eos is not None else []

    def describe(self) -> dict:
        return {"chat": self.chat, "system": self.system}

    def render(self, example: Example) -> str:
        parts, k = [], 0
        for seg in self.template.segments:
            if isinstance(seg, Text):
                parts.append(seg.text)
            elif isinstance(seg, Field):
                if seg.name not in example.fields:
                    have = ", ".join(sorted(example.fields)) or "none"
                    raise DataError(f"template field {{{seg.name}}} is missing (fields present: {have})",
                                    example.source, example.line)
                parts.append(_plain(example.fields[seg.name]))
            elif isinstance(seg, Soft):
                parts.append(f"\ue000{k}\ue001")
                k += 1
        return "".join(parts)

    def _wrap(self, text: str, history: list[dict] | None = None) -> str:
        if not self.chat:
            if history:
                raise SoftPromptError("this prompt's format is plain text, not a chat template: it takes a single "
                                      "message (the text for its template), not a conversation")
            return text
        msgs = ([{"role": "system", "content": self.system}] if self.system else [])
        msgs += [{"role": m["role"], "content": _plain(m["content"])} for m in history or []]
        msgs.append({"role": "user", "content": text})
        return self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def _tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in _MARK.finditer(text):
            if m.start() > pos:
                ids += self.tok(text[pos:m.start()], add_special_tokens=False).input_ids
            ids += [marker(r) for r in self._rows[int(m.group(1))]]
            pos = m.end()
        if pos < len(text):
            ids += self.tok(text[pos:], add_special_tokens=False).input_ids
        return ids

    def prompt_ids(self, example: Example, history: list[dict] | None = None) -> list[int]:
        """Token ids (slot markers negative) of the prompt for ``example``. With a chat template,
        ``history`` (``{"role", "content"}`` turns) goes between the format's system prompt and the
        final user message, which is the rendered template."""
        text = self._wrap(self.render(example), history)
        ids = self._tokenize(text)
        if not self.chat:
            ids = self._bos + ids
        return ids

    def target_ids(self, target: str, prompt_text_ends_with_space: bool = True, eos: bool = True) -> list[int]:
        """The target's ids, followed by the end-of-sequence (chat: end-of-turn) token unless ``eos`` is false."""
        if not self.chat and not prompt_text_ends_with_space and target[:1] not in (" ", "\n"):
            target = " " + target
        return self.tok(target, add_special_tokens=False).input_ids + (self._eos if eos else [])

    def encode(self, example: Example, with_target: bool = True, target: str | None = None, eos: bool = True) -> Encoded:
        prompt = self.prompt_ids(example)
        tgt: list[int] = []
        target = example.target if target is None else target
        if with_target:
            if target is None:
                raise DataError("example has no target", example.source, example.line)
            rendered = self.render(example)
            tgt = self.target_ids(target, rendered[-1:].isspace() if rendered else True, eos=eos)
        ids = prompt + tgt
        if self.max_length is not None and len(ids) > self.max_length:
            raise DataError(f"example is {len(ids)} tokens, longer than the model's window of {self.max_length}",
                            example.source, example.line)
        return Encoded(ids, [IGNORE] * len(prompt) + tgt, len(prompt), example)


def collate(items: list[Encoded], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad a batch: right padding for training, left padding for generation. Soft slots are part of
    each row's own sequence, so padding never separates them from the text."""
    width = max(len(e.ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.ids)
        sl = slice(width - n, width) if left else slice(0, n)
        ids[i, sl] = torch.tensor(e.ids)
        labels[i, sl] = torch.tensor(e.labels)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def check_template(template: Template, needs_soft: bool = True) -> None:
    if needs_soft and template.n_virtual == 0:
        raise SoftPromptError("the template has no soft span: add one, e.g. '[soft:8] {input}'")
    if not template.fields:
        raise SoftPromptError("the template has no field such as {input}: the example text would never be shown")
