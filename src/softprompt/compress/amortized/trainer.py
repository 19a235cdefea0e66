"""Training an amortized compressor on many contexts.

Each context gets a few training queries (self-study by default) whose teacher targets (the frozen
model reading the full context: continuation and next-token distributions at every position after
the context) are computed once and cached on disk by the per-context job. A step takes
``contexts_per_step`` contexts, encodes each (one forward of ``head + context + memory`` with
gradients), and distills the student (the same frozen model with that prompt in the context's place)
toward the teacher on that context's queries: KL(teacher || student) per token, as in per-context
compression. Held-out (``dev``) contexts are evaluated every ``eval_every`` steps; training stops
after ``patience`` evaluations without improvement and the best compressor is kept.

A checkpoint (one safetensors file: the encoder, the best encoder, AdamW's state, and in its
metadata the schedule, history and counters) is written at every evaluation; ``resume`` continues
from it and ends with exactly the compressor an uninterrupted run produces (the step plan is a
function of the seed; nothing else is random).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from softprompt.atomic import atomic_save_tensors, atomic_write_json
from softprompt.base_model import BaseModel, load_base
from softprompt.compress.amortized.contexts import Context, require
from softprompt.compress.amortized.jobs import context_job, make_queries
from softprompt.compress.amortized.model import FORMS, Encoding, MemoryEncoder, init_memory
from softprompt.compress.amortized.store import AmortizedCompressor
from softprompt.compress.teacher import TeacherEntry
from softprompt.errors import SoftPromptError
from softprompt.optim import check_finite, lr_lambda
from softprompt.precision import resolve_precision

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class TrainConfig:
    model: str = "smollm2"
    memory: int = 16
    form: str = "kv"  # kv (memory keys/values as a prefix) | projector (hidden states -> input vectors)
    placement: str = "system"
    queries_per_context: int = 4
    query_source: str = "selfstudy"  # selfstudy | sentences | dataset
    chunk_tokens: int = 256
    max_new_tokens: int = 16  # teacher continuation length
    topk: int = 64
    steps: int = 200
    contexts_per_step: int = 4
    lr: float = 0.01  # memory embeddings (and the projector's per-slot vectors)
    projector_lr: float = 1e-3
    encoder_lora: int = 0  # rank of a LoRA (peft) on the encoder pass only; 0: none
    lora_alpha: float | None = None  # default 2 * rank
    lora_targets: str = "q_proj,v_proj"
    lora_lr: float = 1e-3
    warmup: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    eval_every: int = 10
    patience: int = 4
    min_delta: float = 1e-4
    seed: int = 0
    precision: str = "auto"
    device: str | None = None
    resume: bool = False
    cache_dir: str | None = None  # queries and teacher targets (default: OUT); runs on the same contexts can share it


@dataclass
class Item:
    context: Context
    ctx_ids: list[int]
    job: object  # softprompt.compress.Compressor
    entries: list[TeacherEntry]
    tokens: int  # distilled target tokens


def step_plan(n_items: int, per_step: int, steps: int, seed: int) -> list[list[int]]:
    """Context indices for every step: seeded permutations of all contexts, one after the other."""
    order: list[int] = []
    epoch = 0
    while len(order) < steps * per_step:
        perm = list(range(n_items))
        random.Random(seed * 7919 + epoch).shuffle(perm)
        order += perm
        epoch += 1
    return [order[i * per_step:(i + 1) * per_step] for i in range(steps)]


class Trainer:
    def __init__(self, cfg: TrainConfig, train: list[Context], dev: list[Context], out: str | Path,
                 base: BaseModel | None = None, progress: bool = True, say: Callable[[str], None] | None = None):
        if cfg.form not in FORMS:
            raise SoftPromptError(f"--form {cfg.form!r}: expected one of {', '.join(FORMS)}")
        if cfg.memory < 1:
            raise SoftPromptError(f"--memory must be >= 1 (got {cfg.memory})")
        if cfg.encoder_lora < 0:
            raise SoftPromptError(f"--encoder-lora must be a rank >= 1, or 0 for none (got {cfg.encoder_lora})")
        if cfg.steps < 1 or cfg.contexts_per_step < 1 or cfg.queries_per_context < 1:
            raise SoftPromptError("--steps, --contexts-per-step and --queries-per-context must be >= 1")
        require(train, "training")
        require(dev, "held-out (dev)")
        self.cfg, self.out, self.progress, self.say = cfg, Path(out), progress, say or (lambda m: None)
        self.train_ctx, self.dev_ctx = train, dev
        overlap = {c.sha for c in train} & {c.sha for c in dev}
        if overlap:
            raise SoftPromptError(f"{len(overlap)} context(s) are both training and dev contexts")
        self.base = base or load_base(cfg.model, device=cfg.device)
        self.precision = resolve_precision(cfg.precision, self.base.device)
        self.bf16 = self.precision.bf16
        self.history: list[dict] = []
        self.cache = Path(cfg.cache_dir) if cfg.cache_dir else self.out

    # -- data --------------------------------------------------------------------------------------
    def _item(self, ctx: Context) -> Item:
        c = self.cfg
        job = context_job(self.base, ctx.text, c.form, c.memory, self.out, c.placement, max_new_tokens=c.max_new_tokens,
                          topk=c.topk, seed=c.seed, precision="bf16" if self.bf16 else "fp32",
                          cache_dir=str(self.cache / "teacher_cache"))
        qs = make_queries(job, c.queries_per_context, c.query_source, c.seed, c.chunk_tokens, ctx.questions,
                          self.cache / "queries" / f"{c.query_source}-{c.queries_per_context}-{ctx.sha}.json")
        job.queries = qs
        job._check_window()
        entries, _ = job.teacher_entries("train", qs)
        job.teacher._cache, job.teacher._prefix = None, None  # the context's KV cache is not needed again
        return Item(ctx, job.ctx_ids, job, entries, sum(len(e.cont) + e.qlen for e in entries))

    def prepare(self) -> None:
        """Queries and teacher targets of every context (cached under OUT: a rerun makes none)."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        bar = tqdm(self.train_ctx + self.dev_ctx, desc="queries + teacher", unit="ctx", disable=not self.progress,
                   dynamic_ncols=True)
        items = [self._item(ctx) for ctx in bar]
        self.items, self.dev_items = items[:len(self.train_ctx)], items[len(self.train_ctx):]
        self.prepare_s = time.perf_counter() - t0
        # every context's job and the encoder pass run one frozen training model (a copy per job
        # would hold a second base per context: hundreds of contexts do not fit in memory)
        shared = self.items[0].job.student_model
        for it in self.items + self.dev_items:
            it.job._student = shared
        self.encoding = Encoding(self.base, self.encoder(), self.items[0].job.head_ids, self.bf16, model=shared)

    def encoder(self) -> MemoryEncoder:
        if not hasattr(self, "_encoder"):
            c = self.cfg
            torch.manual_seed(c.seed)
            lora = ({"r": c.encoder_lora, "alpha": c.lora_alpha, "targets": [t.strip() for t in c.lora_targets.split(",") if t.strip()]}
                    if c.encoder_lora else None)
            self._encoder = MemoryEncoder(self.base.hidden_size, c.memory, c.form, init=init_memory(self.base, c.memory),
                                          lora=lora).to(self.base.device)
            self._encoder.attach(self.base.model)  # seeded: the LoRA's initial weights are a function of the seed
        return self._encoder

    # -- the loss ----------------------------------------------------------------------------------
    def loss(self, item: Item) -> tuple[torch.Tensor, int]:
        """Summed KL(teacher || student) over the context's distilled tokens, and their count."""
        return item.job._loss(self.encoding.student(item.ctx_ids), item.entries)

    @torch.no_grad()
    def dev_kl(self, items: list[Item] | None = None) -> float:
        items = self.dev_items if items is None else items
        total, n = 0.0, 0
        for it in items:
            s, k = self.loss(it)
            total, n = total + float(s), n + k
        return total / max(n, 1)

    # -- checkpoints -------------------------------------------------------------------------------
    def _save_checkpoint(self, opt, sched, state: dict) -> None:
        enc = self.encoder()
        tensors = {f"enc.{k}": v.detach().cpu().contiguous() for k, v in enc.state_dict().items()}
        if state["best_state"] is not None:
            tensors.update({f"best.{k}": v.cpu().contiguous() for k, v in state["best_state"].items()})
        osd = opt.state_dict()
        for pid, st in osd["state"].items():
            for k, v in st.items():
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
        meta = {"param_groups": osd["param_groups"], "sched": sched.state_dict(),
                **{k: v for k, v in state.items() if k != "best_state"}}
        atomic_save_tensors(self.out / CHECKPOINT, tensors, {"state": json.dumps(meta)})

    def _load_checkpoint(self, opt, sched) -> dict:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self.out / CHECKPOINT
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["state"])
        t = load_file(str(path))
        enc = self.encoder()
        enc.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("enc.")}, strict=True)
        state: dict = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
        sched.load_state_dict(meta.pop("sched"))
        best = {k[5:]: v.to(self.base.device) for k, v in t.items() if k.startswith("best.")}
        meta["best_state"] = best or None
        return meta

    # -- the loop ----------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> list[dict]:
        """The training loop (``stop_after``: stop once that step is done, as a kill would; for tests)."""
        from tqdm.auto import tqdm

        c, enc = self.cfg, self.encoder()
        enc.train()
        groups = [{"params": [enc.memory] + ([enc.slot] if c.form == "projector" else []), "lr": c.lr}]
        if c.form == "projector":
            groups.append({"params": list(enc.proj.parameters()), "lr": c.projector_lr})
        if len(enc.lora):
            groups.append({"params": list(enc.lora.values()), "lr": c.lora_lr})
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(c.steps, c.warmup, c.schedule))
        plan = step_plan(len(self.items), c.contexts_per_step, c.steps, c.seed)
        st = {"step": 0, "best": float("inf"), "best_step": 0, "bad": 0, "history": [], "best_state": None}
        ck = self.out / CHECKPOINT
        if c.resume:
            if not ck.exists():
                raise SoftPromptError(f"--resume: no checkpoint in {self.out} (nothing to resume)")
            st = self._load_checkpoint(opt, sched)
            self.say(f"resuming at step {st['step']}")
            st["history"].append({"type": "resume", "step": st["step"]})
        elif ck.exists():
            ck.unlink()
        self.history = st["history"]
        if not c.resume and self.dev_items:  # the starting point: dev KL of the initial compressor
            enc.eval()
            dev0 = self.dev_kl()
            enc.train()
            self.history.append({"type": "eval", "step": 0, "dev_kl": dev0})
            st.update(best=dev0, best_state={k: v.detach().clone() for k, v in enc.state_dict().items()})
        bar = tqdm(total=c.steps, initial=st["step"], desc="compressor", unit="step", disable=not self.progress, dynamic_ncols=True)
        self.stopped_early = False
        for step in range(st["step"] + 1, c.steps + 1):
            t0 = time.perf_counter()
            idx = plan[step - 1]
            total_n = sum(self.items[i].tokens for i in idx)
            loss_sum = 0.0
            for i in idx:
                s, _ = self.loss(self.items[i])
                check_finite(s, step)
                (s / total_n).backward()
                loss_sum += float(s.detach())
            norm = torch.nn.utils.clip_grad_norm_(enc.parameters(), c.max_grad_norm) if c.max_grad_norm else None
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            rec = {"type": "train", "step": step, "loss": loss_sum / total_n, "lr": sched.get_last_lr()[0],
                   "grad_norm": float(norm) if norm is not None else None, "time_s": time.perf_counter() - t0}
            self.history.append(rec)
            st["step"] = step
            if step % c.eval_every == 0 or step == c.steps:
                enc.eval()
                dev = self.dev_kl()
                enc.train()
                self.history.append({"type": "eval", "step": step, "dev_kl": dev})
                if dev < st["best"] - c.min_delta:
                    st.update(best=dev, best_step=step, bad=0,
                              best_state={k: v.detach().clone() for k, v in enc.state_dict().items()})
                else:
                    st["bad"] += 1
                self._save_checkpoint(opt, sched, st)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", dev=f"{st['best']:.4f}")
                if c.patience and st["bad"] >= c.patience:
                    self.stopped_early = True
                    bar.update(1)
                    break
            bar.update(1)
            if stop_after is not None and step >= stop_after:
                bar.close()
                return self.history
        bar.close()
        if st["best_state"] is not None:
            enc.load_state_dict(st["best_state"])
        self.best_step, self.best_dev = st["best_step"], (st["best"] if st["best_state"] is not None else None)
        enc.eval()
        enc.requires_grad_(False)
        return self.history

    # -- the artifact ------------------------------------------------------------------------------
    def save(self) -> AmortizedCompressor:
        c = self.cfg
        comp = AmortizedCompressor(self.base, self.encoder(), placement=c.placement, precision="bf16" if self.bf16 else "fp32")
        train_recs = [h for h in self.history if h["type"] == "train"]
        evals = [h for h in self.history if h["type"] == "eval"]
        comp.save(self.out, train_config=asdict(c), precision=self.precision.to_meta(),
                  metrics={"steps": len(train_recs), "best_step": self.best_step, "best_dev_kl": self.best_dev,
                           "first_dev_kl": evals[0]["dev_kl"] if evals else None, "stopped_early": self.stopped_early,
                           "first_loss": train_recs[0]["loss"] if train_recs else None,
                           "final_loss": train_recs[-1]["loss"] if train_recs else None,
                           "prepare_s": getattr(self, "prepare_s", None), "train_s": sum(h["time_s"] for h in train_recs)},
                  contexts={"train": sorted(x.context.sha for x in self.items), "dev": sorted(x.context.sha for x in self.dev_items),
                            "sources": sorted({x.context.source for x in self.items + self.dev_items})})
        atomic_write_json(self.out / "history.json", self.history)
        plot_curve(self.history, self.out / "loss.png")
        (self.out / CHECKPOINT).unlink(missing_ok=True)
        return comp

    def run(self) -> AmortizedCompressor:
        self.prepare()
        self.say(f"{len(self.items)} training and {len(self.dev_items)} dev contexts, "
                 f"{sum(len(x.entries) for x in self.items)} training queries ({self.prepare_s:.0f} s for queries + teacher)")
        self.train()
        return self.save()


def plot_curve(history: list[dict], path: Path) -> None:
    """Training KL per step and dev KL at evaluations (png)."""
    try:
        from softprompt.plots import plot_loss

        plot_loss(history, path, dev_key="dev_kl", train_label="train KL", dev_label="dev KL (held-out contexts)",
                  ylabel="KL(teacher || student), nats/token")
    except ImportError:
        return
