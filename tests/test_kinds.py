"""Every kind of soft prompt behind the one interface: training, save/load, generation, bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from softprompt.artifact import load_artifact
from softprompt.data.examples import Example
from softprompt.encoding import collate
from softprompt.generate import SamplingParams, generate_ids
from softprompt.hf_cache import cache_kw, cache_of, kv_name
from softprompt.prompts import PrefixTuning, PTuning
from softprompt.train import TrainConfig, Trainer

DATA = [Example({"input": t}, y) for t, y in [("good movie", "positive"), ("bad film", "negative"),
                                              ("great acting", "positive"), ("awful plot", "negative")]] * 3

KINDS = [
    ("prompt-tuning", {}, None),
    ("prefix", {}, None),
    ("prefix", {"reparam": True, "reparam_hidden": 16}, None),
    ("p-tuning", {}, None),
    ("p-tuning", {"encoder": "mlp"}, None),
    ("prompt-tuning", {}, '[soft:3 "Classify the sentiment:"] Review: {input} Sentiment:[soft:2]'),
    ("p-tuning", {}, "[soft:2 name=task] {input} [soft:1] [soft name=task]"),
]
IDS = ["prompt-tuning", "prefix", "prefix-reparam", "p-tuning-lstm", "p-tuning-mlp", "hybrid", "hybrid-shared"]


def _train(tiny, tmp_path, kind, opts, template, steps=25, name="p", save_every=0):
    cfg = TrainConfig(model=tiny.name, kind=kind, tokens=4, template=template, steps=steps, lr=0.05,
                      kind_options=opts, init="vocab", batch_size=4, chat=False, save_every=save_every)
    return Trainer(cfg, DATA, DATA[:4], tmp_path / name, base=tiny, progress=False)


def _logits(model, prompt, fmt, examples):
    batch = collate([fmt.encode(e) for e in examples], fmt.tok.pad_token_id)
    with torch.no_grad():
        out = model(**prompt.model_inputs(model, batch["input_ids"], batch["attention_mask"]), use_cache=False)
    return out.logits, batch["attention_mask"]


@pytest.mark.parametrize("kind,opts,template", KINDS, ids=IDS)
def test_loss_falls_weights_frozen_and_save_load_identical(tiny, tmp_path, kind, opts, template):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    tr = _train(tiny, tmp_path, kind, opts, template)
    res = tr.run()
    assert res.metrics["final_train_loss"] < res.metrics["first_train_loss"] - 0.3
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a base weight changed"
    tr.prompt.eval()
    want, mask = _logits(tiny.model, tr.prompt, tr.fmt, DATA[:4])
    art = load_artifact(res.out, base=tiny)
    assert art.kind == kind and art.meta["kind_config"] == tr.prompt.config()
    got, _ = _logits(tiny.model, art.prompt, art.prompt_format(tiny), DATA[:4])
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,opts", [("prefix", {"reparam": True}), ("p-tuning", {})], ids=["prefix-reparam", "p-tuning"])
def test_inference_uses_materialized_tensors_and_resume_keeps_encoder(tiny, tmp_path, kind, opts):
    tr = _train(tiny, tmp_path, kind, opts, None, steps=6)
    res = tr.run()
    art = load_artifact(res.out, base=tiny)
    tensors = art.tensors
    key = "prefix_key_values" if kind == "prefix" else "prompt_embeddings"
    assert key in tensors and any(k.startswith(("reparam.", "encoder_state.")) for k in tensors)
    # inference reads the materialized table, which equals the encoder's output
    inference = art.prompt.key_values() if kind == "prefix" else art.prompt.vectors()
    assert inference is art.prompt.materialized
    art.prompt.train()
    recomputed = art.prompt.key_values() if kind == "prefix" else art.prompt.vectors()
    torch.testing.assert_close(recomputed.detach(), tensors[key], rtol=0, atol=1e-6)
    # the encoder is in the checkpoint: a longer run resumes from it and finishes like a straight run
    straight = _train(tiny, tmp_path, kind, opts, None, steps=10, name="straight").run()
    tr2 = _train(tiny, tmp_path, kind, opts, None, steps=10, name="resumed", save_every=4)
    assert tr2.run(stop_at=5) is None
    assert (tmp_path / "resumed" / "checkpoint" / "state.json").exists()
    resumed = _train(tiny, tmp_path, kind, opts, None, steps=10, name="resumed", save_every=4).run(resume=True)
    assert resumed.metrics["resumed_from"] == [4]  # it did resume, from the step-4 checkpoint
    a, b = load_artifact(straight.out).tensors, load_artifact(resumed.out).tensors
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_prefix_uses_kv_heads_and_leaves_positions(tiny, tmp_path):
    tr = _train(tiny, tmp_path, "prefix", {}, None, steps=1)
    p = tr.prompt
    cfg = tiny.model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # the fixture is GQA
    assert p.key_values().shape == (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 4,
                                    cfg.hidden_size // cfg.num_attention_heads)
    batch = collate([tr.fmt.encode(e) for e in DATA[:2]], tr.fmt.tok.pad_token_id)
    inp = p.model_inputs(tiny.model, batch["input_ids"], batch["attention_mask"])
    assert inp["attention_mask"].shape[1] == batch["input_ids"].shape[1] + 4
    assert inp["position_ids"][0, 0].item() == 4
    assert inp[kv_name()].get_seq_length() == 4


def test_prefix_initialized_from_token_activations(tiny):
    """Without reparameterization a prefix starts as the model's own keys/values for the init tokens,
    so a prefix made from a text's embeddings behaves like that text placed before the input."""
    ids = tiny.tokenizer("Sentiment of the review", add_special_tokens=False).input_ids
    table = tiny.embedding.weight[ids].detach()
    p = PrefixTuning.create(len(ids), tiny, table)
    text = tiny.tokenizer(" good movie", add_special_tokens=False).input_ids
    x = torch.tensor([text])
    with torch.no_grad():
        want = tiny.model(input_ids=torch.tensor([ids + text])).logits[0, len(ids):]
        got = tiny.model(**p.model_inputs(tiny.model, x, torch.ones_like(x))).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_p_tuning_starts_at_its_initialization(tiny):
    table = torch.randn(5, tiny.hidden_size)
    for enc in ("lstm", "mlp"):
        p = PTuning.create(5, tiny, table, {"encoder": enc})
        torch.testing.assert_close(p.vectors().detach(), table, rtol=0, atol=0)
        assert p.num_trainable() > table.numel()  # the encoder is trained too


@pytest.mark.parametrize("kind,opts", [("prefix", {}), ("p-tuning", {})], ids=["prefix", "p-tuning"])
def test_generate_equals_manual_forward(tiny, tmp_path, kind, opts):
    tr = _train(tiny, tmp_path, kind, opts, None, steps=3)
    prompt = tr.prompt.eval()
    enc = [tr.fmt.encode(e, with_target=False) for e in DATA[:3]]
    batch = collate(enc, tr.fmt.tok.pad_token_id, left=True)
    got = generate_ids(tiny.model, prompt, batch, SamplingParams(max_new_tokens=6), eos_ids=[])
    for row, e in zip(got, enc):  # recompute each row alone, without a cache, token by token
        ids = list(e.ids)
        for tok in row:
            x = torch.tensor([ids])
            with torch.no_grad():
                inputs = prompt.model_inputs(tiny.model, x, torch.ones_like(x))
                logits = tiny.model(**inputs, use_cache=False).logits[0, -1]
            assert int(logits.argmax()) == tok
            ids.append(tok)


def test_prefix_with_cache_equals_generation_with_manual_cache(tiny, tmp_path):
    """generate's prefill + one cached step equals a forward given the same DynamicCache by hand."""
    tr = _train(tiny, tmp_path, "prefix", {}, None, steps=2)
    p = tr.prompt.eval()
    x = torch.tensor([tr.fmt.encode(DATA[0], with_target=False).ids])
    got = generate_ids(tiny.model, p, {"input_ids": x, "attention_mask": torch.ones_like(x)},
                       SamplingParams(max_new_tokens=2), eos_ids=[])[0]
    cache = p.cache(tiny.model, 1)
    n, L = p.n_virtual, x.shape[1]
    with torch.no_grad():
        out = tiny.model(input_ids=x, attention_mask=torch.ones(1, n + L, dtype=torch.long),
                         position_ids=torch.arange(n, n + L).unsqueeze(0), **cache_kw(cache), use_cache=True)
        t1 = int(out.logits[0, -1].argmax())
        out2 = tiny.model(input_ids=torch.tensor([[t1]]), attention_mask=torch.ones(1, n + L + 1, dtype=torch.long),
                          position_ids=torch.tensor([[n + L]]), **cache_kw(cache_of(out)), use_cache=True)
    assert got == [t1, int(out2.logits[0, -1].argmax())]


def test_prefix_refuses_unsupported_cache_layout(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from softprompt.base_model import load_base
    from softprompt.errors import SoftPromptError

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=16, max_position_embeddings=128)
    MistralForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    base = load_base(str(tmp_path / "m"), device="cpu")
    with pytest.raises(SoftPromptError, match="not supported for model type 'mistral'.*Sliding"):
        PrefixTuning.create(2, base, torch.zeros(2, 32))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "softprompt", *args], capture_output=True, text=True)


def test_cli_kinds_and_bad_templates(tiny_dir, sentiment_files, tmp_path):
    train, dev = sentiment_files
    common = ["train", "--model", str(tiny_dir), "--data", str(train), "--steps", "2", "--quiet", "--no-chat"]
    r = _cli(*common, "--kind", "prefix", "--tokens", "3", "--out", str(tmp_path / "pre"))
    assert r.returncode == 0, r.stderr
    out = _cli("generate", str(tmp_path / "pre"), "a fine day", "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr
    r = _cli(*common, "--kind", "p-tuning", "--option", "encoder=mlp", "--template", "[soft:2] Review: {input} Sentiment:[soft:1]",
             "--out", str(tmp_path / "pt"))
    assert r.returncode == 0, r.stderr
    import json

    meta = json.loads((tmp_path / "pt" / "prompt.json").read_text())
    assert meta["kind"] == "p-tuning" and meta["kind_config"]["encoder"] == "mlp"
    assert meta["template"] == "[soft:2] Review: {input} Sentiment:[soft:1]"
    bad = {
        "--template=[soft:4 {input}": "position",
        "--template=[soft:0] {input}": "soft",
        "--template=[soft:2] {nope}": "nope",
        "--template=Review: {input}": "no soft span",
    }
    for flag, words in bad.items():
        r = _cli(*common, flag, "--out", str(tmp_path / "bad"))
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (flag, r.stderr)
    r = _cli(*common, "--kind", "prefix", "--template", "[soft:2] {input}", "--out", str(tmp_path / "bad2"))
    assert r.returncode == 2 and "without [soft] spans" in r.stderr
    r = _cli(*common, "--kind", "p-tuning", "--option", "encoder=gru", "--out", str(tmp_path / "bad3"))
    assert r.returncode == 2 and "gru" in r.stderr and "Traceback" not in r.stderr
