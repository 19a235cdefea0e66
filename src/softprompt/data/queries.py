"""Queries about a context (for compression and context coverage): read from a file, one per line or
JSON Lines, with errors that name the file and line."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from softprompt.data.readers import parse_jsonl
from softprompt.errors import DataError

QUERY_KEYS = ("query", "question", "input", "prompt", "instruction")


@dataclass(frozen=True)
class Query:
    text: str
    answers: tuple[str, ...] = ()  # gold answers, when known (scored by answer F1)
    tag: object = field(default=None, hash=False)  # the part of the context the query needs, when the user says (any JSON value)
    source: str | None = None
    line: int | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def read_queries(path: str | Path) -> list[Query]:
    """One query per non-empty line, or (a ``.jsonl`` file) JSON objects with a ``query`` (or
    ``question``/``input``/``prompt``/``instruction``) string, optional ``answers`` (list) or
    ``answer``/``target`` (string), and an optional ``tag``."""
    p = Path(path)
    if not p.exists():
        raise DataError("queries file does not exist", str(p))
    if p.is_dir():
        raise DataError("queries file is a directory", str(p))
    try:
        text = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read queries file ({e.__class__.__name__}: {e})", str(p)) from None
    if p.suffix.lower() == ".jsonl":
        out = [_query(obj, p, n) for n, obj in parse_jsonl(text, p)]
    else:
        out = [Query(line.strip(), source=str(p), line=n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not out:
        raise DataError("queries file is empty (no non-blank lines)", str(p))
    return out


def _query(obj: dict, p: Path, n: int) -> Query:
    key = next((k for k in QUERY_KEYS if k in obj), None)
    if key is None or not isinstance(obj[key], str) or not obj[key].strip():
        raise DataError(f"no query text: expected a non-empty string field, one of {', '.join(QUERY_KEYS)}", str(p), n)
    answers = obj.get("answers")
    if answers is None:
        single = obj.get("answer", obj.get("target"))
        answers = [single] if isinstance(single, str) else []
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataError("'answers' must be a list of strings", str(p), n)
    return Query(obj[key].strip(), tuple(a for a in answers if a.strip()), obj.get("tag"), str(p), n)
