"""Searching for a readable hard prompt that behaves like a soft prompt.

Two searches over vocabulary tokens placed in the template's soft slots, both minimizing the KL
divergence from the soft-prompted model's next-token distributions (or the task loss):

* ``pez``: projected gradient descent (Wen et al. 2023). Continuous vectors are kept; each step runs
  the model on their nearest-token projection and applies that gradient to the continuous vectors.
* ``greedy``: coordinate search in the spirit of AutoPrompt. The gradient with respect to each
  slot's embedding ranks candidate tokens (first-order estimate of the loss change); a few single-token
  swaps are evaluated exactly and the best is kept when it lowers the loss.

Special tokens are never proposed. The result is a list of token ids per slot, with its decoded text.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from softprompt.data.examples import Example
from softprompt.encoding import PromptFormat, collate
from softprompt.errors import SoftPromptError
from softprompt.interpret.fidelity import _example_with_target, input_vectors
from softprompt.interpret.nearest import nearest_tokens
from softprompt.objectives import target_logits
from softprompt.prompts import SoftPrompt

METHODS = ("pez", "greedy")


class _Table(SoftPrompt):
    """A prompt whose table is an arbitrary tensor (for gradients with respect to it)."""

    kind = "prompt-tuning"

    def __init__(self, table: torch.Tensor):
        super().__init__(table.shape[0], table.shape[1])
        self.table = table

    def vectors(self) -> torch.Tensor:
        return self.table


@dataclass
class HardenResult:
    method: str
    ids: list[int]
    tokens: list[str]
    start_loss: float
    loss: float
    history: list[float] = field(default_factory=list)


class Objective:
    """KL(soft || candidate) over the examples' answer positions, or the task loss; the soft
    prompt's reference distributions are computed once."""

    def __init__(self, model, prompt: SoftPrompt, fmt: PromptFormat, examples: list[Example], kind: str = "kl",
                 batch_size: int = 8):
        if kind not in ("kl", "task"):
            raise SoftPromptError(f"unknown objective {kind!r} (kl or task)")
        if kind == "task" and any(e.target is None for e in examples):
            raise SoftPromptError("--objective task needs examples with targets")
        self.model, self.kind = model, kind
        device = next(model.parameters()).device
        eos = fmt.tok.eos_token or ""
        items = [fmt.encode(_example_with_target(e, eos)) for e in examples]
        self.batches = [{k: v.to(device) for k, v in collate(items[i:i + batch_size], fmt.tok.pad_token_id).items()}
                        for i in range(0, len(items), batch_size)]
        self.refs = []
        if kind == "kl":
            with torch.no_grad():
                self.refs = [torch.log_softmax(target_logits(model, prompt, b)[0].float(), -1) for b in self.batches]

    def batch_loss(self, table: torch.Tensor, i: int) -> torch.Tensor:
        logits, targets, _ = target_logits(self.model, _Table(table), self.batches[i])
        if self.kind == "task":
            return F.cross_entropy(logits.float(), targets)
        ref = self.refs[i]
        return (ref.exp() * (ref - torch.log_softmax(logits.float(), -1))).sum(-1).mean()

    @torch.no_grad()
    def full(self, table: torch.Tensor) -> float:
        return sum(float(self.batch_loss(table, i)) for i in range(len(self.batches))) / len(self.batches)


def _allowed(tokenizer, vocab: int, device) -> torch.Tensor:
    ok = torch.ones(vocab, dtype=torch.bool, device=device)
    special = [i for i in tokenizer.all_special_ids if i < vocab]
    ok[special] = False
    return ok


def _nearest_allowed(vectors: torch.Tensor, weight: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    nb = nearest_tokens(vectors, weight, k=min(8, weight.shape[0]), metric="l2")
    ids = nb.ids.clone()
    first = []
    for row in ids:  # the nearest token that is not special
        ok = [int(t) for t in row if allowed[t]]
        first.append(ok[0] if ok else int(row[0]))
    return torch.tensor(first, device=weight.device)


def harden(base, prompt: SoftPrompt, fmt: PromptFormat, examples: list[Example], method: str = "greedy",
           steps: int = 50, objective: str = "kl", lr: float = 0.1, candidates: int = 16, swaps: int = 8,
           seed: int = 0, progress: bool = False) -> HardenResult:
    """Search a hard prompt for ``prompt`` on ``examples``; starts from the soft prompt's projection."""
    if method not in METHODS:
        raise SoftPromptError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    soft = input_vectors(prompt)
    weight = base.embedding.weight.detach()
    allowed = _allowed(base.tokenizer, weight.shape[0], weight.device)
    obj = Objective(base.model, prompt, fmt, examples, objective)
    ids = _nearest_allowed(soft, weight, allowed)
    start = obj.full(weight[ids].float())
    best_ids, best = ids.clone(), start
    history = [start]
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc=f"harden ({method})", disable=not progress)
    if method == "pez":
        cont = soft.clone().requires_grad_(True)
        opt = torch.optim.Adam([cont], lr=lr)
        for step in bar:
            ids = _nearest_allowed(cont.detach(), weight, allowed)
            hard = weight[ids].float().clone().requires_grad_(True)
            loss = obj.batch_loss(hard, step % len(obj.batches))
            (grad,) = torch.autograd.grad(loss, hard)
            cont.grad = grad
            opt.step()
            opt.zero_grad()
            cur = obj.full(weight[_nearest_allowed(cont.detach(), weight, allowed)].float())
            history.append(cur)
            if cur < best:
                best, best_ids = cur, _nearest_allowed(cont.detach(), weight, allowed)
            bar.set_postfix(loss=f"{best:.4f}")
    else:
        ids = ids.clone()
        for step in bar:
            i = step % len(obj.batches)
            table = weight[ids].float().clone().requires_grad_(True)
            loss = obj.batch_loss(table, i)
            (grad,) = torch.autograd.grad(loss, table)
            # first-order estimate of the loss change from putting token t at slot j: (e_t - e_cur) . grad_j
            est = grad @ weight.float().T
            est[:, ~allowed] = float("inf")
            top = est.topk(candidates, dim=-1, largest=False).indices  # [n, c]
            current = float(loss.detach())
            trial = []
            for _ in range(swaps):
                j = int(torch.randint(len(ids), (1,), generator=g))
                t = int(top[j, int(torch.randint(candidates, (1,), generator=g))])
                if t == int(ids[j]):
                    continue
                cand = ids.clone()
                cand[j] = t
                with torch.no_grad():
                    trial.append((float(obj.batch_loss(weight[cand].float(), i)), cand))
            if trial:
                value, cand = min(trial, key=lambda x: x[0])
                if value < current:
                    ids = cand
            cur = obj.full(weight[ids].float())
            history.append(cur)
            if cur < best:
                best, best_ids = cur, ids.clone()
            bar.set_postfix(loss=f"{best:.4f}")
    out_ids = best_ids.tolist()
    return HardenResult(method, out_ids, [base.tokenizer.decode([t]) for t in out_ids], start, best, history)
