"""The training loop: a frozen base model, a soft prompt, the log-likelihood of the targets.

One readable loop. Checkpoints hold the prompt, the optimizer and scheduler state and the step; the
batch order is fixed in advance from the seed, so ``resume`` after a kill ends with exactly the
prompt an uninterrupted run produces.

Under a multi-process launcher (``accelerate launch``, ``torchrun``) the same loop runs data
parallel: each rank takes its slice of every global batch of the plan, the prompt's gradients are
summed across ranks, and only rank 0 evaluates and writes files (see ``softprompt.distributed``).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from softprompt import __version__
from softprompt.artifact import build_meta, save_artifact
from softprompt.atomic import atomic_replace_dir, atomic_save_tensors, atomic_write_json, recover_dir
from softprompt.base_model import BaseModel, load_base
from softprompt.batching import batch_plan
from softprompt.data.examples import Example
from softprompt.distributed import current as current_dist
from softprompt.encoding import PromptFormat, check_template, collate
from softprompt.errors import SoftPromptError
from softprompt.init import init_table, parse_init
from softprompt.objectives import class_loss, compile_forward, lm_loss
from softprompt.optim import PromptOptimizer, check_finite, load_optimizer_tensors, optimizer_tensors
from softprompt.precision import autocast, resolve_precision
from softprompt.prompts import SoftPrompt, kind_class
from softprompt.scoring import label_accuracy, label_set, mean_loss
from softprompt.template import Field, Soft, Template, Text, parse_template

CHECKPOINT = "checkpoint"
OBJECTIVES = ("lm", "classify")


@dataclass
class TrainConfig:
    model: str = "smollm2"
    kind: str = "prompt-tuning"
    template: str | None = None  # template syntax; default "[soft:N] {input_field}"
    tokens: int = 8
    init: str = "vocab"
    input_field: str = "input"
    target_field: str = "target"
    chat: bool = True
    system: str | None = None
    kind_options: dict = field(default_factory=dict)
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 0.03
    weight_decay: float = 0.0
    warmup: float = 0.06  # fraction of steps (or a step count when >= 1)
    schedule: str = "linear"  # linear | cosine | constant
    max_grad_norm: float = 1.0
    eval_every: int = 0  # 0: evaluate only at the end
    patience: int = 0  # evaluations without improvement before stopping; 0: never stop early
    save_every: int = 0  # checkpoint every N steps; 0: only at evaluations and the end
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 (auto: bf16 where the hardware runs it natively)
    bucket: bool = True
    target_only_head: bool = True
    share_prefix: bool = True  # run the batch's common leading tokens once (exact)
    compile: bool = False  # torch.compile the base model's forward over the positions
    pack_weights: bool | None = None  # CPU: train on a frozen copy with prepacked weights (softprompt.frozen); None: in bf16 only
    attention: str = "auto"  # auto | sdpa | eager (auto: eager for bf16 on CPU, see softprompt.frozen)
    objective: str = "lm"  # lm (log-likelihood of the target) | classify (rank the label words, softmax over them)
    device: str | None = None

    def prompt_template(self) -> Template:
        """The template to train with: ``template`` parsed, or the default ``[soft:N] {input_field}``
        built directly. Raises TemplateError for one that cannot be written back (a bad field name,
        a length < 1)."""
        if not self.input_level:  # e.g. prefix tuning: before everything, in keys and values
            t = parse_template(self.template).without_soft() if self.template else Template((Field(self.input_field),))
        else:
            t = parse_template(self.template) if self.template else \
                Template((Soft(self.tokens), Text(" "), Field(self.input_field)))
        t.to_string()  # the artifact records it in the syntax: fail now, not when saving
        return t

    def template_source(self) -> str:
        """The template as the artifact records it: as given, or the canonical form of a built one."""
        if self.template and self.input_level:
            return self.template
        return self.prompt_template().to_string()

    @property
    def input_level(self) -> bool:
        """Whether the kind's virtual tokens are input positions (in the template) or elsewhere."""
        return kind_class(self.kind).input_level

    def n_virtual(self, template) -> int:
        return template.n_virtual if self.input_level else self.tokens


@dataclass
class TrainResult:
    out: Path
    steps_done: int
    final_loss: float
    best: dict | None
    metrics: dict
    stopped_early: bool = False


def create_prompt(cfg: TrainConfig, base: BaseModel, template, label_words: list[str] | None) -> SoftPrompt:
    cls = kind_class(cfg.kind)
    n = cfg.n_virtual(template)
    if n < 1:
        raise SoftPromptError(f"a {cfg.kind} prompt needs at least one virtual token (got {n})")
    table_template = template if cfg.input_level else Template.default(n)
    table = init_table(table_template, parse_init(cfg.init), base.embedding.weight, base.tokenizer, cfg.seed, label_words)
    return cls.create(n, base, table, cfg.kind_options)


class Trainer:
    """Trains one prompt. ``run()`` does the whole job; the pieces are methods so that recipes
    (compression, other objectives) can reuse them."""

    def __init__(self, cfg: TrainConfig, train: list[Example], dev: list[Example] | None = None,
                 out: str | Path = "prompt", base: BaseModel | None = None, progress: bool = True,
                 loss_fn: Callable | None = None):
        if not train:
            raise SoftPromptError("empty training set")
        self.cfg, self.train_set, self.dev_set, self.out = cfg, train, dev or [], Path(out)
        self.dist = current_dist()
        self.progress = progress and self.dist.is_main
        self.base = base or load_base(cfg.model, device=cfg.device or self.dist.device)
        self.device = self.base.device
        self.precision = resolve_precision(cfg.precision, self.device, announce=self.dist.is_main)
        self.bf16 = self.precision.bf16
        self.template = cfg.prompt_template()
        check_template(self.template, needs_soft=cfg.input_level)
        self.fmt = PromptFormat(self.base.tokenizer, self.template, chat=cfg.chat, system=cfg.system,
                                max_length=self.base.max_positions)
        self.encoded = [self.fmt.encode(e) for e in train]
        self.dev_encoded = [self.fmt.encode(e) for e in self.dev_set]
        self.labels = label_set(train)
        if cfg.objective not in OBJECTIVES:
            raise SoftPromptError(f"objective {cfg.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        self.candidates: list[list] = []
        if cfg.objective == "classify":  # every example once per label, the gold label's index
            if loss_fn is not None:
                raise SoftPromptError("objective 'classify' has its own loss; it cannot take a loss_fn")
            if not self.labels:
                raise SoftPromptError("objective 'classify' needs a classification training set (2-20 distinct short targets, "
                                      "each at least 3 times)")
            self.candidates = [[self.fmt.encode(e, target=lab) for lab in self.labels] for e in train]
            self.gold = [self.labels.index((e.target or "").strip()) for e in train]
        torch.manual_seed(cfg.seed)
        self.prompt = create_prompt(cfg, self.base, self.template, self.labels).to(self.device)
        self.prompt.train()
        params = [p for p in self.prompt.parameters() if p.requires_grad]
        self.dist.broadcast_params(params)
        self.params = params
        self.optim = PromptOptimizer(params, lr=cfg.lr, steps=cfg.steps, weight_decay=cfg.weight_decay,
                                     warmup=cfg.warmup, schedule=cfg.schedule, max_grad_norm=cfg.max_grad_norm)
        self.opt, self.sched = self.optim.opt, self.optim.sched
        self.plan = batch_plan([len(e.ids) for e in self.encoded], cfg.batch_size, cfg.steps * cfg.grad_accum,
                               cfg.seed, bucket=cfg.bucket)
        self.model = self._training_model()
        self.compiled = compile_forward(self.model, cfg.target_only_head) if cfg.compile else None
        self.loss_fn = loss_fn or (lambda batch: lm_loss(self.model, self.prompt, batch, cfg.target_only_head, "sum",
                                                         share_prefix=cfg.share_prefix, compiled=self.compiled))
        self.step = 0
        self.best: dict | None = None
        self.best_tensors: dict[str, torch.Tensor] | None = None
        self.bad_evals = 0
        self.history: list[dict] = []

    def _training_model(self):
        """The model the steps and evaluations run (see :func:`softprompt.frozen.training_model`)."""
        from softprompt.frozen import training_model

        return training_model(self.base.model, self.bf16, self.cfg.pack_weights, self.cfg.attention, self.cfg.compile)

    # -- one step ----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        micro = [self.plan[self.step * cfg.grad_accum + i] for i in range(cfg.grad_accum)]
        classify = bool(self.candidates)
        # the loss is a mean over the global batch: over target tokens (lm), over examples (classify)
        n_tok = sum(len(m) if classify else sum(1 for x in self.encoded[j].labels[1:] if x != -100) for m in micro for j in m)
        total, tokens = 0.0, 0
        for idx in map(self.dist.shard, micro):  # the whole batch, or this rank's slice of it
            if not idx:
                continue
            rows = [c for j in idx for c in self.candidates[j]] if classify else [self.encoded[j] for j in idx]
            batch = {k: v.to(self.device) for k, v in collate(rows, self.base.tokenizer.pad_token_id).items()}
            tokens += int(batch["attention_mask"].sum())
            with autocast(self.device, self.bf16):
                if classify:
                    gold = torch.tensor([self.gold[j] for j in idx], device=self.device)
                    loss = class_loss(self.model, self.prompt, batch, len(self.labels), gold, cfg.target_only_head,
                                      cfg.share_prefix, self.compiled) / max(n_tok, 1)
                else:
                    loss = self.loss_fn(batch) / max(n_tok, 1)
            check_finite(loss, self.step + 1, "lower --lr, or check the data")
            loss.backward()
            total += float(loss.detach())
        if self.dist.active:
            self.dist.all_reduce_grads(self.params)
            total, tokens = self.dist.sum([total, float(tokens)], self.device)
            tokens = int(tokens)
        stats = self.optim.step()
        self.step += 1
        return {"step": self.step, "loss": total, "lr": stats["lr"], "tokens": tokens, "grad_norm": stats["grad_norm"],
                "time_s": time.perf_counter() - t0}

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        self.prompt.eval()
        out = {"step": self.step, "dev_loss": mean_loss(self.model, self.prompt, self.fmt, self.dev_set, bf16=self.bf16)}
        if self.labels:
            out["dev_accuracy"] = label_accuracy(self.model, self.prompt, self.fmt, self.dev_set, self.labels, bf16=self.bf16)
        self.prompt.train()
        return out

    def _improved(self, ev: dict) -> bool:
        if self.best is None:
            return True
        if "dev_accuracy" in ev and ev["dev_accuracy"] != self.best.get("dev_accuracy"):
            return ev["dev_accuracy"] > self.best["dev_accuracy"]
        return ev["dev_loss"] < self.best["dev_loss"]

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        tensors = {f"prompt.{k}": v for k, v in self.prompt.state_dict().items()}
        opt_t, opt_info = optimizer_tensors(self.opt)
        tensors.update(opt_t)
        if self.best_tensors is not None:
            tensors.update({f"best.{k}": v for k, v in self.best_tensors.items()})
        state = {"step": self.step, "scheduler": self.sched.state_dict(), "optimizer": opt_info, "best": self.best,
                 "bad_evals": self.bad_evals, "config": asdict(self.cfg), "version": __version__}

        def build(tmp: Path) -> None:
            atomic_save_tensors(tmp / "state.safetensors", tensors)
            atomic_write_json(tmp / "state.json", state)

        atomic_replace_dir(build, self.out / CHECKPOINT)

    def load_checkpoint(self) -> bool:
        from safetensors.torch import load_file

        ck = recover_dir(self.out / CHECKPOINT)
        if not (ck / "state.json").exists():
            return False
        state = json.loads((ck / "state.json").read_text())
        saved = {k: v for k, v in state["config"].items() if k not in ("steps", "eval_every", "save_every", "patience", "device")}
        now = {k: v for k, v in asdict(self.cfg).items() if k in saved}
        diff = [k for k in saved if saved[k] != now.get(k)]
        if diff:
            raise SoftPromptError(f"{ck}: cannot resume, the run's settings differ in {', '.join(diff)}")
        tensors = load_file(str(ck / "state.safetensors"))
        self.prompt.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("prompt.")})
        load_optimizer_tensors(self.opt, {k: v for k, v in tensors.items() if k.startswith("optim.")}, state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.best, self.bad_evals = state["step"], state["best"], state["bad_evals"]
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        self.best_tensors = best or None
        return True

    # -- the whole job -----------------------------------------------------------------------------
    def run(self, resume: bool = False, stop_at: int | None = None) -> TrainResult | None:
        """Train to ``cfg.steps`` and save the artifact. ``stop_at`` halts abruptly after that step
        without saving anything more (as a kill would), for tests of resuming."""
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.dist.is_main
        self.out.mkdir(parents=True, exist_ok=True)
        log_path = self.out / "metrics.jsonl"
        if resume:
            require_checkpoint(self.out)
            self.load_checkpoint()
        if not main:  # other ranks train in step with rank 0 but write nothing
            log_path = Path(os.devnull)
        elif resume:  # drop log lines written after the checkpoint, and say where the run resumed
            lines = log_path.read_text().splitlines() if log_path.exists() else []
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= self.step]
            keep.append(json.dumps({"type": "resume", "step": self.step}))
            log_path.write_text("".join(ln + "\n" for ln in keep))
        else:
            log_path.write_text("")
        self.history = [json.loads(ln) for ln in log_path.read_text().splitlines()] if main else []
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not self.progress, dynamic_ncols=True)
        stopped, last = False, {"loss": float("nan")}
        with open(log_path, "a") as log:
            while self.step < cfg.steps and not stopped:
                last = self.train_step()
                if stop_at is not None and self.step > stop_at:
                    return None
                rec = {"type": "train", **last}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                self.history.append(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2g}")
                at_eval = self.dev_set and cfg.eval_every and self.step % cfg.eval_every == 0
                if at_eval:  # rank 0 evaluates; the others wait for its early-stopping decision
                    stopped = self.dist.broadcast_flag(main and self._eval_and_keep(log, bar), self.device)
                if main and ((cfg.save_every and self.step % cfg.save_every == 0) or at_eval):
                    self.save_checkpoint()
        bar.close()
        if not main:
            self.dist.barrier()  # until rank 0 has saved everything
            return TrainResult(self.out, self.step, last["loss"], None, {"steps": self.step, "rank": self.dist.rank}, stopped)
        records = [h for h in self.history if h.get("type") != "resume"]
        if self.dev_set and (not records or records[-1].get("type") != "eval"):
            with open(log_path, "a") as log:
                self._eval_and_keep(log, None)
        self.save_checkpoint()
        result = self._finish(last, stopped)
        self.dist.barrier()
        return result

    def _eval_and_keep(self, log, bar) -> bool:
        ev = self.evaluate()
        rec = {"type": "eval", **ev}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        self.history.append(rec)
        if bar is not None:
            bar.write("step {step}: dev_loss {dev_loss:.4f}".format(**ev)
                      + (f" dev_accuracy {ev['dev_accuracy']:.3f}" if "dev_accuracy" in ev else ""))
        if self._improved(ev):
            self.best = ev
            self.best_tensors = {k: v.detach().clone().cpu() for k, v in self.prompt.state_dict().items()}
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        return bool(self.cfg.patience) and self.bad_evals >= self.cfg.patience

    def _finish(self, last: dict, stopped: bool) -> TrainResult:
        if self.best_tensors is not None:
            self.prompt.load_state_dict({k: v.to(self.device) for k, v in self.best_tensors.items()})
        train_losses = [h["loss"] for h in self.history if h.get("type") == "train"]
        metrics = {"steps": self.step, "final_train_loss": train_losses[-1] if train_losses else None,
                   "first_train_loss": train_losses[0] if train_losses else None, "stopped_early": stopped}
        if self.best:
            metrics["best"] = self.best
        resumed = [h["step"] for h in self.history if h.get("type") == "resume"]
        if resumed:
            metrics["resumed_from"] = resumed  # the checkpoint steps this run was resumed at
        if self.dist.active:
            metrics["world_size"] = self.dist.world
        meta = build_meta(self.prompt, self.template_source, self.base, init=self.cfg.init,
                          format=self.fmt.describe(), labels=self.labels, train_config=asdict(self.cfg),
                          metrics=metrics, precision=self.precision.to_meta(),
                          data={"train": self.train_set[0].source, "n_train": len(self.train_set),
                                "dev": self.dev_set[0].source if self.dev_set else None,
                                "n_dev": len(self.dev_set)})
        save_artifact(self.out, self.prompt, meta)
        try:
            from softprompt.plots import plot_loss

            plot_loss(self.history, self.out / "loss.png")
        except ImportError:  # matplotlib is optional at run time
            pass
        return TrainResult(self.out, self.step, train_losses[-1] if train_losses else float("nan"), self.best, metrics, stopped)

    @property
    def template_source(self) -> str:
        return self.cfg.template_source()


def require_checkpoint(out: str | Path) -> Path:
    """The checkpoint directory under ``out`` (a swap a crash interrupted is finished first);
    SoftPromptError when there is none to resume from."""
    ck = recover_dir(Path(out) / CHECKPOINT)
    if not (ck / "state.json").is_file():
        raise SoftPromptError(f"--resume: {Path(out)} holds no checkpoint ({CHECKPOINT}/state.json) to resume from")
    return ck


def train(cfg: TrainConfig, train: list[Example], dev: list[Example] | None = None, out: str | Path = "prompt",
          resume: bool = False, base: BaseModel | None = None, progress: bool = True) -> TrainResult:
    """Train a soft prompt and save it as an artifact directory ``out``."""
    return Trainer(cfg, train, dev, out, base=base, progress=progress).run(resume=resume)
