"""Reading data files: UTF-8 text, JSON Lines (the one JSONL reader of the package), and rows and
examples from JSONL, CSV and TSV files, with errors that name the file, line and field."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable

from softprompt.data.examples import Example
from softprompt.errors import DataError


def decode_text(raw: bytes, path: str | Path, latin1_fallback: bool = False) -> str:
    """UTF-8 (a BOM is dropped); invalid bytes are an error naming the file and line, or, with
    ``latin1_fallback``, the whole file is read as Latin-1."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if latin1_fallback:
            return raw.decode("latin-1")
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 text (byte {e.start})", str(path), line) from None


def read_text(path: Path) -> str:
    """A data file's text; a missing file, a directory or a binary file is an error naming it."""
    if not path.exists():
        raise DataError("no such file", str(path))
    if path.is_dir():
        raise DataError("is a directory, expected a data file", str(path))
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise DataError("looks like a binary file (NUL bytes), expected UTF-8 text", str(path))
    return decode_text(raw, path)


def parse_jsonl(text: str, path: str | Path) -> list[tuple[int, dict]]:
    """JSON Lines: one JSON object a non-blank line, as (1-based line number, object). A line that is
    not a JSON object is an error naming the file and line. No lines gives an empty list."""
    rows = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", str(path), i) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", str(path), i)
        rows.append((i, obj))
    return rows


def read_records(path: str | Path, fmt: str | None = None) -> list[tuple[int, dict]]:
    """Rows of a JSONL, CSV or TSV file as (line number, dict). ``fmt`` defaults to the suffix."""
    path = Path(path)
    text = read_text(path)
    fmt = (fmt or path.suffix.lstrip(".") or "jsonl").lower()
    rows: list[tuple[int, dict]] = []
    if fmt in ("jsonl", "json", "ndjson"):
        rows = parse_jsonl(text, path)
    elif fmt in ("csv", "tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="," if fmt == "csv" else "\t")
        if not reader.fieldnames:
            raise DataError("no header row", str(path))
        for row in reader:
            if None in row:
                raise DataError("more values than header columns", str(path), reader.line_num)
            rows.append((reader.line_num, dict(row)))
    else:
        raise DataError(f"unknown data format {fmt!r} (use .jsonl, .csv or .tsv)", str(path))
    if not rows:
        raise DataError("empty dataset: no examples", str(path))
    return rows


def _text_field(value, name: str, path: Path, line: int) -> str:
    if value is None:
        raise DataError(f"field {name!r} is null", str(path), line)
    if isinstance(value, (dict, list)):
        raise DataError(f"field {name!r} must be text, got {type(value).__name__}", str(path), line)
    return str(value)


def read_examples(
    path: str | Path,
    fields: Iterable[str] = ("input",),
    target_field: str | None = "target",
    fmt: str | None = None,
    require_target: bool = True,
) -> list[Example]:
    """Examples from a data file. ``fields`` are the names the template uses; ``target_field`` the
    text to learn. A missing field is an error naming the file, line and field."""
    path = Path(path)
    fields = list(fields)
    out = []
    for line, row in read_records(path, fmt):
        values = {}
        for f in fields:
            if f not in row:
                have = ", ".join(sorted(row)) or "none"
                raise DataError(f"missing field {f!r} (fields present: {have})", str(path), line)
            values[f] = _text_field(row[f], f, path, line)
        target = None
        if target_field is not None:
            if target_field in row:
                target = _text_field(row[target_field], target_field, path, line)
            elif require_target:
                have = ", ".join(sorted(row)) or "none"
                raise DataError(f"missing target field {target_field!r} (fields present: {have})", str(path), line)
        out.append(Example(values, target, str(path), line))
    return out
