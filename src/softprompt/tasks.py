"""Task recipes: a dataset (read by a named reader), its splits, templates, label words and metric.

A recipe is a YAML file, either shipped in ``softprompt/recipes/<name>.yaml`` or given by path::

    name: sst2
    description: SST-2 binary sentiment ...
    reader: stsa                      # one of READERS
    splits:                           # paths relative to the user's --data-dir
      train: sst2-sentences/stsa.binary.train
      dev: {path: trec/TREC.train, portion: [0.9, 1.0]}   # a carved split (see below)
      test: {path: e2e-nlg/devset.csv, unique_inputs: true}
    fields: [sentence]                # the fields the templates use
    soft_template: "[soft:N] Review: {sentence}\\nSentiment:"   # N is filled in by soft_template_for(n)
    hard_prompt: "Is this review positive or negative?\\nReview: {sentence}\\nSentiment:"
    labels: {"0": negative, "1": positive}   # raw label -> label word (classification only)
    metric: accuracy                  # accuracy | macro_f1 | exact_match | rouge_l | bleu
    soft_tokens: 20                   # default N (optional)
    few_shot_k: 4                     # optional
    chat: true                        # optional
    split_seed: 0                     # seed of the shuffle behind carved splits (optional)

A carved split takes the fraction ``portion: [start, end]`` of a deterministic shuffle (seeded by
``split_seed``) of the file's examples. Examples that share ``meta['group']`` (set by some readers:
the E2E meaning representation, the SQuAD/BoolQ article title) are shuffled as one unit, so a group
never straddles two splits. Portions of the same file must not overlap. ``unique_inputs: true`` keeps one
example per distinct input; its ``meta['references']`` lists every target seen for that input.

Every problem in a recipe is a one-line :class:`SoftPromptError` naming the recipe file and field.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from softprompt.errors import DataError, SoftPromptError
from softprompt.examples import Example

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
SPLITS = ("train", "dev", "test")
METRICS = ("accuracy", "macro_f1", "exact_match", "rouge_l", "bleu")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "exact_match")
GENERATION_METRICS = ("exact_match", "rouge_l", "bleu")
DEFAULT_SOFT_TOKENS = 20
DATA_DIR_HINT = "pass --data-dir with the directory that holds the datasets (e.g. ../shared/data)"

# ---------------------------------------------------------------------------------------------
# readers


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
    raw = _need(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if latin1_fallback:
            return raw.decode("latin-1")
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 text (byte {e.start})", str(path), line) from None


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
    out = []
    for i, ln in _lines(path):
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", str(path), i) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", str(path), i)
        out.append((i, obj))
    return out


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


# ---------------------------------------------------------------------------------------------
# recipes


@dataclass(frozen=True)
class SplitSpec:
    path: str  # relative to the data dir
    portion: tuple[float, float] | None = None  # [start, end) of the seeded shuffle
    unique_inputs: bool = False


@dataclass(frozen=True)
class TaskRecipe:
    name: str
    reader: str
    splits: dict[str, SplitSpec]
    fields: tuple[str, ...]
    soft_template: str  # with a literal [soft:N]; see soft_template_for
    hard_prompt: str  # fields only, no soft spans
    metric: str
    description: str = ""
    labels: dict[str, str] | None = None  # raw label -> label word; None for generation
    soft_tokens: int = DEFAULT_SOFT_TOKENS
    few_shot_k: int = 4
    chat: bool = True
    split_seed: int = 0
    path: str | None = None  # the recipe file it came from

    @property
    def is_classification(self) -> bool:
        return self.labels is not None

    @property
    def label_words(self) -> list[str]:
        """Distinct label words in recipe order (empty for generation tasks)."""
        return list(dict.fromkeys((self.labels or {}).values()))

    def soft_template_for(self, n_tokens: int | None = None) -> str:
        """The soft template with every ``[soft:N`` given ``n_tokens`` (default ``soft_tokens``)."""
        n = self.soft_tokens if n_tokens is None else n_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SoftPromptError(f"number of soft tokens must be a positive integer, got {n!r}")
        return _SOFT_N.sub(f"[soft:{n}", self.soft_template)

    @property
    def where(self) -> str:
        return self.path or f"<recipe {self.name}>"


_SOFT_N = re.compile(r"\[soft:N(?=[\]\s])")
_SOFT_SPAN = re.compile(r"\[soft:[^\]]*\]")
_PLACEHOLDER = re.compile(r"(?<!\{)\{([^{}]*)\}(?!\})")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

_REQUIRED = ("name", "reader", "splits", "fields", "soft_template", "hard_prompt", "metric")
_OPTIONAL = ("description", "labels", "soft_tokens", "few_shot_k", "chat", "split_seed")


def template_fields(template: str) -> list[str]:
    """``{field}`` placeholders of a template string (soft spans and ``{{``/``}}`` ignored)."""
    return list(dict.fromkeys(m.group(1).strip() for m in _PLACEHOLDER.finditer(_SOFT_SPAN.sub(" ", template))))


def _err(where: str, fld: str, msg: str) -> SoftPromptError:
    return SoftPromptError(f"{where}: {fld}: {msg}")


def _label_key(k) -> str:
    if isinstance(k, bool):
        return "true" if k else "false"
    if isinstance(k, (int, str)):
        return str(k).strip()
    raise TypeError


def recipe_from_dict(data, where: str) -> TaskRecipe:
    """Validate a parsed recipe; ``where`` (the file) is named in every error."""
    if not isinstance(data, dict):
        raise SoftPromptError(f"{where}: expected a YAML mapping of recipe fields, got {type(data).__name__}")
    for k in data:
        if k not in _REQUIRED + _OPTIONAL:
            raise _err(where, str(k), f"unknown field (known: {', '.join(_REQUIRED + _OPTIONAL)})")
    for k in _REQUIRED:
        if k not in data or data[k] is None:
            raise _err(where, k, "missing required field")

    def text(k: str, allow_empty: bool = False) -> str:
        v = data[k]
        if not isinstance(v, str) or (not allow_empty and not v.strip()):
            raise _err(where, k, f"must be a non-empty string, got {v!r}")
        return v

    def integer(k: str, default: int, minimum: int) -> int:
        v = data.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise _err(where, k, f"must be an integer >= {minimum}, got {v!r}")
        return v

    name = text("name").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise _err(where, "name", f"use letters, digits, '-', '_' or '.', got {name!r}")
    description = data.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise _err(where, "description", f"must be a string, got {description!r}")

    reader_name = text("reader").strip()
    if reader_name not in READERS:
        raise _err(where, "reader", f"unknown reader {reader_name!r} (known: {', '.join(sorted(READERS))})")
    reader = READERS[reader_name]

    # splits
    raw_splits = data["splits"]
    if not isinstance(raw_splits, dict) or not raw_splits:
        raise _err(where, "splits", "must be a mapping of train/dev/test to a path under the data dir")
    splits: dict[str, SplitSpec] = {}
    for sname, spec in raw_splits.items():
        f = f"splits.{sname}"
        if sname not in SPLITS:
            raise _err(where, f, f"unknown split (use {', '.join(SPLITS)})")
        if isinstance(spec, str):
            spec = {"path": spec}
        if not isinstance(spec, dict):
            raise _err(where, f, "must be a path, or a mapping with path, portion, unique_inputs")
        for k in spec:
            if k not in ("path", "portion", "unique_inputs"):
                raise _err(where, f"{f}.{k}", "unknown field (known: path, portion, unique_inputs)")
        p = spec.get("path")
        if not isinstance(p, str) or not p.strip():
            raise _err(where, f"{f}.path", f"must be a non-empty path, got {p!r}")
        if Path(p).is_absolute() or ".." in Path(p).parts:
            raise _err(where, f"{f}.path", f"must be relative to the data dir (no leading '/' or '..'), got {p!r}")
        portion = spec.get("portion")
        if portion is not None:
            ok = (isinstance(portion, (list, tuple)) and len(portion) == 2
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in portion))
            if not ok or not (0 <= portion[0] < portion[1] <= 1):
                raise _err(where, f"{f}.portion", f"must be [start, end] with 0 <= start < end <= 1, got {portion!r}")
            portion = (float(portion[0]), float(portion[1]))
        uniq = spec.get("unique_inputs", False)
        if not isinstance(uniq, bool):
            raise _err(where, f"{f}.unique_inputs", f"must be true or false, got {uniq!r}")
        splits[sname] = SplitSpec(p.strip(), portion, uniq)
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = splits[a], splits[b]
            if sa.path != sb.path:
                continue
            pa, pb = sa.portion or (0.0, 1.0), sb.portion or (0.0, 1.0)
            if pa[0] < pb[1] and pb[0] < pa[1]:
                raise _err(where, f"splits.{b}", f"overlaps splits.{a} (same file {sa.path}; give non-overlapping portions)")

    # fields and templates
    fields = data["fields"]
    if isinstance(fields, str):
        fields = [fields]
    if not isinstance(fields, list) or not fields or not all(isinstance(x, str) and _IDENT.match(x) for x in fields):
        raise _err(where, "fields", f"must be a list of field names, got {data['fields']!r}")
    if len(set(fields)) != len(fields):
        raise _err(where, "fields", "lists a field twice")
    if reader.fields is not None:
        for x in fields:
            if x not in reader.fields:
                raise _err(where, "fields", f"reader {reader_name!r} has no field {x!r} (it has: {', '.join(reader.fields)})")
    soft = text("soft_template")
    if not _SOFT_SPAN.search(soft):
        raise _err(where, "soft_template", "has no soft span; write one like [soft:N] (N is filled in)")
    hard = text("hard_prompt")
    if "[soft" in hard:
        raise _err(where, "hard_prompt", "must not contain soft spans ([soft...]); it is the hand-written zero-shot prompt")
    for k, tpl in (("soft_template", soft), ("hard_prompt", hard)):
        used = template_fields(tpl)
        if not used:
            raise _err(where, k, f"uses no field; put one of {{{'}, {'.join(fields)}}} in it")
        for u in used:
            if u not in fields:
                raise _err(where, k, f"uses {{{u}}} which is not in fields ({', '.join(fields)})")

    # labels and metric
    labels = data.get("labels")
    if reader.kind == "classification":
        if labels is None:
            raise _err(where, "labels", f"missing: reader {reader_name!r} yields class labels, map each raw label to a label word")
        if not isinstance(labels, dict) or not labels:
            raise _err(where, "labels", "must be a mapping from raw label to label word")
        norm: dict[str, str] = {}
        for k, v in labels.items():
            try:
                key = _label_key(k)
            except TypeError:
                raise _err(where, "labels", f"raw label {k!r} must be a string or number") from None
            if not isinstance(v, str) or not v.strip() or "\n" in v or v != v.strip():
                hint = " (quote yes/no/true/false/on/off in YAML)" if isinstance(v, bool) else ""
                raise _err(where, f"labels.{key}", f"label word must be a non-empty one-line string without outer spaces, got {v!r}{hint}")
            if key in norm:
                raise _err(where, f"labels.{key}", "raw label given twice")
            norm[key] = v
        labels = norm
    elif labels is not None:
        raise _err(where, "labels", f"reader {reader_name!r} is a generation task; remove labels")
    metric = text("metric").strip()
    if metric not in METRICS:
        raise _err(where, "metric", f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    allowed = CLASSIFICATION_METRICS if labels is not None else GENERATION_METRICS
    if metric not in allowed:
        kind = "classification" if labels is not None else "generation"
        raise _err(where, "metric", f"{metric!r} does not fit a {kind} task (use {', '.join(allowed)})")

    soft_tokens = integer("soft_tokens", DEFAULT_SOFT_TOKENS, 1)
    few_shot_k = integer("few_shot_k", 4, 0)
    split_seed = integer("split_seed", 0, 0)
    chat = data.get("chat", True)
    if not isinstance(chat, bool):
        raise _err(where, "chat", f"must be true or false, got {chat!r}")
    return TaskRecipe(name=name, reader=reader_name, splits=splits, fields=tuple(fields), soft_template=soft,
                      hard_prompt=hard, metric=metric, description=description.strip(), labels=labels,
                      soft_tokens=soft_tokens, few_shot_k=few_shot_k, chat=chat, split_seed=split_seed, path=where)


def list_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    if not RECIPE_DIR.is_dir():
        return []
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> TaskRecipe:
    """A shipped recipe by name (``sst2``) or a recipe YAML file by path."""
    import yaml

    s = str(name_or_path)
    p = Path(s)
    if p.is_file() or p.suffix in (".yaml", ".yml") or "/" in s or "\\" in s:
        if not p.is_file():
            raise SoftPromptError(f"recipe file not found: {p}")
        path = p
    else:
        path = RECIPE_DIR / f"{s}.yaml"
        if not path.is_file():
            raise SoftPromptError(f"unknown task recipe {s!r} (shipped: {', '.join(list_recipes()) or 'none'}; "
                                  "or give the path of a recipe .yaml file)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SoftPromptError(f"{path}: not valid UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SoftPromptError(f"{path}{loc}: invalid YAML: {problem}") from None
    return recipe_from_dict(data, str(path))


# ---------------------------------------------------------------------------------------------
# splits


def _unique_inputs(examples: list[Example]) -> list[Example]:
    groups: dict[tuple, list[Example]] = {}
    for ex in examples:
        groups.setdefault(tuple(sorted(ex.fields.items())), []).append(ex)
    out = []
    for exs in groups.values():
        first = exs[0]
        refs: list[str] = []
        for e in exs:
            for r in e.meta.get("references") or ([e.target] if e.target is not None else []):
                if r not in refs:
                    refs.append(r)
        out.append(replace(first, meta={**first.meta, "references": refs}))
    return out


def _carve(examples: list[Example], portion: tuple[float, float], seed: int) -> list[Example]:
    """The ``portion`` of a seeded shuffle of the examples' groups (an example is its own group unless
    ``meta['group']`` says otherwise), returned in file order."""
    keys: dict = {}
    for i, ex in enumerate(examples):
        keys.setdefault(ex.meta.get("group", ("#", i)), []).append(i)
    order = list(keys)
    random.Random(seed).shuffle(order)
    n = len(order)
    lo, hi = (math.floor(x * n + 0.5) for x in portion)
    picked = sorted(i for k in order[lo:hi] for i in keys[k])
    return [examples[i] for i in picked]


def load_split(recipe: TaskRecipe, data_dir: str | Path, split: str, limit: int | None = None, seed: int = 0) -> list[Example]:
    """The examples of one split. Classification targets are label words (the raw label stays in
    ``meta['label']``). All examples in file order; with ``limit``, a random sample of that many
    (seeded by ``seed``, in random order)."""
    if split not in recipe.splits:
        raise _err(recipe.where, "splits", f"no {split!r} split (has: {', '.join(recipe.splits)})")
    spec = recipe.splits[split]
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}; {DATA_DIR_HINT}")
    reader = READERS[recipe.reader]
    examples = reader.read(data_dir / spec.path)
    if spec.unique_inputs:
        examples = _unique_inputs(examples)
    if spec.portion is not None:
        examples = _carve(examples, spec.portion, recipe.split_seed)
    out = []
    for ex in examples:
        for f in recipe.fields:
            if f not in ex.fields:
                raise DataError(f"no field {f!r} for recipe {recipe.name} (has: {', '.join(ex.fields)})", ex.source, ex.line)
        if recipe.labels is not None:
            raw = ex.meta.get("label")
            if raw not in recipe.labels:
                raise _err(recipe.where, "labels", f"no label word for raw label {raw!r} seen at {ex.where} "
                                                   f"(mapped: {', '.join(recipe.labels)})")
            ex = replace(ex, target=recipe.labels[raw])
        out.append(ex)
    if not out:
        raise _err(recipe.where, f"splits.{split}", f"selects no examples from {data_dir / spec.path}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise SoftPromptError(f"limit must be a positive integer, got {limit!r}")
        if limit < len(out):
            out = random.Random(seed).sample(out, limit)
    return out
