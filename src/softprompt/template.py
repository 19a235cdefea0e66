"""Hybrid hard/soft templates: soft spans anywhere among hard text and the example's fields.

A template is a sequence of segments: literal ``Text``, a ``Field`` filled from the example, and
``Soft`` spans of trainable virtual tokens. Named soft spans share their vectors wherever the name
recurs. The template string syntax is parsed by :func:`parse_template`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Field:
    name: str


@dataclass(frozen=True)
class Soft:
    length: int
    name: str | None = None  # spans with the same name share vectors
    init_text: str | None = None  # initialize this span from a text


Segment = Union[Text, Field, Soft]


@dataclass(frozen=True)
class SoftSpan:
    """A distinct block of virtual-token rows in the prompt's table."""

    key: str  # the span's name, or an automatic key "#0", "#1", ... for an anonymous span (never an identifier)
    length: int
    offset: int  # first row in the table
    init_text: str | None = None


@dataclass(frozen=True)
class Template:
    segments: tuple[Segment, ...]

    @staticmethod
    def default(n_tokens: int, field: str = "input") -> "Template":
        """The plain prompt-tuning template ``[soft:N] {field}``."""
        return Template((Soft(n_tokens), Text(" "), Field(field))) if n_tokens > 0 else Template((Field(field),))

    @property
    def fields(self) -> list[str]:
        seen: list[str] = []
        for s in self.segments:
            if isinstance(s, Field) and s.name not in seen:
                seen.append(s.name)
        return seen

    def spans(self) -> list[SoftSpan]:
        """Distinct soft spans in order of first appearance, with their row offsets."""
        out: dict[str, SoftSpan] = {}
        offset = 0
        anon = 0
        for s in self.segments:
            if not isinstance(s, Soft):
                continue
            if s.name is None:
                key = f"#{anon}"
                anon += 1
            else:
                key = s.name
            if key in out:
                continue
            out[key] = SoftSpan(key, s.length, offset, s.init_text)
            offset += s.length
        return list(out.values())

    @property
    def n_virtual(self) -> int:
        """Number of distinct trainable rows (shared spans counted once)."""
        return sum(s.length for s in self.spans())

    def slot_rows(self) -> list[list[int]]:
        """For each Soft segment in order, the table rows it reads."""
        spans = {s.key: s for s in self.spans()}
        rows = []
        anon = 0
        for s in self.segments:
            if isinstance(s, Soft):
                key = s.name if s.name is not None else f"#{anon}"
                if s.name is None:
                    anon += 1
                sp = spans[key]
                rows.append(list(range(sp.offset, sp.offset + sp.length)))
        return rows

    def to_string(self) -> str:
        """Serialize back to the template syntax (round-trips through parse_template)."""
        from softprompt.template_syntax import format_template

        return format_template(self)


def parse_template(source: str) -> Template:
    """Parse the template syntax; see :mod:`softprompt.template_syntax`."""
    from softprompt.template_syntax import parse

    return parse(source)
