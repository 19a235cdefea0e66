"""Data: the :class:`Example`, reading data files, the public-dataset readers, task recipes, their
splits, and queries.

Modules: :mod:`.examples` (``Example``), :mod:`.readers` (text and JSON Lines reading; JSONL/CSV/TSV
rows and examples), :mod:`.datasets` (the public-dataset readers, ``READERS``), :mod:`.recipes` (recipe
YAML loading and validation; the shipped recipes are ``softprompt/recipes/*.yaml``), :mod:`.splits`
(``load_split``), :mod:`.queries` (``Query``, ``read_queries``).
"""
from softprompt.data.datasets import READERS, Reader, register_reader
from softprompt.data.examples import Example
from softprompt.data.queries import Query, read_queries
from softprompt.data.readers import read_examples, read_records
from softprompt.data.recipes import TaskRecipe, list_recipes, load_recipe, recipe_from_dict
from softprompt.data.splits import load_split

__all__ = ["Example", "Query", "READERS", "Reader", "TaskRecipe", "list_recipes", "load_recipe", "load_split",
           "read_examples", "read_queries", "read_records", "recipe_from_dict", "register_reader"]
