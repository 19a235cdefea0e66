"""Linear layers with weights prepacked for oneDNN: CPU inference without the per-call repacking.

A plain ``nn.Linear`` on CPU hands its weight to the matrix-multiply library in its stored layout
at every call. oneDNN can keep the weight in its own blocked layout instead; measured on this
2-core machine (fp32, SmolLM2): a 16-row decode forward drops from 68 to 30 ms, one row from 42 to
23 ms, a 512-token prefill from 716 to 391 ms, with logits within 1e-5 relative. In bf16 the gain is
smaller (28 to 23 ms for 16 rows), as bf16 already goes through oneDNN.

Inference only: a packed layer has no weight gradient and no autograd, so only a model that is never
trained again (the server's) is packed.

oneDNN builds (and caches) a primitive for every input row count it sees, about 0.6 MB each for one
SmolLM2-sized layer; the server's packed forwards take any row count from 1 to ``max_batch_tokens``,
so a long-running server grew by hundreds of MB (bench/results/soak.md). Rows are therefore padded
up to a few bucket sizes (:func:`bucket`): the row count of each call is one of about twenty.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def bucket(rows: int) -> int:
    """The padded row count for ``rows``: the next power of two up to 16 (decode batches, where a
    forward costs the weights' reading, not the rows), then the next multiple of 32 up to 512, then
    of 256."""
    if rows <= 16:
        return 1 << max(rows - 1, 0).bit_length()
    step = 32 if rows <= 512 else 256
    return -(-rows // step) * step


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` in oneDNN's layout (no gradient)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, None), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("PackedLinear is for inference: it has no autograd")
        lead, rows = x.shape[:-1], x[..., 0].numel()
        flat = x.reshape(rows, self.in_features)
        padded = bucket(rows)
        if padded != rows:
            flat = torch.cat([flat, flat.new_zeros(padded - rows, self.in_features)])
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y[:rows].reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def packing_available(device: torch.device) -> bool:
    """Whether this torch can prepack linear weights on ``device`` (CPU with oneDNN only)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = PackedLinear(nn.Linear(8, 4))
        x = torch.randn(3, 8)
        return probe(x).shape == (3, 4)
    except (RuntimeError, AttributeError):  # an op missing from this build
        return False


def pack_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` (float32 or bfloat16 weights, on CPU) by a
    :class:`PackedLinear`, in place; returns how many were replaced (0 where packing is unavailable).
    A tied output layer gets its own packed copy; the input embedding is left as it is."""
    device = next(model.parameters()).device
    if not packing_available(device):
        log.info("linear weights not packed: oneDNN prepacking is not available on %s", device)
        return 0
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in (torch.float32, torch.bfloat16):
                setattr(module, name, PackedLinear(child))
                n += 1
    return n
