"""Convert a prefix-tuning prompt into an input-level one (prompt tuning or P-tuning) by distillation.

vLLM (and TensorRT-LLM) take soft prompts only as input embeddings; prefix tuning's per-layer keys and
values have no input-level form. ``convert_prompt`` distills one into the other with the compression
machinery (:class:`~softprompt.compress.compressor.Compressor`'s training loop, its KL losses and
early stopping, the teacher cache format and the fidelity measures of the compression report): the
**teacher** is the base model with the prefix prompt applied, the **student** an input-level prompt
whose soft rows come first in the prefix prompt's own template (``[soft:N] `` + template, same chat
format and system prompt), trained to match the teacher's next-token distributions along the
teacher's greedy continuation of each query.

Queries (the template's fields) come from, in order: ``queries`` given by the caller (``--queries``),
a task recipe (``--task``), the data files the prompt records it was trained on, or inputs the base
model writes itself (generic, weaker). The prompt is saved before the report is made; the report
(``convert_report.json``/``.md`` beside the prompt) holds the held-out KL per token and top-1
agreement against the teacher for the converted prompt and for the bare model (no prompt), greedy
exact match and ROUGE-L against the teacher's outputs, and the task accuracy before and after when
the examples carry targets (label ranking when the prompt records label words).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from softprompt.artifact import PromptArtifact, build_meta, load_artifact, read_meta, save_artifact
from softprompt.atomic import atomic_write_json, atomic_write_text
from softprompt.base_model import BaseModel, load_base
from softprompt.compress.compressor import CompressConfig, Compressor
from softprompt.compress.report import decode, fidelity, forced_logits, greedy
from softprompt.compress.teacher import TeacherEntry, cache_key, compress_dist, load_entries, save_entries
from softprompt.data.examples import Example
from softprompt.encoding import PromptFormat
from softprompt.errors import SoftPromptError
from softprompt.init import init_table, parse_init
from softprompt.precision import resolve_precision
from softprompt.prompts import SoftPrompt, kind_class
from softprompt.template import Soft, Template, Text

log = logging.getLogger(__name__)

TARGET_KINDS = ("prompt-tuning", "p-tuning")
REPORT = "convert_report"
# Topics for inputs the base model writes when the prompt records no data and none is given.
TOPICS = ("a film", "a restaurant", "the weather", "a football match", "a new phone", "a holiday", "a book",
          "a job interview", "a science fact", "a recipe", "a city", "an online order", "a concert", "a school day",
          "a car", "the news", "a hotel stay", "a video game", "a doctor's visit", "a birthday party")


@dataclass
class ConvertConfig:
    to: str = "prompt-tuning"  # prompt-tuning | p-tuning
    tokens: int | None = None  # soft rows (default: the prefix's length)
    init: str = "vocab"  # vocab | random | text:TEXT
    kind_options: dict = field(default_factory=dict)  # e.g. {"encoder": "mlp"} for p-tuning
    objective: str = "forward_kl"
    temperature: float = 1.0
    topk: int = 64  # 0: exact full-vocabulary KL
    max_new_tokens: int = 32  # teacher continuation length
    n_queries: int = 256  # training queries at most (from data) or generated
    n_heldout: int = 24  # held-out queries for the report
    dev: float = 0.1  # share of the training queries used for early stopping
    steps: int = 300
    eval_every: int = 10
    patience: int = 4
    min_delta: float = 1e-4
    batch_size: int = 8
    lr: float = 0.1
    warmup: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"
    device: str | None = None

    def loop_config(self) -> CompressConfig:
        """The compression loop's settings (continuation positions only; no context)."""
        return CompressConfig(kind=self.to, objective=self.objective, temperature=self.temperature, topk=self.topk,
                              steps=self.steps, eval_every=self.eval_every, patience=self.patience, min_delta=self.min_delta,
                              batch_size=self.batch_size, lr=self.lr, warmup=self.warmup, schedule=self.schedule,
                              max_grad_norm=self.max_grad_norm, max_new_tokens=self.max_new_tokens,
                              loss_positions="continuation", seed=self.seed, precision=self.precision, device=self.device,
                              baselines=())


@dataclass
class ConvertResult:
    out: Path
    prompt: SoftPrompt
    report: dict
    history: list[dict]


def check_convertible(meta: dict, to: str, path: str | Path) -> None:
    """One clear line for a prompt that needs no conversion or a target kind that does not exist."""
    if to not in TARGET_KINDS:
        raise SoftPromptError(f"--to {to!r}: expected one of {', '.join(TARGET_KINDS)}")
    kind = meta["kind"]
    if kind_class(kind).input_level:
        raise SoftPromptError(f"{path}: prompt is {kind}, already input-level (vLLM serves it as it is): nothing to convert")


def _key(example: Example) -> str:
    return json.dumps(example.fields, sort_keys=True, ensure_ascii=False)


def recorded_examples(meta: dict, fields: list[str]) -> tuple[list[Example], list[Example]]:
    """The training and dev examples the prompt records (``data.train``/``data.dev`` files that still
    exist and hold the template's fields); empty lists when there are none."""
    from softprompt.data.readers import read_examples

    data, tc = meta.get("data") or {}, meta.get("train_config") or {}
    out = []
    for k in ("train", "dev"):
        p = data.get(k)
        if not isinstance(p, str) or not Path(p).is_file():
            out.append([])
            continue
        try:
            out.append(read_examples(p, fields, tc.get("target_field", "target"), require_target=False))
        except SoftPromptError as e:
            log.warning("recorded %s data %s is unusable (%s): not used", k, p, e)
            out.append([])
    return out[0], out[1]


def generated_inputs(base: BaseModel, field_name: str, n: int, seed: int, bf16: bool = False) -> list[Example]:
    """``n`` short user inputs sampled from the bare base model over generic topics (no data at hand)."""
    from softprompt.compress.queries import dedupe
    from softprompt.data.queries import Query
    from softprompt.generate import SamplingParams, generate

    fmt = PromptFormat(base.tokenizer, Template.default(0), chat=True)
    got: list[Query] = []
    for attempt in range(4):
        asks = [f"Write one sentence that someone might say about {TOPICS[(i + attempt) % len(TOPICS)]}. Reply with the sentence only."
                for i in range(max(8, n - len(got)))]
        outs = generate(base, None, fmt, asks, SamplingParams(24, temperature=1.0, top_p=0.95, seed=seed + attempt),
                        batch_size=16, bf16=bf16)
        lines = [next((x.strip().strip('"') for x in o.splitlines() if len(x.strip()) > 3), "") for o in outs]
        got = dedupe(got + [Query(t) for t in lines if t])
        if len(got) >= n:
            break
    if len(got) < 2:
        raise SoftPromptError("the base model wrote fewer than 2 usable inputs: give --queries FILE")
    return [Example({field_name: q.text}, meta={"origin": "generated"}) for q in got[:n]]


class Converter(Compressor):
    """One conversion. It reuses :class:`Compressor`'s distillation loop (``train``, ``loss_on``); the
    teacher is the prefix-prompted model, the student's rows are the prefix prompt's own template
    with the soft rows in front."""

    def __init__(self, source: str | Path | PromptArtifact, cfg: ConvertConfig, out: str | Path,
                 examples: list[Example] | None = None, heldout: list[Example] | None = None,
                 base: BaseModel | None = None, labels: list[str] | None = None, progress: bool = True,
                 warn: Callable[[str], None] | None = None):
        self.t_start = time.perf_counter()
        self.conv, self.out, self.progress = cfg, Path(out), progress
        self.warnings: list[str] = []
        self._warn_cb = warn
        if isinstance(source, PromptArtifact):
            meta, self.source_path = source.meta, source.path
        else:
            meta, self.source_path = read_meta(source), Path(source)
        check_convertible(meta, cfg.to, self.source_path)
        if cfg.tokens is not None and cfg.tokens < 1:
            raise SoftPromptError(f"--tokens must be >= 1 (got {cfg.tokens})")
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.max_new_tokens < 1:
            raise SoftPromptError("--steps, --batch-size and --max-new-tokens must be >= 1")
        self.base = base or load_base(meta["base_model"]["id"], device=cfg.device)
        self.art = source if isinstance(source, PromptArtifact) else load_artifact(source, base=self.base)
        self.cfg = cfg.loop_config()
        self.precision = resolve_precision(cfg.precision, self.base.device)
        self.bf16 = self.precision.bf16
        self.teacher_prompt = self.art.prompt.to(self.base.device)
        self.teacher_fmt = self.art.prompt_format(self.base)
        self.tokens = cfg.tokens or self.art.prompt.n_virtual
        segs = self.art.template.segments
        lead = () if segs and isinstance(segs[0], Text) and segs[0].text[:1].isspace() else (Text(" "),)
        self.template = Template((Soft(self.tokens),) + lead + tuple(segs))
        self.student_fmt = PromptFormat(self.base.tokenizer, self.template, chat=self.art.chat, system=self.art.system,
                                        max_length=self.base.max_positions)
        self.fields = self.art.template.fields
        self.labels = labels if labels is not None else self.art.meta.get("labels")
        self.examples, self.heldout_examples = examples, heldout
        self.history: list[dict] = []
        self.prompt: SoftPrompt | None = None

    # -- queries -----------------------------------------------------------------------------------
    def split(self) -> None:
        """Training, dev (early stopping) and held-out examples, deduplicated by their fields."""
        c = self.conv
        train, held = list(self.examples or []), list(self.heldout_examples or [])
        self.origin = "given" if train else None
        if not train:
            train, rec_dev = recorded_examples(self.art.meta, self.fields)
            if train:
                self.origin = "recorded"
                held = held or rec_dev
        if not train:
            if len(self.fields) != 1:
                raise SoftPromptError(f"{self.source_path}: no recorded data, and its template has fields "
                                      f"{', '.join(self.fields)}: give --queries FILE.jsonl with those fields")
            self.origin = "generated"
            train = generated_inputs(self.base, self.fields[0], c.n_queries + c.n_heldout, c.seed, self.bf16)
        seen, uniq = set(), []
        for e in train:
            if _key(e) not in seen:
                seen.add(_key(e))
                uniq.append(e)
        rng = random.Random(c.seed)
        rng.shuffle(uniq)
        held = [e for e in held if _key(e) not in seen][: c.n_heldout] if held else []
        if not held:
            k = min(c.n_heldout, max(1, len(uniq) // 5))
            held, uniq = uniq[:k], uniq[k:]
        uniq = uniq[: c.n_queries]
        if len(uniq) < 2 or not held:
            raise SoftPromptError(f"need at least 2 training queries and 1 held out, got {len(uniq)} and {len(held)}")
        n_dev = min(32, max(1, round(c.dev * len(uniq)))) if len(uniq) >= 4 else 0
        self.dev_x, self.fit_x, self.held_x = uniq[:n_dev], uniq[n_dev:], held

    # -- the teacher -------------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return self.out / "teacher_cache"

    def teacher_entries(self, split: str, examples: list[Example]) -> list[TeacherEntry]:
        """The teacher's greedy continuation of each example and its distributions along it (cached)."""
        from tqdm.auto import tqdm

        c, base = self.conv, self.base
        rows = [self.teacher_fmt.prompt_ids(e) for e in examples]
        sha = hashlib.sha256(b"".join(t.numpy().tobytes() for t in self.art.tensors.values())).hexdigest()
        key = cache_key(split=split, prompt=sha, base=base.fingerprint, rows=hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
                        max_new_tokens=c.max_new_tokens, topk=c.topk, temperature=c.temperature, bf16=self.bf16, version=1)
        path = self.cache_dir / f"{split}-{key}.safetensors"
        cached = load_entries(path)
        if cached is not None and [e.query for e in cached] == [_key(e) for e in examples]:
            return cached
        eos = base.eos_ids()
        entries = []
        bs = c.batch_size
        for i in tqdm(range(0, len(rows), bs), desc=f"teacher ({split})", disable=not self.progress, leave=False):
            chunk = rows[i:i + bs]
            conts = greedy(base, self.teacher_prompt, chunk, c.max_new_tokens, self.bf16, batch_size=bs)
            conts = [cont + [eos[0]] if len(cont) < c.max_new_tokens and eos else cont for cont in conts]
            conts = [cont or [eos[0]] for cont in conts]
            logits = forced_logits(base.model, self.teacher_prompt, chunk, conts, base.tokenizer.pad_token_id, self.bf16)
            for j, (ids, cont, lg) in enumerate(zip(chunk, conts, logits)):
                if cont[-1] in eos:  # the stop token greedy decoding actually chose
                    cont[-1] = int(lg[-1].argmax()) if int(lg[-1].argmax()) in eos else cont[-1]
                dists = compress_dist(lg, c.temperature, c.topk) if split != "heldout" else None
                entries.append(TeacherEntry(_key(examples[i + j]), ids, cont, dists.to("cpu") if dists else None, 0))
                if split == "heldout":
                    self.held_logits.append(lg.cpu())
        save_entries(path, entries, {"split": split, "source": str(self.source_path)})
        return entries

    # -- the student -------------------------------------------------------------------------------
    def student_ids(self, query: str) -> list[int]:
        return self.student_fmt.prompt_ids(Example(json.loads(query)))

    def make_prompt(self) -> SoftPrompt:
        b = self.base
        table = init_table(self.template, parse_init(self.conv.init), b.embedding.weight, b.tokenizer, self.conv.seed)
        return kind_class(self.conv.to).create(self.tokens, b, table, dict(self.conv.kind_options)).to(b.device)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "convert_checkpoint"

    # -- the report --------------------------------------------------------------------------------
    def task_scores(self, examples: list[Example]) -> dict | None:
        """Task score of the prefix prompt (before) and the converted one (after) on held-out examples
        with targets: label accuracy when label words are known, else ROUGE-L of greedy outputs."""
        scored = [e for e in examples if e.target]
        if not scored:
            return None
        base = self.base
        if self.labels:
            from softprompt.scoring import label_accuracy

            return {"metric": "accuracy", "n": len(scored), "labels": list(self.labels),
                    **{name: label_accuracy(base.model, p, fmt, scored, list(self.labels), bf16=self.bf16)
                       for name, p, fmt in (("before", self.teacher_prompt, self.teacher_fmt),
                                            ("after", self.prompt, self.student_fmt),
                                            ("no_prompt", None, self.teacher_fmt))}}
        from softprompt.task_metrics import rouge_l

        out = {"metric": "rouge_l", "n": len(scored)}
        for name, p, fmt in (("before", self.teacher_prompt, self.teacher_fmt), ("after", self.prompt, self.student_fmt),
                             ("no_prompt", None, self.teacher_fmt)):
            ids = greedy(base, p, [fmt.prompt_ids(e) for e in scored], self.conv.max_new_tokens, self.bf16)
            out[name] = rouge_l([decode(base.tokenizer, x) for x in ids], [[e.target] for e in scored])
        return out

    def evaluate(self, held: list[TeacherEntry]) -> dict:
        base, tok = self.base, self.base.tokenizer
        conts = [e.cont for e in held]
        texts = [decode(tok, e.cont) for e in held]
        teacher_logits = [t.to(base.device) for t in self.held_logits]
        fid = {"converted": fidelity(base, self.prompt, [self.student_ids(e.query) for e in held], conts, teacher_logits,
                                     texts, self.conv.max_new_tokens, bf16=self.bf16),
               "no_prompt": fidelity(base, None, [e.ids for e in held], conts, teacher_logits, texts,
                                     self.conv.max_new_tokens, bf16=self.bf16)}
        examples = [{"query": json.loads(e.query), "teacher": texts[i], "converted": fid["converted"]["outputs"][i],
                     "no_prompt": fid["no_prompt"]["outputs"][i]} for i, e in enumerate(held[:3])]
        for v in fid.values():
            v.pop("outputs")
        gap = fid["no_prompt"]["kl_per_token"]
        fid["converted"]["kl_gap_closed"] = 1 - fid["converted"]["kl_per_token"] / gap if gap > 0 else None
        recs = [h for h in self.history if h.get("type") == "train"]
        return {
            "source": str(self.source_path), "source_kind": self.art.kind, "source_virtual_tokens": self.art.prompt.n_virtual,
            "to": self.conv.to, "soft_tokens": self.tokens, "template": self.template.to_string(),
            "queries": {"origin": self.origin, "train": len(self.fit_x), "dev": len(self.dev_x), "heldout": len(held)},
            "objective": self.conv.objective, "topk": self.conv.topk, "max_new_tokens": self.conv.max_new_tokens,
            "train": {"steps": len(recs), "max_steps": self.conv.steps, "stopped_early": getattr(self, "stopped_early", False),
                      "best_step": getattr(self, "best_step", None), "best_dev_kl": getattr(self, "best_dev", None),
                      "curve": [{"step": h["step"], "dev_kl": h["dev_kl"]} for h in recs if "dev_kl" in h],
                      "time_s": sum(h["time_s"] for h in recs)},
            "fidelity": fid, "task": self.task_scores(self.held_x), "examples": examples, "warnings": list(self.warnings),
        }

    # -- the whole job -----------------------------------------------------------------------------
    def run(self) -> ConvertResult:
        """Queries, teacher, training; the prompt is saved before the report is made."""
        self.split()
        self.held_logits: list[torch.Tensor] = []
        t0 = time.perf_counter()
        fit = self.teacher_entries("train", self.fit_x)
        dev = self.teacher_entries("dev", self.dev_x) if self.dev_x else []
        held = self.teacher_entries("heldout", self.held_x)
        if not self.held_logits:  # held-out entries came from the cache: their logits are recomputed
            self.held_logits = forced_logits(self.base.model, self.teacher_prompt, [e.ids for e in held], [e.cont for e in held],
                                             self.base.tokenizer.pad_token_id, self.bf16)
        teacher_s = time.perf_counter() - t0
        self.train(fit, dev)
        self.save_prompt()
        self.drop_checkpoint()
        report = self.evaluate(held)
        report["time"] = {"teacher_s": teacher_s, "total_s": time.perf_counter() - self.t_start}
        write_convert_report(report, self.out)
        return ConvertResult(self.out, self.prompt, report, self.history)

    def save_prompt(self) -> None:
        losses = [h["loss"] for h in self.history if h.get("type") == "train"]
        metrics = {"steps": len(losses), "first_train_loss": losses[0] if losses else None,
                   "final_train_loss": losses[-1] if losses else None, "stopped_early": getattr(self, "stopped_early", False),
                   "best_dev_kl": getattr(self, "best_dev", None), "best_step": getattr(self, "best_step", None)}
        extra = {"labels": list(self.labels)} if self.labels else {}
        meta = build_meta(self.prompt, self.template.to_string(), self.base, init=self.conv.init,
                          format=self.student_fmt.describe(), train_config=asdict(self.conv), metrics=metrics,
                          precision=self.precision.to_meta(), **extra,
                          converted_from={"path": str(self.source_path), "kind": self.art.kind,
                                          "n_virtual": self.art.prompt.n_virtual, "template": self.art.meta["template"],
                                          "objective": self.conv.objective},
                          data={"origin": self.origin, "n_train": len(self.fit_x), "n_dev": len(self.dev_x),
                                "n_heldout": len(self.held_x), **{k: v for k, v in (self.art.meta.get("data") or {}).items()
                                                                 if k in ("train", "dev")}})
        save_artifact(self.out, self.prompt, meta)
        self.out.joinpath("metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in self.history))


def format_convert_report(r: dict) -> str:
    """The report as a few lines of Markdown (printed by the CLI, saved as convert_report.md)."""
    f, t = r["fidelity"], r["train"]
    conv, none = f["converted"], f["no_prompt"]
    closed = conv.get("kl_gap_closed")
    lines = [f"# {r['source_kind']} -> {r['to']}: {r['source']}", "",
             f"{r['soft_tokens']} soft rows, template {json.dumps(r['template'], ensure_ascii=False)}; {r['queries']['train']} training queries "
             f"({r['queries']['origin']}), {r['queries']['dev']} dev, {r['queries']['heldout']} held out; "
             f"{t['steps']} steps{' (stopped early)' if t['stopped_early'] else ''}, best dev KL "
             + (f"{t['best_dev_kl']:.4f} at step {t['best_step']}" if t["best_dev_kl"] is not None else "n/a"), "",
             "Held-out fidelity against the prefix prompt (the teacher), along its greedy continuations:", "",
             "| variant | KL per token | top-1 agreement | exact match | ROUGE-L |", "|---|---|---|---|---|"]
    for name, v in (("converted", conv), ("no prompt", none)):
        lines.append(f"| {name} | {v['kl_per_token']:.4f} | {v['top1_agreement']:.3f} | {v['exact_match']:.3f} | {v['rouge_l']:.3f} |")
    if closed is not None:
        lines += ["", f"The converted prompt closes {100 * closed:.1f} % of the no-prompt KL gap."]
    task = r.get("task")
    if task:
        lines += ["", f"Task {task['metric']} on {task['n']} held-out examples: before (prefix) {task['before']:.3f}, "
                      f"after (converted) {task['after']:.3f}, no prompt {task['no_prompt']:.3f}."]
    for w in r.get("warnings", []):
        lines += ["", f"Warning: {w}"]
    return "\n".join(lines) + "\n"


def write_convert_report(report: dict, out: str | Path) -> None:
    out = Path(out)
    atomic_write_json(out / f"{REPORT}.json", report)
    atomic_write_text(out / f"{REPORT}.md", format_convert_report(report))


def convert_prompt(source: str | Path, out: str | Path, cfg: ConvertConfig | None = None,
                   examples: list[Example] | None = None, heldout: list[Example] | None = None,
                   base: BaseModel | None = None, labels: list[str] | None = None, progress: bool = True) -> ConvertResult:
    """Distill the prefix prompt at ``source`` into an input-level prompt saved in ``out`` (see the module)."""
    return Converter(source, cfg or ConvertConfig(), out, examples, heldout, base=base, labels=labels, progress=progress).run()


__all__ = ["ConvertConfig", "ConvertResult", "Converter", "convert_prompt", "check_convertible", "format_convert_report",
           "TARGET_KINDS"]
