"""HF PEFT peers for the benchmarks: PEFT's prompt tuning given our initial vectors, and a PEFT LoRA
reference, each trained on the batches our Trainer planned with the same optimizer, schedule and
clipping (softprompt.optim.PromptOptimizer), and scored on the same token sequences.

PEFT prepends its virtual tokens before everything (the chat header included); ours sit where the
template's soft span is. The token sequences are otherwise identical: our encoding with the soft-slot
markers dropped. LoRA runs the soft template with its soft span removed, through our own scoring and
generation code (PEFT injects LoRA into the base model's modules in place; ``unload`` removes it).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from softprompt.encoding import IGNORE, Encoded, PromptFormat, collate
from softprompt.objectives import lm_loss
from softprompt.optim import PromptOptimizer, check_finite

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def without_markers(enc: Encoded) -> tuple[list[int], list[int]]:
    """Ids and labels of an encoded example with our soft-slot markers (negative ids) dropped."""
    keep = [i for i, t in enumerate(enc.ids) if t >= 0]
    return [enc.ids[i] for i in keep], [enc.labels[i] for i in keep]


def _pad(rows: list[tuple[list[int], list[int]]], pad: int, left: bool = False) -> dict[str, torch.Tensor]:
    width = max(len(r[0]) for r in rows)

    def fill(seq, value):
        extra = [value] * (width - len(seq))
        return extra + seq if left else seq + extra

    return {"input_ids": torch.tensor([fill(r[0], pad) for r in rows]),
            "attention_mask": torch.tensor([fill([1] * len(r[0]), 0) for r in rows]),
            "labels": torch.tensor([fill(r[1], IGNORE) for r in rows])}


@torch.no_grad()
def peft_label_scores(model, fmt: PromptFormat, examples, labels: list[str], batch_size: int = 16, bf16: bool = False) -> torch.Tensor:
    """[n_examples, n_labels] summed log-probability of each label's tokens under a PEFT prompt-tuning
    model (it prepends its virtual tokens to the same token sequence, without our slot markers)."""
    pad = fmt.tok.pad_token_id
    rows = [without_markers(fmt.encode(e, target=lab)) for e in examples for lab in labels]
    scores = []
    for start in range(0, len(rows), batch_size):
        batch = _pad(rows[start:start + batch_size], pad)
        width = batch["input_ids"].shape[1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -width:]
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        tgt = batch["labels"][:, 1:]
        got = lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (tgt != IGNORE)
        scores += got.sum(-1).tolist()
    return torch.tensor(scores).view(len(examples), len(labels))


def peft_classify(model, fmt, examples, labels, **kw) -> list[str]:
    return [labels[i] for i in peft_label_scores(model, fmt, examples, labels, **kw).argmax(-1).tolist()]


def peft_accuracy(model, fmt, examples, labels, bf16: bool = False, batch_size: int = 16) -> float:
    preds = peft_classify(model, fmt, examples, labels, bf16=bf16, batch_size=batch_size)
    return sum(p == e.target for p, e in zip(preds, examples)) / len(examples)


@torch.no_grad()
def peft_generate(model, fmt: PromptFormat, examples, max_new_tokens: int, eos_ids: list[int], batch_size: int = 1,
                  bf16: bool = False) -> list[str]:
    """Greedy completions from a PEFT prompt-tuning model, one example at a time, each step a whole
    forward through PEFT's own ``forward`` (which prepends the virtual tokens), decoded as
    softprompt.generate decodes ours (special tokens skipped).

    Not ``model.generate``: with peft 0.21.2 and transformers 5 its cached decoding goes wrong after
    the first token (runs of newlines where a cache-free loop over the same model writes text; seen
    on SmolLM2), so the loop here is the reference. ``batch_size`` is ignored (PEFT drops position
    ids, so a padded batch would shift positions)."""
    tok, out = fmt.tok, []
    for e in examples:
        ids, _ = without_markers(fmt.encode(e, with_target=False))
        new: list[int] = []
        for _ in range(max_new_tokens):
            x = torch.tensor([ids + new])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                nxt = int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax())
            if nxt in eos_ids:
                break
            new.append(nxt)
        out.append(tok.decode(new, skip_special_tokens=True))
    return out


def _loop(params, plan: list[list[int]], loss_of: Callable[[list[int]], torch.Tensor], steps: int, lr: float, warmup: float,
          schedule: str, max_grad_norm: float, bar=None) -> dict:
    """The shared optimization loop: AdamW + warmup/decay + clipping (PromptOptimizer) over ``plan``."""
    optim = PromptOptimizer(params, lr=lr, steps=steps, warmup=warmup, schedule=schedule, max_grad_norm=max_grad_norm)
    losses, times = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = loss_of(plan[i])
        check_finite(loss, i + 1)
        loss.backward()
        optim.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "losses": losses, "step_s": sum(times) / len(times)}


def peft_prompt_tuning(trainer, init: torch.Tensor, bar=None):
    """PEFT's PromptTuning on ``trainer``'s base, started from ``init`` ([n, hidden], our initial
    vectors), trained on ``trainer.plan`` with ``trainer.cfg``'s lr, schedule and clipping, with
    PEFT's own forward and loss. Returns (peft model, stats); stats records how far PEFT's starting
    vectors were from ``init`` (0 when the copy took)."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    cfg, base = trainer.cfg, trainer.base
    model = get_peft_model(base.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=init.shape[0]))
    table = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.copy_(init.to(table))
    start = table.detach().clone()
    pad = base.tokenizer.pad_token_id

    def loss_of(idx):
        batch = _pad([without_markers(trainer.encoded[j]) for j in idx], pad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.bf16):
            return model(**batch).loss

    model.train()
    stats = _loop([p for p in model.parameters() if p.requires_grad], trainer.plan, loss_of, cfg.steps, cfg.lr, cfg.warmup,
                  cfg.schedule, cfg.max_grad_norm, bar)
    model.eval()
    stats.update(init_max_abs_diff=float((start - init.to(start)).abs().max()), init_rms=float(start.pow(2).mean().sqrt()),
                 trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    return model, stats


def lora(trainer, fmt: PromptFormat, lr: float, r: int = 8, alpha: int = 16, bar=None):
    """PEFT LoRA (rank ``r`` on every attention and MLP projection) on ``trainer``'s base, trained on
    ``trainer.plan``'s batches encoded with ``fmt`` (the task's template without its soft span) with
    our target-token loss, the same schedule and clipping. Returns (peft model, stats); call
    ``model.unload()`` to give the base model back its own modules."""
    from peft import LoraConfig, TaskType, get_peft_model

    cfg, base = trainer.cfg, trainer.base
    torch.manual_seed(cfg.seed)  # LoRA's A matrices: the same draw whether or not our prompt trained first
    model = get_peft_model(base.model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                  target_modules=LORA_TARGETS))
    inner = model.get_base_model()
    encoded = [fmt.encode(e) for e in trainer.train_set]
    pad = base.tokenizer.pad_token_id

    def loss_of(idx):
        rows = [encoded[j] for j in idx]
        n = sum(1 for e in rows for x in e.labels[1:] if x != IGNORE)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.bf16):
            return lm_loss(inner, None, collate(rows, pad), reduction="sum", share_prefix=True) / max(n, 1)

    model.train()
    stats = _loop([p for p in model.parameters() if p.requires_grad], trainer.plan, loss_of, cfg.steps, lr, cfg.warmup,
                  cfg.schedule, cfg.max_grad_norm, bar)
    model.eval()
    stats.update(trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad), lr=lr, rank=r, alpha=alpha)
    return model, stats
