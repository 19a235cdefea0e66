"""The peer check: with the same tensors our prompt tuning and prefix tuning give HF PEFT's logits, and
prompts move between the two formats with identical logits."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from strict import need_module

from softprompt.artifact import load_artifact
from softprompt.data.examples import Example
from softprompt.encoding import collate
from softprompt.peft_io import _peft_prefix, export_peft, import_peft
from softprompt.prompts import PrefixTuning, PromptTuning
from softprompt.prompts.prefix import cache_layout
from softprompt.prompts.soft_prompt import marker

peft = need_module("peft")

TEXTS = ["the movie was a delight", "bad", "an average film with a few good scenes"]


def _peft_model(base_dir, config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return peft.get_peft_model(model, config).eval()


def _batch(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


def _check_prompt_tuning(base, base_dir, n=5, seed=0):
    torch.manual_seed(seed)
    table = torch.randn(n, base.hidden_size) * base.embedding.weight.std()
    pm = _peft_model(base_dir, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(table)
    ids, mask = _batch(base.tokenizer, TEXTS)
    ours = PromptTuning(n, base.hidden_size, init=table)
    ours_ids = torch.cat([torch.tensor([[marker(i) for i in range(n)]] * len(TEXTS)), ids], 1)
    ours_mask = torch.cat([torch.ones(len(TEXTS), n, dtype=mask.dtype), mask], 1)
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask).logits
        got = base.model(**ours.model_inputs(base.model, ours_ids, ours_mask)).logits
    keep = ours_mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=1e-5)


def _check_prefix(base, base_dir, n=4, seed=0):
    layers, heads, dim = cache_layout(base.model)
    torch.manual_seed(seed)
    kv = torch.randn(layers, 2, heads, n, dim)
    pm = _peft_model(base_dir, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(_peft_prefix(kv))
    ids, mask = _batch(base.tokenizer, TEXTS)
    ours = PrefixTuning(n, base.hidden_size, layers, heads, dim, init=kv)
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask).logits
        got = base.model(**ours.model_inputs(base.model, ids, mask)).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=1e-5)


def test_prompt_tuning_logits_equal_peft_tiny(tiny, tiny_dir):
    assert tiny.model.config.num_key_value_heads < tiny.model.config.num_attention_heads
    _check_prompt_tuning(tiny, tiny_dir)


def test_prefix_logits_equal_peft_tiny_gqa(tiny, tiny_dir):
    _check_prefix(tiny, tiny_dir)


@pytest.mark.slow
def test_prompt_tuning_and_prefix_logits_equal_peft_smollm2(smollm2, smollm2_dir):
    cfg = smollm2.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    _check_prompt_tuning(smollm2, smollm2_dir, n=8)
    _check_prefix(smollm2, smollm2_dir, n=6)


def _train_peft(base_dir, config, steps=3):
    from transformers import AutoTokenizer

    pm = _peft_model(base_dir, config).train()
    tok = AutoTokenizer.from_pretrained(base_dir)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    ids, mask = _batch(tok, TEXTS)
    for _ in range(steps):
        loss = pm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return pm.eval()


def _our_logits(art, base, texts):
    fmt = art.prompt_format(base)
    batch = collate([fmt.encode(Example({"input": t}), with_target=False) for t in texts], base.tokenizer.pad_token_id)
    with torch.no_grad():
        out = base.model(**art.prompt.model_inputs(base.model, batch["input_ids"], batch["attention_mask"])).logits
    return out, batch["attention_mask"]


@pytest.mark.parametrize("method", ["prompt", "prefix", "p-tuning"])
def test_peft_trained_prompt_imports_with_identical_logits(tiny, tiny_dir, tmp_path, method):
    n = 4
    config = {"prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n),
              "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n),
              "p-tuning": peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)}[method]
    pm = _train_peft(tiny_dir, config)
    pm.save_pretrained(tmp_path / "adapter")
    import_peft(tmp_path / "adapter", tiny, tmp_path / "ours")
    art = load_artifact(tmp_path / "ours", base=tiny)
    assert art.kind == ("prefix" if method == "prefix" else "prompt-tuning")
    for text in TEXTS:  # one row at a time: PEFT's rows are right-padded, ours may differ in length
        ids = tiny.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            want = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -ids.shape[1]:]
        got, _ = _our_logits(art, tiny, [text])
        torch.testing.assert_close(got[0, -ids.shape[1]:], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["prompt-tuning", "prefix", "p-tuning"])
def test_our_prompt_loads_in_peft_with_identical_logits(tiny, tiny_dir, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    from softprompt.train import TrainConfig, Trainer

    template = "{input}" if kind == "prefix" else "[soft:4]{input}"
    cfg = TrainConfig(model=str(tiny_dir), kind=kind, template=template, tokens=4, steps=4, chat=False, lr=0.05)
    data = [Example({"input": t}, "yes") for t in TEXTS]
    res = Trainer(cfg, data, None, tmp_path / "ours", base=tiny, progress=False).run()
    art = load_artifact(res.out, base=tiny)
    export_peft(art, tiny, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("PREFIX_TUNING" if kind == "prefix" else "PROMPT_TUNING")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    for text in TEXTS:
        ids = tiny.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            want = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -ids.shape[1]:]
        got, _ = _our_logits(art, tiny, [text])
        torch.testing.assert_close(got[0, -ids.shape[1]:], want, rtol=0, atol=1e-5)
    # and back: the exported adapter re-imports to the same tensors
    import_peft(tmp_path / "adapter", tiny, tmp_path / "again")
    again = load_artifact(tmp_path / "again", base=tiny)
    a = art.prompt.key_values() if kind == "prefix" else art.prompt.vectors()
    b = again.prompt.key_values() if kind == "prefix" else again.prompt.vectors()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "softprompt", *args], capture_output=True, text=True)


def test_cli_import_export_and_bad_adapters(tiny, tiny_dir, other_tiny_dir, tmp_path):
    pm = _peft_model(tiny_dir, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    pm.save_pretrained(tmp_path / "pt")
    r = _cli("import", str(tmp_path / "pt"), "--model", str(tiny_dir), "--out", str(tmp_path / "imp"))
    assert r.returncode == 0, r.stderr
    r = _cli("export", str(tmp_path / "imp"), "--format", "peft", "--out", str(tmp_path / "exp"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "exp" / "adapter_model.safetensors").exists()
    # another base model: refused, naming the one it was made for
    r = _cli("import", str(tmp_path / "pt"), "--model", str(other_tiny_dir), "--out", str(tmp_path / "x1"))
    assert r.returncode == 2 and "made for base model" in r.stderr and "Traceback" not in r.stderr
    r = _cli("import", str(tmp_path / "exp"), "--model", str(other_tiny_dir), "--out", str(tmp_path / "x1"))
    assert r.returncode == 2 and "embedding_sha256 differs" in r.stderr
    # another method
    lora = _peft_model(tiny_dir, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    r = _cli("import", str(tmp_path / "lora"), "--model", str(tiny_dir), "--out", str(tmp_path / "x2"))
    assert r.returncode == 2 and "peft_type 'LORA'" in r.stderr and "Traceback" not in r.stderr
    # not an adapter at all
    r = _cli("import", str(tmp_path), "--model", str(tiny_dir), "--out", str(tmp_path / "x3"))
    assert r.returncode == 2 and "not a PEFT adapter" in r.stderr
    # a prompt inside the chat template cannot be expressed in PEFT
    cfg_chat = ["train", "--model", str(tiny_dir), "--data", str(_data(tmp_path)), "--steps", "1", "--quiet"]
    assert _cli(*cfg_chat, "--out", str(tmp_path / "chat")).returncode == 0
    r = _cli("export", str(tmp_path / "chat"), "--out", str(tmp_path / "x4"))
    assert r.returncode == 2 and "inside the chat template" in r.stderr


def _data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"input": t, "target": "ok"}) + "\n" for t in TEXTS))
    return p
