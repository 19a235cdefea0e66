"""Context compression: losses, the teacher cache and its reuse, the report's numbers recomputed
independently, the artifact through the ordinary paths, and bad input through the CLI."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from softprompt.compress import CompressConfig, Compressor, Query, compress, read_queries, split_queries
from softprompt.compress.distill import distill_loss, kl_loss, rows_batch, teacher_top1
from softprompt.compress.layout import Renderer, make_layout
from softprompt.compress.teacher import TeacherDists, compress_dist
from softprompt.errors import DataError, SoftPromptError
from softprompt.objectives import target_logits
from softprompt.onednn import packing_available

CONTEXT = ("The harbor town of Vell sits between two cliffs. Its lighthouse was built in 1871 by Ada Moreau, "
           "who also founded the town's school. Fishing boats leave at dawn and return before noon.")
QUERIES = ["Who built the lighthouse?", "When was the lighthouse built?", "What does the town sit between?",
           "Who founded the school?", "When do boats leave?", "What is the town called?",
           "When do the boats return?", "What did Ada Moreau found?"]


def _queries() -> list[Query]:
    return [Query(q) for q in QUERIES]


def _cfg(**kw) -> CompressConfig:
    base = dict(tokens=4, steps=6, batch_size=4, max_new_tokens=6, lr=0.1, timing_repeats=1, heldout=0.25)
    base.update(kw)
    return CompressConfig(**base)


# -- losses ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("topk", [0, 16])
@pytest.mark.parametrize("reverse", [False, True])
def test_kl_is_zero_when_student_sees_the_teachers_input(tiny, tmp_path, topk, reverse):
    job = Compressor(CONTEXT, _cfg(topk=topk), _queries(), tmp_path / "p", base=tiny, progress=False)
    train, _ = job.split()
    entries, hit = job.teacher_entries("train", train)
    assert not hit
    # The student path (no soft prompt, no KV cache, whole padded batch) fed the teacher's own ids.
    # The teacher's distributions cover every position after the context: query tokens, then the continuation.
    rows = [(job.renderer.fill(e.query, job.ctx_ids), e.cont) for e in entries]
    frm = [job.renderer.span_end(e.query, len(job.ctx_ids)) + 1 for e in entries]
    assert all(e.qlen == len(r) - f > 0 for e, (r, _), f in zip(entries, rows, frm))
    batch = rows_batch(rows, tiny.tokenizer.pad_token_id, tiny.device, label_from=frm)
    logits = target_logits(tiny.model, None, batch, share_prefix=False)[0]
    dists = TeacherDists.cat([e.dists for e in entries])
    n = sum(len(e.cont) + e.qlen for e in entries)
    assert logits.shape[0] == n == len(dists)
    assert float(kl_loss(logits, dists, reverse=reverse)) / n < 1e-5
    # ... and clearly non-zero when the context is missing.
    rows = [(job.renderer.fill(e.query, []), e.cont) for e in entries]
    frm = [job.renderer.span_end(e.query, 0) + 1 for e in entries]
    logits = target_logits(tiny.model, None, rows_batch(rows, tiny.tokenizer.pad_token_id, tiny.device, label_from=frm),
                           share_prefix=False)[0]
    assert float(kl_loss(logits, dists, reverse=reverse)) / n > 1e-3


def test_topk_kl_is_a_lower_bound_and_exact_with_the_whole_vocabulary():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, 50, generator=g) * 3, torch.randn(5, 50, generator=g) * 3
    for reverse in (False, True):
        exact = kl_loss(s, compress_dist(t, 1.0, 0), reverse=reverse)
        assert kl_loss(s, compress_dist(t, 1.0, 8), reverse=reverse) <= exact + 1e-5
        assert torch.allclose(kl_loss(s, compress_dist(t, 1.0, 50), reverse=reverse), exact, atol=1e-4)
    # temperature: softened distributions, scaled by T^2
    p, q = torch.log_softmax(t / 2, -1), torch.log_softmax(s / 2, -1)
    manual = (p.exp() * (p - q)).sum() * 4
    assert torch.allclose(kl_loss(s, compress_dist(t, 2.0, 0), temperature=2.0), manual, atol=1e-4)


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "loglik"])
def test_distillation_loss_falls(tiny, tmp_path, objective):
    job = Compressor(CONTEXT, _cfg(objective=objective, steps=25, init="random"), _queries(), tmp_path / "p",
                     base=tiny, progress=False)
    train, _ = job.split()
    entries, _ = job.teacher_entries("train", train)
    before = job.loss_on(entries, job.make_prompt())
    job.train(entries)
    after = job.loss_on(entries)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("topk", [0, 8])
def test_mode_weight_adds_the_cross_entropy_of_the_teachers_top_token(topk):
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(6, 40, generator=g) * 3, torch.randn(6, 40, generator=g) * 3
    dists = compress_dist(t, 1.0, topk)
    assert torch.equal(teacher_top1(dists), t.argmax(-1))
    targets = torch.randint(0, 40, (6,), generator=g)
    for objective in ("forward_kl", "reverse_kl"):
        plain = distill_loss(objective, s, dists, targets)
        ce = -torch.log_softmax(s, -1)[torch.arange(6), t.argmax(-1)].sum()  # written out, not F.cross_entropy
        assert torch.allclose(distill_loss(objective, s, dists, targets, mode_weight=0.5), plain + 0.5 * ce, atol=1e-5)


def _top1_agreement(job, entries) -> float:
    batch, _, teacher = job._batch(entries)
    logits = target_logits(job.student_model, job.prompt, batch, share_prefix=False)[0]
    return float((logits.argmax(-1) == teacher_top1(teacher)).float().mean())


def test_mode_weight_pulls_the_students_argmax_to_the_teachers(tiny, tmp_path):
    agree = {}
    for w in (0.0, 4.0):
        job = Compressor(CONTEXT, _cfg(mode_weight=w, steps=30, init="random", topk=0), _queries(), tmp_path / str(w),
                         base=tiny, progress=False)
        train, _ = job.split()
        entries, _ = job.teacher_entries("train", train)
        job.train(entries)
        with torch.no_grad():
            agree[w] = _top1_agreement(job, entries)
    assert agree[4.0] > agree[0.0], agree


def test_early_stopping_watches_the_kl_without_the_mode_term(tiny, tmp_path):
    jobs = [Compressor(CONTEXT, _cfg(mode_weight=w, init="random"), _queries(), tmp_path / str(w), base=tiny, progress=False)
            for w in (0.0, 2.0)]
    entries = jobs[0].teacher_entries("train", jobs[0].split()[0])[0]
    prompt = jobs[0].make_prompt()
    with torch.no_grad():
        trained = [float(j._loss(prompt, entries)[0]) for j in jobs]
    assert trained[1] > trained[0] * 1.5  # training does add the term ...
    assert jobs[1].loss_on(entries, prompt) == pytest.approx(jobs[0].loss_on(entries, prompt), rel=1e-6)  # ... the dev KL does not


def test_mode_weight_is_checked(tiny, tmp_path):
    for kw in (dict(mode_weight=-1.0), dict(mode_weight=1.0, objective="loglik")):
        with pytest.raises(SoftPromptError, match="--mode-weight"):
            Compressor(CONTEXT, _cfg(**kw), _queries(), tmp_path / "p", base=tiny, progress=False)


# -- the teacher cache -----------------------------------------------------------------------------
def test_teacher_runs_once_and_its_cache_is_reused(tiny, tmp_path):
    import softprompt.compress.compressor as cm

    cache = tmp_path / "cache"
    cfg = _cfg(steps=8, batch_size=2, cache_dir=str(cache))  # 6 training queries: more than 2 epochs
    job = Compressor(CONTEXT, cfg, _queries(), tmp_path / "a", base=tiny, progress=False)
    train, _ = job.split()
    entries, _ = job.teacher_entries("train", train)
    # the context is encoded once; the queries (one batch) then cost one forward per token of the longest continuation
    assert len(entries) <= cm.TEACHER_BATCH
    assert job.teacher.forwards == 1 + max(len(e.cont) for e in entries)
    n = job.teacher.forwards
    job.train(entries)
    assert job.teacher.forwards == n  # no teacher forward in any epoch
    assert len(job.history) == 8
    job.teacher_entries("heldout", job.heldout_q)
    # a second job with the same inputs loads everything from disk: zero teacher forwards
    job2 = Compressor(CONTEXT, cfg, _queries(), tmp_path / "b", base=tiny, progress=False)
    train2, _ = job2.split()
    entries2, hit = job2.teacher_entries("train", train2)
    assert hit and job2.teacher.forwards == 0
    assert [e.cont for e in entries2] == [e.cont for e in entries]
    assert all(torch.equal(a.dists.idx, b.dists.idx) for a, b in zip(entries, entries2))
    # the report's teacher logits: the context is encoded once, then one forward per held-out query
    held2, hit = job2.teacher_entries("heldout", job2.heldout_q)
    assert hit and job2.teacher.forwards == 0
    job2.train(entries2)
    job2.evaluate(held2)
    assert job2.teacher.forwards == 1 + len(held2)
    # a changed setting (temperature) is a different cache entry
    job3 = Compressor(CONTEXT, _cfg(steps=8, batch_size=2, cache_dir=str(cache), temperature=2.0), _queries(),
                      tmp_path / "c", base=tiny, progress=False)
    _, hit = job3.teacher_entries("train", job3.split()[0])
    assert not hit and job3.teacher.forwards > 0


def test_teacher_with_kv_reuse_matches_a_plain_forward(tiny, tmp_path):
    job = Compressor(CONTEXT, _cfg(topk=0), _queries(), tmp_path / "p", base=tiny, progress=False)
    train, held = job.split()
    entries, _ = job.teacher_entries("train", train)
    for e in entries[:3]:
        ids = torch.tensor([e.ids + e.cont])
        plain = tiny.model(input_ids=ids).logits[0, len(e.ids) - 1 - e.qlen:-1]  # query targets, then the continuation
        assert torch.allclose(job.teacher.forced_logits(e.ids, e.cont), plain[e.qlen:], atol=1e-4)
        assert torch.allclose(e.dists.full, torch.log_softmax(plain, -1).half().float(), atol=1e-2)


@pytest.mark.parametrize("loss_positions", ["all", "continuation"])
def test_batched_teacher_equals_one_query_at_a_time(tiny, tmp_path, monkeypatch, loss_positions):
    """Greedy teacher entries decoded 16 at a time (shared context cache, padded rows) equal the ones
    decoded one query at a time: the same continuations, the same distributions."""
    import softprompt.compress.compressor as cm

    def entries(batch):
        monkeypatch.setattr(cm, "TEACHER_BATCH", batch)
        job = Compressor(CONTEXT, _cfg(topk=0, loss_positions=loss_positions), _queries(), tmp_path / f"p{batch}", base=tiny,
                         progress=False, )
        train, _ = job.split()
        return job.teacher_entries("train", train)[0], job.teacher.forwards

    one, f1 = entries(1)
    many, f16 = entries(16)
    assert f16 < f1  # batched for real
    assert [e.cont for e in many] == [e.cont for e in one] and [e.ids for e in many] == [e.ids for e in one]
    assert [e.qlen for e in many] == [e.qlen for e in one]
    for a, b in zip(many, one):
        torch.testing.assert_close(a.dists.full, b.dists.full, atol=2e-3, rtol=0)


# -- the report ------------------------------------------------------------------------------------
def test_top1_agreement_is_split_by_the_teachers_confidence():
    from softprompt.compress.report import agreement_counts

    teacher = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 0.1]])  # p(top) .96 .96 .36 .36
    student = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert agreement_counts(student, teacher) == (2, 2, 1)  # agree at 0 and 2; confident at 0 and 1; both at 0
    half = torch.tensor([[0.0, 0.0]])  # p(top) exactly 0.5 counts as confident
    assert agreement_counts(half, half) == (1, 1, 1)


def test_report_numbers_are_recomputed_independently(tiny, tmp_path):
    res = compress(CONTEXT, _cfg(tokens=6), _queries(), tmp_path / "p", base=tiny, progress=False)
    rep = json.loads((tmp_path / "p" / "compression_report.json").read_text())
    assert rep["fidelity"]["truncated"]["top1_agreement"] == res.report["fidelity"]["truncated"]["top1_agreement"]
    tok, model = tiny.tokenizer, tiny.model
    ctx = tok(CONTEXT, add_special_tokens=False).input_ids
    assert rep["context_tokens"] == len(ctx) and rep["compression_ratio"] == pytest.approx(len(ctx) / 6)
    agree, kl, n = 0, 0.0, 0
    sure: list[bool] = []
    unsure: list[bool] = []
    for q in rep["queries"]["heldout"]:
        # the teacher's ids straight from the chat template, and the teacher's own greedy continuation
        full = tok.apply_chat_template([{"role": "system", "content": CONTEXT}, {"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
        full = list(full["input_ids"] if isinstance(full, dict) else full)
        with torch.no_grad():
            gen = model.generate(torch.tensor([full]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        cont = gen[0, len(full):].tolist()
        start = next(i for i in range(len(full)) if full[i:i + len(ctx)] == ctx)
        trunc = full[:start] + ctx[:6] + full[start + len(ctx):]
        with torch.no_grad():
            t = model(input_ids=torch.tensor([full + cont])).logits[0, len(full) - 1:-1]
            s = model(input_ids=torch.tensor([trunc + cont])).logits[0, len(trunc) - 1:-1]
        agree += int((t.argmax(-1) == s.argmax(-1)).sum())
        lt, ls = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
        for pos in range(len(cont)):  # the split by the teacher's confidence in its top token
            (sure if float(lt[pos].exp().max()) >= 0.5 else unsure).append(bool(t[pos].argmax() == s[pos].argmax()))
        kl += float((lt.exp() * (lt - ls)).sum())
        n += len(cont)
    got = rep["fidelity"]["truncated"]
    assert got["tokens"] == n
    assert got["top1_agreement"] == pytest.approx(agree / n, abs=1e-9)
    assert got["teacher_confident_share"] == pytest.approx(len(sure) / n, abs=1e-9)
    assert got["top1_when_confident"] == pytest.approx(sum(sure) / max(len(sure), 1), abs=1e-9)
    assert got["top1_when_unsure"] == pytest.approx(sum(unsure) / max(len(unsure), 1), abs=1e-9)
    assert got["kl_per_token"] == pytest.approx(kl / n, rel=1e-3, abs=1e-5)
    c = rep["cost"]
    assert c["full"]["kv_bytes"] > c["soft"]["kv_bytes"] > 0
    # KV bytes: layers x 2 (k, v) x kv heads x head_dim x tokens x 4 bytes (fp32)
    cfg = model.config
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert c["soft"]["kv_bytes"] == pytest.approx(per_token * c["soft"]["prompt_tokens"])
    md = (tmp_path / "p" / "compression_report.md").read_text()
    assert "truncated context" in md and "no context" in md
    t = rep["time"]  # the parts of a compression add up, and the report comes after the saved prompt
    assert 0 < t["queries_s"] + t["teacher_s"] + t["train_s"] <= t["compress_s"] < t["total_s"]
    assert t["compress_s"] + t["report_s"] == pytest.approx(t["total_s"], abs=0.05)
    assert f"Compressed in {t['compress_s']:.0f} s" in md


def test_compressed_prompt_loads_and_generates_through_the_ordinary_paths(tiny, tiny_dir, tmp_path, capsys):
    from softprompt.artifact import load_artifact
    from softprompt.cli import main
    from softprompt.generate import SamplingParams, generate

    out = tmp_path / "p"
    res = compress(CONTEXT, _cfg(), _queries(), out, base=tiny, progress=False)
    art = load_artifact(out, base=tiny)
    assert art.kind == "prompt-tuning" and art.meta["compression"]["soft_tokens"] == 4
    assert art.template.n_virtual == 4 and art.template.fields == ["input"]
    assert torch.equal(art.prompt.vectors().cpu(), res.prompt.vectors().cpu())
    ex = res.report["examples"][0]
    got = generate(tiny, art.prompt, art.prompt_format(tiny), [ex["query"]], SamplingParams(max_new_tokens=6))
    assert got[0].strip() == ex["soft"]  # the report's soft-prompt output is what `generate` produces
    assert main(["generate", str(out), ex["query"], "--model", str(tiny_dir), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == ex["soft"]


def test_user_placement_and_custom_template(tiny, tmp_path):
    lay = make_layout(tiny.tokenizer, 4, "user")
    assert lay.chat and lay.template_source.startswith("[soft:4]")
    r = Renderer(tiny.tokenizer, lay)
    ids = r.student_ids("hi")
    assert sum(1 for x in ids if x < 0) == 4
    lay2 = make_layout(tiny.tokenizer, 5, template="Notes: [soft:2]\nQ: {input}")
    assert "[soft:5]" in lay2.template_source
    with pytest.raises(SoftPromptError, match="exactly one soft span"):
        make_layout(tiny.tokenizer, 4, template="[soft:2] {input} [soft:2]")
    res = compress(CONTEXT, _cfg(placement="user", steps=2), _queries(), tmp_path / "u", base=tiny, progress=False)
    assert res.report["placement"] == "user"


def test_system_layout_matches_the_chat_template(tiny):
    lay = make_layout(tiny.tokenizer, 3, "system")
    r = Renderer(tiny.tokenizer, lay)
    ctx = tiny.tokenizer(CONTEXT, add_special_tokens=False).input_ids
    want = tiny.tokenizer.apply_chat_template([{"role": "system", "content": CONTEXT}, {"role": "user", "content": "Who?"}],
                                              add_generation_prompt=True, tokenize=True, return_dict=False)
    want = list(want["input_ids"] if isinstance(want, dict) else want)
    assert r.fill("Who?", ctx) == want


def test_different_teacher_sharing_the_tokenizer(tiny, other_tiny_dir, tmp_path):
    from softprompt.base_model import load_base

    other = load_base(str(other_tiny_dir), device="cpu")
    job = Compressor(CONTEXT, _cfg(teacher=str(other_tiny_dir)), _queries(), tmp_path / "p", base=tiny,
                     teacher_base=other, progress=False)
    train, _ = job.split()
    entries, _ = job.teacher_entries("train", train)
    own = Compressor(CONTEXT, _cfg(), _queries(), tmp_path / "q", base=tiny, progress=False)
    own_entries, _ = own.teacher_entries("train", own.split()[0])
    assert [e.cont for e in entries] != [e.cont for e in own_entries]


def test_generated_queries(tiny):
    from softprompt.compress import generate_queries
    from softprompt.compress.queries import PROBES

    qs = generate_queries(tiny, CONTEXT, n=8, seed=0, max_new_tokens=8)
    assert len(qs) == 8 and len({q.text for q in qs}) == 8
    assert sum(q.text in PROBES for q in qs) >= 4
    train, held = split_queries(qs, 0.25, seed=0)
    assert len(held) == 2 and not set(q.text for q in train) & set(q.text for q in held)


# -- bad input -------------------------------------------------------------------------------------
def test_read_queries_formats_and_errors(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"question": "Who?", "answers": ["Ada"]}\n\n{"query": "When?"}\n')
    qs = read_queries(p)
    assert [q.text for q in qs] == ["Who?", "When?"] and qs[0].answers == ("Ada",) and qs[1].line == 3
    (tmp_path / "bad.jsonl").write_text('{"question": "ok"}\n{"nope": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_queries(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="empty"):
        read_queries(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_queries(tmp_path / "missing.txt")
    with pytest.raises(SoftPromptError, match="at least 2 queries"):
        split_queries([Query("one")])


def _cli(args, capsys):
    from softprompt.cli import main

    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_bad_input(tiny_dir, tmp_path, capsys):
    q = tmp_path / "q.txt"
    q.write_text("\n".join(QUERIES) + "\n")
    common = ["compress", "--model", str(tiny_dir), "--device", "cpu", "--quiet", "--steps", "2", "--max-new-tokens", "4"]
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    rc, _, err = _cli(common + ["--context", str(empty), "--queries", str(q), "--out", str(tmp_path / "o1")], capsys)
    assert rc == 2 and "context is empty" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _cli(common + ["--context", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o2")], capsys)
    assert rc == 2 and "does not exist" in err
    long = tmp_path / "long.txt"
    long.write_text("word " * 400)  # the tiny model's window is 256 positions
    rc, _, err = _cli(common + ["--context", str(long), "--queries", str(q), "--out", str(tmp_path / "o3")], capsys)
    assert rc == 2 and "window of 256" in err and "shorten the context" in err
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    rc, _, err = _cli(common + ["--context", str(ctx), "--queries", str(empty), "--out", str(tmp_path / "o4")], capsys)
    assert rc == 2 and "queries file is empty" in err
    rc, _, err = _cli(common + ["--context", str(ctx), "--queries", str(tmp_path), "--out", str(tmp_path / "o5")], capsys)
    assert rc == 2 and "directory" in err
    short = tmp_path / "short.txt"
    short.write_text("Ada built it.")
    rc, out, err = _cli(common + ["--context", str(short), "--queries", str(q), "--tokens", "8", "--out", str(tmp_path / "o6")], capsys)
    assert rc == 0 and "warning" in err and "nothing to compress" in err
    assert "soft prompt" in out and (tmp_path / "o6" / "compression_report.json").exists()
    rc, _, err = _cli(common + ["--context", str(ctx), "--queries", str(q), "--out", str(tmp_path / "o6")], capsys)
    assert rc == 2 and "--overwrite" in err


@pytest.mark.slow
def test_smollm2_soft_prompt_beats_no_context(smollm2, tmp_path):
    qs = [Query(q) for q in QUERIES + ["Where are the cliffs?", "What leaves at dawn?"]]
    res = compress(CONTEXT, CompressConfig(tokens=8, steps=30, batch_size=4, max_new_tokens=12, lr=0.05, precision="auto",
                                           timing_repeats=1, heldout=0.3), qs, tmp_path / "p", base=smollm2, progress=False)
    fid = res.report["fidelity"]
    assert fid["soft"]["kl_per_token"] < fid["none"]["kl_per_token"]
    assert res.report["cost"]["full"]["kv_bytes"] > 2 * res.report["cost"]["soft"]["kv_bytes"]


# -- KV-prefix students ----------------------------------------------------------------------------
def test_rerotated_keys_match_a_prefill_at_the_new_positions(tiny):
    from softprompt.compress.kv_init import prefill_kv, rerotate

    ids = tiny.tokenizer(CONTEXT, add_special_tokens=False).input_ids[:20]
    at0, at7 = prefill_kv(tiny.model, ids, start=0), prefill_kv(tiny.model, ids, start=7)
    assert not torch.allclose(at0[:, 0], at7[:, 0], atol=1e-3)  # the keys carry their positions
    assert torch.allclose(at0[:, 1], at7[:, 1], atol=1e-5)  # the values do not (RoPE is shift-invariant)
    back = rerotate(tiny.model, at7[:, 0], list(range(7, 27)), list(range(20)))
    assert torch.allclose(back, at0[:, 0], atol=1e-5)


@pytest.mark.parametrize("positions", ["first", "even", "attention"])
def test_kv_prefix_from_every_context_position_is_the_teacher(tiny, tmp_path, positions):
    n = len(tiny.tokenizer(CONTEXT, add_special_tokens=False).input_ids)
    job = Compressor(CONTEXT, _cfg(kind="prefix", tokens=n, positions=positions, topk=0), _queries(), tmp_path / "p",
                     base=tiny, progress=False)
    train, _ = job.split()
    entries, _ = job.teacher_entries("train", train)
    prompt = job.make_prompt()
    assert prompt.kind == "prefix" and prompt.n_virtual == len(job.head_ids) + n == job.n_positions
    assert job.positions_kept == list(range(n))
    kl = job.loss_on(entries, prompt)  # exact full-vocabulary KL at every query and continuation position
    assert kl < 1e-5, kl
    # fewer positions: a real approximation, not the teacher
    job2 = Compressor(CONTEXT, _cfg(kind="prefix", tokens=4, positions=positions, topk=0), _queries(), tmp_path / "q",
                      base=tiny, progress=False)
    job2.split()
    job2.fit_entries = entries
    p2 = job2.make_prompt()
    assert len(job2.positions_kept) == 4 and job2.loss_on(entries, p2) > 1e-3


def test_kv_prefix_student_trains_saves_and_generates(tiny, tiny_dir, tmp_path):
    from softprompt.artifact import load_artifact
    from softprompt.generate import SamplingParams, generate

    out = tmp_path / "p"
    job = Compressor(CONTEXT, _cfg(kind="prefix", tokens=6, positions="even", steps=12, eval_every=4, lr=0.01), _queries(), out,
                     base=tiny, progress=False)
    job.split()
    entries, _ = job.teacher_entries("train", job.fit_q)
    first = job.make_prompt().kv.detach().clone()
    res = job.run()
    kv = res.prompt.kv.detach()
    assert torch.equal(kv[:, :, :, :1], first[:, :, :, :1])  # the attention sink stayed frozen
    assert not torch.equal(kv[:, :, :, 1:], first[:, :, :, 1:])
    art = load_artifact(out, base=tiny)
    assert art.kind == "prefix" and "[soft" not in art.meta["template"]
    ex = res.report["examples"][0]
    got = generate(tiny, art.prompt, art.prompt_format(tiny), [ex["query"]], SamplingParams(max_new_tokens=6))
    assert got[0].strip() == ex["soft"]


def test_kv_prefix_bad_input(tiny, tmp_path):
    with pytest.raises(SoftPromptError, match="cannot be a compression student"):
        Compressor(CONTEXT, _cfg(kind="lora"), _queries(), tmp_path / "a", base=tiny, progress=False)
    with pytest.raises(SoftPromptError, match="has only"):
        Compressor(CONTEXT, _cfg(kind="prefix", tokens=500), _queries(), tmp_path / "b", base=tiny, progress=False)
    with pytest.raises(SoftPromptError, match="--positions"):
        Compressor(CONTEXT, _cfg(kind="prefix", positions="middle"), _queries(), tmp_path / "c", base=tiny, progress=False)
    with pytest.raises(SoftPromptError, match="placement system"):
        Compressor(CONTEXT, _cfg(kind="prefix", placement="user"), _queries(), tmp_path / "d", base=tiny, progress=False)


# -- self-study queries ----------------------------------------------------------------------------
LONG = " ".join(f"Rule {i}: customers of the {w} desk must show a ticket before {h} o'clock on weekdays."
                for i, (w, h) in enumerate(zip(["north", "south", "east", "west", "main", "side"], [8, 9, 10, 11, 12, 1])))


def test_dedupe_ignores_case_spacing_and_punctuation():
    from softprompt.compress.queries import dedupe

    qs = [Query("When do boats leave?"), Query("when do  boats leave"), Query("Who built it?"), Query("WHEN do boats, leave?!")]
    assert [q.text for q in dedupe(qs)] == ["When do boats leave?", "Who built it?"]
    assert [q.text for q in dedupe(qs, exclude=["who built it"])] == ["When do boats leave?"]


def test_self_study_yields_distinct_queries_from_every_chunk(tiny):
    from softprompt.compress.queries import query_key
    from softprompt.compress.selfstudy import TYPES, chunks, self_study

    pieces = chunks(tiny.tokenizer, LONG, 40)
    assert len(pieces) >= 3
    train, held = self_study(tiny, tiny.tokenizer, LONG, n_train=30, n_heldout=6, seed=0, chunk_tokens=40, progress=False,
                             max_new_tokens=12)
    assert len(train) == 30 and len(held) == 6
    keys = [query_key(q.text) for q in train + held]
    assert len(set(keys)) == len(keys)  # distinct, and held-out disjoint from training
    assert {q.meta["chunk"] for q in train} == set(range(len(pieces)))
    assert {q.meta["chunk"] for q in held} >= set(range(min(6, len(pieces))))
    assert {q.meta["set"] for q in train} == {"train"} and {q.meta["set"] for q in held} == {"heldout"}
    assert all(q.meta["type"] in TYPES for q in train)
    generated = [q for q in train if q.meta["origin"] == "self-study"]
    assert {q.meta["type"] for q in generated} == set(TYPES)  # every type, not the first few filling each chunk's quota
    assert max(Counter(q.meta["type"] for q in generated).values()) <= -(-len(generated) // len(TYPES)) + len(pieces)


def test_generated_queries_by_default_and_none_usable_is_an_error(tiny, tmp_path, monkeypatch):
    job = Compressor(LONG, _cfg(n_queries=12, n_heldout=3, chunk_tokens=40), None, tmp_path / "p", base=tiny, progress=False)
    train, held = job.split()
    assert len(train) == 12 and len(held) == 3 and len(job.dev_q) >= 1 and job.generated
    import softprompt.compress.selfstudy as ss

    monkeypatch.setattr(ss, "self_study", lambda *a, **k: ([], []))
    job = Compressor(LONG, _cfg(), None, tmp_path / "q", base=tiny, progress=False)
    with pytest.raises(SoftPromptError, match="no usable queries"):
        job.split()


# -- training to convergence -----------------------------------------------------------------------
def test_early_stopping_on_a_rising_dev_kl_keeps_the_best_prompt(tiny, tmp_path, monkeypatch):
    job = Compressor(CONTEXT, _cfg(steps=200, eval_every=2, patience=3), _queries(), tmp_path / "p", base=tiny, progress=False)
    job.split()
    entries, _ = job.teacher_entries("train", job.fit_q)
    dev, _ = job.teacher_entries("dev", job.dev_q)
    curve = iter([1.0, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4])
    seen = {}

    def fake_dev(e, prompt=None):
        v = next(curve)
        seen[v] = prompt.vectors().detach().clone()
        return v

    monkeypatch.setattr(job, "loss_on", fake_dev)
    hist = job.train(entries, dev)
    assert job.stopped_early and job.best_step == 4 and len(hist) == 10  # best at step 4, 3 worse evaluations after it
    assert [h["dev_kl"] for h in hist if "dev_kl" in h] == [1.0, 0.8, 0.9, 1.0, 1.1]
    assert torch.equal(job.prompt.vectors().detach(), seen[0.8])  # the best prompt is the one kept


def test_resume_continues_an_interrupted_compression(tiny, tmp_path, monkeypatch):
    def job(out, **kw):
        j = Compressor(CONTEXT, _cfg(steps=12, eval_every=4, patience=0, **kw), _queries(), out, base=tiny, progress=False)
        j.split()
        return j, j.teacher_entries("train", j.fit_q)[0], j.teacher_entries("dev", j.dev_q)[0]

    ref, e, d = job(tmp_path / "ref")
    ref.train(e, d)
    broken, e, d = job(tmp_path / "p")
    calls = {"n": 0}
    orig = broken._loss

    def dies(prompt, entries, **kw):
        calls["n"] += 1
        if calls["n"] > 11:  # 8 steps + 2 dev evaluations (1 batch each) + 1: dies at step 9
            raise KeyboardInterrupt
        return orig(prompt, entries, **kw)

    monkeypatch.setattr(broken, "_loss", dies)
    with pytest.raises(KeyboardInterrupt):
        broken.train(e, d)
    ck = tmp_path / "p" / "compress_checkpoint"
    assert {f.name for f in ck.iterdir()} == {"state.safetensors", "state.json"}  # no pickle
    again, e, d = job(tmp_path / "p", resume=True)
    hist = again.train(e, d)
    assert [h["step"] for h in hist] == list(range(1, 13))
    assert torch.allclose(again.prompt.vectors(), ref.prompt.vectors(), atol=1e-6)


# -- robust runs -----------------------------------------------------------------------------------
def test_a_report_failure_leaves_a_loadable_prompt(tiny, tmp_path, monkeypatch):
    from softprompt.artifact import load_artifact

    def boom(self, heldout):
        raise ModuleNotFoundError("No module named 'rouge_score'")

    monkeypatch.setattr(Compressor, "evaluate", boom)
    with pytest.raises(ModuleNotFoundError):
        compress(CONTEXT, _cfg(), _queries(), tmp_path / "p", base=tiny, progress=False)
    art = load_artifact(tmp_path / "p", base=tiny)
    assert art.kind == "prompt-tuning" and art.prompt.n_virtual == 4


@pytest.mark.parametrize("baselines", [("none",), ("truncated",), ()], ids=["none-only", "truncated-only", "no-baseline"])
def test_the_report_is_written_with_any_subset_of_baselines(tiny, tmp_path, baselines):
    res = compress(CONTEXT, _cfg(baselines=baselines), _queries(), tmp_path / "p", base=tiny, progress=False)
    md = (res.out / "compression_report.md").read_text()
    assert set(res.report["fidelity"]) == {"soft", *baselines}
    ex = res.report["examples"][0]
    for k in ("teacher", "soft", *baselines):
        assert f"- {k}: {ex[k]!r}" in md


@pytest.mark.parametrize("kind,lr", [("prompt-tuning", 0.03), ("prefix", 0.005)])
def test_the_resolved_learning_rate_is_recorded(tiny, tmp_path, kind, lr):
    """With no --lr the kind's default trains, and the report and the artifact's train_config say which."""
    from softprompt.artifact import load_artifact

    res = compress(CONTEXT, _cfg(lr=None, kind=kind, steps=2, baselines=()), _queries(), tmp_path / "p", base=tiny,
                   progress=False)
    assert res.report["train"]["lr"] == lr
    assert load_artifact(tmp_path / "p", base=tiny).meta["train_config"]["lr"] == lr


def test_missing_dependencies_are_found_before_any_work(tiny, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rouge_score" else real(name, *a))
    with pytest.raises(SoftPromptError, match="rouge-score.*nothing was run"):
        Compressor(CONTEXT, _cfg(), _queries(), tmp_path / "p", base=tiny, progress=False)
    assert not (tmp_path / "p").exists()


def test_cli_bad_kind_and_positions(tiny_dir, tmp_path, capsys):
    q = tmp_path / "q.txt"
    q.write_text("\n".join(QUERIES) + "\n")
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    common = ["compress", "--model", str(tiny_dir), "--device", "cpu", "--quiet", "--steps", "2", "--max-new-tokens", "4",
              "--context", str(ctx), "--queries", str(q)]
    rc, _, err = _cli(common + ["--kind", "lora", "--out", str(tmp_path / "a")], capsys)
    assert rc == 2 and "cannot be a compression student" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _cli(common + ["--kind", "prefix", "--tokens", "999", "--out", str(tmp_path / "b")], capsys)
    assert rc == 2 and "has only" in err and len(err.strip().splitlines()) == 1
    for extra in (["--mode-weight", "-1"], ["--objective", "loglik", "--mode-weight", "1"]):
        rc, _, err = _cli(common + extra + ["--out", str(tmp_path / "c")], capsys)
        assert rc == 2 and "--mode-weight" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "c" / "prompt.json").exists()


# -- LLMLingua -------------------------------------------------------------------------------------
def test_llmlingua_baseline_is_its_own_api_output(tiny, tmp_path):
    from llmlingua import PromptCompressor

    from softprompt.compress.lingua import _local_counter, lingua_compress, model_dir

    text = "\n\n".join([LONG, CONTEXT, LONG.replace("ticket", "pass")])
    got = lingua_compress(text, 24, tiny, tiny.tokenizer)
    with _local_counter(tiny.tokenizer):
        pc = PromptCompressor(model_name=str(model_dir(tiny)), device_map="cpu", model_config={"trust_remote_code": False})
    want = pc.compress_prompt([text], target_token=24)["compressed_prompt"]
    assert got == want and got != text
    assert lingua_compress(text, 96, tiny, tiny.tokenizer) != got  # the budget matters
    res = compress(CONTEXT, _cfg(baselines=("truncated", "none", "llmlingua")), _queries(), tmp_path / "p", base=tiny, progress=False)
    assert res.report["llmlingua_text"] == lingua_compress(CONTEXT, 4, tiny, tiny.tokenizer)
    assert "llmlingua" in res.report["fidelity"]


@pytest.mark.parametrize("kind", ["prompt-tuning", "prefix"])
def test_the_students_shortcuts_are_exact(tiny, tmp_path, kind):
    """The student's shared prefix (header and soft positions run once) gives the loss and gradients of
    the plain batch; in bf16 on CPU the student runs on the prepacked copy with the eager-or-sdpa kernel."""
    from softprompt.frozen import EAGER_OR_SDPA, FrozenLinear

    jobs = {}
    for share in (False, True):
        job = Compressor(CONTEXT, _cfg(kind=kind, tokens=4, share_prefix=share, precision="fp32", init="random"), _queries(),
                         tmp_path / f"{kind}-{share}", base=tiny, progress=False)
        train, _ = job.split()
        entries, _ = job.teacher_entries("train", train)
        job.fit_entries = entries
        torch.manual_seed(0)
        prompt = job.make_prompt()
        loss, n = job._loss(prompt, entries[:4])
        loss.backward()
        jobs[share] = (float(loss.detach()) / n, [p.grad.clone() for p in prompt.parameters() if p.requires_grad])
        assert job.student_model is tiny.model  # fp32: the base as it is
    (plain, g0), (shared, g1) = jobs[False], jobs[True]
    assert plain > 1e-3
    assert abs(shared - plain) <= 1e-5 * max(1.0, plain), (plain, shared)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    job = Compressor(CONTEXT, _cfg(kind=kind, precision="bf16"), _queries(), tmp_path / f"{kind}-bf16", base=tiny, progress=False)
    model = job.student_model
    if packing_available(torch.device("cpu"), torch.bfloat16):
        assert any(isinstance(m, FrozenLinear) for m in model.modules())
    else:  # AVX2-only: oneDNN cannot pack bf16; the copy with linear weights cast once
        assert model is not tiny.model and {m.weight.dtype for m in model.modules() if type(m) is torch.nn.Linear} == {torch.bfloat16}
    assert model.config._attn_implementation == EAGER_OR_SDPA
    assert tiny.model.config._attn_implementation != EAGER_OR_SDPA  # the shared base is left alone


def test_training_batches_hold_similar_lengths(tiny, tmp_path, monkeypatch):
    """Bucketed batches (the default) pad far less than random ones and still use every query once an epoch."""
    qs = [Query(("Tell me " + "more " * (3 * i)).strip() + f" about item {i}?") for i in range(16)]
    padded = {}
    for bucket in (True, False):
        job = Compressor(CONTEXT, _cfg(steps=4, batch_size=4, bucket=bucket, eval_every=100, patience=0, heldout=0.0),
                         qs, tmp_path / str(bucket), base=tiny, progress=False, heldout_queries=[Query("Who built it?")])
        job.split()
        entries, _ = job.teacher_entries("train", job.fit_q)
        pads, seen, orig = [], [], job._batch

        def batch(es, orig=orig, pads=pads, seen=seen):
            b = orig(es)
            pads.append(int((b[0]["attention_mask"] == 0).sum()))
            seen.extend(e.query for e in es)
            return b

        monkeypatch.setattr(job, "_batch", batch)
        job.train(entries)
        padded[bucket] = sum(pads)
        assert sorted(seen) == sorted(e.query for e in entries)  # 4 steps x 4 = one epoch of 16
    assert padded[True] * 3 < padded[False]


def test_held_out_queries_are_asked_in_the_training_batches(tiny, monkeypatch):
    """Self-study runs each chunk once per round for both sets: the held-out asks share the chunk's batch."""
    import itertools

    import softprompt.generate as gen
    from softprompt.compress.selfstudy import chunks, self_study

    counter, calls = itertools.count(), []

    def fake(base, prompt, fmt, texts, params, **kw):  # every sample usable and new: one round
        calls.append(len(texts))
        return [f"What does rule number {next(counter)} say?\nmore" for _ in texts]

    monkeypatch.setattr(gen, "generate", fake)
    pieces = chunks(tiny.tokenizer, LONG, 40)
    train, held = self_study(tiny, tiny.tokenizer, LONG, n_train=30, n_heldout=6, seed=0, chunk_tokens=40, progress=False)
    assert len(train) == 30 and len(held) == 6
    assert len(calls) == len(pieces)  # one batch per chunk, not one per chunk and set
    with_held = sum(calls)
    calls.clear()
    self_study(tiny, tiny.tokenizer, LONG, n_train=30, n_heldout=0, seed=0, chunk_tokens=40, progress=False)
    assert len(calls) == len(pieces) and sum(calls) < with_held
