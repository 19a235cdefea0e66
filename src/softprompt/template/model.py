"""Hybrid hard/soft templates: soft spans anywhere among hard text and the example's fields.

A template is a sequence of segments (:mod:`softprompt.template.segments`): literal ``Text``, a
``Field`` filled from the example, and ``Soft`` spans of trainable virtual tokens. Named soft spans
share their vectors wherever the name recurs. The template string syntax
(:mod:`softprompt.template.syntax`) is read by :func:`parse_template` and written by
:func:`format_template`.
"""
from __future__ import annotations

from dataclasses import dataclass

from softprompt.template.segments import Field, Segment, Soft, SoftSpan, Text
from softprompt.template.syntax import format_segments, parse_segments


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

    def without_soft(self) -> "Template":
        """The template with its soft spans removed (for kinds that add no input positions)."""
        return Template(tuple(s for s in self.segments if not isinstance(s, Soft)))

    def to_string(self) -> str:
        """Serialize back to the template syntax (round-trips through parse_template)."""
        return format_template(self)


def parse_template(source: str, placeholder: str | None = None, placeholder_length: int = 1) -> Template:
    """Parse the template syntax (see :mod:`softprompt.template.syntax`); raise TemplateError if it is
    invalid. A soft span length written as ``placeholder`` (``N`` in ``[soft:N]``) reads as ``placeholder_length``."""
    return Template(parse_segments(source, placeholder, placeholder_length))


def format_template(t: Template) -> str:
    """Write ``t`` in the template syntax, so that ``parse_template(format_template(t)) == t``; raise
    TemplateError if it cannot be written (see :func:`softprompt.template.syntax.format_segments`)."""
    return format_segments(t.segments)
