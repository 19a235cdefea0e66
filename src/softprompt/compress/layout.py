"""Where the context goes: one template for both sides of the distillation.

The student's template holds exactly one soft span (where the context was) and the field ``{input}``
(the query). The teacher's token ids are the student's with the span's slot markers replaced by the
context's tokens, so everything outside the span is token-for-token identical on both sides, and the
same replacement gives the baselines (the context cut to the span's length, or nothing at all).

Placement ``system`` (the default for chat models) renders the chat template with the span as the
system message and the query as the user message, and records the result as a literal template with
``chat`` off, so ``generate``/``eval``/``serve`` reproduce it exactly. Placement ``user`` puts the span
before the query inside the user message.
"""
from __future__ import annotations

from dataclasses import dataclass

from softprompt.data.examples import Example
from softprompt.encoding import PromptFormat
from softprompt.errors import SoftPromptError
from softprompt.template import Field, Soft, Template, Text, parse_template

PLACEMENTS = ("system", "user")
_SYS, _USR = "\ue010", "\ue011"


@dataclass(frozen=True)
class Layout:
    """The student's template (one soft span, one ``{input}``) and how it is wrapped."""

    template: Template
    chat: bool
    placement: str

    @property
    def template_source(self) -> str:
        return self.template.to_string()


def make_layout(tokenizer, n_soft: int, placement: str = "system", template: str | None = None,
                chat: bool = True, separator: str = "\n\n") -> Layout:
    """Build the layout for ``n_soft`` soft tokens. A user ``template`` overrides ``placement``; it must
    hold one soft span (its length is replaced by ``n_soft`` when they differ) and ``{input}``."""
    if n_soft < 1:
        raise SoftPromptError(f"--tokens must be >= 1 (got {n_soft})")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template is not None:
        t = parse_template(template)
        softs = [s for s in t.segments if isinstance(s, Soft)]
        if len(softs) != 1 or t.fields != ["input"]:
            raise SoftPromptError(f"--template {template!r}: a compression template needs exactly one soft span "
                                  "(where the context goes) and the field {input} (the query)")
        segs = tuple(Soft(n_soft) if isinstance(s, Soft) else s for s in t.segments)
        return Layout(Template(segs), chat and has_chat, "template")
    if placement not in PLACEMENTS:
        raise SoftPromptError(f"--placement {placement!r}: expected one of {', '.join(PLACEMENTS)}")
    if placement == "user" or not chat:
        segs = (Soft(n_soft), Text(separator), Field("input")) if separator else (Soft(n_soft), Field("input"))
        return Layout(Template(segs), chat and has_chat, "user")
    if not has_chat:
        raise SoftPromptError("placement 'system' needs a model with a chat template: use --placement user")
    text = tokenizer.apply_chat_template([{"role": "system", "content": _SYS}, {"role": "user", "content": _USR}],
                                         add_generation_prompt=True, tokenize=False)
    if text.count(_SYS) != 1 or text.count(_USR) != 1 or text.index(_SYS) > text.index(_USR):
        raise SoftPromptError("this chat template does not show a system message before the user message: "
                              "use --placement user")
    bos = tokenizer.bos_token
    probe = tokenizer("a").input_ids
    if bos and probe and probe[0] == tokenizer.bos_token_id and text.startswith(bos):
        text = text[len(bos):]  # PromptFormat adds the BOS token itself when chat is off
    pre, rest = text.split(_SYS)
    mid, post = rest.split(_USR)
    segs = tuple(s for s in (Text(pre), Soft(n_soft), Text(mid), Field("input"), Text(post)) if not (isinstance(s, Text) and not s.text))
    return Layout(Template(segs), False, "system")


class Renderer:
    """Token ids of one query under the layout, with the span filled by soft markers (student), the
    context (teacher), a cut context (truncated baseline) or nothing (no-context baseline)."""

    def __init__(self, tokenizer, layout: Layout, max_length: int | None = None):
        self.layout = layout
        self.fmt = PromptFormat(tokenizer, layout.template, chat=layout.chat, system=None, max_length=max_length)

    def student_ids(self, query: str) -> list[int]:
        return self.fmt.prompt_ids(Example({"input": query}))

    def span_end(self, query: str, span_length: int) -> int:
        """Index just past the span once it is filled with ``span_length`` tokens."""
        ids = self.student_ids(query)
        return next(i for i, x in enumerate(ids) if x < 0) + span_length

    def fill(self, query: str, span: list[int] | None) -> list[int]:
        """The ids with the soft span replaced by ``span`` (``None``: keep the soft markers)."""
        ids = self.student_ids(query)
        if span is None:
            return ids
        soft = [i for i, x in enumerate(ids) if x < 0]
        a, b = soft[0], soft[-1] + 1
        return ids[:a] + list(span) + ids[b:]
