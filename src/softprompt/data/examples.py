"""The unit of data: one example with named fields, an optional target, and where it came from."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One example. ``fields`` holds every named text field (e.g. ``input``, ``question``);
    ``target`` is the text the model should produce (None for unlabeled data)."""

    fields: dict[str, str]
    target: str | None = None
    source: str | None = None  # file path
    line: int | None = None  # 1-based line (or row) number in ``source``
    meta: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        if self.source is None:
            return "<memory>"
        return f"{self.source}:{self.line}" if self.line is not None else self.source
