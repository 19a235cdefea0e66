"""The foundation: the loss falls, the base stays frozen, artifacts round-trip, resume is exact."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from softprompt.artifact import load_artifact
from softprompt.base_model import load_base
from softprompt.data.examples import Example
from softprompt.data.readers import read_examples
from softprompt.encoding import IGNORE, Encoded, PromptFormat, collate
from softprompt.errors import SoftPromptError
from softprompt.template import parse_template
from softprompt.train import TrainConfig, Trainer, train


def cfg_for(tiny_dir, **kw) -> TrainConfig:
    base = dict(model=str(tiny_dir), tokens=4, steps=20, batch_size=4, lr=0.1, init="random", seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_and_base_is_frozen(tiny, tiny_dir, sentiment_files, tmp_path):
    train_f, dev_f = sentiment_files
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    res = train(cfg_for(tiny_dir, steps=30), read_examples(train_f), read_examples(dev_f), tmp_path / "p",
                base=tiny, progress=False)
    losses = [float(x["loss"]) for x in map(eval_json, (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()) if x["type"] == "train"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5, losses
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a base weight changed"
    assert all(not p.requires_grad for p in tiny.model.parameters())
    assert (tmp_path / "p" / "loss.png").stat().st_size > 1000
    assert res.best is not None and "dev_loss" in res.best


def eval_json(line: str) -> dict:
    import json

    return json.loads(line)


def test_only_prompt_gets_gradients(tiny, tiny_dir, sentiment_files, tmp_path):
    t = Trainer(cfg_for(tiny_dir, steps=1), read_examples(sentiment_files[0]), out=tmp_path / "p", base=tiny, progress=False)
    t.train_step()
    assert all(p.grad is None for p in tiny.model.parameters())


def test_save_load_identical_logits(tiny, tiny_dir, sentiment_files, tmp_path):
    train(cfg_for(tiny_dir, steps=5), read_examples(sentiment_files[0]), None, tmp_path / "p", base=tiny, progress=False)
    t = Trainer(cfg_for(tiny_dir, steps=5), read_examples(sentiment_files[0]), out=tmp_path / "q", base=tiny, progress=False)
    art = load_artifact(tmp_path / "p", base=tiny)
    fmt = art.prompt_format(tiny)
    batch = collate([fmt.encode(Example({"input": "good stuff"}), with_target=False)], tiny.tokenizer.pad_token_id)
    # the trainer's in-memory prompt after the same 5 steps gives the same logits as the saved one
    for _ in range(5):
        t.train_step()
    with torch.no_grad():
        a = tiny.model(**art.prompt.model_inputs(tiny.model, batch["input_ids"], batch["attention_mask"])).logits
        b = tiny.model(**t.prompt.model_inputs(tiny.model, batch["input_ids"], batch["attention_mask"])).logits
    assert torch.equal(a, b)
    assert art.meta["base_model"]["embedding_sha256"] == tiny.fingerprint["embedding_sha256"]


def test_wrong_base_model_refused(tiny, tiny_dir, other_tiny_dir, sentiment_files, tmp_path):
    train(cfg_for(tiny_dir, steps=2), read_examples(sentiment_files[0]), None, tmp_path / "p", base=tiny, progress=False)
    other = load_base(str(other_tiny_dir), device="cpu")
    with pytest.raises(SoftPromptError, match="embedding_sha256 differs"):
        load_artifact(tmp_path / "p", base=other)


def test_padded_batch_equals_single_rows(tiny, tiny_dir, sentiment_files, tmp_path):
    """Left padding (generation) and right padding (training) give each row the logits it has alone."""
    train(cfg_for(tiny_dir, steps=3), read_examples(sentiment_files[0]), None, tmp_path / "p", base=tiny, progress=False)
    art = load_artifact(tmp_path / "p", base=tiny)
    fmt = art.prompt_format(tiny)
    texts = ["short", "a much longer input sentence with many more words in it", "medium length one"]
    enc = [fmt.encode(Example({"input": t}), with_target=False) for t in texts]
    for left in (False, True):
        batch = collate(enc, tiny.tokenizer.pad_token_id, left=left)
        with torch.no_grad():
            out = tiny.model(**art.prompt.model_inputs(tiny.model, batch["input_ids"], batch["attention_mask"])).logits
        for i, e in enumerate(enc):
            single = collate([e], tiny.tokenizer.pad_token_id)
            with torch.no_grad():
                ref = tiny.model(**art.prompt.model_inputs(tiny.model, single["input_ids"], single["attention_mask"])).logits[0]
            mask = batch["attention_mask"][i].bool()
            torch.testing.assert_close(out[i][mask], ref, atol=1e-5, rtol=1e-5)
        # soft markers sit right before the text, never separated by padding
        for i in range(len(enc)):
            row = batch["input_ids"][i][batch["attention_mask"][i].bool()]
            assert row.tolist() == enc[i].ids


def _lines(path) -> list[str]:
    return (path / "metrics.jsonl").read_text().splitlines()


def test_resume_is_exact(tiny, tiny_dir, sentiment_files, tmp_path):
    """A run cut after step 8 resumes from its step-6 checkpoint: the log lines up to step 6 survive
    byte for byte, a resume record names step 6 (and prompt.json's metrics too), and the run ends with
    the uninterrupted run's prompt, best evaluation and log."""
    data = read_examples(sentiment_files[0])
    dev = data[:4]
    cfg = lambda: cfg_for(tiny_dir, steps=12, save_every=4, eval_every=3, grad_accum=2)  # noqa: E731
    full = train(cfg(), data, dev, tmp_path / "full", base=tiny, progress=False)
    assert Trainer(cfg(), data, dev, tmp_path / "cut", base=tiny, progress=False).run(stop_at=7) is None
    before = _lines(tmp_path / "cut")
    ck_step = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"]
    assert ck_step == 6 and any(json.loads(ln).get("step") == 7 for ln in before)  # a line past the checkpoint
    resumed = train(cfg(), data, dev, tmp_path / "cut", resume=True, base=tiny, progress=False)
    a = load_artifact(full.out).prompt.export_tensors()
    b = load_artifact(resumed.out).prompt.export_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.best == resumed.best
    after = _lines(resumed.out)
    kept = [ln for ln in before if json.loads(ln)["step"] <= ck_step]
    assert after[:len(kept)] == kept  # the pre-kill lines, unchanged
    assert json.loads(after[len(kept)]) == {"type": "resume", "step": ck_step}
    assert resumed.metrics["resumed_from"] == [ck_step]
    assert load_artifact(resumed.out).meta["metrics"]["resumed_from"] == [ck_step]
    assert "resumed_from" not in load_artifact(full.out).meta["metrics"]
    strip = lambda lines: [{k: v for k, v in eval_json(x).items() if k != "time_s"} for x in lines  # noqa: E731
                           if eval_json(x).get("type") != "resume"]
    assert strip(_lines(full.out)) == strip(after)


def test_resume_without_a_checkpoint_is_an_error(tiny, tiny_dir, sentiment_files, tmp_path):
    data = read_examples(sentiment_files[0])
    with pytest.raises(SoftPromptError, match="no checkpoint"):
        Trainer(cfg_for(tiny_dir, steps=2), data, None, tmp_path / "none", base=tiny, progress=False).run(resume=True)
    assert not (tmp_path / "none" / "prompt.json").exists()
    res = subprocess.run([sys.executable, "-m", "softprompt.cli", "train", "--model", str(tiny_dir), "--data",
                          str(sentiment_files[0]), "--steps", "2", "--out", str(tmp_path / "none"), "--resume"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "no checkpoint" in res.stderr, res.stderr
    assert not (tmp_path / "none" / "prompt.json").exists()


def test_resume_after_sigkill_cli(tiny_dir, sentiment_files, tmp_path):
    """A CLI run killed with SIGKILL mid-training, then resumed, ends with the uninterrupted prompt;
    the log lines up to the checkpoint survive unchanged and the resumed step is recorded."""
    train_f, _ = sentiment_files
    args = [sys.executable, "-m", "softprompt.cli", "train", "--model", str(tiny_dir), "--data", str(train_f),
            "--tokens", "4", "--steps", "300", "--batch-size", "4", "--lr", "0.1", "--init", "random",
            "--save-every", "5", "--device", "cpu", "--quiet"]
    ref = subprocess.run(args + ["--out", str(tmp_path / "ref")], capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "cut")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "prompt.json").exists(), "the run finished before it was killed"
    assert (tmp_path / "cut" / "checkpoint" / "state.json").exists()
    ck_step = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"]
    kept = [ln for ln in metrics.read_text().splitlines() if ln.endswith("}") and json.loads(ln)["step"] <= ck_step]
    assert ck_step >= 5 and len(kept) == ck_step
    res = subprocess.run(args + ["--out", str(tmp_path / "cut"), "--resume"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    a = load_artifact(tmp_path / "ref").prompt.export_tensors()
    b = load_artifact(tmp_path / "cut").prompt.export_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)
    after = metrics.read_text().splitlines()
    assert after[:len(kept)] == kept and json.loads(after[len(kept)]) == {"type": "resume", "step": ck_step}
    assert load_artifact(tmp_path / "cut").meta["metrics"]["resumed_from"] == [ck_step]


def test_bad_inputs_name_file_and_line(tmp_path, tiny, tiny_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"input": "a", \n')
    with pytest.raises(SoftPromptError, match=r"bad.jsonl:2: malformed JSON"):
        read_examples(bad)
    bad.write_text('{"input": "a", "target": "b"}\n[1, 2]\n')
    with pytest.raises(SoftPromptError, match=r"bad.jsonl:2: expected a JSON object"):
        read_examples(bad)
    bad.write_text('{"input": "a", "target": "b"}\n{"text": "a", "target": "b"}\n')
    with pytest.raises(SoftPromptError, match=r"bad.jsonl:2: missing field 'input'"):
        read_examples(bad)
    bad.write_text("")
    with pytest.raises(SoftPromptError, match="empty dataset"):
        read_examples(bad)
    bad.write_bytes(b"\x89PNG\x00\x00\x01")
    with pytest.raises(SoftPromptError, match="binary"):
        read_examples(bad)
    with pytest.raises(SoftPromptError, match="no such file"):
        read_examples(tmp_path / "missing.jsonl")
    long = tmp_path / "long.jsonl"
    long.write_text('{"input": "%s", "target": "x"}\n' % ("word " * 400))
    fmt = PromptFormat(tiny.tokenizer, parse_template("[soft:4] {input}"), max_length=tiny.max_positions)
    with pytest.raises(SoftPromptError, match=r"long.jsonl:1: example is \d+ tokens, longer than the model's window of 256"):
        fmt.encode(read_examples(long)[0])


def test_non_finite_loss_stops_cleanly(tiny, tiny_dir, sentiment_files, tmp_path):
    t = Trainer(cfg_for(tiny_dir, steps=3), read_examples(sentiment_files[0]), out=tmp_path / "p", base=tiny, progress=False)
    with torch.no_grad():
        t.prompt.embeddings.fill_(float("nan"))
    with pytest.raises(SoftPromptError, match="non-finite loss"):
        t.train_step()


def test_generation_greedy_matches_manual_forward(tiny, tiny_dir, sentiment_files, tmp_path):
    from softprompt.generate import SamplingParams, generate

    train(cfg_for(tiny_dir, steps=3), read_examples(sentiment_files[0]), None, tmp_path / "p", base=tiny, progress=False)
    art = load_artifact(tmp_path / "p", base=tiny)
    fmt = art.prompt_format(tiny)
    texts = ["hello there", "a longer input to force some left padding here"]
    outs = generate(tiny, art.prompt, fmt, texts, SamplingParams(max_new_tokens=6), batch_size=2)
    # reference: no cache, full recompute each step, one row at a time
    for text, got in zip(texts, outs):
        ids = fmt.encode(Example({"input": text}), with_target=False).ids
        new = []
        for _ in range(6):
            b = collate([Encoded(ids + new, [IGNORE] * len(ids + new), len(ids))], 0)
            with torch.no_grad():
                logits = tiny.model(**art.prompt.model_inputs(tiny.model, b["input_ids"], b["attention_mask"])).logits
            t = int(logits[0, -1].argmax())
            if t in tiny.eos_ids():
                break
            new.append(t)
        assert got == tiny.tokenizer.decode(new, skip_special_tokens=True)
    # sampling with a seed is reproducible
    p = SamplingParams(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3)
    assert generate(tiny, art.prompt, fmt, texts, p) == generate(tiny, art.prompt, fmt, texts, p)
