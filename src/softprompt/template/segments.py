"""The pieces of a template: literal ``Text``, a ``Field`` filled from the example, and ``Soft`` spans
of trainable virtual tokens; ``SoftSpan`` is a distinct block of rows in the prompt's table."""
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
