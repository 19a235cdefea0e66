"""bench/tasks.py (every task: zero-shot, few-shot, ours, PEFT prompt tuning from our init, LoRA) on a
tiny model: the JSON has a row per task, method and seed with the recipe's metric; PEFT starts from
our vectors; LoRA leaves the base model as it was; the summary's intervals and goal verdicts follow
from the numbers."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SHARED_DATA, make_tiny_model
from strict import need, need_module

from softprompt.precision import resolve_precision

sys.path.insert(0, str(REPO / "bench"))
need_module("peft")
import peers  # noqa: E402
import tasks  # noqa: E402

ROW_KEYS = {"task", "method", "seed", "metric", "n_eval", "n_train", "bootstrap_low", "bootstrap_high"}


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory, smollm2_dir) -> Path:
    """The tiny llama with a 2048-position window (rotary positions: no weights depend on it), so
    BoolQ and SQuAD passages with demonstrations fit."""
    d = make_tiny_model(tmp_path_factory.mktemp("tasks") / "tiny-long", smollm2_dir)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 2048
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def quick(long_tiny, tmp_path_factory) -> Path:
    need(SHARED_DATA.is_dir(), f"public datasets not found at {SHARED_DATA} (../shared/data from the repo root)")
    out = tmp_path_factory.mktemp("tasks-out")
    assert tasks.main(["--quick", "--model", str(long_tiny), "--out", str(out), "--tasks", "sst2,trec,squad",
                       "--no-inner-progress"]) == 0
    return out


def test_quick_run_writes_every_row_with_the_recipe_metric(quick):
    doc = json.loads((quick / "tasks.json").read_text())
    assert doc["schema"] == tasks.SCHEMA and doc["setup"]["seeds"] == 2 and doc["hardware"]["cpu_model"]
    keys = {(r["task"], r["method"], r["seed"]) for r in doc["rows"]}
    want = {(t, "zero-shot", None) for t in ("sst2", "trec", "squad")}
    want |= {(t, m, s) for t in ("sst2", "trec", "squad") for m in tasks.METHODS[1:] for s in (0, 1)}
    assert keys == want and len(doc["rows"]) == len(want)
    for r in doc["rows"]:
        assert ROW_KEYS <= set(r), (r["task"], r["method"], sorted(ROW_KEYS - set(r)))
        assert r["metric"] == {"sst2": "accuracy", "trec": "accuracy", "squad": "exact_match"}[r["task"]]
        assert 0.0 <= r[r["metric"]] <= 1.0 and r["bootstrap_low"] <= r[r["metric"]] <= r["bootstrap_high"]
        assert r["n_eval"] == (8 if r["task"] != "squad" else 4)
        if r["task"] == "squad":
            assert 0.0 <= r["f1"] <= 1.0 and r["f1"] >= r["exact_match"]
        else:
            assert math.isclose(sum(r["pred_share"].values()), 1.0)
        if r["method"] in tasks.TRAINED:
            assert r["trainable_params"] > 0 and r["train_s"] > 0
        if r["method"] == "peft-prompt-tuning":
            assert r["init_max_abs_diff"] == 0.0, "PEFT did not start from our initial vectors"
            assert r["trainable_params"] == next(x for x in doc["rows"] if x["task"] == r["task"] and x["method"] == "ours"
                                                 and x["seed"] == r["seed"])["trainable_params"]
    check = doc["sst2_fewshot_check"]
    assert len(check["draws"]) == 2 and all(len(d["demo_labels"]) == 4 for d in check["draws"])
    assert all(0.0 <= d[k] <= 1.0 for d in [*check["draws"], check["zero_shot"]] for k in ("accuracy", "calibrated_accuracy", "plain_accuracy"))
    md = (quick / "tasks.md").read_text()
    for heading in ("| task | metric | zero-shot |", "## Where soft prompts lose", "## Goal (issue 18 item 3)",
                    "## Why 4-shot SST-2 falls below zero-shot", "Hardware: "):
        assert heading in md
    assert (quick / "tasks.png").stat().st_size > 1000


def test_render_rebuilds_the_markdown_from_the_json(quick):
    before = (quick / "tasks.md").read_text()
    (quick / "tasks.md").unlink()
    assert tasks.main(["--render", "--out", str(quick)]) == 0
    assert (quick / "tasks.md").read_text() == before


def test_resume_adds_the_peer_rows_without_retraining_ours_and_they_equal_a_fresh_run(quick, long_tiny, tmp_path, monkeypatch):
    """Adding PEFT and LoRA rows to a run that has ours (the 200-step tables) trains only the peers,
    and their rows are the ones an uninterrupted run wrote (same init, batches and LoRA draw)."""
    doc = json.loads((quick / "tasks.json").read_text())
    peer_rows = {(r["method"], r["seed"]): r for r in doc["rows"] if r["task"] == "sst2" and r["method"] in ("peft-prompt-tuning", "lora")}
    assert len(peer_rows) == 4
    doc["rows"] = [r for r in doc["rows"] if not (r["task"] == "sst2" and r["method"] in ("peft-prompt-tuning", "lora"))]
    (tmp_path / "tasks.json").write_text(json.dumps(doc))
    ours_before = [r for r in doc["rows"] if r["method"] == "ours"]

    def no_training(self):
        raise AssertionError("ours was trained again although its row was saved")

    monkeypatch.setattr(tasks.Trainer, "run", no_training)
    assert tasks.main(["--quick", "--model", str(long_tiny), "--out", str(tmp_path), "--tasks", "sst2", "--resume",
                       "--no-inner-progress"]) == 0
    after = json.loads((tmp_path / "tasks.json").read_text())
    assert [r for r in after["rows"] if r["method"] == "ours"] == ours_before
    assert [r["setup"]["tasks"] for r in after["earlier_runs"]] == [["sst2", "trec", "squad"]] and after["setup"]["tasks"] == ["sst2"]
    assert "Assembled by 2 runs" in (tmp_path / "tasks.md").read_text()
    got = {(r["method"], r["seed"]): r for r in after["rows"] if r["task"] == "sst2" and r["method"] in ("peft-prompt-tuning", "lora")}
    assert got.keys() == peer_rows.keys()
    for k, want in peer_rows.items():
        assert got[k]["accuracy"] == want["accuracy"], k
        assert math.isclose(got[k]["first_loss"], want["first_loss"], rel_tol=1e-5), k
        assert math.isclose(got[k]["last_loss"], want["last_loss"], rel_tol=1e-5), k


def test_peft_prompt_tuning_starts_from_our_vectors(long_tiny):
    """With lr 0 nothing moves, so PEFT's table after 'training' must be exactly our initial one (read
    from PEFT's own prompt encoder, not from the stats the helper reports)."""
    from softprompt.base_model import load_base
    from softprompt.data.examples import Example
    from softprompt.train import TrainConfig, Trainer

    base = load_base(str(long_tiny), device="cpu", reuse=False)
    train = [Example({"input": f"text {i}"}, ["yes", "no"][i % 2]) for i in range(8)]
    cfg = TrainConfig(model=str(long_tiny), tokens=4, init="vocab", steps=2, batch_size=4, lr=0.0, precision="fp32", device="cpu", seed=3)
    trainer = Trainer(cfg, train, None, "/nonexistent", base=base, progress=False)
    ours = trainer.prompt.embeddings.detach().clone()
    model, stats = peers.peft_prompt_tuning(trainer, ours.clone())
    table = model.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(table, ours)
    assert stats["init_max_abs_diff"] == 0.0 and stats["init_rms"] == pytest.approx(float(ours.pow(2).mean().sqrt()))
    # PEFT's default start is far from ours (its N(0,1) init is about 10x real embeddings' scale): a missed copy shows
    fresh = load_base(str(long_tiny), device="cpu", reuse=False)
    from peft import PromptTuningConfig, TaskType, get_peft_model

    default = get_peft_model(fresh.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    assert (default.prompt_encoder["default"].embedding.weight.detach() - ours).abs().max() > 0.1


def test_lora_unload_gives_the_base_model_back(long_tiny):
    from softprompt.base_model import load_base
    from softprompt.data.examples import Example
    from softprompt.encoding import PromptFormat
    from softprompt.template import parse_template
    from softprompt.train import TrainConfig, Trainer

    base = load_base(str(long_tiny), device="cpu", reuse=False)
    before = tasks.base_checksum(base)
    train = [Example({"input": f"text {i}"}, ["yes", "no"][i % 2]) for i in range(8)]
    cfg = TrainConfig(model=str(long_tiny), tokens=4, steps=3, batch_size=4, precision="fp32", device="cpu")
    trainer = Trainer(cfg, train, None, "/nonexistent", base=base, progress=False)
    body = PromptFormat(base.tokenizer, parse_template(cfg.template_source()).without_soft(), chat=True)
    model, stats = peers.lora(trainer, body, lr=1e-2)
    assert stats["trainable_params"] > 0 and tasks.base_checksum(base) != before  # LoRA is in the base's modules
    model.unload()
    assert tasks.base_checksum(base) == before


def _rows(task, method, vals, metric="accuracy", **extra):
    return [{"task": task, "method": method, "seed": None if method == "zero-shot" else i, "metric": metric, metric: v,
             "bootstrap_low": v - 0.05, "bootstrap_high": v + 0.05, "first_loss": 3.0, "last_loss": 0.5,
             "pred_share": {"a": 0.5, "b": 0.5}, "gold_share": {"a": 0.5, "b": 0.5}, **extra} for i, v in enumerate(vals)]


def test_t_interval_and_goal_verdicts_follow_the_numbers():
    lo, hi = tasks.t_interval([0.90, 0.91, 0.92])
    assert (lo + hi) / 2 == pytest.approx(0.91) and (hi - lo) / 2 == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    rows = (_rows("sst2", "zero-shot", [0.60]) + _rows("sst2", "few-shot", [0.50, 0.55, 0.60]) + _rows("sst2", "ours", [0.90, 0.91, 0.92])
            + _rows("sst2", "lora", [0.93, 0.94, 0.95])
            + _rows("trec", "zero-shot", [0.60]) + _rows("trec", "few-shot", [0.62, 0.66, 0.70]) + _rows("trec", "ours", [0.60, 0.70, 0.80]))
    doc = {"rows": rows}
    s = tasks.summarize(doc)
    assert s["sst2"]["zero-shot"]["low"] == pytest.approx(0.55)  # deterministic: the bootstrap interval
    md = "\n".join(tasks.analysis(doc, s))
    assert "- sst2: met" in md and "- trec: NOT met" in md and "Met on 1 of 2" in md
    assert "gap to LoRA -0.030" in md


def test_fewshot_finding_follows_the_numbers():
    def draw(seed, last, share, plain_share, acc=0.5, plain_acc=0.8):
        return {"seed": seed, "demo_labels": ["positive", last], "last_label": last, "accuracy": acc, "calibrated_accuracy": acc,
                "positive_share": share, "calibrated_positive_share": share, "plain_accuracy": plain_acc, "plain_positive_share": plain_share}

    z = {"accuracy": 0.7, "calibrated_accuracy": 0.6, "positive_share": 0.7, "calibrated_positive_share": 0.8, "plain_accuracy": 0.85,
         "plain_positive_share": 0.55}
    check = {"n_eval": 32, "gold_positive_share": 0.5, "zero_shot": z, "draws": [draw(0, "negative", 1.0, 0.5), draw(1, "positive", 1.0, 0.4)]}
    md = "\n".join(tasks.fewshot_section(check))
    assert "moves the 'positive' share by 0%" in md and "not the cause here" in md
    assert "comes from how the few-shot prompt is wrapped" in md and "does not beat plain zero-shot (0.850)" in md
    check["draws"] = [draw(0, "negative", 0.2, 0.2), draw(1, "positive", 0.9, 0.9)]  # a recency effect, no chat collapse
    md = "\n".join(tasks.fewshot_section(check))
    assert "moves the 'positive' share by 70%" in md and "not the cause here" not in md and "wrapped" not in md


def test_peft_generation_equals_our_generate_with_the_same_vectors_in_front(long_tiny):
    """PEFT prepends its virtual tokens to everything; our prompt with the same vectors in a
    ``[soft:N] {input}`` template (no chat wrapper) sees the same sequence, so greedy text must agree."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from softprompt.base_model import load_base
    from softprompt.data.examples import Example
    from softprompt.encoding import PromptFormat
    from softprompt.generate import SamplingParams, generate
    from softprompt.prompts import PromptTuning
    from softprompt.template import parse_template

    base = load_base(str(long_tiny), device="cpu", reuse=False)
    torch.manual_seed(0)
    vecs = base.model.get_input_embeddings().weight[torch.randint(0, 1000, (4,))].detach().clone()
    ours = PromptTuning(4, base.hidden_size, init=vecs.clone())
    fmt = PromptFormat(base.tokenizer, parse_template("[soft:4]{input}"), chat=False)
    texts = ["the movie was", "a b c d e f"]
    want = generate(base, ours, fmt, texts, SamplingParams(max_new_tokens=8))
    model = get_peft_model(base.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(vecs)
    got = peers.peft_generate(model, fmt, [Example({"input": t}) for t in texts], 8, base.eos_ids())
    assert got == want and all(w.strip() for w in want)


def test_the_dev_sweep_scores_dev_only_and_names_the_best_configuration(long_tiny, tmp_path, monkeypatch):
    """bench/dev_sweep.py: one tasks.py run per configuration on the dev split; the test split is
    never read, and the configuration named best is the one with the highest dev mean."""
    need(SHARED_DATA.is_dir(), f"public datasets not found at {SHARED_DATA} (../shared/data from the repo root)")
    import dev_sweep

    read = []
    real = tasks.load_split
    monkeypatch.setattr(tasks, "load_split", lambda recipe, data_dir, split, **kw: read.append(split) or real(recipe, data_dir, split, **kw))
    trained = []
    real_cfg = tasks.train_config
    monkeypatch.setattr(tasks, "train_config", lambda *a: trained.append((real_cfg(*a).kind, real_cfg(*a).template)) or real_cfg(*a))
    configs = "vocab-lr0.03-n1000,labels-lr0.1-nall,soft-after-review,prefix-lr0.01,prefix-text-lr0.01"
    assert dev_sweep.main(["--model", str(long_tiny), "--steps", "2", "--seeds", "2", "--eval", "8", "--configs", configs,
                           "--data-dir", str(SHARED_DATA), "--out", str(tmp_path)]) == 0
    assert "test" not in read and set(read) == {"train", "dev"}
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["config"] for r in doc["rows"]] == sorted(configs.split(","))
    assert doc["best"] == max(doc["rows"], key=lambda r: r["mean"])["config"]
    by = {r["config"]: r for r in doc["rows"]}
    assert by["labels-lr0.1-nall"]["lr"] == 0.1 and by["labels-lr0.1-nall"]["init"] == "labels"
    assert by["labels-lr0.1-nall"]["train_examples"] > by["vocab-lr0.03-n1000"]["train_examples"] == 1000
    for r in doc["rows"]:
        assert len(r["scores"]) == 2 and r["n_dev"] == 8 and r["mean"] == pytest.approx(sum(r["scores"]) / 2)
    assert f"**{doc['best']}**" in (tmp_path / "sweep.md").read_text()
    after = "Review: {sentence}\n[soft:20]\nSentiment:"  # the configuration's template, its span given --tokens
    recipe_template = "[soft:20] Review: {sentence}\nSentiment:"
    assert by["soft-after-review"]["template"] == after and ("prompt-tuning", after) in trained
    assert by["vocab-lr0.03-n1000"]["template"] == "the recipe's" and ("prompt-tuning", recipe_template) in trained
    assert by["prefix-lr0.01"]["kind"] == "prefix" and ("prefix", recipe_template) in trained
    assert by["prefix-lr0.01"]["lr"] == 0.01 and len(by["prefix-lr0.01"]["scores"]) == 2
    assert by["prefix-text-lr0.01"]["kind"] == "prefix" and by["prefix-text-lr0.01"]["init"] == "text:" + dev_sweep.SST2_INSTRUCTION
    # precision auto is what this CPU runs natively; the zero-shot row, the same for every
    # configuration, is not scored once per configuration
    native = resolve_precision("auto", announce=False).dtype
    for name in configs.split(","):
        run = json.loads((tmp_path / name / "tasks.json").read_text())
        assert run["setup"]["precision"] == native == by[name]["precision"]
        assert {r["method"] for r in run["rows"]} == {"ours"}


def test_a_template_that_does_not_fit_the_task_is_refused_before_any_work(capsys, tmp_path):
    for argv, msg in ((["--tasks", "sst2", "--template", "[soft:N] {text}"], "uses fields ['text'], recipe sst2 has ['sentence']"),
                      (["--tasks", "sst2,trec", "--template", "[soft:N] {sentence}"], "applies to one task"),
                      (["--tasks", "sst2", "--template", "[soft:0] {sentence}"], "soft span length"),
                      (["--tasks", "sst2", "--kind", "prefix", "--methods", "peft-prompt-tuning"], "not with --kind prefix")):
        with pytest.raises(SystemExit) as e:
            tasks.main([*argv, "--out", str(tmp_path)])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "tasks.json").exists()
