"""FLOP accounting for soft-prompt training on a frozen base (used by the benchmarks; the machine's
matmul peak is softprompt.hardware).

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

from dataclasses import dataclass

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


def train_step_flops(dims: ModelDims, lengths: list[int], head_positions: int, shared: int = 0) -> StepFlops:
    """FLOPs of one training step over sequences of ``lengths`` real tokens (soft tokens included),
    with the LM head run at ``head_positions`` positions in all. ``shared`` leading positions common
    to every row run once (see objectives: the shared prefix); the rows' own queries still attend to
    them."""
    tokens = sum(lengths) - shared * (len(lengths) - 1) if shared else sum(lengths)
    linear = 2 * dims.linear_params * tokens
    scores = shared * shared + sum((n - shared) * n for n in lengths) if shared else sum(n * n for n in lengths)
    attn = 4 * dims.layers * dims.attn_dim * scores
    head = 2 * dims.head_params * head_positions
    return StepFlops(forward=float(linear + attn + head), backward=float(linear + 2 * attn + head))
