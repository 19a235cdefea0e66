"""Every task in the data dir on one budget: a hand-written zero-shot prompt, a few-shot prompt, our
prompt tuning, HF PEFT's prompt tuning started from our initial vectors, and a PEFT LoRA reference,
over several seeds, each scored with the task recipe's own metric on the same test examples.

    python bench/tasks.py [--steps 40] [--seeds 3] [--tasks sst2,trec,...]   # SmolLM2, writes bench/results/tasks.*
    python bench/tasks.py --quick --model TINY_DIR --out DIR               # the tiny-model smoke run (tests)
    python bench/tasks.py --render                                          # Markdown + plot from the saved JSON

One process, one base model. Every trained row (ours, PEFT, LoRA) of a seed uses the same training
examples, the same batches (our Trainer's seeded plan), the same AdamW + warmup + linear decay +
clipping (softprompt.optim.PromptOptimizer) and the same step count. Rows are written to the JSON as
they finish, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

from softprompt.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from softprompt.base_model import load_base  # noqa: E402
from softprompt.data import load_recipe, load_split  # noqa: E402
from softprompt.data.recipes import LENGTH_PLACEHOLDER  # noqa: E402
from softprompt.encoding import PromptFormat  # noqa: E402
from softprompt.errors import SoftPromptError  # noqa: E402
from softprompt.evaluate import few_shot_contender, hard_contender  # noqa: E402
from softprompt.generate import SamplingParams, generate  # noqa: E402
from softprompt.hardware import hardware_line, hardware_report  # noqa: E402
from softprompt.precision import resolve_precision  # noqa: E402
from softprompt.scoring import classify, label_logprobs  # noqa: E402
from softprompt.task_metrics import bootstrap_ci, metric_fn  # noqa: E402
from softprompt.template import parse_template  # noqa: E402
from softprompt.template.syntax import fill_length  # noqa: E402
from softprompt.train import TrainConfig, Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA = REPO.parent / "shared" / "data"
TASKS = ["sst2", "trec", "emotion", "agnews", "boolq", "squad", "e2e"]
METHODS = ["zero-shot", "few-shot", "ours", "peft-prompt-tuning", "lora"]
TRAINED = ["ours", "peft-prompt-tuning", "lora"]
MAX_NEW = {"squad": 12, "e2e": 40}  # greedy tokens generated per test example
EXTRA_METRICS = {"squad": ["f1"], "emotion": ["accuracy"]}  # reported beside the recipe's own metric
SCHEMA = 1


def t_interval(xs: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean over seeds; (mean, mean) for a single value."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return (m, m)
    from scipy.stats import t

    h = t.ppf((1 + level) / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return (m - h, m + h)


def scores(task: str, recipe, preds: list[str], test) -> dict:
    refs = [list(e.meta.get("references") or [e.target or ""]) for e in test]
    out = {name: metric_fn(name)(preds, refs) for name in [recipe.metric, *EXTRA_METRICS.get(task, [])]}
    lo, hi = bootstrap_ci(recipe.metric, preds, refs, resamples=200)
    out["bootstrap_low"], out["bootstrap_high"] = lo, hi
    if recipe.is_classification:
        out["pred_share"] = {w: sum(p == w for p in preds) / len(preds) for w in recipe.label_words}
        out["gold_share"] = {w: sum(e.target == w for e in test) / len(test) for w in recipe.label_words}
    else:
        out["mean_pred_words"] = statistics.mean(len(p.split()) for p in preds)
        out["mean_ref_words"] = statistics.mean(len(r[0].split()) for r in refs)
        out["examples"] = [{"pred": p, "ref": r[0]} for p, r in list(zip(preds, refs))[:3]]
    return out


def predict(base, model, prompt, fmt, recipe, task, exs, bf16: bool) -> list[str]:
    """Our scoring/generation path (classification: label ranking; generation: greedy decoding)."""
    if recipe.is_classification:
        return classify(model, prompt, fmt, exs, recipe.label_words, batch_size=16, bf16=bf16)
    return generate(base, prompt, fmt, exs, SamplingParams(max_new_tokens=MAX_NEW[task]), batch_size=8, bf16=bf16)


def base_checksum(base) -> float:
    """A fixed input's logits summed: the base model must be the same before and after every method."""
    with torch.no_grad():
        ids = torch.arange(1, 17).unsqueeze(0)
        return float(base.model(input_ids=ids).logits.double().sum())


def soft_template(args, recipe) -> str:
    """Our rows' template: ``--template`` (its ``[soft:N]`` spans take ``--tokens``) or the recipe's."""
    return fill_length(args.template, LENGTH_PLACEHOLDER, args.tokens) if args.template else recipe.soft_template_for(args.tokens)


def train_config(args, recipe, seed: int) -> TrainConfig:
    return TrainConfig(model=args.model, kind=args.kind, template=soft_template(args, recipe), tokens=args.tokens,
                       init=args.init, chat=recipe.chat, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       warmup=args.warmup, schedule="linear", max_grad_norm=1.0, seed=seed, precision=args.precision, device="cpu",
                       objective=args.objective if recipe.labels else "lm")


def task_data(task: str, args, base) -> tuple:
    """(recipe, training pool, evaluation examples): fixed samples (seed 0) of the train split and of
    ``args.eval_split`` (test, or dev for choosing a configuration without looking at test),
    keeping only examples whose soft-template encoding fits ``args.max_tokens`` (when set)."""
    recipe = load_recipe(task)
    n_eval = args.eval if recipe.is_classification else args.eval_gen
    fmt = PromptFormat(base.tokenizer, parse_template(soft_template(args, recipe)), chat=recipe.chat)

    def sample(split: str, n: int) -> list:
        pool = load_split(recipe, args.data_dir, split, limit=n if not args.max_tokens else 4 * n, seed=0)
        if args.max_tokens:
            pool = [e for e in pool if len(fmt.encode(e).ids) <= args.max_tokens]
        return pool[:n]

    return recipe, sample("train", args.train), sample(args.eval_split, n_eval)


def run_task(task: str, seed: int, data: tuple, args, base, save, bar) -> None:
    """Every row of one task and seed (the zero-shot row with seed 0) not yet in ``save``."""
    recipe, train, test = data
    ref_sum = base_checksum(base)
    bf16 = args.precision == "bf16"
    common = {"task": task, "metric": recipe.metric, "n_eval": len(test), "n_train": len(train)}

    def row(method, seed, preds, **extra):
        save({**common, "method": method, "seed": seed, **scores(task, recipe, preds, test), **extra})
        bar.update(1)

    if seed == 0 and not args.no_zero_shot and not save.has(task, "zero-shot", None):
        t0 = time.perf_counter()
        c = hard_contender(base, "hand-written", recipe.hard_prompt, recipe.chat)
        row("zero-shot", None, predict(base, base.model, None, c.fmt, recipe, task, test, bf16), eval_s=time.perf_counter() - t0,
            prompt=recipe.hard_prompt)
    if seed < args.fewshot_seeds and not save.has(task, "few-shot", seed):
        t0 = time.perf_counter()
        c = few_shot_contender(base, recipe.hard_prompt, train, recipe.few_shot_k, seed=seed, chat=recipe.chat)
        exs = [c.examples_transform(e) for e in test]
        row("few-shot", seed, predict(base, base.model, None, c.fmt, recipe, task, exs, bf16), eval_s=time.perf_counter() - t0,
            k=recipe.few_shot_k, prompt_tokens_first_example=len(c.fmt.prompt_ids(exs[0])))
    if all(save.has(task, m, seed) for m in args.methods):
        return
    cfg = train_config(args, recipe, seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, train, None, Path(tmp) / "prompt", base=base, progress=args.inner_progress)
        start = trainer.prompt.embeddings if args.kind == "prompt-tuning" else next(trainer.prompt.parameters())
        init = start.detach().clone()  # PEFT's prompt tuning starts from it
        if not save.has(task, "ours", seed):  # on resume the peers need only the init and the batches
            t0 = time.perf_counter()
            res = trainer.run()
            train_s = time.perf_counter() - t0
    trainer.prompt.eval()
    if not save.has(task, "ours", seed):
        losses = [h["loss"] for h in trainer.history if h.get("type") == "train"]
        t0 = time.perf_counter()
        preds = predict(base, trainer.model, trainer.prompt, trainer.fmt, recipe, task, test, bf16)
        row("ours", seed, preds, train_s=train_s, step_s=train_s / res.steps_done, eval_s=time.perf_counter() - t0,
            first_loss=losses[0], last_loss=losses[-1], trainable_params=trainer.prompt.num_trainable(),
            init_rms=float(init.pow(2).mean().sqrt()))
    if "peft-prompt-tuning" in args.methods and not save.has(task, "peft-prompt-tuning", seed):
        t0 = time.perf_counter()
        with tqdm(total=cfg.steps, desc=f"{task} peft s{seed}", unit="step", leave=False, disable=not args.inner_progress) as b:
            model, st = peers.peft_prompt_tuning(trainer, init.clone(), bar=b)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if recipe.is_classification:
            preds = peers.peft_classify(model, trainer.fmt, test, recipe.label_words, bf16=bf16)
        else:
            preds = peers.peft_generate(model, trainer.fmt, test, MAX_NEW[task], base.eos_ids(), batch_size=1, bf16=bf16)  # unpadded
        st.pop("losses")
        row("peft-prompt-tuning", seed, preds, train_s=train_s, eval_s=time.perf_counter() - t0, **st)
        del model
    if "lora" in args.methods and not save.has(task, "lora", seed):
        body = PromptFormat(base.tokenizer, parse_template(cfg.template).without_soft(), chat=recipe.chat, max_length=base.max_positions)
        t0 = time.perf_counter()
        with tqdm(total=cfg.steps, desc=f"{task} lora s{seed}", unit="step", leave=False, disable=not args.inner_progress) as b:
            model, st = peers.lora(trainer, body, args.lora_lr, bar=b)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        preds = predict(base, base.model, None, body, recipe, task, test, bf16)  # LoRA sits inside base.model's modules
        st.pop("losses")
        row("lora", seed, preds, train_s=train_s, eval_s=time.perf_counter() - t0, **st)
        model.unload()
        del model
    now = base_checksum(base)
    if now != ref_sum:
        raise RuntimeError(f"{task} seed {seed}: the base model changed under the peers ({ref_sum} -> {now})")


def sst2_fewshot_check(args, base, draws: int) -> dict:
    """Why 4-shot SST-2 can fall below zero-shot: per demonstration draw, the share of 'positive'
    predictions against the last demonstration's label, and accuracy before and after contextual
    calibration (Zhao et al. 2021: divide out the label probabilities the prompt gives a content-free
    input, 'N/A')."""
    from softprompt.data.examples import Example

    recipe, train, test = task_data("sst2", args, base)
    labels = recipe.label_words
    gold = torch.tensor([labels.index(e.target) for e in test])
    out = {"n_eval": len(test), "labels": labels, "gold_positive_share": float((gold == labels.index("positive")).float().mean()), "draws": []}
    pos = labels.index("positive")

    def measure(fmt, exs, free):
        bf16 = args.precision == "bf16"
        lp = label_logprobs(base.model, None, fmt, exs, labels, batch_size=16, bf16=bf16)
        cal = lp - label_logprobs(base.model, None, fmt, [free], labels, bf16=bf16)[0]
        acc = float((lp.argmax(-1) == gold).float().mean())
        return acc, float((cal.argmax(-1) == gold).float().mean()), float((lp.argmax(-1) == pos).float().mean()), \
            float((cal.argmax(-1) == pos).float().mean())

    free = Example({"sentence": "N/A"}, None)
    c = hard_contender(base, "hand-written", recipe.hard_prompt, recipe.chat)
    acc, cal, share, cal_share = measure(c.fmt, test, free)
    out["zero_shot"] = {"accuracy": acc, "calibrated_accuracy": cal, "positive_share": share, "calibrated_positive_share": cal_share}
    c = hard_contender(base, "hand-written", recipe.hard_prompt, chat=False)  # the same text without the chat template
    acc, _, share, _ = measure(c.fmt, test, free)
    out["zero_shot"].update(plain_accuracy=acc, plain_positive_share=share)
    for seed in tqdm(range(draws), desc="sst2 few-shot check", unit="draw"):
        c = few_shot_contender(base, recipe.hard_prompt, train, recipe.few_shot_k, seed=seed, chat=recipe.chat)
        demos = c.examples_transform(free).fields["_demonstrations"]
        demo_labels = [ln.rsplit(" ", 1)[-1] for ln in demos.strip().split("\n\n")]
        acc, cal, share, cal_share = measure(c.fmt, [c.examples_transform(e) for e in test], c.examples_transform(free))
        p = few_shot_contender(base, recipe.hard_prompt, train, recipe.few_shot_k, seed=seed, chat=False)
        p_acc, _, p_share, _ = measure(p.fmt, [p.examples_transform(e) for e in test], p.examples_transform(free))
        out["draws"].append({"seed": seed, "demo_labels": demo_labels, "last_label": demo_labels[-1], "accuracy": acc,
                             "calibrated_accuracy": cal, "positive_share": share, "calibrated_positive_share": cal_share,
                             "plain_accuracy": p_acc, "plain_positive_share": p_share})
    return out


class Saver:
    """Rows appended to the results JSON as they finish (atomic writes), and looked up on resume."""

    def __init__(self, path: Path, doc: dict):
        self.path, self.doc = path, doc

    def __call__(self, row: dict) -> None:
        self.doc["rows"].append(row)
        self.write()

    def write(self) -> None:
        atomic_write_json(self.path, self.doc)

    def has(self, task: str, method: str, seed: int | None) -> bool:
        return any(r["task"] == task and r["method"] == method and r["seed"] == seed for r in self.doc["rows"])


# -- the summary -----------------------------------------------------------------------------------------
def summarize(doc: dict) -> dict:
    """Per task and method: the per-seed scores of the recipe's metric, their mean and t-interval."""
    out: dict = {}
    for r in doc["rows"]:
        out.setdefault(r["task"], {}).setdefault(r["method"], []).append(r)
    summary = {}
    for task, methods in out.items():
        summary[task] = {}
        for method, rows in methods.items():
            vals = [r[r["metric"]] for r in sorted(rows, key=lambda r: -1 if r["seed"] is None else r["seed"])]
            lo, hi = t_interval(vals)
            if len(rows) == 1:  # zero-shot (deterministic), few-shot with one draw: the bootstrap interval over examples
                lo, hi = rows[0]["bootstrap_low"], rows[0]["bootstrap_high"]
            summary[task][method] = {"metric": rows[0]["metric"], "mean": statistics.mean(vals), "low": lo, "high": hi, "per_seed": vals,
                                     "rows": rows}
    return summary


def fmt_cell(s: dict | None) -> str:
    if not s:
        return "—"
    return f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def analysis(doc: dict, summary: dict) -> list[str]:
    """The findings, computed from the numbers."""
    st = doc.get("setup", {})
    md = ["## Where soft prompts lose, and why", ""]
    if st:
        md += [f"Every trained row saw {st['steps'] * st['batch_size']} training examples ({st['steps']} steps of batch {st['batch_size']}): "
               "a small budget, so the verdicts below are about prompts trained this briefly.", ""]
    goal_rows, gaps, vs_peft = [], {}, {"above": [], "below": [], "within": []}
    for task in TASKS:
        s = summary.get(task)
        if not s or "ours" not in s:
            continue
        ours = s["ours"]
        hard = [m for m in ("zero-shot", "few-shot") if m in s]
        if not hard:  # --no-zero-shot and no few-shot: nothing untrained to compare against
            continue
        base_best = max(hard, key=lambda m: s[m]["mean"])
        b = s[base_best]
        notes = []
        if "lora" in s:
            gaps[task] = ours["mean"] - s["lora"]["mean"]
            notes.append(f"gap to LoRA {gaps[task]:+.3f}")
        if "peft-prompt-tuning" in s:
            p = s["peft-prompt-tuning"]
            rel = "above" if ours["low"] > p["high"] else "below" if ours["high"] < p["low"] else "within the interval of"
            vs_peft[rel.split()[0]].append(task)
            notes.append(f"ours {rel} PEFT's prompt tuning ({ours['mean']:.3f} vs {p['mean']:.3f})")
        beats = ours["low"] > b["high"]
        lost = ours["mean"] <= b["mean"]
        verdict = "beats" if beats else ("loses to" if lost else "is not outside the interval of")
        line = f"- **{task}** ({ours['metric']}): ours {fmt_cell(ours)} {verdict} the best untrained prompt ({base_best}, {fmt_cell(b)})" \
               + "".join(f"; {n}" for n in notes) + "."
        why = []
        last = statistics.mean(r["last_loss"] for r in ours["rows"])
        first = statistics.mean(r["first_loss"] for r in ours["rows"])
        why.append(f"training loss {first:.3f} -> {last:.3f}")
        r0 = ours["rows"]
        if "pred_share" in r0[0]:
            share = {w: statistics.mean(r["pred_share"][w] for r in r0) for w in r0[0]["pred_share"]}
            top = max(share, key=share.get)
            gold = r0[0]["gold_share"][top]
            why.append(f"most predicted label '{top}' {share[top]:.0%} of predictions (gold {gold:.0%})")
            lost_classes = [w for w, v in share.items() if v == 0 and r0[0]["gold_share"][w] > 0]
            if lost_classes:
                why.append(f"never predicted: {', '.join(lost_classes)}")
        else:
            pw = statistics.mean(r["mean_pred_words"] for r in r0)
            why.append(f"mean output {pw:.1f} words vs {r0[0]['mean_ref_words']:.1f} in the first reference")
            if task == "squad":
                f1 = statistics.mean(r["f1"] for r in r0)
                why.append(f"F1 {f1:.3f} against exact match {ours['mean']:.3f} (partial spans)")
        md.append(line + " Diagnostics: " + "; ".join(why) + ".")
        if task in ("sst2", "trec", "emotion", "agnews", "boolq"):
            goal_rows.append((task, beats, ours, base_best, b))
    if gaps:
        md += ["", f"Gap to LoRA (ours - LoRA, mean over seeds): mean {statistics.mean(gaps.values()):+.3f} over {len(gaps)} tasks "
               f"(LoRA ahead by {-statistics.mean(gaps.values()):.3f}); ours at or "
               f"above LoRA on {', '.join(t for t, g in gaps.items() if g >= 0) or 'none'}; below on "
               f"{', '.join(t for t, g in gaps.items() if g < 0) or 'none'}. Against PEFT's prompt tuning from the same init: ours above "
               f"its interval on {', '.join(vs_peft['above']) or 'none'}, below on {', '.join(vs_peft['below']) or 'none'}, "
               f"overlapping on {', '.join(vs_peft['within']) or 'none'}."]
    md += ["", "## Goal (issue 18 item 3): on every classification task the soft prompt beats the best hand-written or few-shot prompt "
           "outside the interval", "",
           "Criterion: the lower end of ours' 95% t-interval over seeds is above the upper end of the best untrained prompt's interval "
           "(its t-interval over demonstration draws when there are several, else the bootstrap interval over the test examples).", ""]
    for task, beats, ours, name, b in goal_rows:
        md.append(f"- {task}: {'met' if beats else 'NOT met'} (ours low {ours['low']:.3f} vs {name} high {b['high']:.3f})")
    met = sum(b for _, b, *_ in goal_rows)
    md += ["", f"Met on {met} of {len(goal_rows)} classification tasks measured." if goal_rows else "No classification task measured.", ""]
    return md


def fewshot_section(check: dict | None) -> list[str]:
    if not check:
        return []
    z, draws = check["zero_shot"], check["draws"]
    plain = "plain_accuracy" in z
    gold = check["gold_positive_share"]
    md = ["## Why 4-shot SST-2 falls below zero-shot (measured)", "",
          f"{check['n_eval']} SST-2 test sentences (gold 'positive' share {gold:.0%}), the recipe's hand-written "
          "prompt, its 4 demonstrations drawn per seed from the training pool. Calibrated: each label's log-probability minus the one the "
          "same prompt gives the content-free input 'N/A' (contextual calibration, Zhao et al. 2021). Written by the run, or by "
          "`bench/tasks.py --fewshot-check-only` into tasks_sst2_fewshot.json, which replaces it."
          + (" Plain: the same text without the chat template (a bare continuation, demonstrations and all)." if plain else ""), "",
          "| prompt | demonstration labels | accuracy | 'positive' share | calibrated accuracy | calibrated 'positive' share |"
          + (" plain accuracy | plain 'positive' share |" if plain else ""),
          "|---|---|---|---|---|---|" + ("---|---|" if plain else "")]

    def extra(d):
        return f" {d['plain_accuracy']:.3f} | {d['plain_positive_share']:.0%} |" if plain else ""

    md.append(f"| zero-shot | — | {z['accuracy']:.3f} | {z['positive_share']:.0%} | {z['calibrated_accuracy']:.3f} | "
              f"{z['calibrated_positive_share']:.0%} |" + extra(z))
    for d in draws:
        md.append(f"| 4-shot seed {d['seed']} | {', '.join(d['demo_labels'])} | {d['accuracy']:.3f} | {d['positive_share']:.0%} | "
                  f"{d['calibrated_accuracy']:.3f} | {d['calibrated_positive_share']:.0%} |" + extra(d))
    acc = statistics.mean(d["accuracy"] for d in draws)
    cal = statistics.mean(d["calibrated_accuracy"] for d in draws)
    share = statistics.mean(d["positive_share"] for d in draws)
    by_last = {}
    for d in draws:
        by_last.setdefault(d["last_label"], []).append(d["positive_share"])
    last = "; ".join(f"last demonstration '{k}': mean 'positive' share {statistics.mean(v):.0%} over {len(v)} draws"
                     for k, v in sorted(by_last.items()))
    md += ["", f"Mean over draws: 4-shot accuracy {acc:.3f} against zero-shot {z['accuracy']:.3f}; 4-shot answers 'positive' for "
           f"{share:.0%} of the sentences (zero-shot {z['positive_share']:.0%}, gold {gold:.0%}). By the last demonstration's label: {last}."]
    spread = max(statistics.mean(v) for v in by_last.values()) - min(statistics.mean(v) for v in by_last.values())
    md.append(f"Recency (the last demonstration's label) moves the 'positive' share by {spread:.0%} between the groups"
              + (": not the cause here." if spread < 0.1 else "."))
    md.append(f"Contextual calibration gives {cal:.3f} ({cal - acc:+.3f})"
              + (": the bias is not a constant label prior that one content-free input can divide out." if cal - acc < 0.05 else
                 ": much of the loss is a label prior the demonstrations add."))
    if plain:
        pacc = statistics.mean(d["plain_accuracy"] for d in draws)
        pshare = statistics.mean(d["plain_positive_share"] for d in draws)
        md.append(f"Without the chat template the same 4-shot text answers 'positive' for {pshare:.0%} (inside the chat turn: {share:.0%}) "
                  f"and scores {pacc:.3f} (inside the chat turn: {acc:.3f})"
                  + (": the collapse toward one label comes from how the few-shot prompt is wrapped for the instruct model (every "
                     "demonstration pasted into a single user message, answered once by the assistant), not from the demonstrations' "
                     "labels." if abs(share - gold) > abs(pshare - gold) + 0.1 else ".")
                  + f" As a bare continuation, 4-shot {'beats' if pacc > z['plain_accuracy'] else 'does not beat'} plain zero-shot "
                  f"({z['plain_accuracy']:.3f}) on these {check['n_eval']} sentences.")
    return md + [""]


CLASSIFY_NOTE = ", ours with the `classify` objective (softmax over the label words) on classification tasks"


def markdown(doc: dict) -> str:
    summary = summarize(doc)
    st = doc["setup"]
    runs = [r["setup"] for r in doc.get("earlier_runs", []) if "setup" in r] + [st]
    seeds = max(r["seeds"] for r in runs)
    md = ["# Every task: hand-written, few-shot, our prompt tuning, PEFT prompt tuning, LoRA", "",
          f"Model: {st['model']}. Up to {seeds} seeds (the per-seed scores below give each cell's count); each seed trains on "
          f"the same {st['train_examples']} training examples (a fixed "
          f"sample per task) for {st['steps']} steps of batch {st['batch_size']}, lr {st['lr']} (LoRA {st['lora_lr']}), warmup "
          f"{st['warmup']} then linear decay, gradient clipping 1.0, AdamW, "
          f"{st.get('precision', 'fp32')} (ours trains in it, PEFT and LoRA under its autocast, scoring too); "
          f"{st['tokens']} virtual tokens, `{st['init']}` init"
          f"{CLASSIFY_NOTE if st.get('objective') == 'classify' else ''}. "
          f"{'Dev' if st.get('eval_split') == 'dev' else 'Test'} examples: {st['eval']} per classification task, "
          f"{st['eval_gen']} per generation task (fixed samples of the {st.get('eval_split', 'test')} split). "
          f"Few-shot: the recipe's k demonstrations drawn from the training pool with seed{'s' if st['fewshot_seeds'] > 1 else ''} "
          f"{', '.join(map(str, range(st['fewshot_seeds'])))}, the same for every seed of the trained rows. "
          f"Examples longer than {st['max_tokens'] or 'the window'} tokens (soft-template encoding) are left out of both samples. "
          f"Budget: {st['budget']}.", "",
          hardware_line(doc["hardware"]), ""]
    if len(runs) > 1:  # resumed runs: each added rows under the settings above, on its own command line
        md += [f"Assembled by {len(runs)} runs, each keeping the rows before it: "
               + "; ".join(f"`{r.get('command', '?')}` ({r.get('date', '?')})" for r in runs) + ".", ""]
    md += [
          "Cells: mean over seeds [95% t-interval over seeds]; a row measured once (zero-shot, which is deterministic, and few-shot "
          "with one demonstration draw) has the bootstrap interval over the test examples instead. "
          "Metric: the recipe's own (accuracy; macro-F1 for tweeteval emotion; exact match for SQuAD, F1 beside it; "
          "ROUGE-L for E2E).", "",
          "| task | metric | zero-shot | few-shot | ours | PEFT prompt tuning (our init) | LoRA r=8 | ours - LoRA |",
          "|---|---|---|---|---|---|---|---|"]
    for task in TASKS:
        s = summary.get(task)
        if not s:
            continue
        gap = f"{s['ours']['mean'] - s['lora']['mean']:+.3f}" if "ours" in s and "lora" in s else "—"
        md.append(f"| {task} | {next(iter(s.values()))['metric']} | " + " | ".join(fmt_cell(s.get(m)) for m in METHODS) + f" | {gap} |")
    md += ["", "Per seed (a cell's scores in seed order):", "",
           "| task | method | per-seed scores | extra metrics | train s/run | init max abs diff to ours |", "|---|---|---|---|---|---|"]
    for task in TASKS:
        for method in METHODS:
            s = summary.get(task, {}).get(method)
            if not s:
                continue
            extra = [f"{k} {statistics.mean(r[k] for r in s['rows']):.3f}" for k in EXTRA_METRICS.get(task, [])]
            tr = [r["train_s"] for r in s["rows"] if "train_s" in r]
            diff = [r["init_max_abs_diff"] for r in s["rows"] if "init_max_abs_diff" in r]
            md.append(f"| {task} | {method} | {', '.join(f'{v:.3f}' for v in s['per_seed'])} | {', '.join(extra) or '—'} | "
                      f"{statistics.mean(tr):.0f} |" if tr else f"| {task} | {method} | {', '.join(f'{v:.3f}' for v in s['per_seed'])} | "
                      f"{', '.join(extra) or '—'} | — |")
            md[-1] += f" {max(diff):.1e} |" if diff else " — |"
    skipped = [m for m in TRAINED if m not in doc["setup"].get("methods", TRAINED)]
    wanted = [m for m in METHODS if m not in skipped]
    missing = [t for t in doc["setup"]["tasks"] if t not in summary or any(m not in summary[t] for m in wanted)]
    if skipped:
        md += ["", f"**Not run in this run (--methods):** {', '.join(skipped)}."]
    if missing:
        md += ["", f"**Incomplete:** {', '.join(missing)} did not finish every method within the run (rows above are what finished)."]
    md += [""] + analysis(doc, summary) + fewshot_section(doc.get("sst2_fewshot_check"))
    md += ["## Setup notes", "",
           "- PEFT's prompt tuning gets our initial vectors copied into its prompt encoder (the `init max abs diff` column is "
           "PEFT's starting table against ours: 0 when the copy took) and runs its own forward and loss; it prepends its virtual "
           "tokens before the chat header, ours sit where the recipe's template puts `[soft:N]`. Same token sequences otherwise. "
           "PEFT generates one example at a time: PEFT ignores position ids, so a left-padded batch would put the pads between its "
           "virtual tokens and the text and shift every text position.",
           "- LoRA (r=8, alpha 16, every attention and MLP projection) trains on the recipe's template without the soft span, "
           "with our target-token loss, on the same batches; it is scored by the same label-ranking and greedy-decoding code as ours.",
           "- Classification is label ranking (summed log-probability of each label word); generation is greedy decoding.",
           f"- Command: `{st['command']}`; started {st['date']}; {doc.get('wall_s', 0):.0f} s of wall time for the rows present."]
    md += [f"- Rerun: {st['rerun']}"] if st.get("rerun") else []
    md += [""]
    return "\n".join(md) + "\n"


def plot(doc: dict, path: Path) -> None:
    from softprompt.plots import _plt, save_figure

    summary = summarize(doc)
    tasks = [t for t in TASKS if t in summary]
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(2.6 * len(tasks), 3.6), squeeze=False)
    colors = ["tab:gray", "tab:olive", "tab:blue", "tab:orange", "tab:green"]
    for ax, task in zip(axes[0], tasks):
        s = summary[task]
        for i, m in enumerate(METHODS):
            if m not in s:
                continue
            c = s[m]
            ax.bar(i, c["mean"], color=colors[i], yerr=[[c["mean"] - c["low"]], [c["high"] - c["mean"]]], capsize=3)
            ax.scatter([i] * len(c["per_seed"]), c["per_seed"], color="black", s=8, zorder=3)
        ax.set_xticks(range(len(METHODS)), ["0-shot", "few", "ours", "PEFT", "LoRA"], rotation=45, fontsize=8)
        ax.set_title(f"{task} ({next(iter(s.values()))['metric']})", fontsize=9)
        ax.set_ylim(0, 1)
    fig.suptitle(f"{doc['setup']['model']}: {doc['setup']['steps']} steps, {doc['setup']['seeds']} seeds (mean, 95% t-interval, seeds as dots)",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def render(out: Path) -> None:
    doc = json.loads((out / "tasks.json").read_text())
    extra = out / "tasks_sst2_fewshot.json"  # the few-shot check rerun on its own (--fewshot-check-only) replaces the run's
    if extra.exists():
        doc["sst2_fewshot_check"] = json.loads(extra.read_text())
    atomic_write_text(out / "tasks.md", markdown(doc))
    plot(doc, out / "tasks.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data-dir", type=Path, default=DATA)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=float, default=0.06)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="bf16",
                    help="every method's: ours trains in it, PEFT and LoRA run under its autocast, scoring too; "
                         "auto: bf16 where this CPU runs it natively, else fp32")
    ap.add_argument("--no-zero-shot", action="store_true",
                    help="skip the hand-written zero-shot row (a sweep that scores it once elsewhere)")
    ap.add_argument("--init", default="vocab")
    ap.add_argument("--kind", default="prompt-tuning", choices=["prompt-tuning", "prefix", "p-tuning"],
                    help="our rows' kind (PEFT's prompt-tuning row needs prompt-tuning: it starts from our vectors)")
    ap.add_argument("--template", default="",
                    help="our rows' soft template instead of the recipe's (one task; [soft:N] takes --tokens), "
                         "e.g. a hybrid of soft spans and the hand-written instruction")
    ap.add_argument("--objective", choices=["lm", "classify"], default="lm",
                    help="our rows' training objective on classification tasks (generation tasks always use lm)")
    ap.add_argument("--train", type=int, default=1000, help="training examples per task (a fixed sample)")
    ap.add_argument("--eval", type=int, default=200, help="test examples per classification task")
    ap.add_argument("--eval-gen", type=int, default=40, help="test examples per generation task")
    ap.add_argument("--eval-split", choices=["test", "dev"], default="test",
                    help="the split scored: test for the table, dev to choose a configuration (test unseen)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(TRAINED), help=f"trained rows to run (of {', '.join(TRAINED)}); ours always runs")
    ap.add_argument("--fewshot-seeds", type=int, default=1, help="few-shot demonstration draws (seeds 0..N-1), each a row")
    ap.add_argument("--max-tokens", type=int, default=0, help="keep only examples whose soft-template encoding is at most this long (0: all)")
    ap.add_argument("--fewshot-draws", type=int, default=6, help="demonstration draws in the SST-2 few-shot check (0: skip)")
    ap.add_argument("--budget", default="", help="the time budget the run was sized for (recorded)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in OUT/tasks.json and run the rest")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 2 seeds, 8/4 test examples (use with a tiny --model)")
    ap.add_argument("--fewshot-check-only", action="store_true", help="run only the SST-2 few-shot check into OUT/tasks_sst2_fewshot.json")
    ap.add_argument("--render", action="store_true", help="rewrite tasks.md and tasks.png from OUT/tasks.json")
    ap.add_argument("--no-inner-progress", dest="inner_progress", action="store_false")
    args = ap.parse_args(argv)
    if args.precision == "auto":
        args.precision = resolve_precision("auto", announce=False).dtype
    if args.render:
        render(args.out)
        return 0
    if args.fewshot_check_only:
        atomic_write_json(args.out / "tasks_sst2_fewshot.json", {**sst2_fewshot_check(args, load_base(args.model, device="cpu"),
                                                                                      args.fewshot_draws), "hardware": hardware_report()})
        if (args.out / "tasks.json").exists():
            render(args.out)
        return 0
    if args.quick:
        args.steps, args.seeds, args.eval, args.eval_gen, args.train, args.batch_size = 2, 2, 8, 4, 24, 4
        args.fewshot_draws, args.fewshot_seeds = 2, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    args.methods = list(dict.fromkeys(["ours", *args.methods.split(",")]))
    if [m for m in args.methods if m not in TRAINED]:
        ap.error(f"--methods: unknown {', '.join(m for m in args.methods if m not in TRAINED)} (known: {', '.join(TRAINED)})")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"--tasks: unknown {', '.join(unknown)} (known: {', '.join(TASKS)})")
    if args.kind != "prompt-tuning" and "peft-prompt-tuning" in args.methods:
        ap.error(f"--methods peft-prompt-tuning starts from our prompt-tuning vectors: not with --kind {args.kind}")
    if args.template:
        if len(tasks) != 1:
            ap.error(f"--template: applies to one task, got --tasks {','.join(tasks)}")
        recipe = load_recipe(tasks[0])
        try:
            fields = parse_template(soft_template(args, recipe)).fields
        except SoftPromptError as e:
            ap.error(f"--template: {e}")
        if set(fields) != set(recipe.fields):
            ap.error(f"--template: uses fields {sorted(fields)}, recipe {tasks[0]} has {sorted(recipe.fields)}")
    path = args.out / "tasks.json"
    hw = hardware_report()
    print(hardware_line(hw), flush=True)
    setup = {"model": "SmolLM2-135M-Instruct (embedded)" if args.model == "smollm2" else args.model, "tasks": tasks,
             "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "lora_lr": args.lora_lr, "warmup": args.warmup,
             "tokens": args.tokens, "precision": args.precision, "init": args.init, "objective": args.objective, "kind": args.kind,
             "template": fill_length(args.template, LENGTH_PLACEHOLDER, args.tokens) if args.template else "the recipe's",
             "train_examples": args.train, "eval": args.eval, "eval_gen": args.eval_gen, "eval_split": args.eval_split,
             "seeds": args.seeds, "methods": args.methods, "fewshot_seeds": args.fewshot_seeds, "max_tokens": args.max_tokens,
             "quick": args.quick, "budget": args.budget or "not stated",
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(["python", "bench/tasks.py", *(argv or sys.argv[1:])])}
    doc = {"schema": SCHEMA, "setup": setup, "hardware": hw, "rows": [], "wall_s": 0.0}
    if args.resume and path.exists():
        old = json.loads(path.read_text())
        doc["rows"], doc["wall_s"] = old["rows"], old.get("wall_s", 0.0)
        # this run's setup replaces the old one: keep the earlier runs' setups (and a merge's sources)
        doc["earlier_runs"] = [*old.get("earlier_runs", []), {k: old[k] for k in ("setup", "hardware", "merged_from") if k in old}]
        if "sst2_fewshot_check" in old:
            doc["sst2_fewshot_check"] = old["sst2_fewshot_check"]
    save = Saver(path, doc)
    base = load_base(args.model, device="cpu")
    t_start, wall0 = time.perf_counter(), doc["wall_s"]
    total = len(tasks) * (1 + min(args.fewshot_seeds, args.seeds) + args.seeds * len(args.methods))
    data = {}
    if args.fewshot_draws and "sst2" in tasks and "sst2_fewshot_check" not in doc:
        doc["sst2_fewshot_check"] = sst2_fewshot_check(args, base, args.fewshot_draws)
        save.write()
    with tqdm(total=total, desc="tasks", unit="row", initial=len(doc["rows"])) as bar:
        for seed in range(args.seeds):  # seed-major: a cut-short run still has every task
            for task in tasks:
                bar.set_description(f"{task} seed {seed}")
                if task not in data:
                    data[task] = task_data(task, args, base)
                run_task(task, seed, data[task], args, base, save, bar)
                doc["wall_s"] = wall0 + time.perf_counter() - t_start
                save.write()
            render(args.out)
    render(args.out)
    print(f"saved {path}, tasks.md, tasks.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
