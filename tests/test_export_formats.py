"""softprompt export --format vllm / trtllm: the soft rows and the template parts a client needs.
The parts rebuild exactly the ids our own format gives, for every input-level kind."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from serve_helpers import _cli

from softprompt.artifact import load_artifact
from softprompt.data.examples import Example
from softprompt.errors import SoftPromptError
from softprompt.export_formats import export_trtllm, export_vllm, ids_from_parts

TEXTS = ["hello there", "a much longer input text, with punctuation!", "x"]


@pytest.mark.parametrize("name", ["trained", "pt", "pt-plain", "hybrid", "ptune"])
def test_vllm_export_rebuilds_our_ids_and_rows(base, prompts_dir, tmp_path, name):
    art = load_artifact(prompts_dir / name, base=base)
    export_vllm(art, base, tmp_path)
    spec = json.loads((tmp_path / "vllm_prompt.json").read_text())
    fmt = art.prompt_format(base)
    for text in TEXTS:
        assert ids_from_parts(spec, base.tokenizer, {"input": text}) == fmt.prompt_ids(Example({"input": text})), text
    rows = torch.load(tmp_path / "soft_rows.pt", weights_only=True)
    assert torch.equal(rows, art.prompt.vectors().float())
    assert spec["n_virtual"] == rows.shape[0] and spec["base_model"] == base.fingerprint


def test_trtllm_export_table_and_virtual_ids(base, prompts_dir, tmp_path):
    art = load_artifact(prompts_dir / "hybrid", base=base)
    export_trtllm(art, base, tmp_path, "hybrid")
    table = np.load(tmp_path / "prompt_table.npy")
    spec = json.loads((tmp_path / "trtllm_prompt.json").read_text())
    assert table.shape == (1, art.prompt.n_virtual, base.hidden_size) and table.dtype == np.float16
    assert json.loads((tmp_path / "task_ids.json").read_text()) == {"hybrid": 0}
    vocab = spec["vocab_size"]
    ids = ids_from_parts(spec, base.tokenizer, {"input": "hi"}, soft_id=lambda k: vocab + k)
    ours = art.prompt_format(base).prompt_ids(Example({"input": "hi"}))
    assert ids == [vocab - t - 1 if t < 0 else t for t in ours]  # marker -(k+1) -> vocab + k


def test_prefix_tuning_export_refused(base, prompts_dir, tmp_path):
    art = load_artifact(prompts_dir / "prefix", base=base)
    with pytest.raises(SoftPromptError, match="softprompt convert .* --to prompt-tuning"):
        export_vllm(art, base, tmp_path)


def test_export_cli(tiny_dir, prompts_dir, tmp_path):
    r = _cli("export", str(prompts_dir / "pt"), "--format", "vllm", "--out", str(tmp_path / "v"), "--model", str(tiny_dir))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "v" / "soft_rows.pt").exists() and (tmp_path / "v" / "vllm_prompt.json").exists()
    r = _cli("export", str(prompts_dir / "prefix"), "--format", "trtllm", "--out", str(tmp_path / "t"), "--model", str(tiny_dir))
    assert r.returncode == 2 and "softprompt convert" in r.stderr and len(r.stderr.strip().splitlines()) == 1
