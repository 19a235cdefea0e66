"""oneDNN's prepacked linear weights on CPU: whether this torch has them, and the products with
rows padded to a few bucket sizes.

oneDNN builds (and caches) a primitive for every row count a prepacked weight meets, about 0.6 MB
each for one SmolLM2-sized layer; a server's packed forwards (any count from 1 to
``max_batch_tokens``) or a training run over batches of many lengths would meet hundreds and keep
growing (bench/results/packed_buckets.md). Padding rows to :func:`bucket` sizes bounds them at about
twenty per weight; the padded rows are zeros and are cut off again, so no output row changes.
"""
from __future__ import annotations

import functools

import torch


def bucket(rows: int) -> int:
    """The padded row count for ``rows``: the next power of two up to 16 (decode batches, where a
    forward costs the weights' reading, not the rows), then the next multiple of 32 up to 512, then
    of 256."""
    if rows <= 16:
        return 1 << max(rows - 1, 0).bit_length()
    step = 32 if rows <= 512 else 256
    return -(-rows // step) * step


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ([out, in]) in oneDNN's blocked layout, for :func:`packed_mm`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_mm(x2d: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2d @ W^T + bias`` for ``packed = pack(W)``, rows padded to a bucket and cut back."""
    rows = x2d.shape[0]
    padded = bucket(rows)
    if padded != rows:
        x2d = torch.cat([x2d, x2d.new_zeros(padded - rows, x2d.shape[1])])
    return torch.ops.mkldnn._linear_pointwise(x2d, packed, bias, "none", [], "")[:rows]


def packing_available(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch can prepack ``dtype`` linear weights on ``device`` (CPU with oneDNN only;
    bf16 also needs a CPU with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT: oneDNN refuses it on AVX2-only ones)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return _probe(dtype)


@functools.cache
def _probe(dtype: torch.dtype) -> bool:
    try:
        w = torch.randn(4, 8)
        x = torch.randn(3, 8)
        got = packed_mm(x.to(dtype), pack(w.to(dtype)), None).float()
        want = x.to(dtype).float() @ w.to(dtype).float().t()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        return torch.allclose(got, want, rtol=tol, atol=tol)
    except (RuntimeError, AttributeError):  # an op missing from this build, or a dtype this CPU cannot pack
        return False
