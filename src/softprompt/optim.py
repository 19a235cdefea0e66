"""The optimizer setup every prompt-training loop shares: AdamW over the prompt's trainable tensors,
linear warmup then linear/cosine/constant decay, gradient clipping, and a clear stop on a non-finite
loss. Used by the training loop (train.py) and context compression (compress/compressor.py)."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from softprompt.errors import SoftPromptError


def lr_lambda(steps: int, warmup: float, schedule: str) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: ``warmup`` is a fraction of ``steps`` (or a step
    count when >= 1); then ``schedule`` linear | cosine | constant."""
    warm = int(warmup if warmup >= 1 else round(warmup * steps))

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, steps - warm)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return f


def check_finite(loss: torch.Tensor, step: int, hint: str = "lower --lr") -> None:
    if not torch.isfinite(loss.detach()):
        raise SoftPromptError(f"non-finite loss ({loss.item()}) at step {step}: {hint}")


class PromptOptimizer:
    """AdamW + schedule + clipping over ``params``; :meth:`step` applies the accumulated gradients."""

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, steps: int, weight_decay: float = 0.0,
                 warmup: float = 0.06, schedule: str = "linear", max_grad_norm: float = 1.0):
        self.params = [p for p in params if p.requires_grad]
        self.max_grad_norm = max_grad_norm
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(steps, warmup, schedule))

    def step(self) -> dict:
        """Clip, step the optimizer and the schedule, clear the gradients; the step's lr and grad norm."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm) if self.max_grad_norm else None
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return {"lr": self.sched.get_last_lr()[0], "grad_norm": float(norm) if norm is not None else None}


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as tensors (``optim.<param>.<name>``, for safetensors) and the JSON rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict, info: dict) -> None:
    """The inverse of :func:`optimizer_tensors`."""
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in info["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
