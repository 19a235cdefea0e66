"""Training contexts for the amortized compressor, and the split by context.

Contexts come from text files (one context per ``.txt`` file, or ``.jsonl`` objects with a
``context``/``passage``/``text`` field) or from the shared datasets (SQuAD paragraphs with their
questions, BoolQ passages, AG News articles, E2E references). Every context is assigned to ``train``,
``dev`` (early stopping) or ``eval`` (benchmarks) by a hash of its normalized text, so a paragraph that
occurs several times (SQuAD repeats it once per question) always lands in the same split, and an
evaluation context can never be trained on, whatever files are passed.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from softprompt.data.readers import parse_jsonl
from softprompt.errors import DataError, SoftPromptError

TEXT_FIELDS = ("context", "passage", "text", "document")
SPLITS = ("train", "dev", "eval")
SHARED = {"squad": "squad-v1.1/dev-v1.1.json", "boolq": "boolq/dev.jsonl", "agnews": "agnews/dev.tsv",
          "e2e": "e2e-nlg/trainset.csv"}


@dataclass(frozen=True)
class Context:
    """One context, where it came from, and questions that come with it (SQuAD, BoolQ)."""

    text: str
    source: str
    questions: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), compare=False)

    @property
    def sha(self) -> str:
        return context_sha(self.text)


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def context_sha(text: str) -> str:
    """A stable id of a context: sha256 of its whitespace-normalized text (16 hex digits)."""
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()[:16]


def split_of(text: str, eval_share: float = 0.1, dev_share: float = 0.05) -> str:
    """``eval``, ``dev`` or ``train`` for a context, from its hash alone (order- and file-independent)."""
    u = int(hashlib.sha256(("split:" + normalize(text)).encode("utf-8")).hexdigest()[:12], 16) / 16 ** 12
    if u < eval_share:
        return "eval"
    return "dev" if u < eval_share + dev_share else "train"


def _squad(path: Path) -> list[Context]:
    try:
        data = json.loads(path.read_text("utf-8"))["data"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"not a SQuAD file ({e.__class__.__name__})", str(path)) from None
    out = []
    for article in data:
        for p in article["paragraphs"]:
            qs = tuple((q["question"], tuple(a["text"] for a in q.get("answers", ()))) for q in p.get("qas", ()))
            out.append(Context(normalize(p["context"]), "squad", qs))
    return out


def _jsonl(path: Path, source: str) -> list[Context]:
    out = []
    for i, row in parse_jsonl(path.read_text("utf-8"), path):
        key = next((k for k in TEXT_FIELDS if isinstance(row.get(k), str)), None)
        if key is None:
            raise DataError(f"no context field (one of {', '.join(TEXT_FIELDS)})", str(path), i)
        qs = ()
        if isinstance(row.get("question"), str):
            ans = row.get("answer")
            qs = ((row["question"], (str(ans).lower(),) if isinstance(ans, bool) else ((str(ans),) if ans else ())),)
        out.append(Context(normalize(row[key]), source, qs))
    return out


def _tsv_first_column(path: Path, source: str) -> list[Context]:
    with path.open(encoding="utf-8", newline="") as f:
        return [Context(normalize(r[0]), source) for r in csv.reader(f, delimiter="\t") if r and r[0].strip()]


def _e2e(path: Path) -> list[Context]:
    with path.open(encoding="utf-8", newline="") as f:
        return [Context(normalize(r["ref"]), "e2e") for r in csv.DictReader(f) if r.get("ref", "").strip()]


def read_shared(data_dir: str | Path, sources: tuple[str, ...] = tuple(SHARED)) -> list[Context]:
    """Contexts of the shared datasets found under ``data_dir`` (SQuAD, BoolQ, AG News, E2E)."""
    root, out = Path(data_dir), []
    for name in sources:
        path = root / SHARED[name]
        if not path.is_file():
            continue
        out += {"squad": _squad, "e2e": _e2e}.get(name, lambda p, n=name: _jsonl(p, n) if p.suffix == ".jsonl"
                                                  else _tsv_first_column(p, n))(path)
    return out


def read_contexts(paths: list[str | Path]) -> list[Context]:
    """Contexts from files and directories: ``.txt`` (the whole file is one context), ``.jsonl``, a SQuAD
    ``.json``, or a directory holding the shared datasets (or such files). Duplicates are removed."""
    found: list[Context] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError("does not exist", str(p))
        if p.is_dir():
            shared = read_shared(p)
            if shared:
                found += shared
                continue
            files = sorted(x for x in p.rglob("*") if x.is_file() and x.suffix in (".txt", ".jsonl", ".json"))
            found += read_contexts(files) if files else []
            continue
        if p.suffix == ".jsonl":
            found += _jsonl(p, p.stem)
        elif p.suffix == ".json":
            found += _squad(p)
        else:
            try:
                text = p.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"cannot read context file ({e.__class__.__name__})", str(p)) from None
            if text.strip():
                found.append(Context(normalize(text), p.stem))
    seen: dict[str, Context] = {}
    for c in found:
        if c.text and c.sha not in seen:
            seen[c.sha] = c
        elif c.text and c.questions:  # merge the questions of a repeated paragraph
            old = seen[c.sha]
            seen[c.sha] = Context(old.text, old.source, old.questions + c.questions)
    return list(seen.values())


def split_contexts(contexts: list[Context], eval_share: float = 0.1, dev_share: float = 0.05) -> dict[str, list[Context]]:
    """The contexts by split (see :func:`split_of`)."""
    out: dict[str, list[Context]] = {s: [] for s in SPLITS}
    for c in contexts:
        out[split_of(c.text, eval_share, dev_share)].append(c)
    return out


def filter_length(contexts: list[Context], tokenizer, min_tokens: int, max_tokens: int) -> list[Context]:
    return [c for c in contexts if min_tokens <= len(tokenizer(c.text, add_special_tokens=False).input_ids) <= max_tokens]


def require(contexts: list[Context], what: str) -> None:
    if not contexts:
        raise SoftPromptError(f"no {what} contexts: pass --contexts with more (or longer) contexts")
