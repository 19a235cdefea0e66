"""User-facing errors: one line, naming what and where."""
from __future__ import annotations


class SoftPromptError(Exception):
    """An error caused by user input (a file, a flag, a field). The CLI prints it on one line and
    exits non-zero, without a traceback."""


class DataError(SoftPromptError):
    """Bad data: a file, a line or a field."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path, self.line = path, line


class TemplateError(SoftPromptError):
    """A template that does not parse or does not fit the data."""

    def __init__(self, message: str, template: str | None = None, position: int | None = None):
        text = message
        if template is not None and position is not None:
            text = f"template error at position {position}: {message} (in {template!r})"
        super().__init__(text)
        self.template, self.position = template, position


class ArtifactError(SoftPromptError):
    """A prompt artifact that is missing, corrupt, or made for another base model."""
