"""The public-dataset readers behind task recipes (SST-2, TREC, AG News, TweetEval, BoolQ, E2E, GLUE
TSV, SQuAD), registered by name in :data:`READERS`. Each returns :class:`Example` objects; every
problem in a file is a one-line :class:`DataError` naming the file (and line)."""
from __future__ import annotations

import csv
import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from softprompt.data.examples import Example
from softprompt.data.readers import decode_text, parse_jsonl
from softprompt.errors import DataError

DATA_DIR_HINT = "pass --data-dir with the directory that holds the datasets (e.g. ../shared/data)"


@dataclass(frozen=True)
class Reader:
    """A dataset format. ``read(path)`` returns examples whose raw class label (classification) is in
    ``meta['label']`` and whose ``target`` is None, or (generation) whose ``target`` is the reference."""

    name: str
    read: Callable[[Path], list[Example]]
    fields: tuple[str, ...] | None  # None: decided by the file (a header row)
    kind: str  # "classification" | "generation"
    description: str = ""


READERS: dict[str, Reader] = {}


def register_reader(name: str, fields: tuple[str, ...] | None, kind: str, description: str = ""):
    """Decorator: register ``fn(path) -> list[Example]`` as the reader ``name``."""
    if kind not in ("classification", "generation"):
        raise ValueError(f"reader kind must be classification or generation, not {kind!r}")

    def deco(fn: Callable[[Path], list[Example]]):
        READERS[name] = Reader(name, fn, tuple(fields) if fields is not None else None, kind, description)
        return fn

    return deco


def _need(path: Path) -> Path:
    """Fail with a one-line hint when a data file is missing."""
    if not path.exists():
        raise DataError(f"data file not found: {path}; {DATA_DIR_HINT}")
    if path.is_dir():
        raise DataError(f"expected a data file, found a directory: {path}; {DATA_DIR_HINT}")
    return path


def _read_text(path: Path, latin1_fallback: bool = False) -> str:
    return decode_text(_need(path).read_bytes(), path, latin1_fallback)


def _lines(path: Path, latin1_fallback: bool = False) -> list[tuple[int, str]]:
    """Non-blank lines as (1-based line number, text without the line ending)."""
    out = [(i, ln.rstrip("\r")) for i, ln in enumerate(_read_text(path, latin1_fallback).split("\n"), 1)]
    out = [(i, ln) for i, ln in out if ln.strip()]
    if not out:
        raise DataError("empty dataset: no examples", str(path))
    return out


def _ex(fields: dict[str, str], path: Path, line: int | None, target: str | None = None, **meta) -> Example:
    return Example(fields, target, str(path), line, meta)


@register_reader("stsa", ("sentence",), "classification",
                 "one example a line, '<label> <sentence>' (SST-2 sentence-level, Kim 2014)")
def read_stsa(path: Path) -> list[Example]:
    out = []
    for i, ln in _lines(path):
        label, sep, text = ln.strip().partition(" ")
        if not sep or not text.strip():
            raise DataError("expected '<label> <sentence>'", str(path), i)
        out.append(_ex({"sentence": text.strip()}, path, i, label=label))
    return out


@register_reader("trec", ("question",), "classification",
                 "TREC question classification, 'COARSE:fine question' a line; raw label = COARSE")
def read_trec(path: Path) -> list[Example]:
    out = []
    # TREC.train has a few Latin-1 bytes (not UTF-8)
    for i, ln in _lines(path, latin1_fallback=True):
        head, sep, text = ln.strip().partition(" ")
        coarse, colon, fine = head.partition(":")
        if not sep or not colon or not coarse or not text.strip():
            raise DataError("expected 'COARSE:fine question'", str(path), i)
        out.append(_ex({"question": text.strip()}, path, i, label=coarse, fine=fine))
    return out


_AG_ENTITY = re.compile(r" ?(?<![&\w])(#\d{2,4}|#x[0-9a-fA-F]{2,4}|quot|amp|lt|gt|hellip|nbsp);")
_TAG = re.compile(r"<[^<>]{0,400}>")


def clean_agnews(text: str) -> str:
    """Undo AG News's mangled markup: ' #39;' -> "'", ' quot;' -> '"', ' #36;' -> '$', '&lt;b&gt;' tags
    removed, '\\$' -> '$' and a bare backslash (a lost line break) -> space."""
    text = _AG_ENTITY.sub(lambda m: html.unescape("&" + m.group(1) + ";"), text)
    text = _TAG.sub(" ", html.unescape(text))
    text = text.replace("\\$", "$").replace("\\", " ")
    return " ".join(text.split())


@register_reader("agnews", ("text",), "classification",
                 "AG News TSV without header, '<text>\\t<label name>' (CSV-style quoting); text cleaned")
def read_agnews(path: Path) -> list[Example]:
    text = _read_text(_need(path))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    out = []
    for row in reader:
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise DataError(f"expected 2 tab-separated columns (text, label), got {len(row)}", str(path), reader.line_num)
        body, label = clean_agnews(row[0]), row[1].strip()
        if not body or not label:
            raise DataError("empty text or label", str(path), reader.line_num)
        out.append(_ex({"text": body}, path, reader.line_num, label=label))
    if not out:
        raise DataError("empty dataset: no examples", str(path))
    return out


def clean_tweet(text: str) -> str:
    """TweetEval stores line breaks as a literal backslash-n and escapes '&' as '&amp;'."""
    return html.unescape(text.replace("\\n", "\n")).strip()


@register_reader("tweeteval", ("text",), "classification",
                 "TweetEval: split path PREFIX names PREFIX_text.txt + PREFIX_labels.txt (+ mapping.txt beside them)")
def read_tweeteval(path: Path) -> list[Example]:
    text_path = path.parent / f"{path.name}_text.txt"
    label_path = path.parent / f"{path.name}_labels.txt"
    texts = _read_text(_need(text_path)).split("\n")
    labels = _read_text(_need(label_path)).split("\n")
    # a final newline leaves one empty string at the end
    for lst in (texts, labels):
        if lst and lst[-1] == "":
            lst.pop()
    if len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels in {label_path}", str(text_path))
    mapping: dict[str, str] = {}
    map_path = path.parent / "mapping.txt"
    if map_path.exists():
        for i, ln in _lines(map_path):
            key, sep, name = ln.strip().partition("\t")
            if not sep or not name.strip():
                raise DataError("expected 'label_id<TAB>label_name'", str(map_path), i)
            mapping[key.strip()] = name.strip()
    out = []
    for i, (t, lab) in enumerate(zip(texts, labels), 1):
        lab = lab.strip()
        if not lab:
            raise DataError("empty label", str(label_path), i)
        if mapping and lab not in mapping:
            raise DataError(f"label {lab!r} is not in {map_path}", str(label_path), i)
        t = clean_tweet(t)
        if not t:
            raise DataError("empty tweet", str(text_path), i)
        out.append(_ex({"text": t}, text_path, i, label=mapping.get(lab, lab), label_id=lab))
    if not out:
        raise DataError("empty dataset: no examples", str(text_path))
    return out


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = parse_jsonl(_read_text(path), path)
    if not rows:
        raise DataError("empty dataset: no examples", str(path))
    return rows


def _str_field(obj: dict, key: str, path: Path, line: int | None) -> str:
    if key not in obj:
        raise DataError(f"missing field {key!r} (fields present: {', '.join(sorted(obj)) or 'none'})", str(path), line)
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(f"field {key!r} must be a string, got {type(v).__name__}", str(path), line)
    return v


@register_reader("boolq", ("passage", "question"), "classification",
                 "BoolQ JSON Lines with question, passage, answer (true/false) and title; raw label 'true'/'false'")
def read_boolq(path: Path) -> list[Example]:
    out = []
    for i, obj in _jsonl(path):
        q, p = _str_field(obj, "question", path, i), _str_field(obj, "passage", path, i)
        ans = obj.get("answer")
        if isinstance(ans, str) and ans.strip().lower() in ("true", "false"):
            ans = ans.strip().lower() == "true"
        if not isinstance(ans, bool):
            raise DataError(f"field 'answer' must be true or false, got {ans!r}", str(path), i)
        title = obj.get("title")
        meta = {"label": "true" if ans else "false"}
        if isinstance(title, str):
            meta.update(title=title, group=title)
        out.append(_ex({"passage": p.strip(), "question": q.strip()}, path, i, **meta))
    return out


@register_reader("e2e", ("mr",), "generation",
                 "E2E NLG CSV with header mr,ref (one reference per row, MRs repeat); group = mr")
def read_e2e(path: Path) -> list[Example]:
    text = _read_text(_need(path))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
    if "mr" not in cols or "ref" not in cols:
        raise DataError(f"expected a header with columns mr,ref, got {','.join(reader.fieldnames or []) or 'none'}", str(path), 1)
    out = []
    for row in reader:
        mr, ref = (row.get(cols["mr"]) or "").strip(), (row.get(cols["ref"]) or "").strip()
        if not mr or not ref:
            raise DataError("empty mr or ref", str(path), reader.line_num)
        out.append(_ex({"mr": mr}, path, reader.line_num, ref, group=mr))
    if not out:
        raise DataError("empty dataset: no examples", str(path))
    return out


@register_reader("glue", None, "classification",
                 "GLUE-style TSV with a header; the 'label' column is the raw label, other columns "
                 "(except 'index') are fields; no quoting")
def read_glue(path: Path) -> list[Example]:
    lines = _lines(path)
    header = [h.strip() for h in lines[0][1].split("\t")]
    if "label" not in header:
        raise DataError(f"header has no 'label' column (columns: {', '.join(header)})", str(path), lines[0][0])
    names = [h for h in header if h not in ("label", "index")]
    if not names:
        raise DataError("header has no text column besides 'label'", str(path), lines[0][0])
    out = []
    for i, ln in lines[1:]:
        vals = ln.split("\t")
        if len(vals) != len(header):
            raise DataError(f"expected {len(header)} tab-separated columns, got {len(vals)}", str(path), i)
        row = dict(zip(header, (v.strip() for v in vals)))
        if not row["label"]:
            raise DataError("empty label", str(path), i)
        out.append(_ex({k: row[k] for k in names}, path, i, label=row["label"]))
    if not out:
        raise DataError("empty dataset: no examples", str(path))
    return out


@register_reader("squad", ("context", "question"), "generation",
                 "SQuAD v1.1 JSON; target = first answer, meta['references'] = all answers; group = article")
def read_squad(path: Path) -> list[Example]:
    try:
        doc = json.loads(_read_text(_need(path)))
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg}", str(path), e.lineno) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError("expected a SQuAD JSON object with a 'data' list", str(path))
    out = []
    for article in doc["data"]:
        title = article.get("title", "") if isinstance(article, dict) else ""
        for para in (article.get("paragraphs") or []) if isinstance(article, dict) else []:
            ctx = _str_field(para, "context", path, None)
            for qa in para.get("qas") or []:
                q = _str_field(qa, "question", path, None)
                answers = []
                for a in qa.get("answers") or []:
                    t = a.get("text") if isinstance(a, dict) else None
                    if isinstance(t, str) and t.strip() and t.strip() not in answers:
                        answers.append(t.strip())
                if not answers:
                    raise DataError(f"question {qa.get('id', '?')!r} has no answer text", str(path))
                out.append(_ex({"context": ctx, "question": q.strip()}, path, None, answers[0],
                               id=qa.get("id"), title=title, group=title, references=answers))
    if not out:
        raise DataError("empty dataset: no examples", str(path))
    return out
