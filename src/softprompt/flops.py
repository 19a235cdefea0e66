"""FLOP accounting for soft-prompt training on a frozen base, and the machine's matmul throughput.

Counted: the matrix multiplies (2 FLOPs per multiply-add), which are nearly all of the work.

- forward: ``2 * P * T`` for the backbone's linear layers (``P`` their weights, ``T`` the real,
  non-pad tokens), plus attention ``2 * 2 * L * d * n^2`` per sequence of length ``n`` (scores
  Q K^T and the weighted sum A V, over the whole ``n x n`` score matrix, as eager and SDPA math
  kernels compute it; ``L`` layers, ``d`` = heads x head dim), plus the LM head ``2 * V * h`` per
  position where it runs (only the target positions with ``target_only_head``, every position
  otherwise, as in PEFT);
- backward: gradients with respect to activations only, because the base is frozen: again
  ``2 * P * T`` for the linear layers (no ``2 * P * T`` for weight gradients, which a full
  fine-tune would add), twice the forward attention (dQ, dK from the scores, dA, dV from the
  weighted sum) and ``2 * V * h`` per head position. The prompt's own gradient is a scatter of the
  input-embedding gradient: no multiply.

Not counted: norms, rotary embeddings, activations, softmax and the cross-entropy (a few percent).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from softprompt.objectives import split_model


@dataclass(frozen=True)
class ModelDims:
    linear_params: int  # weights of the backbone's linear layers (the head and embedding excluded)
    layers: int
    attn_dim: int  # query heads x head dim
    head_params: int  # vocabulary x hidden (the LM head's matmul)


def model_dims(model: nn.Module) -> ModelDims:
    parts = split_model(model)
    backbone = parts[0] if parts is not None else model
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in backbone.modules() if isinstance(m, nn.Linear) and m is not head)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelDims(linear, cfg.num_hidden_layers, cfg.num_attention_heads * head_dim, head.weight.numel())


@dataclass(frozen=True)
class StepFlops:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def train_step_flops(dims: ModelDims, lengths: list[int], head_positions: int) -> StepFlops:
    """FLOPs of one training step over sequences of ``lengths`` real tokens (soft tokens included),
    with the LM head run at ``head_positions`` positions in all."""
    tokens = sum(lengths)
    linear = 2 * dims.linear_params * tokens
    attn = 4 * dims.layers * dims.attn_dim * sum(n * n for n in lengths)
    head = 2 * dims.head_params * head_positions
    return StepFlops(forward=float(linear + attn + head), backward=float(linear + 2 * attn + head))


def matmul_flops_per_s(dtype: torch.dtype, size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Measured throughput of ``torch.matmul`` on two ``size x size`` matrices of ``dtype``: the best
    of ``repeats`` timed runs after a warm-up (the best, because other load only slows a run down)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=g, device=device).to(dtype)
    b = torch.randn(size, size, generator=g, device=device).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best
