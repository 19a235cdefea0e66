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

import re
from dataclasses import dataclass
from pathlib import Path

from softprompt.data.datasets import READERS
from softprompt.errors import SoftPromptError, TemplateError
from softprompt.template import Template, fill_length, parse_template

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
SPLITS = ("train", "dev", "test")
METRICS = ("accuracy", "macro_f1", "exact_match", "rouge_l", "bleu")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "exact_match")
GENERATION_METRICS = ("exact_match", "rouge_l", "bleu")
DEFAULT_SOFT_TOKENS = 20
LENGTH_PLACEHOLDER = "N"  # the soft template's [soft:N], filled in by soft_template_for


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
        """The soft template with every ``[soft:N]`` length given ``n_tokens`` (default ``soft_tokens``)."""
        n = self.soft_tokens if n_tokens is None else n_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SoftPromptError(f"number of soft tokens must be a positive integer, got {n!r}")
        return fill_length(self.soft_template, LENGTH_PLACEHOLDER, n)

    @property
    def where(self) -> str:
        return self.path or f"<recipe {self.name}>"


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

_REQUIRED = ("name", "reader", "splits", "fields", "soft_template", "hard_prompt", "metric")
_OPTIONAL = ("description", "labels", "soft_tokens", "few_shot_k", "chat", "split_seed")


def _parse(template: str) -> Template:
    return parse_template(template, placeholder=LENGTH_PLACEHOLDER)


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a recipe template uses, in order (``[soft:N]`` allowed)."""
    return _parse(template).fields


def recipe_error(where: str, fld: str, msg: str) -> SoftPromptError:
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
            raise recipe_error(where, str(k), f"unknown field (known: {', '.join(_REQUIRED + _OPTIONAL)})")
    for k in _REQUIRED:
        if k not in data or data[k] is None:
            raise recipe_error(where, k, "missing required field")

    def text(k: str, allow_empty: bool = False) -> str:
        v = data[k]
        if not isinstance(v, str) or (not allow_empty and not v.strip()):
            raise recipe_error(where, k, f"must be a non-empty string, got {v!r}")
        return v

    def integer(k: str, default: int, minimum: int) -> int:
        v = data.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise recipe_error(where, k, f"must be an integer >= {minimum}, got {v!r}")
        return v

    name = text("name").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise recipe_error(where, "name", f"use letters, digits, '-', '_' or '.', got {name!r}")
    description = data.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise recipe_error(where, "description", f"must be a string, got {description!r}")

    reader_name = text("reader").strip()
    if reader_name not in READERS:
        raise recipe_error(where, "reader", f"unknown reader {reader_name!r} (known: {', '.join(sorted(READERS))})")
    reader = READERS[reader_name]

    # splits
    raw_splits = data["splits"]
    if not isinstance(raw_splits, dict) or not raw_splits:
        raise recipe_error(where, "splits", "must be a mapping of train/dev/test to a path under the data dir")
    splits: dict[str, SplitSpec] = {}
    for sname, spec in raw_splits.items():
        f = f"splits.{sname}"
        if sname not in SPLITS:
            raise recipe_error(where, f, f"unknown split (use {', '.join(SPLITS)})")
        if isinstance(spec, str):
            spec = {"path": spec}
        if not isinstance(spec, dict):
            raise recipe_error(where, f, "must be a path, or a mapping with path, portion, unique_inputs")
        for k in spec:
            if k not in ("path", "portion", "unique_inputs"):
                raise recipe_error(where, f"{f}.{k}", "unknown field (known: path, portion, unique_inputs)")
        p = spec.get("path")
        if not isinstance(p, str) or not p.strip():
            raise recipe_error(where, f"{f}.path", f"must be a non-empty path, got {p!r}")
        if Path(p).is_absolute() or ".." in Path(p).parts:
            raise recipe_error(where, f"{f}.path", f"must be relative to the data dir (no leading '/' or '..'), got {p!r}")
        portion = spec.get("portion")
        if portion is not None:
            ok = (isinstance(portion, (list, tuple)) and len(portion) == 2
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in portion))
            if not ok or not (0 <= portion[0] < portion[1] <= 1):
                raise recipe_error(where, f"{f}.portion", f"must be [start, end] with 0 <= start < end <= 1, got {portion!r}")
            portion = (float(portion[0]), float(portion[1]))
        uniq = spec.get("unique_inputs", False)
        if not isinstance(uniq, bool):
            raise recipe_error(where, f"{f}.unique_inputs", f"must be true or false, got {uniq!r}")
        splits[sname] = SplitSpec(p.strip(), portion, uniq)
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = splits[a], splits[b]
            if sa.path != sb.path:
                continue
            pa, pb = sa.portion or (0.0, 1.0), sb.portion or (0.0, 1.0)
            if pa[0] < pb[1] and pb[0] < pa[1]:
                raise recipe_error(where, f"splits.{b}", f"overlaps splits.{a} (same file {sa.path}; give non-overlapping portions)")

    # fields and templates
    fields = data["fields"]
    if isinstance(fields, str):
        fields = [fields]
    if not isinstance(fields, list) or not fields or not all(isinstance(x, str) and _IDENT.match(x) for x in fields):
        raise recipe_error(where, "fields", f"must be a list of field names, got {data['fields']!r}")
    if len(set(fields)) != len(fields):
        raise recipe_error(where, "fields", "lists a field twice")
    if reader.fields is not None:
        for x in fields:
            if x not in reader.fields:
                raise recipe_error(where, "fields", f"reader {reader_name!r} has no field {x!r} (it has: {', '.join(reader.fields)})")
    templates = {}
    for k in ("soft_template", "hard_prompt"):
        try:
            templates[k] = _parse(text(k))
        except TemplateError as e:
            raise recipe_error(where, k, str(e)) from None
        if k == "soft_template" and not templates[k].n_virtual:
            raise recipe_error(where, k, "has no soft span; write one like [soft:N] (N is filled in)")
        if k == "hard_prompt" and templates[k].n_virtual:
            raise recipe_error(where, k, "must not contain soft spans ([soft...]); it is the hand-written zero-shot prompt")
    for k, tpl in templates.items():
        used = tpl.fields
        if not used:
            raise recipe_error(where, k, f"uses no field; put one of {{{'}, {'.join(fields)}}} in it")
        for u in used:
            if u not in fields:
                raise recipe_error(where, k, f"uses {{{u}}} which is not in fields ({', '.join(fields)})")

    # labels and metric
    labels = data.get("labels")
    if reader.kind == "classification":
        if labels is None:
            raise recipe_error(where, "labels", f"missing: reader {reader_name!r} yields class labels, map each raw label to a label word")
        if not isinstance(labels, dict) or not labels:
            raise recipe_error(where, "labels", "must be a mapping from raw label to label word")
        norm: dict[str, str] = {}
        for k, v in labels.items():
            try:
                key = _label_key(k)
            except TypeError:
                raise recipe_error(where, "labels", f"raw label {k!r} must be a string or number") from None
            if not isinstance(v, str) or not v.strip() or "\n" in v or v != v.strip():
                hint = " (quote yes/no/true/false/on/off in YAML)" if isinstance(v, bool) else ""
                raise recipe_error(where, f"labels.{key}", f"label word must be a non-empty one-line string without outer spaces, got {v!r}{hint}")
            if key in norm:
                raise recipe_error(where, f"labels.{key}", "raw label given twice")
            norm[key] = v
        labels = norm
    elif labels is not None:
        raise recipe_error(where, "labels", f"reader {reader_name!r} is a generation task; remove labels")
    metric = text("metric").strip()
    if metric not in METRICS:
        raise recipe_error(where, "metric", f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    allowed = CLASSIFICATION_METRICS if labels is not None else GENERATION_METRICS
    if metric not in allowed:
        kind = "classification" if labels is not None else "generation"
        raise recipe_error(where, "metric", f"{metric!r} does not fit a {kind} task (use {', '.join(allowed)})")

    soft_tokens = integer("soft_tokens", DEFAULT_SOFT_TOKENS, 1)
    few_shot_k = integer("few_shot_k", 4, 0)
    split_seed = integer("split_seed", 0, 0)
    chat = data.get("chat", True)
    if not isinstance(chat, bool):
        raise recipe_error(where, "chat", f"must be true or false, got {chat!r}")
    return TaskRecipe(name=name, reader=reader_name, splits=splits, fields=tuple(fields),
                      soft_template=data["soft_template"], hard_prompt=data["hard_prompt"], metric=metric, description=description.strip(),
                      labels=labels,
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
