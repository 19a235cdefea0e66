"""Reading soft prompts: nearest tokens, projection fidelity, hardening, similarity, context coverage."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from softprompt.artifact import build_meta, load_artifact, save_artifact
from softprompt.data.examples import Example
from softprompt.data.queries import Query
from softprompt.encoding import PromptFormat
from softprompt.interpret.coverage import coverage_table, query_agreement, split_parts, tag_by_overlap
from softprompt.interpret.fidelity import divergence, hard_prompt, next_token_logits, projection_fidelity
from softprompt.interpret.harden import harden
from softprompt.interpret.nearest import compare_prompts, nearest_tokens, norm_percentiles
from softprompt.template import parse_template
from softprompt.train import TrainConfig, Trainer, create_prompt

EX = [Example({"input": t}, y) for t, y in [("good movie", "positive"), ("bad film", "negative"),
                                            ("great acting", "positive"), ("awful plot", "negative")]] * 2


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "softprompt", *args], capture_output=True, text=True)


def test_text_initialized_prompt_nearest_tokens_are_the_text(tiny):
    text = "Classify the sentiment of this review"
    ids = tiny.tokenizer(text, add_special_tokens=False).input_ids
    cfg = TrainConfig(model=tiny.name, tokens=len(ids), init=f"text:{text}")
    t = cfg.prompt_template()
    prompt = create_prompt(cfg, tiny, t, None)
    for metric in ("cosine", "l2"):
        nb = nearest_tokens(prompt.vectors(), tiny.embedding.weight, k=3, metric=metric)
        assert nb.ids[:, 0].tolist() == ids, metric
    dot = nearest_tokens(prompt.vectors(), tiny.embedding.weight, k=3, metric="dot")
    want = (prompt.vectors().detach() @ tiny.embedding.weight.detach().T).topk(3).indices
    assert torch.equal(dot.ids, want)  # independent reference for the chunked top-k
    norms, pct, stats = norm_percentiles(prompt.vectors(), tiny.embedding.weight)
    vocab = tiny.embedding.weight.detach().norm(dim=-1)
    assert torch.allclose(norms, vocab[ids])
    assert all(0 <= p <= 100 for p in pct.tolist()) and stats["p1"] <= stats["median"] <= stats["p99"]


def test_nearest_tokens_chunked_equals_unchunked(tiny):
    v = torch.randn(5, tiny.hidden_size)
    a = nearest_tokens(v, tiny.embedding.weight, k=7, metric="l2", chunk=1000)
    b = nearest_tokens(v, tiny.embedding.weight, k=7, metric="l2", chunk=10**9)
    assert torch.equal(a.ids, b.ids)
    assert torch.allclose(a.scores, torch.cdist(v, tiny.embedding.weight.detach()).gather(1, a.ids))


def test_projection_of_vocabulary_embeddings_is_lossless(tiny):
    ids = tiny.tokenizer("Sentiment of the review:", add_special_tokens=False).input_ids
    prompt = hard_prompt(ids, tiny.embedding)
    fmt = PromptFormat(tiny.tokenizer, parse_template(f"[soft:{len(ids)}] {{input}}"), chat=True)
    fid = projection_fidelity(tiny, prompt, fmt, EX, ["negative", "positive"])
    assert fid["projected_ids"] == ids
    assert fid["kl"] == pytest.approx(0.0, abs=1e-6) and fid["top1_agreement"] == 1.0
    assert fid["soft"]["value"] == fid["projected"]["value"]


def test_projection_of_trained_prompt_reports_real_loss(tiny, tmp_path):
    cfg = TrainConfig(model=tiny.name, tokens=3, steps=30, lr=0.1, init="random")
    tr = Trainer(cfg, EX, None, tmp_path / "p", base=tiny, progress=False)
    tr.run()
    fid = projection_fidelity(tiny, tr.prompt.eval(), tr.fmt, EX, ["negative", "positive"])
    # recompute the KL independently from the two prompts' logits
    proj = hard_prompt(fid["projected_ids"], tiny.embedding)
    a = torch.log_softmax(next_token_logits(tiny.model, tr.prompt, tr.fmt, EX), -1)
    b = torch.log_softmax(next_token_logits(tiny.model, proj, tr.fmt, EX), -1)
    assert fid["kl"] == pytest.approx(float((a.exp() * (a - b)).sum(-1).mean()), rel=1e-5)
    assert fid["kl"] > 1e-4  # a random-initialized trained prompt is not a token sequence


@pytest.mark.parametrize("method", ["greedy", "pez"])
def test_harden_lowers_kl_from_its_start(tiny, tmp_path, method):
    cfg = TrainConfig(model=tiny.name, tokens=3, steps=30, lr=0.1, init="random")
    tr = Trainer(cfg, EX, None, tmp_path / "p", base=tiny, progress=False)
    tr.run()
    res = harden(tiny, tr.prompt.eval(), tr.fmt, EX, method=method, steps=25, lr=0.05)
    assert res.loss < res.start_loss
    assert min(res.history) == pytest.approx(res.loss)
    special = set(tiny.tokenizer.all_special_ids)
    assert not special & set(res.ids)
    d = divergence(next_token_logits(tiny.model, tr.prompt, tr.fmt, EX),
                   next_token_logits(tiny.model, hard_prompt(res.ids, tiny.embedding), tr.fmt, EX))
    assert d["kl"] == pytest.approx(res.loss, rel=1e-4)  # the reported loss is the KL of the tokens returned


def test_compare_prompts():
    a = torch.randn(4, 8)
    same = compare_prompts(a, a.clone())
    assert same["mean_positionwise_cosine"] == pytest.approx(1.0) and same["relative_l2"] == pytest.approx(0.0, abs=1e-6)
    shuffled = compare_prompts(a, a[[2, 0, 3, 1]])
    assert shuffled["mean_best_match"] == pytest.approx(1.0)
    assert shuffled["best_match_index_a_to_b"] == [1, 3, 0, 2]
    assert "positionwise_cosine" not in compare_prompts(a, torch.randn(3, 8))


def test_coverage_grouping_and_exact_context_agrees(tiny, tmp_path):
    context = "The museum opens at nine in the morning.\n\nTickets cost twelve euros for adults."
    parts = split_parts(context)
    assert len(parts) == 2
    assert tag_by_overlap("When does the museum open?", parts) == 0
    assert tag_by_overlap("How much are adult tickets?", parts) == 1
    assert tag_by_overlap("xyzzy", parts) is None
    # a "compressed" prompt whose vectors are exactly the context's token embeddings reproduces the teacher
    ids = tiny.tokenizer(context, add_special_tokens=False).input_ids
    prompt = hard_prompt(ids, tiny.embedding)
    fmt = PromptFormat(tiny.tokenizer, parse_template(f"[soft:{len(ids)}]\n\nQuestion: {{input}}"), chat=False)
    qs = [Query("When does the museum open?"), Query("How much are adult tickets?", tag="prices")]
    agree = query_agreement(tiny, prompt, fmt, context, qs, max_new_tokens=5)
    assert agree == [1.0, 1.0]
    table = coverage_table(qs, agree, parts)
    assert [r["part"][:6] for r in table] == ["part 1", "prices"]
    # the bare model (no context) does not fully agree: the measure can fail
    other = hard_prompt(tiny.tokenizer("zz " * len(ids), add_special_tokens=False).input_ids[: len(ids)], tiny.embedding)
    assert min(query_agreement(tiny, other, fmt, context, qs, max_new_tokens=5)) < 1.0


def _artifact(tiny, tmp_path, name="art", text="Sentiment of the review:"):
    ids = tiny.tokenizer(text, add_special_tokens=False).input_ids
    prompt = hard_prompt(ids, tiny.embedding)
    src = f"[soft:{len(ids)}] {{input}}"
    meta = build_meta(prompt, src, tiny, format={"chat": True, "system": None}, labels=["negative", "positive"])
    return save_artifact(tmp_path / name, prompt, meta), ids


def test_cli_inspect_writes_computed_report(tiny, tiny_dir, tmp_path):
    art_dir, ids = _artifact(tiny, tmp_path)
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps({"input": e.fields["input"], "target": e.target}) + "\n" for e in EX))
    r = _cli("inspect", str(art_dir), "--k", "4", "--data", str(data), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "rep" / "inspect.json").read_text())
    assert [t["cosine"][0]["id"] for t in rep["nearest"]["tokens"]] == ids
    art = load_artifact(art_dir, base=tiny)
    assert rep["nearest"]["tokens"][0]["norm"] == pytest.approx(float(art.prompt.vectors()[0].norm()), rel=1e-6)
    assert rep["fidelity"]["kl"] == pytest.approx(0.0, abs=1e-6)
    md = (tmp_path / "rep" / "inspect.md").read_text()
    assert "Projection fidelity" in md and f"{rep['fidelity']['soft']['value']:.4f}" in md
    assert (tmp_path / "rep" / "nearest.png").stat().st_size > 1000
    other, _ = _artifact(tiny, tmp_path, "other", "Label the review:")
    r = _cli("inspect", str(art_dir), str(other), "--out", str(tmp_path / "cmp"))
    assert r.returncode == 0, r.stderr
    cmp = json.loads((tmp_path / "cmp" / "inspect.json").read_text())["comparison"]
    a, b = art.prompt.vectors(), load_artifact(other, base=tiny).prompt.vectors()
    want = torch.nn.functional.cosine_similarity(a.mean(0), b.mean(0), dim=0)
    assert cmp["mean_vector_cosine"] == pytest.approx(float(want), rel=1e-5)


def test_cli_harden_reports(tiny, tmp_path):
    art_dir, _ = _artifact(tiny, tmp_path)
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps({"input": e.fields["input"], "target": e.target}) + "\n" for e in EX))
    r = _cli("harden", str(art_dir), "--data", str(data), "--steps", "3", "--method", "greedy",
             "--hard-prompt", "Review: {input}\nSentiment:", "--out", str(tmp_path / "h"))
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "h" / "harden.json").read_text())
    names = [row["name"] for row in rep["rows"]]
    assert names == ["soft prompt", "nearest-token projection", "hardened (greedy)", "hand-written"]
    assert rep["rows"][0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert rep["rows"][1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the prompt is a token sequence


def test_cli_inspect_bad_input(tiny, tmp_path):
    art_dir, _ = _artifact(tiny, tmp_path)
    r = _cli("inspect", str(tmp_path))
    assert r.returncode == 2 and "not a prompt artifact" in r.stderr and "Traceback" not in r.stderr
    r = _cli("inspect", str(art_dir), "--k", "10000000")
    assert r.returncode == 2 and "--k must be between 1 and the vocabulary size" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no input field", "target": "x"}) + "\n")
    r = _cli("inspect", str(art_dir), "--data", str(bad))
    assert r.returncode == 2 and "bad.jsonl" in r.stderr and "input" in r.stderr and "Traceback" not in r.stderr
    r = _cli("harden", str(art_dir), "--data", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = _cli("inspect", str(art_dir), "--context", str(bad))
    assert r.returncode == 2 and "--queries" in r.stderr
