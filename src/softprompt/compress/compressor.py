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
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from softprompt.artifact import build_meta, save_artifact
from softprompt.atomic import atomic_replace_dir, atomic_save_tensors, atomic_write_json, recover_dir
from softprompt.base_model import BaseModel, load_base
from softprompt.batching import batch_plan
from softprompt.compress.distill import OBJECTIVES, distill_loss, rows_batch
from softprompt.compress.layout import Layout, Renderer, make_layout
from softprompt.compress.queries import split_queries
from softprompt.compress.report import decode, fidelity, format_text, prefill_cost, write_report
from softprompt.compress.teacher import Teacher, TeacherDists, TeacherEntry, cache_key, load_entries, save_entries
from softprompt.data.examples import Example
from softprompt.data.queries import Query
from softprompt.errors import SoftPromptError
from softprompt.init import InitSpec, init_table, parse_init
from softprompt.kv_prefix import extends, reusable_prefix
from softprompt.objectives import target_logits
from softprompt.optim import PromptOptimizer, check_finite, load_optimizer_tensors, optimizer_tensors
from softprompt.precision import autocast, resolve_precision
from softprompt.prompts import SoftPrompt, kind_class

log = logging.getLogger(__name__)
TEACHER_BATCH = 16  # greedy teacher continuations decoded together (they share the context's cache)


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
    mode_weight: float = 0.0  # add this times the cross-entropy of the teacher's top token (0: off)
    topk: int = 64  # 0: exact full-vocabulary KL
    init: str = "context"  # context | random | vocab | text:TEXT (prompt-tuning)
    kind: str = "prompt-tuning"  # prompt-tuning (soft input vectors) | prefix (per-layer keys/values)
    positions: str = "first"  # prefix: context positions whose keys/values start the prefix (first|even|attention)
    freeze_first: bool = True  # prefix: keep the first position (the attention sink) frozen
    loss_positions: str = "all"  # all: every position after the context (query + continuation) | continuation
    steps: int = 400  # at most; training stops early when the held-out (dev) KL stops improving
    eval_every: int = 10  # steps between dev evaluations (early stopping, checkpoints)
    patience: int = 4  # dev evaluations without improvement before stopping (0: never stop early)
    min_delta: float = 1e-4
    dev: float = 0.1  # share of the training queries used for early stopping (at least 1, at most 32)
    batch_size: int = 8
    bucket: bool = True  # batches of similar lengths (an epoch's windows sorted by length): less padding, same examples
    lr: float | None = None  # None: 0.03 for prompt tuning, 0.005 for a KV prefix (keys/values move at a smaller scale)
    warmup: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    max_new_tokens: int = 32  # teacher continuation length
    sample_temperature: float = 0.0  # 0: greedy teacher continuations for training
    n_queries: int = 256  # generated when no queries are given (self-study)
    n_heldout: int = 24  # held-out queries generated with another seed when none are given
    chunk_tokens: int = 128  # self-study chunk length
    query_mix: bool = False  # with --queries: mix generated (self-study) queries in as well
    baselines: tuple = ("truncated", "none", "llmlingua")
    resume: bool = False
    heldout: float = 0.2
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 (auto: bf16 where the hardware runs it natively)
    pack_weights: bool | None = None  # the student trains on a prepacked frozen copy (softprompt.frozen); None: in bf16 only
    attention: str = "auto"  # the student's attention kernel: auto | sdpa | eager (auto: eager for bf16 on CPU)
    share_prefix: bool = True  # run the batch's common leading positions (header, soft tokens) once (exact)
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


STUDENT_KINDS = ("prompt-tuning", "prefix")
LOSS_POSITIONS = ("all", "continuation")


def check_dependencies(cfg: CompressConfig) -> None:
    """Every package the whole run needs, checked before any work starts."""
    from importlib.util import find_spec

    need = {"rouge_score": "rouge-score (pip install 'softprompt[eval]')", "tqdm": "tqdm"}
    if "llmlingua" in cfg.baselines:
        need["llmlingua"] = "llmlingua (pip install 'softprompt[compress]', or drop the llmlingua baseline)"
    missing = [hint for mod, hint in need.items() if find_spec(mod) is None]
    if missing:
        raise SoftPromptError(f"compress needs {', '.join(missing)}: not installed (nothing was run)")


def _same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


class Compressor:
    """One compression job; the steps are methods so tests and benchmarks can drive them."""

    _student: torch.nn.Module | None = None  # built on first use (student_model); subclasses inherit it

    def __init__(self, context: str, cfg: CompressConfig, queries: list[Query] | None = None,
                 out: str | Path = "compressed", base: BaseModel | None = None, teacher_base: BaseModel | None = None,
                 progress: bool = True, warn: Callable[[str], None] | None = None,
                 heldout_queries: list[Query] | None = None):
        """``heldout_queries``, when given, are the held-out set and ``queries`` all train."""
        self.t_start = time.perf_counter()
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.fixed_heldout = heldout_queries
        self.warnings: list[str] = []
        self._warn_cb = warn
        if cfg.objective not in OBJECTIVES:
            raise SoftPromptError(f"--objective {cfg.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if cfg.temperature <= 0:
            raise SoftPromptError(f"--temperature must be > 0 (got {cfg.temperature})")
        if cfg.mode_weight < 0 or (cfg.mode_weight and cfg.objective == "loglik"):
            raise SoftPromptError(f"--mode-weight {cfg.mode_weight}: expected >= 0, with a KL objective "
                                  f"(--objective {cfg.objective})")
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.max_new_tokens < 1:
            raise SoftPromptError("--steps, --batch-size and --max-new-tokens must be >= 1")
        if cfg.kind not in STUDENT_KINDS:
            raise SoftPromptError(f"--kind {cfg.kind!r} cannot be a compression student: expected one of {', '.join(STUDENT_KINDS)}")
        if cfg.loss_positions not in LOSS_POSITIONS:
            raise SoftPromptError(f"--loss-positions {cfg.loss_positions!r}: expected one of {', '.join(LOSS_POSITIONS)}")
        from softprompt.compress.kv_init import POSITION_CHOICES

        if cfg.positions not in POSITION_CHOICES:
            raise SoftPromptError(f"--positions {cfg.positions!r}: expected one of {', '.join(POSITION_CHOICES)}")
        check_dependencies(cfg)
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
        if cfg.tokens > len(self.ctx_ids) and cfg.kind != "prefix":  # a prefix refuses it (below)
            self.warn(f"{cfg.tokens} soft tokens for a context of only {len(self.ctx_ids)} tokens: nothing to compress "
                      f"(compression ratio {len(self.ctx_ids) / cfg.tokens:.2f}); use fewer --tokens")
        self.layout: Layout = make_layout(tok, cfg.tokens, cfg.placement, cfg.template, cfg.chat)
        self.renderer = Renderer(tok, self.layout)
        self.student_fmt = self.renderer.fmt
        self.head_ids: list[int] = []
        if cfg.kind == "prefix":
            self._prefix_layout()
        self.queries = queries
        self.precision = resolve_precision(cfg.precision, self.base.device)
        self.bf16 = self.precision.bf16
        self.teacher = Teacher(self.teacher_base, bf16=self.bf16)
        self.history: list[dict] = []
        self.prompt: SoftPrompt | None = None

    @property
    def student_model(self) -> torch.nn.Module:
        """The frozen model the student trains and is scored on (see softprompt.frozen.training_model):
        built once, the base itself in fp32."""
        if self._student is None:
            from softprompt.frozen import training_model

            self._student = training_model(self.base.model, self.bf16, self.cfg.pack_weights, self.cfg.attention)
        return self._student

    def _prefix_layout(self) -> None:
        """For a KV-prefix student: the ids before the context (``head``, held in the prefix) and the
        template after it (what the student runs), checked to tokenize exactly as the teacher's tail."""
        from softprompt.encoding import PromptFormat
        from softprompt.template import Soft, Template

        if self.cfg.tokens > len(self.ctx_ids):
            raise SoftPromptError(f"--tokens {self.cfg.tokens}: a KV prefix keeps context positions, and this context "
                                  f"has only {len(self.ctx_ids)}")
        segs = self.layout.template.segments
        at = next(i for i, x in enumerate(segs) if isinstance(x, Soft))
        tail = Template(tuple(segs[at + 1:]))
        fmt = PromptFormat(self.base.tokenizer, tail, chat=False, system=None)
        heads = set()
        for q in ("What is it?", "Explain the rules in detail, please."):
            ids = self.renderer.student_ids(q)
            a = next(i for i, x in enumerate(ids) if x < 0)
            teacher = self.renderer.fill(q, self.ctx_ids)
            heads.add(tuple(ids[:a]))
            if fmt.prompt_ids(Example({"input": q})) != teacher[a + len(self.ctx_ids):] or len(heads) != 1:
                raise SoftPromptError("--kind prefix needs a layout whose text after the context tokenizes on its own and "
                                      "whose text before it does not depend on the query: use --placement system")
        self.head_ids = list(heads.pop())
        self.student_fmt = fmt
        self.student_template = tail

    @property
    def lr(self) -> float:
        """The learning rate: the configured one, else the kind's default."""
        if self.cfg.lr is not None:
            return self.cfg.lr
        return 0.005 if self.cfg.kind == "prefix" else 0.03

    @property
    def n_positions(self) -> int:
        """Positions the student's prompt occupies (a prefix also holds the template before the context)."""
        return len(self.head_ids) + self.cfg.tokens if self.cfg.kind == "prefix" else self.cfg.tokens

    @property
    def template_source(self) -> str:
        return self.student_template.to_string() if self.cfg.kind == "prefix" else self.layout.template_source

    def student_ids(self, query: str) -> list[int]:
        """The student's ids for ``query`` (prompt tuning: with soft markers; prefix: the tail only)."""
        return self.student_fmt.prompt_ids(Example({"input": query}))

    def _label_from(self, student_row: list[int]) -> int:
        """Index of the first distilled target in a student row: the second token after the context."""
        if self.cfg.loss_positions == "continuation":
            return len(student_row)
        if self.cfg.kind == "prefix":
            return 1
        return max(i for i, x in enumerate(student_row) if x < 0) + 2

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)
        if self._warn_cb:
            self._warn_cb(message)

    # -- queries -----------------------------------------------------------------------------------
    def split(self) -> tuple[list[Query], list[Query]]:
        """Training and held-out queries (the user's, generated ones, or both), and a dev share of the
        training queries for early stopping. Generated queries are saved in OUT so ``--resume`` reuses them."""
        from softprompt.compress.queries import dedupe
        from softprompt.compress.selfstudy import self_study

        c = self.cfg
        self.generated = self.queries is None or (c.query_mix and not self.fixed_heldout)
        saved = self.out / "queries.json"
        if c.resume and saved.exists():
            data = json.loads(saved.read_text())
            self.train_q = [Query(q["text"], tuple(q.get("answers", ())), meta=q.get("meta", {})) for q in data["train"]]
            self.heldout_q = [Query(q["text"], tuple(q.get("answers", ())), meta=q.get("meta", {})) for q in data["heldout"]]
        else:
            user = list(self.queries or [])
            if self.fixed_heldout:
                user_train, user_held = user, list(self.fixed_heldout)
            elif user:
                if len(user) < 2 and not self.generated:
                    raise SoftPromptError(f"need at least 2 queries (one to train on, one held out), got {len(user)}")
                user_train, user_held = split_queries(user, c.heldout, c.seed) if len(user) >= 2 else (user, [])
            else:
                user_train, user_held = [], []
            gen_train, gen_held = [], []
            if self.queries is None or (c.query_mix and not self.fixed_heldout):
                gen_train, gen_held = self_study(self.teacher_base, self.base.tokenizer, self.context, c.n_queries,
                                                 c.n_heldout, c.seed, c.chunk_tokens, bf16=self.bf16, progress=self.progress,
                                                 exclude=[q.text for q in user])
            self.train_q = dedupe(user_train + gen_train)
            self.heldout_q = dedupe(user_held + gen_held, exclude=[q.text for q in self.train_q])
            if not self.train_q or not self.heldout_q:
                raise SoftPromptError("the query generator yielded no usable queries "
                                      f"({len(self.train_q)} to train on, {len(self.heldout_q)} held out): pass --queries FILE")
            self.out.mkdir(parents=True, exist_ok=True)
            from softprompt.atomic import atomic_write_json

            atomic_write_json(saved, {k: [{"text": q.text, "answers": list(q.answers), "meta": dict(q.meta or {})} for q in v]
                                      for k, v in (("train", self.train_q), ("heldout", self.heldout_q))})
        order = list(range(len(self.train_q)))
        import random

        random.Random(c.seed + 1).shuffle(order)
        k = min(32, max(1, round(c.dev * len(order)))) if len(order) > 1 else 0
        self.dev_q = [self.train_q[i] for i in order[:k]]
        self.fit_q = [self.train_q[i] for i in order[k:]] or list(self.train_q)
        self.queries = self.train_q + self.heldout_q
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
        layout and queries, but not the soft prompt's length or kind) and the decoding/distribution settings."""
        c = self.cfg
        rows = [self.renderer.fill(q.text, self.ctx_ids) for q in queries]
        train = split != "heldout"
        return cache_key(split=split, teacher=self.teacher_base.fingerprint, ids=hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
                         max_new_tokens=c.max_new_tokens, sample=c.sample_temperature if split == "train" else 0.0, seed=c.seed,
                         topk=c.topk if train else None, temperature=c.temperature if train else None, bf16=self.bf16,
                         positions=c.loss_positions if train else None, version=2)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.out / "teacher_cache"

    def teacher_entries(self, split: str, queries: list[Query]) -> tuple[list[TeacherEntry], bool]:
        """Cached teacher outputs for ``queries`` (train/dev: continuations + distributions at every
        distilled position; held-out: greedy continuations only). Returns (entries, loaded from disk)."""
        path = self.cache_dir / f"{split}-{self._key(split, queries)}.safetensors"
        entries = load_entries(path)
        if entries is not None and [e.query for e in entries] == [q.text for q in queries]:
            return entries, True
        c = self.cfg
        rows = [self.renderer.fill(q.text, self.ctx_ids) for q in queries]
        span_end = self.renderer.span_end(queries[0].text, len(self.ctx_ids))
        self.teacher.set_prefix(reusable_prefix(rows, limit=span_end))
        self.teacher_kv_prefix = len(self.teacher._prefix or [])
        gen = torch.Generator(device=self.teacher.device).manual_seed(c.seed)
        entries = []
        from tqdm.auto import tqdm

        dists_kept = split != "heldout"
        sample = c.sample_temperature if split == "train" else 0.0
        from_pos = span_end + 1 if dists_kept and c.loss_positions == "all" else None
        prefix = self.teacher._prefix or []
        # Greedy continuations of rows sharing the context's cache run TEACHER_BATCH at a time.
        batched = (TEACHER_BATCH > 1 and sample <= 0 and bool(prefix) and all(extends(r, prefix) for r in rows)
                   and (from_pos is None or from_pos > len(prefix)))
        step = TEACHER_BATCH if batched else 1
        bar = tqdm(total=len(rows), desc=f"teacher ({split})", disable=not self.progress, leave=False)
        for at in range(0, len(rows), step):
            part = rows[at:at + step]
            if batched:
                outs = self.teacher.continue_batch(part, c.max_new_tokens, c.temperature, c.topk, from_pos=from_pos)
            else:
                outs = [self.teacher.continue_(part[0], c.max_new_tokens, c.temperature, c.topk, sample, gen, from_pos=from_pos)]
            for q, ids, (cont, dists) in zip(queries[at:at + step], part, outs):
                qlen = len(ids) - from_pos if from_pos is not None else 0
                entries.append(TeacherEntry(q.text, ids, cont, dists.to("cpu") if dists_kept else None, qlen))
            bar.update(len(part))
        bar.close()
        save_entries(path, entries, {"split": split, "context_tokens": len(self.ctx_ids)})
        return entries, False

    # -- the student -------------------------------------------------------------------------------
    def init_spec(self) -> InitSpec:
        if self.cfg.init == "context":
            return InitSpec("text", text=self.context)
        return parse_init(self.cfg.init)

    def kept_positions(self) -> list[int]:
        """Context positions whose keys/values start a prefix student (see :mod:`kv_init`)."""
        from softprompt.compress.kv_init import attention_received, select_positions

        c = self.cfg
        scores = None
        if c.positions == "attention" and c.tokens < len(self.ctx_ids):
            entries = getattr(self, "fit_entries", None)
            qs = self.fit_q[:16]
            rows = [self.renderer.fill(q.text, self.ctx_ids) for q in qs]
            if entries:
                rows = [e.ids + e.cont[:-1] for e in entries[:16]]
            scores = attention_received(self.teacher_base.model, self.head_ids + self.ctx_ids, rows, self.bf16)
        self.positions_kept = select_positions(c.positions, c.tokens, len(self.head_ids), len(self.ctx_ids), scores)
        return self.positions_kept

    def make_prompt(self) -> SoftPrompt:
        if self.cfg.kind == "prefix":
            from softprompt.compress.kv_init import kv_prefix_init
            from softprompt.prompts.prefix import PrefixTuning, cache_layout

            kv = kv_prefix_init(self.teacher_base.model, self.head_ids, self.ctx_ids, self.kept_positions(), self.bf16)
            layers, kv_heads, head_dim = cache_layout(self.base.model)
            return PrefixTuning(kv.shape[3], self.base.hidden_size, layers, kv_heads, head_dim, init=kv).to(self.base.device)
        table = init_table(self.layout.template, self.init_spec(), self.base.embedding.weight, self.base.tokenizer, self.cfg.seed)
        return kind_class("prompt-tuning").create(self.cfg.tokens, self.base, table).to(self.base.device)

    def _freeze(self, prompt: SoftPrompt) -> None:
        """Keep the prefix's first position (the attention sink) as initialized: its gradient is zeroed,
        so AdamW (no weight decay) never moves it."""
        if self.cfg.kind != "prefix" or not self.cfg.freeze_first:
            return

        def hook(g):
            g = g.clone()
            g[:, :, :, :1] = 0
            return g

        prompt.kv.register_hook(hook)

    def _batch(self, entries: list[TeacherEntry]):
        c, base = self.cfg, self.base
        rows = []
        for e in entries:
            r = self.student_ids(e.query)
            frm = self._label_from(r)
            if len(r) - frm != e.qlen:
                raise RuntimeError(f"student targets ({len(r) - frm}) and teacher query distributions ({e.qlen}) differ")
            rows.append((r, e.cont, frm))
        batch = rows_batch([(r, cont) for r, cont, _ in rows], base.tokenizer.pad_token_id, base.device,
                           label_from=[f for _, _, f in rows])
        targets = torch.tensor([t for r, cont, f in rows for t in r[f:] + cont], device=base.device)
        teacher = TeacherDists.cat([e.dists for e in entries]).to(base.device) if c.objective != "loglik" else None
        return batch, targets, teacher

    def _loss(self, prompt: SoftPrompt, entries: list[TeacherEntry], mode_weight: float | None = None
              ) -> tuple[torch.Tensor, int]:
        """Summed training loss over ``entries`` and its token count (``mode_weight``: default the config's)."""
        batch, targets, teacher = self._batch(entries)
        with autocast(self.base.device, self.bf16):
            logits = target_logits(self.student_model, prompt, batch, share_prefix=self.cfg.share_prefix)[0]
        w = self.cfg.mode_weight if mode_weight is None else mode_weight
        return distill_loss(self.cfg.objective, logits, teacher, targets, self.cfg.temperature, w), len(targets)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "compress_checkpoint"

    def drop_checkpoint(self) -> None:
        """Remove the resume checkpoint (once the prompt is saved)."""
        shutil.rmtree(self.checkpoint_path, ignore_errors=True)

    def _save_checkpoint(self, prompt: SoftPrompt, optim: PromptOptimizer, best_state: dict | None, counters: dict) -> None:
        """The prompt, AdamW's state and the best prompt as safetensors, the rest as JSON (never pickle),
        replaced atomically."""
        tensors = {f"prompt.{k}": v.detach().contiguous() for k, v in prompt.state_dict().items()}
        opt_t, opt_info = optimizer_tensors(optim.opt)
        tensors.update(opt_t)
        tensors.update({f"best.{k}": v.contiguous() for k, v in (best_state or {}).items()})
        state = {**counters, "optimizer": opt_info, "scheduler": optim.sched.state_dict()}

        def build(tmp: Path) -> None:
            atomic_save_tensors(tmp / "state.safetensors", tensors)
            atomic_write_json(tmp / "state.json", state)

        atomic_replace_dir(build, self.checkpoint_path)

    def train(self, entries: list[TeacherEntry], dev: list[TeacherEntry] | None = None) -> list[dict]:
        """The distillation loop; it runs only the student (the teacher's outputs come from ``entries``).
        Every ``eval_every`` steps the dev KL is measured; training stops after ``patience`` evaluations
        without improvement and the best prompt is kept. A checkpoint is written at each evaluation;
        with ``resume`` a run continues from it."""
        from tqdm.auto import tqdm

        c = self.cfg
        torch.manual_seed(c.seed)
        self.fit_entries = entries
        prompt = self.prompt = self.make_prompt()
        prompt.train()
        self._freeze(prompt)
        optim = PromptOptimizer(prompt.parameters(), lr=self.lr, steps=c.steps, warmup=c.warmup, schedule=c.schedule,
                                max_grad_norm=c.max_grad_norm)
        plan = batch_plan([len(self.student_ids(e.query)) + len(e.cont) for e in entries], c.batch_size, c.steps, c.seed,
                          bucket=c.bucket)
        history: list[dict] = []
        best, best_step, bad, start = float("inf"), 0, 0, 0
        best_state = None
        ck = recover_dir(self.checkpoint_path)
        if c.resume and (ck / "state.json").exists():
            from safetensors.torch import load_file

            state, tensors = json.loads((ck / "state.json").read_text()), load_file(str(ck / "state.safetensors"))
            prompt.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("prompt.")})
            load_optimizer_tensors(optim.opt, {k: v for k, v in tensors.items() if k.startswith("optim.")}, state["optimizer"])
            optim.sched.load_state_dict(state["scheduler"])
            history, best, best_step, bad, start = state["history"], state["best"], state["best_step"], state["bad"], state["step"]
            best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
        bar = tqdm(total=c.steps, initial=start, desc="compress", unit="step", disable=not self.progress, dynamic_ncols=True)
        self.stopped_early = False
        for step, idx in enumerate(plan, 1):
            if step <= start:
                continue
            t0 = time.perf_counter()
            loss_sum, n = self._loss(prompt, [entries[i] for i in idx])
            loss = loss_sum / n
            check_finite(loss, step)
            loss.backward()
            rec = {"type": "train", "step": step, "loss": float(loss.detach()), **optim.step(),
                   "time_s": time.perf_counter() - t0}
            if dev and (step % c.eval_every == 0 or step == c.steps):
                prompt.eval()
                rec["dev_kl"] = self.loss_on(dev, prompt)
                prompt.train()
                if rec["dev_kl"] < best - c.min_delta:
                    best, best_step, bad = rec["dev_kl"], step, 0
                    best_state = {k: v.detach().clone() for k, v in prompt.state_dict().items()}
                else:
                    bad += 1
                history.append(rec)
                self._save_checkpoint(prompt, optim, best_state, {"history": history, "best": best, "best_step": best_step,
                                                                  "bad": bad, "step": step})
                if c.patience and bad >= c.patience:
                    self.stopped_early = True
                    bar.update(1)
                    break
            else:
                history.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", **({"dev": f"{best:.4f}"} if best_state is not None else {}))
        bar.close()
        if best_state is not None:
            prompt.load_state_dict(best_state)
        self.best_step, self.best_dev = best_step, (best if best_state is not None else None)
        prompt.eval()
        prompt.requires_grad_(False)
        self.history = history
        return history

    @torch.no_grad()
    def loss_on(self, entries: list[TeacherEntry], prompt: SoftPrompt | None = None) -> float:
        """Mean distillation loss per token of ``prompt`` (default: the current one) over ``entries``: the
        objective alone, without the ``mode_weight`` term, so early stopping watches the dev KL."""
        prompt = prompt or self.prompt
        total, count = 0.0, 0
        for i in range(0, len(entries), self.cfg.batch_size):
            loss, n = self._loss(prompt, entries[i:i + self.cfg.batch_size], mode_weight=0.0)
            total += float(loss)
            count += n
        return total / max(count, 1)

    # -- the report --------------------------------------------------------------------------------
    def lingua_text(self) -> tuple[str, list[int]]:
        """The context compressed by LLMLingua (the frozen model as its scorer) to this prompt's budget."""
        from softprompt.compress.lingua import lingua_compress

        if not hasattr(self, "_lingua"):
            text = lingua_compress(self.context, self.cfg.tokens, self.teacher_base, self.base.tokenizer)
            self._lingua = (text, self.base.tokenizer(text, add_special_tokens=False).input_ids)
        return self._lingua

    def evaluate(self, heldout: list[TeacherEntry]) -> dict:
        """Fidelity of the soft prompt and the baselines on held-out queries, and the cost side."""
        c, base, tok = self.cfg, self.base, self.base.tokenizer
        n = c.tokens
        conts = [e.cont for e in heldout]
        teacher_texts = [decode(tok, e.cont) for e in heldout]
        ctx_end = self.renderer.span_end(heldout[0].query, len(self.ctx_ids))
        self.teacher.set_prefix(reusable_prefix([e.ids for e in heldout], limit=ctx_end))  # once, also on a cache hit
        teacher_logits = [self.teacher.forced_logits(e.ids, e.cont).cpu() for e in heldout]
        answers = [next((q.answers for q in self.heldout_q if q.text == e.query), ()) for e in heldout]
        variants = {"soft": (self.prompt, [self.student_ids(e.query) for e in heldout])}
        if "truncated" in c.baselines:
            variants["truncated"] = (None, [self.renderer.fill(e.query, self.ctx_ids[:n]) for e in heldout])
        if "llmlingua" in c.baselines:
            try:
                lingua_ids = self.lingua_text()[1]
                variants["llmlingua"] = (None, [self.renderer.fill(e.query, lingua_ids) for e in heldout])
            except Exception as e:  # noqa: BLE001 - a peer's failure must not cost the run its report
                self.warn(f"the LLMLingua baseline failed ({e.__class__.__name__}: {e}); reported without it")
        if "none" in c.baselines:
            variants["none"] = (None, [self.renderer.fill(e.query, []) for e in heldout])
        fid = {}
        for name, (prompt, rows) in variants.items():
            fid[name] = fidelity(base, prompt, rows, conts, [t.to(base.device) for t in teacher_logits], teacher_texts,
                                 c.max_new_tokens, answers, self.bf16)
        if "none" in fid:
            gap = fid["none"]["kl_per_token"]
            for v in fid.values():
                v["kl_gap_closed"] = (1 - v["kl_per_token"] / gap) if gap > 0 else None
        if any(answers):
            from softprompt.compress.report import answer_f1

            scored = [(t, a) for t, a in zip(teacher_texts, answers) if a]
            fid["teacher"] = {"answer_f1": sum(answer_f1(t, list(a)) for t, a in scored) / len(scored)}
        timing = heldout[: min(c.timing_queries, len(heldout))]
        full = prefill_cost(base, None, [e.ids for e in timing], c.timing_repeats, self.bf16)
        soft = prefill_cost(base, self.prompt, [self.student_ids(e.query) for e in timing], c.timing_repeats, self.bf16)
        cost = {"full": full, "soft": soft, "kv_ratio": full["kv_bytes"] / max(soft["kv_bytes"], 1),
                "ttft_speedup": full["ttft_ms"] / max(soft["ttft_ms"], 1e-9), "device": str(base.device), "bf16": self.bf16,
                "timed_queries": len(timing), "repeats": c.timing_repeats,
                "prompt_param_bytes": sum(p.numel() for p in self.prompt.parameters()) * 4}
        examples = [{"query": e.query, "teacher": teacher_texts[i], **{k: fid[k]["outputs"][i] for k in variants}}
                    for i, e in enumerate(heldout[:3])]
        for k in variants:
            fid[k].pop("outputs")
        train_recs = [h for h in self.history if h.get("type") == "train"]
        train_losses = [h["loss"] for h in train_recs]
        return {
            "context_tokens": len(self.ctx_ids), "soft_tokens": n, "compression_ratio": len(self.ctx_ids) / n,
            "kind": c.kind, "student_positions": self.n_positions,
            "positions": c.positions if c.kind == "prefix" else None,
            "positions_kept": getattr(self, "positions_kept", None), "freeze_first": c.freeze_first if c.kind == "prefix" else None,
            "context_sha256": context_sha(self.context), "placement": self.layout.placement,
            "template": self.template_source, "objective": c.objective, "temperature": c.temperature, "mode_weight": c.mode_weight,
            "topk": c.topk, "init": c.init if c.kind == "prompt-tuning" else f"kv:{c.positions}",
            "loss_positions": c.loss_positions, "n_train": len(self.fit_q), "n_dev": len(self.dev_q), "n_heldout": len(heldout),
            "llmlingua_text": self._lingua[0] if hasattr(self, "_lingua") else None,
            "train": {"steps": len(train_recs), "max_steps": c.steps, "lr": self.lr, "stopped_early": getattr(self, "stopped_early", False),
                      "best_step": getattr(self, "best_step", None), "best_dev_kl": getattr(self, "best_dev", None),
                      "first_loss": train_losses[0] if train_losses else None,
                      "final_loss": train_losses[-1] if train_losses else None,
                      "curve": [{"step": h["step"], "dev_kl": h["dev_kl"]} for h in train_recs if "dev_kl" in h],
                      "time_s": sum(h["time_s"] for h in train_recs)},
            "fidelity": fid, "cost": cost, "examples": examples, "warnings": list(self.warnings),
        }

    # -- the whole job -----------------------------------------------------------------------------
    def run(self) -> CompressResult:
        """Queries, teacher, training, then the prompt is saved *before* the report is made, so a
        failure in the report never loses the trained prompt."""
        tq = time.perf_counter()
        self.split()
        t0 = time.perf_counter()
        f0 = self.teacher.forwards
        fit_entries, fit_hit = self.teacher_entries("train", self.fit_q)
        dev_entries, dev_hit = self.teacher_entries("dev", self.dev_q) if self.dev_q else ([], True)
        held_entries, held_hit = self.teacher_entries("heldout", self.heldout_q)
        teacher_info = {"forwards": self.teacher.forwards - f0, "time_s": time.perf_counter() - t0,
                        "cache": "hit" if fit_hit and dev_hit and held_hit else "built", "dir": str(self.cache_dir),
                        "kv_reused_prefix_tokens": getattr(self, "teacher_kv_prefix", None)}
        f1 = self.teacher.forwards
        t1 = time.perf_counter()
        self.train(fit_entries, dev_entries)
        if self.teacher.forwards != f1:  # the loop must not touch the teacher
            raise RuntimeError("teacher ran during training")
        self.save_prompt()
        self.drop_checkpoint()
        t2 = time.perf_counter()
        train_s = t2 - t1
        report = self.evaluate(held_entries)
        report["teacher"] = teacher_info
        # compress_s: from the job's start (model loading included when it loaded the model) until the prompt
        # is saved; the report (baselines, fidelity, timing) comes after it.
        report["time"] = {"queries_s": t0 - tq, "teacher_s": teacher_info["time_s"], "train_s": train_s,
                          "compress_s": t2 - self.t_start, "report_s": time.perf_counter() - t2,
                          "total_s": time.perf_counter() - self.t_start}
        report["queries"] = {"train": [q.text for q in self.fit_q], "dev": [q.text for q in self.dev_q],
                             "heldout": [q.text for q in self.heldout_q], "generated": self.generated,
                             "origins": dict(Counter(str((q.meta or {}).get("type", (q.meta or {}).get("origin", "user")))
                                                     for q in self.train_q))}
        self.save_report(report)
        return CompressResult(self.out, self.prompt, report, self.history, self.teacher.forwards, list(self.warnings))

    def save_prompt(self) -> None:
        c = self.cfg
        metrics = {"steps": len(self.history), "best_dev_kl": getattr(self, "best_dev", None),
                   "best_step": getattr(self, "best_step", None)}
        meta = build_meta(self.prompt, self.template_source, self.base, init=c.init if c.kind == "prompt-tuning" else f"kv:{c.positions}",
                          format=self.student_fmt.describe(), train_config={**asdict(c), "lr": self.lr},
                          metrics=metrics, precision=self.precision.to_meta(),
                          compression={"context_tokens": len(self.ctx_ids), "soft_tokens": c.tokens,
                                       "compression_ratio": len(self.ctx_ids) / c.tokens, "context_sha256": context_sha(self.context),
                                       "placement": self.layout.placement, "objective": c.objective, "kind": c.kind},
                          data={"n_train": len(self.fit_q), "n_dev": len(self.dev_q), "n_heldout": len(self.heldout_q)})
        save_artifact(self.out, self.prompt, meta)
        self.out.joinpath("metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in self.history))

    def save_report(self, report: dict) -> None:
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
