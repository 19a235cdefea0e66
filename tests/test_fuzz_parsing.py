"""Hypothesis on the files an operator or a client hands the server: keys.yaml and prompt.json. Any
content is either accepted (and then means what it says) or refused with a SoftPromptError naming the
problem; no other exception escapes, so a bad file is a one-line error, never a crash. Bounded
example counts, no deadlines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import _save

from softprompt.artifact import TENSORS, load_artifact, read_meta
from softprompt.errors import SoftPromptError
from softprompt.prompts import PromptTuning
from softprompt.serve.auth import Auth, hash_key

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-5, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)
entry_keys = st.sampled_from(["name", "sha256", "prompts", "admin", "max_queued", "max_running", "other"])
entries = st.dictionaries(entry_keys, values | st.just(hash_key("k")) | st.just("*"), max_size=7)


@SETTINGS
@given(doc=values | st.fixed_dictionaries({"keys": st.lists(entries | values, max_size=4)}))
def test_any_keys_file_is_accepted_or_refused_with_a_reason(tmp_path, doc):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        auth = Auth.from_file(path)
    except SoftPromptError as e:
        assert str(e).startswith(f"--keys {path}")
        return
    for digest, t in auth.tenants.items():  # accepted: it says what the file says
        assert len(digest) == 64 and isinstance(t.admin, bool)
        assert t.max_queued is None or (type(t.max_queued) is int and t.max_queued >= 1)
        assert t.max_running is None or (type(t.max_running) is int and t.max_running >= 1)
        assert t.prompts is None or all(isinstance(p, str) for p in t.prompts)


@SETTINGS
@given(names=st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True), min_size=1, max_size=5, unique=True),
       caps=st.tuples(st.none() | st.integers(1, 64), st.none() | st.integers(1, 16)), admin=st.booleans())
def test_a_valid_keys_file_means_what_it_says(tmp_path, names, caps, admin):
    entry = {"name": "t", "sha256": hash_key("sk-1"), "prompts": names, "admin": admin}
    entry.update({k: v for k, v in zip(("max_queued", "max_running"), caps) if v is not None})
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [entry]}))
    t = Auth.from_file(path).tenant("Bearer sk-1")
    assert t.prompts == frozenset(names) and t.admin is admin and (t.max_queued, t.max_running) == caps
    assert Auth.from_file(path).tenant("Bearer sk-2") is None


@pytest.fixture(scope="module")
def good_artifact(base, tmp_path_factory) -> Path:
    return _save(base, tmp_path_factory.mktemp("fuzz") / "good", PromptTuning(3, 32, init=torch.randn(3, 32)), "[soft:3] {input}")


@SETTINGS
@given(doc=values)
def test_any_prompt_json_is_read_or_refused(tmp_path, doc):
    d = tmp_path / "p"
    d.mkdir(exist_ok=True)
    (d / "prompt.json").write_text(json.dumps(doc))
    try:
        meta = read_meta(d)
    except SoftPromptError:
        return
    assert isinstance(meta, dict) and type(meta["n_virtual"]) is int and isinstance(meta["template"], str)


@SETTINGS
@given(field=st.sampled_from(["kind", "n_virtual", "hidden_size", "template", "kind_config", "format_version", "format"]),
       value=values)
def test_a_mutated_prompt_json_beside_good_tensors_loads_or_is_refused(base, good_artifact, tmp_path_factory, field, value):
    """One field of a good prompt.json replaced by anything: the artifact loads (and then its table
    has the shape prompt.json declares) or is refused with a SoftPromptError."""
    d = tmp_path_factory.mktemp("mut")
    meta = json.loads((good_artifact / "prompt.json").read_text())
    meta[field] = value
    (d / "prompt.json").write_text(json.dumps(meta))
    (d / TENSORS).write_bytes((good_artifact / TENSORS).read_bytes())
    try:
        art = load_artifact(d, base=base)
        art.prompt_format(base)
    except SoftPromptError:
        return
    assert tuple(art.prompt.vectors().shape) == (art.meta["n_virtual"], art.meta["hidden_size"])
