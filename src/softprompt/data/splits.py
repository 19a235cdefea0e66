"""The examples of a recipe's split: read by the recipe's reader, optionally one per distinct input,
carved out of a seeded shuffle, mapped to label words and sampled (see :mod:`softprompt.data.recipes`)."""
from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

from softprompt.data.datasets import DATA_DIR_HINT, READERS
from softprompt.data.examples import Example
from softprompt.data.recipes import TaskRecipe, recipe_error
from softprompt.errors import DataError, SoftPromptError


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
        raise recipe_error(recipe.where, "splits", f"no {split!r} split (has: {', '.join(recipe.splits)})")
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
                raise recipe_error(recipe.where, "labels", f"no label word for raw label {raw!r} seen at {ex.where} "
                                                   f"(mapped: {', '.join(recipe.labels)})")
            ex = replace(ex, target=recipe.labels[raw])
        out.append(ex)
    if not out:
        raise recipe_error(recipe.where, f"splits.{split}", f"selects no examples from {data_dir / spec.path}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise SoftPromptError(f"limit must be a positive integer, got {limit!r}")
        if limit < len(out):
            out = random.Random(seed).sample(out, limit)
    return out
