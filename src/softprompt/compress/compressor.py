"""Compress a context into a soft prompt by distillation from the same (or a sibling) frozen model.

``compress(context, cfg, queries, out)`` builds the layout, the teacher cache (context KV computed
once; continuations and distributions cached on disk), trains a prompt-tuning prompt with a small
loop that runs only the student, saves an ordinary prompt artifact and writes the compression report
beside it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from softprompt.artifact import build_meta, save_artifact
from softprompt.base_model import BaseModel, load_base
from softprompt.batching import batch_plan
from softprompt.compress.distill import OBJECTIVES, distill_loss, rows_batch
from softprompt.compress.layout import Layout, Renderer, make_layout
from softprompt.compress.queries import generate_queries, split_queries
from softprompt.compress.report import decode, fidelity, format_text, prefill_cost, write_report
from softprompt.compress.teacher import Teacher, TeacherDists, TeacherEntry, cache_key, load_entries, save_entries
from softprompt.data.queries import Query
from softprompt.errors import SoftPromptError
from softprompt.init import InitSpec, init_table, parse_init
from softprompt.kv_prefix import reusable_prefix
from softprompt.objectives import target_logits
from softprompt.optim import PromptOptimizer, check_finite
from softprompt.precision import autocast, resolve_precision
from softprompt.prompts import SoftPrompt, kind_class

log = logging.getLogger(__name__)


@dataclass
class CompressConfig:
    model: str = "smollm2"
    teacher: str | None = None  # another model sharing the tokenizer (default: the same model)
    tokens: int = 16
    placement: str = "system"  # system | user
    template: str | None = None  # custom layout: one soft span + {input}
    chat: bool = True
    objective: str = "forward_kl"  # forward_kl | reverse_kl | loglik
    temperature: float = 1.0
    topk: int = 64  # 0: exact full-vocabulary KL
    init: str = "context"  # context | random | vocab | text:TEXT
    steps: int = 100
    batch_size: int = 8
    lr: float = 0.03
    warmup: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    max_new_tokens: int = 32  # teacher continuation length
    sample_temperature: float = 0.0  # 0: greedy teacher continuations for training
    n_queries: int = 24  # generated when no queries are given
    heldout: float = 0.2
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 (auto: bf16 where the hardware runs it natively)
    device: str | None = None
    cache_dir: str | None = None  # teacher cache (default: OUT/teacher_cache)
    timing_repeats: int = 3
    timing_queries: int = 4  # held-out queries timed for time to first token


@dataclass
class CompressResult:
    out: Path
    prompt: SoftPrompt
    report: dict
    history: list[dict]
    teacher_forwards: int
    warnings: list[str] = field(default_factory=list)


def context_sha(context: str) -> str:
    return hashlib.sha256(context.encode("utf-8")).hexdigest()[:16]


def _same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


class Compressor:
    """One compression job; the steps are methods so tests and benchmarks can drive them."""

    def __init__(self, context: str, cfg: CompressConfig, queries: list[Query] | None = None,
                 out: str | Path = "compressed", base: BaseModel | None = None, teacher_base: BaseModel | None = None,
                 progress: bool = True, warn: Callable[[str], None] | None = None,
                 heldout_queries: list[Query] | None = None):
        """``heldout_queries``, when given, are the held-out set and ``queries`` all train."""
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.fixed_heldout = heldout_queries
        self.warnings: list[str] = []
        self._warn_cb = warn
        if cfg.objective not in OBJECTIVES:
            raise SoftPromptError(f"--objective {cfg.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if cfg.temperature <= 0:
            raise SoftPromptError(f"--temperature must be > 0 (got {cfg.temperature})")
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.max_new_tokens < 1:
            raise SoftPromptError("--steps, --batch-size and --max-new-tokens must be >= 1")
        if not isinstance(context, str) or not context.strip():
            raise SoftPromptError("the context is empty: nothing to compress")
        self.context = context.strip()
        self.base = base or load_base(cfg.model, device=cfg.device)
        tok = self.base.tokenizer
        if cfg.teacher:
            self.teacher_base = teacher_base or load_base(cfg.teacher, device=cfg.device)
        else:
            self.teacher_base = teacher_base or self.base
        if self.teacher_base is not self.base:
            if not _same_tokenizer(self.teacher_base.tokenizer, tok):
                raise SoftPromptError(f"teacher {self.teacher_base.name!r} does not share the student's tokenizer")
            vs = self.base.model.get_output_embeddings().weight.shape[0]
            vt = self.teacher_base.model.get_output_embeddings().weight.shape[0]
            if vs != vt:
                raise SoftPromptError(f"teacher vocabulary ({vt}) differs from the student's ({vs})")
        self.ctx_ids = tok(self.context, add_special_tokens=False).input_ids
        if cfg.tokens > len(self.ctx_ids):
            self.warn(f"{cfg.tokens} soft tokens for a context of only {len(self.ctx_ids)} tokens: nothing to compress "
                      f"(compression ratio {len(self.ctx_ids) / cfg.tokens:.2f}); use fewer --tokens")
        self.layout: Layout = make_layout(tok, cfg.tokens, cfg.placement, cfg.template, cfg.chat)
        self.renderer = Renderer(tok, self.layout)
        self.queries = queries
        self.precision = resolve_precision(cfg.precision, self.base.device)
        self.bf16 = self.precision.bf16
        self.teacher = Teacher(self.teacher_base, bf16=self.bf16)
        self.history: list[dict] = []
        self.prompt: SoftPrompt | None = None

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)
        if self._warn_cb:
            self._warn_cb(message)

    # -- queries -----------------------------------------------------------------------------------
    def split(self) -> tuple[list[Query], list[Query]]:
        self.generated = self.queries is None
        if self.queries is None:
            self.queries = generate_queries(self.teacher_base, self.context, self.cfg.n_queries, self.cfg.seed, bf16=self.bf16)
        if not self.queries:
            raise SoftPromptError("no queries")
        if self.fixed_heldout:
            self.train_q, self.heldout_q = list(self.queries), list(self.fixed_heldout)
            self.queries = self.train_q + self.heldout_q
        else:
            self.train_q, self.heldout_q = split_queries(self.queries, self.cfg.heldout, self.cfg.seed)
        self._check_window()
        return self.train_q, self.heldout_q

    def _check_window(self) -> None:
        window = min(self.base.max_positions, self.teacher_base.max_positions)
        longest = max(len(self.renderer.fill(q.text, self.ctx_ids)) for q in self.queries)
        need = longest + self.cfg.max_new_tokens
        if need > window:
            raise SoftPromptError(
                f"the context is {len(self.ctx_ids)} tokens; with the template, the longest query and "
                f"{self.cfg.max_new_tokens} new tokens the teacher needs {need} positions, more than the model's "
                f"window of {window}: shorten the context (or split it and compress each part), or lower --max-new-tokens")

    # -- the teacher -------------------------------------------------------------------------------
    def _key(self, split: str, queries: list[Query]) -> str:
        """Hash of everything the teacher's outputs depend on: its weights, its exact input ids (context,
        layout and queries, but not the soft prompt's length) and the decoding/distribution settings."""
        c = self.cfg
        rows = [self.renderer.fill(q.text, self.ctx_ids) for q in queries]
        train = split == "train"
        return cache_key(split=split, teacher=self.teacher_base.fingerprint, ids=hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
                         max_new_tokens=c.max_new_tokens, sample=c.sample_temperature if train else 0.0, seed=c.seed,
                         topk=c.topk if train else None, temperature=c.temperature if train else None, bf16=self.bf16, version=1)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.out / "teacher_cache"

    def teacher_entries(self, split: str, queries: list[Query]) -> tuple[list[TeacherEntry], bool]:
        """Cached teacher outputs for ``queries`` (training: continuations + distributions; held-out:
        greedy continuations only). Returns (entries, loaded from disk)."""
        path = self.cache_dir / f"{split}-{self._key(split, queries)}.safetensors"
        entries = load_entries(path)
        if entries is not None and [e.query for e in entries] == [q.text for q in queries]:
            return entries, True
        c = self.cfg
        rows = [self.renderer.fill(q.text, self.ctx_ids) for q in queries]
        self.teacher.set_prefix(reusable_prefix(rows, limit=self.renderer.span_end(queries[0].text, len(self.ctx_ids))))
        self.teacher_kv_prefix = len(self.teacher._prefix or [])
        gen = torch.Generator(device=self.teacher.device).manual_seed(c.seed)
        entries = []
        from tqdm.auto import tqdm

        for q, ids in tqdm(list(zip(queries, rows)), desc=f"teacher ({split})", disable=not self.progress, leave=False):
            sample = c.sample_temperature if split == "train" else 0.0
            cont, dists = self.teacher.continue_(ids, c.max_new_tokens, c.temperature, c.topk, sample, gen)
            entries.append(TeacherEntry(q.text, ids, cont, dists.to("cpu") if split == "train" else None))
        save_entries(path, entries, {"split": split, "context_tokens": len(self.ctx_ids)})
        return entries, False

    # -- the student -------------------------------------------------------------------------------
    def init_spec(self) -> InitSpec:
        if self.cfg.init == "context":
            return InitSpec("text", text=self.context)
        return parse_init(self.cfg.init)

    def make_prompt(self) -> SoftPrompt:
        table = init_table(self.layout.template, self.init_spec(), self.base.embedding.weight, self.base.tokenizer, self.cfg.seed)
        return kind_class("prompt-tuning").create(self.cfg.tokens, self.base, table).to(self.base.device)

    def train(self, entries: list[TeacherEntry]) -> list[dict]:
        """The distillation loop; it runs only the student (the teacher's outputs come from ``entries``)."""
        from tqdm.auto import tqdm

        c, base = self.cfg, self.base
        torch.manual_seed(c.seed)
        prompt = self.prompt = self.make_prompt()
        prompt.train()
        student_rows = [self.renderer.student_ids(e.query) for e in entries]
        optim = PromptOptimizer(prompt.parameters(), lr=c.lr, steps=c.steps, warmup=c.warmup, schedule=c.schedule,
                                max_grad_norm=c.max_grad_norm)
        plan = batch_plan([len(r) + len(e.cont) for r, e in zip(student_rows, entries)], c.batch_size, c.steps, c.seed, bucket=False)
        bar = tqdm(total=c.steps, desc="compress", unit="step", disable=not self.progress, dynamic_ncols=True)
        history = []
        for step, idx in enumerate(plan, 1):
            t0 = time.perf_counter()
            batch = rows_batch([(student_rows[i], entries[i].cont) for i in idx], base.tokenizer.pad_token_id, base.device)
            targets = torch.tensor([t for i in idx for t in entries[i].cont], device=base.device)
            teacher = TeacherDists.cat([entries[i].dists for i in idx]).to(base.device) if c.objective != "loglik" else None
            with autocast(base.device, self.bf16):
                logits = target_logits(base.model, prompt, batch, share_prefix=False)[0]
            loss = distill_loss(c.objective, logits, teacher, targets, c.temperature) / len(targets)
            check_finite(loss, step)
            loss.backward()
            rec = {"type": "train", "step": step, "loss": float(loss.detach()), **optim.step(),
                   "time_s": time.perf_counter() - t0}
            history.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        bar.close()
        prompt.eval()
        prompt.requires_grad_(False)
        self.history = history
        return history

    @torch.no_grad()
    def loss_on(self, entries: list[TeacherEntry], prompt: SoftPrompt | None = None) -> float:
        """Mean distillation loss per token of ``prompt`` (default: the current one) over ``entries``."""
        c, base = self.cfg, self.base
        prompt = prompt or self.prompt
        total, count = 0.0, 0
        for i in range(0, len(entries), c.batch_size):
            chunk = entries[i:i + c.batch_size]
            batch = rows_batch([(self.renderer.student_ids(e.query), e.cont) for e in chunk], base.tokenizer.pad_token_id, base.device)
            targets = torch.tensor([t for e in chunk for t in e.cont], device=base.device)
            teacher = TeacherDists.cat([e.dists for e in chunk]).to(base.device) if c.objective != "loglik" else None
            with autocast(base.device, self.bf16):
                logits = target_logits(base.model, prompt, batch, share_prefix=False)[0]
            total += float(distill_loss(c.objective, logits, teacher, targets, c.temperature))
            count += len(targets)
        return total / max(count, 1)

    # -- the report --------------------------------------------------------------------------------
    def evaluate(self, heldout: list[TeacherEntry]) -> dict:
        """Fidelity of the soft prompt and the two baselines on held-out queries, and the cost side."""
        c, base, tok = self.cfg, self.base, self.base.tokenizer
        n = c.tokens
        conts = [e.cont for e in heldout]
        teacher_texts = [decode(tok, e.cont) for e in heldout]
        ctx_end = self.renderer.span_end(heldout[0].query, len(self.ctx_ids))
        self.teacher.set_prefix(reusable_prefix([e.ids for e in heldout], limit=ctx_end))  # once, also on a cache hit
        teacher_logits = [self.teacher.forced_logits(e.ids, e.cont).cpu() for e in heldout]
        answers = [next((q.answers for q in self.heldout_q if q.text == e.query), ()) for e in heldout]
        variants = {"soft": (self.prompt, [self.renderer.fill(e.query, None) for e in heldout]),
                    "truncated": (None, [self.renderer.fill(e.query, self.ctx_ids[:n]) for e in heldout]),
                    "none": (None, [self.renderer.fill(e.query, []) for e in heldout])}
        fid = {}
        for name, (prompt, rows) in variants.items():
            fid[name] = fidelity(base, prompt, rows, conts, [t.to(base.device) for t in teacher_logits], teacher_texts,
                                 c.max_new_tokens, answers, self.bf16)
        if any(answers):
            from softprompt.compress.report import answer_f1

            scored = [(t, a) for t, a in zip(teacher_texts, answers) if a]
            fid["teacher"] = {"answer_f1": sum(answer_f1(t, list(a)) for t, a in scored) / len(scored)}
        timing = heldout[: min(c.timing_queries, len(heldout))]
        full = prefill_cost(base, None, [e.ids for e in timing], c.timing_repeats, self.bf16)
        soft = prefill_cost(base, self.prompt, [self.renderer.fill(e.query, None) for e in timing], c.timing_repeats, self.bf16)
        cost = {"full": full, "soft": soft, "kv_ratio": full["kv_bytes"] / max(soft["kv_bytes"], 1),
                "ttft_speedup": full["ttft_ms"] / max(soft["ttft_ms"], 1e-9), "device": str(base.device), "bf16": self.bf16,
                "timed_queries": len(timing), "repeats": c.timing_repeats}
        examples = [{"query": e.query, "teacher": teacher_texts[i], **{k: fid[k]["outputs"][i] for k in variants}}
                    for i, e in enumerate(heldout[:3])]
        for k in variants:
            fid[k].pop("outputs")
        train_losses = [h["loss"] for h in self.history]
        return {
            "context_tokens": len(self.ctx_ids), "soft_tokens": n, "compression_ratio": len(self.ctx_ids) / n,
            "context_sha256": context_sha(self.context), "placement": self.layout.placement,
            "template": self.layout.template_source, "objective": c.objective, "temperature": c.temperature,
            "topk": c.topk, "init": c.init, "n_train": len(self.train_q), "n_heldout": len(heldout),
            "train": {"steps": len(self.history), "first_loss": train_losses[0] if train_losses else None,
                      "final_loss": train_losses[-1] if train_losses else None,
                      "time_s": sum(h["time_s"] for h in self.history)},
            "fidelity": fid, "cost": cost, "examples": examples, "warnings": list(self.warnings),
        }

    # -- the whole job -----------------------------------------------------------------------------
    def run(self) -> CompressResult:
        self.split()
        t0 = time.perf_counter()
        f0 = self.teacher.forwards
        train_entries, train_hit = self.teacher_entries("train", self.train_q)
        held_entries, held_hit = self.teacher_entries("heldout", self.heldout_q)
        teacher_info = {"forwards": self.teacher.forwards - f0, "time_s": time.perf_counter() - t0,
                        "cache": "hit" if train_hit and held_hit else "built", "dir": str(self.cache_dir),
                        "kv_reused_prefix_tokens": getattr(self, "teacher_kv_prefix", None)}
        f1 = self.teacher.forwards
        self.train(train_entries)
        if self.teacher.forwards != f1:  # the loop must not touch the teacher
            raise RuntimeError("teacher ran during training")
        report = self.evaluate(held_entries)
        report["teacher"] = teacher_info
        report["queries"] = {"train": [q.text for q in self.train_q], "heldout": [q.text for q in self.heldout_q],
                             "generated": self.generated}
        self.save(report)
        return CompressResult(self.out, self.prompt, report, self.history, self.teacher.forwards, list(self.warnings))

    def save(self, report: dict) -> None:
        c = self.cfg
        metrics = {"steps": len(self.history), "first_train_loss": report["train"]["first_loss"],
                   "final_train_loss": report["train"]["final_loss"]}
        meta = build_meta(self.prompt, self.layout.template_source, self.base, init=c.init,
                          format=self.renderer.fmt.describe(), train_config=asdict(c), metrics=metrics,
                          precision=self.precision.to_meta(),
                          compression={k: report[k] for k in ("context_tokens", "soft_tokens", "compression_ratio",
                                                              "context_sha256", "placement", "objective")},
                          data={"n_train": report["n_train"], "n_heldout": report["n_heldout"]})
        save_artifact(self.out, self.prompt, meta)
        self.out.joinpath("metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in self.history))
        write_report(report, self.out)
        try:
            from softprompt.plots import plot_loss

            plot_loss(self.history, self.out / "loss.png")
        except ImportError:
            pass


def compress(context: str, cfg: CompressConfig | None = None, queries: list[Query] | None = None,
             out: str | Path = "compressed", base: BaseModel | None = None, progress: bool = True,
             warn: Callable[[str], None] | None = None) -> CompressResult:
    """Distill ``context`` into ``cfg.tokens`` soft tokens; save the prompt and its report in ``out``."""
    return Compressor(context, cfg or CompressConfig(), queries, out, base=base, progress=progress, warn=warn).run()


__all__ = ["CompressConfig", "CompressResult", "Compressor", "compress", "format_text"]
