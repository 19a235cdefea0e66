"""The on-disk artifact: safetensors + prompt.json; save then load gives identical logits for every
kind; the base-model fingerprint is enforced; broken or foreign files are refused with their path."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from softprompt.artifact import META, TENSORS, build_meta, load_artifact, read_meta, save_artifact
from softprompt.encoding import PromptFormat, collate
from softprompt.errors import ArtifactError, SoftPromptError
from softprompt.objectives import model_inputs
from softprompt.prompts import KINDS, kind_class
from softprompt.template import parse_template

TEMPLATE = "[soft:4] {input}"


def _prompt(base, kind: str):
    torch.manual_seed(0)
    init = torch.randn(4, base.hidden_size) * 0.02
    p = kind_class(kind).create(4, base, init, {})
    with torch.no_grad():  # move every tensor off its initial value, so a load that ignores the file shows
        for t in p.parameters():
            t.add_(torch.randn_like(t) * 0.01)
    return p.eval()


def _logits(base, prompt, template: str = TEMPLATE):
    fmt = PromptFormat(base.tokenizer, parse_template(template), chat=False)
    from softprompt.data.examples import Example

    batch = collate([fmt.encode(Example({"input": t}, None), with_target=False) for t in ("hello there", "a longer input text")],
                    base.tokenizer.pad_token_id)
    with torch.no_grad():
        return base.model(**model_inputs(base.model, prompt, batch)).logits


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_save_then_load_gives_identical_logits(tiny, tmp_path, kind):
    prompt = _prompt(tiny, kind)
    template = TEMPLATE if prompt.input_level else "{input}"
    out = save_artifact(tmp_path / kind, prompt, build_meta(prompt, template, tiny))
    art = load_artifact(out, base=tiny)
    assert art.kind == kind and art.prompt.n_virtual == 4 and art.template.to_string() == template
    assert torch.equal(_logits(tiny, prompt, template), _logits(tiny, art.prompt, template))
    assert not art.prompt.training and not any(t.requires_grad for t in art.prompt.parameters())


def test_files_are_safetensors_and_json_with_the_fingerprint(tiny, tmp_path):
    prompt = _prompt(tiny, "prompt-tuning")
    out = save_artifact(tmp_path / "p", prompt, build_meta(prompt, TEMPLATE, tiny, init="vocab"))
    with safe_open(str(out / TENSORS), "pt") as f:  # a safetensors file, no pickle
        assert f.metadata() == {"kind": "prompt-tuning", "format": "softprompt"}
        assert set(f.keys()) == set(prompt.export_tensors())
    meta = json.loads((out / META).read_text())
    assert meta["kind"] == "prompt-tuning" and meta["n_virtual"] == 4 and meta["hidden_size"] == tiny.hidden_size
    assert meta["base_model"] == tiny.fingerprint and meta["init"] == "vocab"
    assert sorted(p.name for p in out.iterdir()) == [META, TENSORS]  # no temp files left behind


def test_another_base_model_is_refused(tiny, tmp_path, other_tiny_dir):
    from softprompt.base_model import load_base

    prompt = _prompt(tiny, "prompt-tuning")
    out = save_artifact(tmp_path / "p", prompt, build_meta(prompt, TEMPLATE, tiny))
    other = load_base(str(other_tiny_dir), device="cpu")
    with pytest.raises(SoftPromptError, match="embedding"):
        load_artifact(out, base=other)
    load_artifact(out)  # without a base to check against, it loads


@pytest.mark.parametrize("damage,message", [
    ("no-dir", "does not exist"),
    ("no-meta", "no prompt.json"),
    ("bad-json", "corrupt metadata"),
    ("missing-field", "missing field 'template'"),
    ("newer-format", "newer than this softprompt supports"),
    ("no-tensors", "missing prompt.safetensors"),
    ("truncated", "corrupt tensor file"),
    ("wrong-shape", "tensors do not match prompt.json"),
])
def test_broken_artifacts_are_refused_with_their_path(tiny, tmp_path, damage, message):
    prompt = _prompt(tiny, "prompt-tuning")
    out = save_artifact(tmp_path / "p", prompt, build_meta(prompt, TEMPLATE, tiny))
    meta = json.loads((out / META).read_text())
    if damage == "no-dir":
        out = tmp_path / "nowhere"
    elif damage == "no-meta":
        (out / META).unlink()
    elif damage == "bad-json":
        (out / META).write_text("{not json")
    elif damage == "missing-field":
        (out / META).write_text(json.dumps({k: v for k, v in meta.items() if k != "template"}))
    elif damage == "newer-format":
        (out / META).write_text(json.dumps({**meta, "format_version": 99}))
    elif damage == "no-tensors":
        (out / TENSORS).unlink()
    elif damage == "truncated":
        data = (out / TENSORS).read_bytes()
        (out / TENSORS).write_bytes(data[: len(data) // 2])
    elif damage == "wrong-shape":
        (out / META).write_text(json.dumps({**meta, "hidden_size": tiny.hidden_size * 2}))
    with pytest.raises(ArtifactError, match=message) as e:
        load_artifact(out, base=tiny)
    assert str(out) in str(e.value)


def test_read_meta_reads_without_tensors(tiny, tmp_path):
    prompt = _prompt(tiny, "p-tuning")
    out = save_artifact(tmp_path / "p", prompt, build_meta(prompt, TEMPLATE, tiny, metrics={"steps": 3}))
    (out / TENSORS).unlink()
    assert read_meta(out)["metrics"] == {"steps": 3}
