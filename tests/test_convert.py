"""softprompt convert: a prefix-tuning prompt distilled into prompt tuning (the prefix-prompted model as
teacher) gets closer to the teacher than the bare model, saves an ordinary input-level artifact that
reloads to the same logits and serves through the vLLM gateway, and bad input is one line, exit 2."""
from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import SENTIMENT, write_jsonl
from serve_helpers import LiveServer, _cli, _err, http, reference

from softprompt.artifact import load_artifact
from softprompt.compress.convert import ConvertConfig, convert_prompt
from softprompt.data.examples import Example
from softprompt.encoding import collate
from softprompt.generate import SamplingParams, generate
from softprompt.objectives import model_inputs

WORDS = ["good", "bad", "movie", "film", "great", "awful", "plot", "actors", "boring", "fun", "long", "sad"]


def _inputs(n: int) -> list[str]:
    return [" ".join(c) for c in itertools.islice(itertools.permutations(WORDS, 3), 0, 7 * n, 7)][:n]


@pytest.fixture(scope="module")
def prefix_dir(base, tmp_path_factory):
    """A prefix prompt trained on the tiny model (its data recorded in prompt.json)."""
    from softprompt.data.readers import read_examples
    from softprompt.train import TrainConfig, Trainer

    tmp = tmp_path_factory.mktemp("prefix")
    rows = [{"input": t, "target": y} for t, y in SENTIMENT]
    data = read_examples(write_jsonl(tmp / "train.jsonl", rows), ["input"], "target")
    torch.manual_seed(0)
    cfg = TrainConfig(model=base.name, kind="prefix", tokens=4, steps=30, lr=0.3, init="vocab", batch_size=4)
    return Trainer(cfg, data, None, tmp / "prefix", base=base, progress=False).run().out


@pytest.fixture(scope="module")
def converted(base, prefix_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "pt"
    examples = [Example({"input": t}) for t in _inputs(72)]
    cfg = ConvertConfig(steps=80, max_new_tokens=8, n_heldout=12, lr=0.1, patience=0)
    return convert_prompt(prefix_dir, out, cfg, examples, base=base, progress=False)


def test_conversion_lowers_kl_below_the_bare_model(converted):
    fid = converted.report["fidelity"]
    assert fid["converted"]["kl_per_token"] < 0.7 * fid["no_prompt"]["kl_per_token"], fid
    assert converted.report["queries"] == {"origin": "given", "train": 54, "dev": 6, "heldout": 12}
    assert converted.report["train"]["curve"]  # the dev KL was measured (early stopping's signal)
    saved = json.loads((converted.out / "convert_report.json").read_text())
    assert saved["fidelity"] == fid and (converted.out / "convert_report.md").read_text().startswith("# prefix -> prompt-tuning")


def test_output_is_an_input_level_artifact_whose_reload_gives_the_same_logits(base, converted, prefix_dir):
    art = load_artifact(converted.out, base=base)
    assert art.kind == "prompt-tuning" and art.prompt.input_level and art.template.to_string() == "[soft:4] {input}"
    assert art.meta["converted_from"]["kind"] == "prefix" and art.meta["labels"] == ["negative", "positive"]
    assert torch.equal(art.prompt.vectors(), converted.prompt.vectors().cpu())
    fmt = art.prompt_format(base)
    items = [fmt.encode(Example({"input": t}), with_target=False) for t in ["good movie", "sad long plot"]]
    batch = collate(items, base.tokenizer.pad_token_id, left=True)
    with torch.no_grad():
        a = base.model(**model_inputs(base.model, converted.prompt, batch)).logits
        b = base.model(**model_inputs(base.model, art.prompt, batch)).logits
    assert torch.equal(a, b)
    params = SamplingParams(max_new_tokens=6)
    assert generate(base, converted.prompt, fmt, ["good movie"], params) == generate(base, art.prompt, fmt, ["good movie"], params)


def test_report_has_task_accuracy_from_recorded_labels(base, prefix_dir, tmp_path):
    """Without --queries the recorded training data is used, and its targets give accuracy before/after."""
    res = convert_prompt(prefix_dir, tmp_path / "pt", ConvertConfig(steps=10, max_new_tokens=4), base=base, progress=False)
    task = res.report["task"]
    assert res.report["queries"]["origin"] == "recorded"
    assert task["metric"] == "accuracy" and task["n"] == res.report["queries"]["heldout"]
    assert {"before", "after", "no_prompt"} <= set(task)


def test_prompt_is_saved_before_the_report(base, prefix_dir, tmp_path, monkeypatch):
    """A failure while the report is made never loses the trained prompt."""
    from softprompt.compress.convert import Converter

    def broken(self, held):
        raise RuntimeError("report failed")

    monkeypatch.setattr(Converter, "evaluate", broken)
    with pytest.raises(RuntimeError, match="report failed"):
        convert_prompt(prefix_dir, tmp_path / "pt", ConvertConfig(steps=5, max_new_tokens=4), base=base, progress=False)
    assert load_artifact(tmp_path / "pt", base=base).kind == "prompt-tuning"
    assert not (tmp_path / "pt" / "convert_report.json").exists()


def test_p_tuning_target(base, prefix_dir, tmp_path):
    cfg = ConvertConfig(to="p-tuning", steps=10, max_new_tokens=4, kind_options={"encoder": "mlp"})
    res = convert_prompt(prefix_dir, tmp_path / "pt", cfg, [Example({"input": t}) for t in _inputs(20)], base=base, progress=False)
    art = load_artifact(res.out, base=base)
    assert art.kind == "p-tuning" and art.prompt.input_level


def test_gateway_refusal_names_the_command_that_makes_it_servable(base, tiny_dir, prompts_dir, tmp_path):
    """The vLLM gateway refuses a prefix prompt naming a convert command; run as given in the prompts
    directory (plus speed flags), it yields NAME-pt, which the gateway hot-loads and serves with our
    engine's output."""
    from vllm_helpers import FakeVLLM

    from softprompt.serve.app import build_vllm_server
    from softprompt.serve.registry import Registry

    root = tmp_path / "prompts"
    root.mkdir()
    shutil.copytree(prompts_dir / "prefix", root / "prefix")
    body = {"model": "prefix", "prompt": "good movie", "max_tokens": 6, "temperature": 0}
    with FakeVLLM(base.model, base.tokenizer, base.eos_ids()) as fake:
        server = build_vllm_server(str(tiny_dir), root, [fake.url], health_interval=0.2, watch_interval=0.2)
        with LiveServer(server) as s:
            err = _err(http.post(s.url + "/v1/completions", json=body, timeout=30), 400)
            command = re.search(r"`(softprompt convert [^`]+)`", err["message"]).group(1)
            assert command == "softprompt convert prefix --to prompt-tuning --out prefix-pt"
            args = command.split()[1:] + ["--model", str(tiny_dir), "--steps", "10", "--max-new-tokens", "6", "--n-queries", "24",
                                          "--n-heldout", "6", "--quiet"]
            r = subprocess.run([sys.executable, "-m", "softprompt", *args], cwd=root, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
            assert "KL per token" in r.stdout and "generated" in r.stdout  # no data recorded: inputs the model wrote
            deadline = time.time() + 20
            while True:
                got = http.post(s.url + "/v1/completions", json={**body, "model": "prefix-pt"}, timeout=30)
                if got.status_code == 200 or time.time() > deadline:
                    break
                time.sleep(0.2)
            assert got.status_code == 200, got.text
    registry = Registry(base, root)
    registry.scan()
    assert got.json()["choices"][0]["text"] == reference(base, registry, "prefix-pt", "good movie", SamplingParams(max_new_tokens=6))


def test_bad_input_is_one_line_exit_2(tiny_dir, prompts_dir, tmp_path):
    cases = [
        ([str(prompts_dir / "pt"), "--to", "prompt-tuning"], "already input-level"),
        ([str(prompts_dir / "prefix"), "--to", "lora"], "--to 'lora': expected one of prompt-tuning, p-tuning"),
        ([str(tmp_path / "missing"), "--to", "prompt-tuning"], "does not exist"),
        ([str(prompts_dir / "prefix"), "--to", "prompt-tuning", "--queries", str(tmp_path / "none.txt")], "none.txt"),
    ]
    for args, want in cases:
        r = _cli("convert", *args, "--out", str(tmp_path / "out"), "--model", str(tiny_dir))
        assert r.returncode == 2 and want in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_instruction_prefix_converts(smollm2, tmp_path):
    """On SmolLM2: a prefix holding the model's own keys/values for an instruction (what the model
    computes reading it) converts into 8 soft rows that are closer to it than the bare model."""
    from softprompt.artifact import build_meta, save_artifact
    from softprompt.prompts import PrefixTuning

    tok = smollm2.tokenizer
    ids = tok("Answer every message with exactly one word in French.", add_special_tokens=False).input_ids
    prefix = PrefixTuning.create(len(ids), smollm2, smollm2.embedding.weight[ids].detach())
    prefix.eval()
    save_artifact(tmp_path / "prefix", prefix, build_meta(prefix, "{input}", smollm2, format={"chat": True, "system": None}))
    examples = [Example({"input": f"Tell me about {t}."}) for t in
                ["the sea", "cats", "winter", "bread", "music", "the moon", "trains", "coffee", "rain", "books", "football",
                 "the city", "flowers", "summer", "a dog", "the night", "apples", "the river", "snow", "a friend",
                 "mountains", "the kitchen", "birds", "the sun", "a school", "cheese", "the forest", "a car", "the wind", "tea",
                 "the garden", "a song", "the beach", "a horse", "the stars", "chocolate"]]
    cfg = ConvertConfig(tokens=8, init="text:Answer with one word in French.", steps=40, max_new_tokens=8, n_heldout=6, lr=0.05,
                        batch_size=6, patience=0)
    res = convert_prompt(tmp_path / "prefix", tmp_path / "pt", cfg, examples, base=smollm2, progress=False)
    fid = res.report["fidelity"]
    assert fid["converted"]["kl_per_token"] < fid["no_prompt"]["kl_per_token"], fid
    assert load_artifact(res.out, base=smollm2).kind == "prompt-tuning"
