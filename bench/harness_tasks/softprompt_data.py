"""Datasets for the lm-eval task YAMLs beside this file, read from disk with softprompt's own task
recipes and readers (lm-eval's own tasks download from a hub). The data directory is, in order: the
task metadata ``data_dir`` (``--metadata '{"data_dir": "..."}'``), ``$SOFTPROMPT_DATA_DIR``, or
``../shared/data`` next to this repository. ``sample``/``sample_seed`` take the same seeded sample of
each evaluation split as ``softprompt eval --limit N --seed S`` does (the training split stays whole).

Importing this module also registers the ``softprompt`` model, so ``lm_eval --model softprompt
--include_path bench/harness_tasks ...`` finds it."""
from __future__ import annotations

import os
from pathlib import Path

import softprompt.harness  # noqa: F401 - registers the softprompt model with lm-eval
from softprompt.data import load_recipe, load_split

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def data_dir(given: str | None = None) -> Path:
    return Path(given or os.environ.get("SOFTPROMPT_DATA_DIR") or DEFAULT_DATA_DIR)


def recipe_dataset(task: str, data_dir_: str | None = None, sample: int | None = None, sample_seed: int = 0):
    """A ``datasets.DatasetDict`` with every split of the recipe ``task``: each doc holds the
    recipe's fields, ``target`` (the label word or reference), and for classification ``choices``
    (the label words) and ``label_index``."""
    from datasets import Dataset, DatasetDict

    recipe = load_recipe(task)
    words = recipe.label_words
    out = {}
    for split in recipe.splits:
        limit = None if split == "train" or sample is None else int(sample)
        docs = []
        for ex in load_split(recipe, data_dir(data_dir_), split, limit=limit, seed=int(sample_seed)):
            doc = {**ex.fields, "target": ex.target or ""}
            if words:
                doc |= {"choices": words, "label_index": words.index(ex.target)}
            docs.append(doc)
        out[split] = Dataset.from_list(docs)
    return DatasetDict(out)


def sst2(data_dir: str | None = None, sample: int | None = None, sample_seed: int = 0, **_unused) -> object:
    """SST-2 (recipe ``sst2``: sst2-sentences/ train, dev, test)."""
    return recipe_dataset("sst2", data_dir, sample, sample_seed)
