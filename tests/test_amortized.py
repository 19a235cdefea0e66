"""The amortized compressor (docs/compressor.md): training lowers the loss and leaves the base
untouched, the one-forward prompt is what generate uses after save/load, resume is exact, held-out
contexts never reach training, and bad input exits 2 with one line."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from softprompt.compress.amortized import AmortizedCompressor, Compressor, TrainConfig, Trainer
from softprompt.compress.amortized.contexts import Context, read_contexts, read_shared, split_contexts, split_of

TOWNS = ["Vell", "Orra", "Kest", "Mirin", "Dusk", "Pallo", "Tarn", "Ebb", "Sorrel", "Quill", "Brae", "Lune"]
MAKERS = ["Ada Moreau", "Jon Pike", "Lea Varga", "Tom Hale", "Ina Roth", "Raf Cole"]


def _context(i: int) -> str:
    t, m = TOWNS[i % len(TOWNS)], MAKERS[i % len(MAKERS)]
    return (f"The harbor town of {t} sits between two cliffs. Its lighthouse was built in {1800 + 7 * i} by {m}, "
            f"who also founded the school of {t}. Fishing boats leave at {4 + i % 5} in the morning and return before noon. "
            f"The market of {t} sells {['salt', 'rope', 'fish', 'nets'][i % 4]} every {['Monday', 'Friday'][i % 2]}.")


def _contexts(n: int = 8) -> list[Context]:
    return [Context(_context(i), "synthetic") for i in range(n)]


def _cfg(**kw) -> TrainConfig:
    base = dict(memory=4, queries_per_context=3, query_source="sentences", max_new_tokens=4, steps=12, contexts_per_step=2,
                lr=0.05, projector_lr=0.01, eval_every=4, patience=0, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("form", ["kv", "projector"])
def test_training_lowers_the_loss_and_leaves_the_base_bit_identical(tiny, tmp_path, form):
    before = _state_hash(tiny.model)
    ctx = _contexts(8)
    tr = Trainer(_cfg(form=form, steps=16), ctx[:6], ctx[6:], tmp_path / "c", base=tiny, progress=False)
    tr.prepare()
    dev0 = tr.dev_kl()
    train0 = tr.dev_kl(tr.items)
    tr.train()
    comp = tr.save()
    assert tr.dev_kl(tr.items) < 0.9 * train0  # the training contexts' KL falls
    assert comp.meta["metrics"]["best_dev_kl"] < dev0 == comp.meta["metrics"]["first_dev_kl"]  # and the held-out contexts'
    assert _state_hash(tiny.model) == before
    assert all(not p.requires_grad for p in tiny.model.parameters())
    assert (tmp_path / "c" / "loss.png").stat().st_size > 0
    hist = json.loads((tmp_path / "c" / "history.json").read_text())
    assert [h["step"] for h in hist if h["type"] == "eval"] == [0, 4, 8, 12, 16]


@pytest.mark.parametrize("form", ["kv", "projector"])
def test_bf16_training_shares_one_packed_copy_and_follows_the_base(tiny, tmp_path, form):
    """In bf16 every context's job and the encoder pass run one shared prepacked copy of the base (not
    a copy per context: 200 contexts ran out of memory), and its loss is the base's under autocast."""
    from softprompt.frozen import FrozenLinear
    from softprompt.onednn import packing_available

    ctx = _contexts(6)
    tr = Trainer(_cfg(form=form, precision="bf16"), ctx[:4], ctx[4:], tmp_path / "c", base=tiny, progress=False)
    tr.prepare()
    fast = tr.items[0].job.student_model
    if packing_available(torch.device("cpu"), torch.bfloat16):
        assert any(isinstance(m, FrozenLinear) for m in fast.modules())
    else:  # AVX2-only: oneDNN cannot pack bf16, so the copy with linear weights cast once
        assert fast is not tiny.model
        assert {m.weight.dtype for m in fast.modules() if type(m) is torch.nn.Linear} == {torch.bfloat16}
    assert all(it.job.student_model is fast for it in tr.items + tr.dev_items)
    assert tr.encoding.model is fast
    with torch.no_grad():
        packed = [float(tr.loss(it)[0]) for it in tr.dev_items]
        tr.encoding.model = None  # the encoder pass on the base as loaded, under autocast
        plain = [float(tr.loss(it)[0]) for it in tr.dev_items]
    assert packed == pytest.approx(plain, rel=2e-2)


@pytest.mark.parametrize("form", ["kv", "projector"])
def test_the_prompt_is_what_generate_uses_after_save_and_load(tiny, tiny_dir, tmp_path, form, capsys):
    from softprompt.artifact import load_artifact
    from softprompt.cli import main
    from softprompt.generate import SamplingParams, generate

    ctx = _contexts(6)
    tr = Trainer(_cfg(form=form, steps=4), ctx[:4], ctx[4:], tmp_path / "c", base=tiny, progress=False)
    tr.prepare()
    tr.train()
    trained = tr.save()
    comp = Compressor.load(tmp_path / "c", base=tiny)
    text = _context(40)  # a context never seen in training
    direct = comp.prompt(text)
    for k, v in trained.prompt(text).export_tensors().items():  # loading restores the trained compressor exactly
        assert torch.equal(v, direct.export_tensors()[k]), k
    path, prompt, _ = comp.compress(text, tmp_path / "p")
    art = load_artifact(path, base=tiny)
    assert art.kind == ("prefix" if form == "kv" else "prompt-tuning")
    for k, v in direct.export_tensors().items():
        assert torch.equal(v, art.tensors[k]), k
    q = "Who built the lighthouse?"
    want = generate(tiny, direct, art.prompt_format(tiny), [q], SamplingParams(6))
    assert generate(tiny, art.prompt, art.prompt_format(tiny), [q], SamplingParams(6)) == want
    # the CLI: compress --compressor writes the same prompt; generate reads it
    cfile = tmp_path / "ctx.txt"
    cfile.write_text(text)
    assert main(["compress", "--model", str(tiny_dir), "--compressor", str(tmp_path / "c"), "--context", str(cfile),
                 "--out", str(tmp_path / "p2")]) == 0
    art2 = load_artifact(tmp_path / "p2", base=tiny)
    assert all(torch.equal(v, art2.tensors[k]) for k, v in art.tensors.items())
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "p2"), q, "--model", str(tiny_dir), "--max-new-tokens", "6"]) == 0
    assert want[0].strip() in capsys.readouterr().out
    assert art2.meta["compression"]["method"] == "amortized"


def test_resume_is_exact(tiny, tmp_path):
    ctx = _contexts(6)
    full = Trainer(_cfg(form="projector", steps=10, eval_every=3), ctx[:4], ctx[4:], tmp_path / "a", base=tiny, progress=False)
    full.prepare()
    full.train()
    cut = Trainer(_cfg(form="projector", steps=10, eval_every=3), ctx[:4], ctx[4:], tmp_path / "b", base=tiny, progress=False)
    cut.prepare()
    cut.train(stop_after=7)  # killed after step 7: the checkpoint holds step 6
    assert (tmp_path / "b" / "checkpoint.safetensors").exists()
    res = Trainer(_cfg(form="projector", steps=10, eval_every=3, resume=True), ctx[:4], ctx[4:], tmp_path / "b", base=tiny,
                  progress=False)
    f0 = None
    res.prepare()  # queries and teacher targets come from the cache
    f0 = sum(it.job.teacher.forwards for it in res.items + res.dev_items)
    assert f0 == 0
    res.train()
    assert {"type": "resume", "step": 6} in res.history
    for k, v in full.encoder().state_dict().items():
        assert torch.equal(v, res.encoder().state_dict()[k]), k
    evals = lambda t: [h["dev_kl"] for h in t.history if h["type"] == "eval"]  # noqa: E731
    assert evals(full) == evals(res)


def test_held_out_contexts_never_reach_training(tiny_dir, tmp_path):
    from softprompt.cli import main

    texts = [_context(i) for i in range(60)]
    d = tmp_path / "ctx"
    d.mkdir()
    for i, t in enumerate(texts):
        (d / f"c{i}.txt").write_text(t)
    (d / "dup.txt").write_text(texts[0] + "\n")  # the same context again (whitespace differs): one context
    evals = {Context(t, "x").sha for t in texts if split_of(t, 0.2, 0.1) == "eval"}
    assert 3 <= len(evals) <= 25
    assert main(["compressor", "train", "--model", str(tiny_dir), "--contexts", str(d), "--memory", "4", "--out",
                 str(tmp_path / "c"), "--query-source", "sentences", "--queries-per-context", "2", "--max-new-tokens", "3",
                 "--steps", "2", "--eval-every", "1", "--eval-share", "0.2", "--dev-share", "0.1", "--min-tokens", "8",
                 "--quiet"]) == 0
    meta = json.loads((tmp_path / "c" / "compressor.json").read_text())
    used = set(meta["contexts"]["train"]) | set(meta["contexts"]["dev"])
    assert used and not used & evals
    assert len(used) == len(texts) - len(evals)
    assert not set(meta["contexts"]["train"]) & set(meta["contexts"]["dev"])
    cached = {p.stem.rsplit("-", 1)[1] for p in (tmp_path / "c" / "queries").iterdir()}  # nothing was even prepared for them
    assert cached == used


def test_split_is_by_context_and_stable():
    a, b = "One paragraph about rivers.", "Another paragraph about hills."
    assert split_of(a) == split_of("  One   paragraph about rivers. ")
    sp = split_contexts([Context(a, "s"), Context(b, "s"), Context(a, "t")])
    assert sum(len(v) for v in sp.values()) == 3
    assert len({s for s, v in sp.items() for c in v if c.text == a}) == 1


def test_shared_data_contexts_are_split_by_paragraph(tmp_path):
    from conftest import SHARED_DATA
    from strict import need

    need((SHARED_DATA / "squad-v1.1" / "dev-v1.1.json").is_file(), "the shared SQuAD data")
    ctx = read_shared(SHARED_DATA, ("squad",))
    assert len(ctx) > 1000 and all(c.questions for c in ctx[:50])
    assert len({c.sha for c in ctx}) == len(read_contexts([SHARED_DATA / "squad-v1.1" / "dev-v1.1.json"]))
    sp = split_contexts(ctx)
    assert 0.07 < len(sp["eval"]) / len(ctx) < 0.13
    assert not {c.sha for c in sp["eval"]} & {c.sha for c in sp["train"] + sp["dev"]}


def test_cli_bad_input_exits_2_with_one_line(tiny, tiny_dir, other_tiny_dir, tmp_path, capsys):
    from softprompt.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    common = ["compressor", "train", "--model", str(tiny_dir), "--out", str(tmp_path / "c"), "--quiet"]
    cases = [
        (common + ["--contexts", str(empty)], "no contexts found"),
        (common + ["--contexts", str(tmp_path / "missing")], "does not exist"),
        (common + ["--contexts", str(empty), "--memory", "0"], "--memory must be >= 1"),
        (common + ["--contexts", str(empty), "--encoder-lora", "-1"], "--encoder-lora must be a rank"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
    # a compressor made for another base model is refused with one line
    ctx = _contexts(4)
    tr = Trainer(_cfg(steps=1), ctx[:3], ctx[3:], tmp_path / "c", base=tiny, progress=False)
    tr.prepare()
    tr.train()
    tr.save()
    cfile = tmp_path / "ctx.txt"
    cfile.write_text(_context(30))
    argv = ["compress", "--model", str(other_tiny_dir), "--compressor", str(tmp_path / "c"), "--context", str(cfile),
            "--out", str(tmp_path / "p")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "compressor" in err and "trained on base model" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p").exists()
    with pytest.raises(Exception, match="not a compressor"):
        AmortizedCompressor.load(tmp_path / "nothing", base=tiny)
    assert main(common + ["--contexts", str(cfile), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no checkpoint" in err and len(err.splitlines()) == 1
    assert main(common + ["--contexts", str(cfile)]) == 2  # a compressor is in --out already
    err = capsys.readouterr().err.strip()
    assert "already holds a compressor" in err and len(err.splitlines()) == 1
    argv = common[:4] + ["--out", str(tmp_path / "c2"), "--contexts", str(cfile), "--min-tokens", "8", "--quiet"]
    assert main(argv) == 2  # one context: none left to hold out
    err = capsys.readouterr().err.strip()
    assert "no held-out (dev) contexts" in err and len(err.splitlines()) == 1


def test_refine_continues_from_the_compressors_prompt(tiny, tiny_dir, tmp_path, capsys):
    from softprompt.artifact import load_artifact
    from softprompt.cli import main

    ctx = _contexts(5)
    tr = Trainer(_cfg(form="kv", steps=2), ctx[:4], ctx[4:], tmp_path / "c", base=tiny, progress=False)
    tr.prepare()
    tr.train()
    tr.save()
    cfile, qfile = tmp_path / "ctx.txt", tmp_path / "q.txt"
    cfile.write_text(_context(33))
    qfile.write_text("Who built the lighthouse?\nWhen do boats leave?\nWhat does the market sell?\nWhere is the town?\n")
    assert main(["compress", "--model", str(tiny_dir), "--compressor", str(tmp_path / "c"), "--context", str(cfile),
                 "--queries", str(qfile), "--refine", "3", "--max-new-tokens", "4", "--baselines", "truncated,none",
                 "--out", str(tmp_path / "p"), "--quiet"]) == 0
    art = load_artifact(tmp_path / "p", base=tiny)
    assert art.kind == "prefix" and art.meta["compression"]["method"] == "amortized+refine"
    report = json.loads((tmp_path / "p" / "compression_report.json").read_text())
    assert report["train"]["steps"] == 3
    start = Compressor.load(tmp_path / "c", base=tiny).prompt(_context(33))
    assert not torch.equal(start.export_tensors()["prefix_key_values"], art.tensors["prefix_key_values"])


@pytest.mark.slow
@pytest.mark.parametrize("name,lora", [("smollm2-kv16", None), ("smollm2-kv16-lora8", 8)])
def test_the_shipped_smollm2_compressor_loads_and_compresses(smollm2, tmp_path, name, lora):
    from conftest import REPO

    from softprompt.artifact import load_artifact
    from softprompt.generate import SamplingParams, generate

    before = _state_hash(smollm2.model)
    comp = Compressor.load(REPO / "examples" / "compressors" / name, base=smollm2)
    assert comp.form == "kv" and comp.memory == 16
    assert (comp.meta.get("encoder_lora") or {}).get("r") == lora
    path, prompt, _ = comp.compress(_context(3) * 2, tmp_path / "p")
    art = load_artifact(path, base=smollm2)
    assert art.kind == "prefix" and art.prompt.n_virtual == 16 + len(comp.job(_context(3) * 2).head_ids)
    out = generate(smollm2, art.prompt, art.prompt_format(smollm2), ["Who built the lighthouse?"], SamplingParams(8))
    assert out[0].strip()
    assert _state_hash(smollm2.model) == before  # an encoder LoRA sits in a twin, never in the base


def test_a_registered_context_serves_the_compressors_prompt(tiny, tmp_path):
    from softprompt.serve.from_context import register_context
    from softprompt.serve.registry import Registry

    ctx = _contexts(5)
    tr = Trainer(_cfg(form="kv", steps=2), ctx[:4], ctx[4:], tmp_path / "c", base=tiny, progress=False)
    tr.prepare()
    tr.train()
    comp = tr.save()
    (tmp_path / "prompts").mkdir()
    reg = Registry(tiny, tmp_path / "prompts")
    register_context(reg, comp, "harbor", _context(21))
    served = reg.get("harbor")
    want = comp.prompt(_context(21)).export_tensors()
    assert served is not None and served.artifact.kind == "prefix"
    assert all(torch.equal(v, served.artifact.tensors[k]) for k, v in want.items())
    assert served.artifact.meta["compression"]["method"] == "amortized"


def test_encoder_lora_is_in_the_artifact_and_only_on_the_encoder_pass(tiny, tiny_dir, tmp_path):
    """--encoder-lora R: peft's LoRA on the encoder pass only. The base model stays bit-identical (its
    state and its modules: the LoRA sits in a twin sharing its weights); the student pass of training
    equals the same pass on a freshly loaded base that never saw a LoRA; the LoRA's weights are in
    compressor.safetensors, they trained, and they change the encoder's output; loading restores it."""
    from safetensors import safe_open

    from softprompt.base_model import load_base
    from softprompt.compress.amortized.model import MemoryEncoder

    before, modules = _state_hash(tiny.model), [n for n, _ in tiny.model.named_modules()]
    ctx = _contexts(6)
    tr = Trainer(_cfg(form="kv", steps=6, encoder_lora=2, lora_lr=0.05), ctx[:4], ctx[4:], tmp_path / "c", base=tiny,
                 progress=False)
    tr.prepare()
    tr.train()
    comp = tr.save()
    assert _state_hash(tiny.model) == before and [n for n, _ in tiny.model.named_modules()] == modules
    assert not any("lora" in n for n in modules)
    # the student pass: the trainer's loss equals the same student prompt on a base that never had a LoRA
    fresh = load_base(str(tiny_dir), device="cpu")
    item = tr.items[0]
    with torch.no_grad():
        student = tr.encoding.student(item.ctx_ids)
        ours, n = item.job._loss(student, item.entries)
        item.job.base = fresh
        plain, n2 = item.job._loss(student, item.entries)
        item.job.base = tiny
    assert n == n2 and torch.equal(ours, plain)
    # the artifact: LoRA tensors in the safetensors file, its settings in compressor.json
    with safe_open(str(tmp_path / "c" / "compressor.safetensors"), "pt") as f:
        lora_keys = [k for k in f.keys() if k.startswith("lora.")]
        b_norm = sum(float(f.get_tensor(k).abs().sum()) for k in lora_keys if "lora_B" in k)
    assert lora_keys and {("lora_A" in k) for k in lora_keys} == {True, False}
    assert b_norm > 0  # peft starts B at zero: it trained
    meta = json.loads((tmp_path / "c" / "compressor.json").read_text())
    assert meta["encoder_lora"] == {"r": 2, "alpha": 4.0, "targets": ["q_proj", "v_proj"]}
    loaded = Compressor.load(tmp_path / "c", base=tiny)
    text = _context(40)
    got = loaded.prompt(text).export_tensors()
    assert all(torch.equal(v, got[k]) for k, v in comp.prompt(text).export_tensors().items())
    plain_enc = MemoryEncoder(tiny.hidden_size, 4, "kv", init=loaded.encoder.memory)
    without = AmortizedCompressor(tiny, plain_enc, precision="fp32").prompt(text).export_tensors()
    assert not all(torch.equal(v, got[k]) for k, v in without.items())  # the LoRA changes the memory's keys/values
    assert _state_hash(tiny.model) == before
