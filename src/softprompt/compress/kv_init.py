"""KV-prefix students initialized from the frozen model's own keys and values of the context.

The teacher reads ``head + context + tail(query)``, where ``head`` is the template before the context
(e.g. ``<|im_start|>system\\n``). A KV-prefix student (the ``prefix`` kind) holds ``len(head) + N``
positions of per-layer keys/values and runs ``tail(query)`` after them. It starts as a real prefill:
the keys/values of ``head`` and of N chosen context positions (``first`` N, ``even``-ly spaced, or the
N that receive the most ``attention`` from the training queries), taken from one forward of
``head + context``.

Rotary phases. A key computed at original position ``p`` carries the rotation of ``p``. The prefix
kind runs the tokens after an ``n``-position prefix at positions ``n, n+1, ...`` and treats the prefix
as positions ``0..n-1``; so a kept key is re-rotated from ``p`` to its slot ``i`` (rotation by
``i - p``; rotations compose), and the student's queries then see exactly the relative distances
of a compact ``n``-token prefix. Values carry no position. With every position kept, ``i == p`` and
the student *is* the teacher (tested: KL below 1e-5). The re-rotation is checked numerically against
a prefill run at shifted positions (RoPE attention is shift-invariant, so the two keys must agree).
"""
from __future__ import annotations

import torch
from torch import nn

from softprompt.errors import SoftPromptError
from softprompt.hf_cache import cache_kw, cache_of
from softprompt.kv_prefix import rewind
from softprompt.precision import autocast

POSITION_CHOICES = ("first", "even", "attention")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rotary(model: nn.Module):
    """The model's rotary embedding module (Llama-style ``rotary_emb``), or an error for models
    without one (their keys carry no position to re-rotate: refused rather than guessed)."""
    inner = getattr(model, "model", model)
    rot = getattr(inner, "rotary_emb", None)
    if rot is None:
        raise SoftPromptError(f"--kind prefix initialization needs a rotary (RoPE) model; "
                              f"{type(model).__name__} has no rotary_emb")
    if float(getattr(rot, "attention_scaling", 1.0)) != 1.0:
        raise SoftPromptError("--kind prefix: rotary scaling with attention_scaling != 1 is not supported")
    return rot


@torch.no_grad()
def rerotate(model: nn.Module, keys: torch.Tensor, old: list[int] | torch.Tensor, new: list[int] | torch.Tensor) -> torch.Tensor:
    """Keys ``[..., n, head_dim]`` computed at positions ``old`` rotated as if computed at ``new``."""
    rot = rotary(model)
    delta = (torch.as_tensor(new) - torch.as_tensor(old)).to(torch.float64)
    inv = rot.inv_freq.detach().to(torch.float64).cpu()
    freqs = delta[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(keys.dtype), emb.sin().to(keys.dtype)
    return keys * cos + _rotate_half(keys) * sin


@torch.no_grad()
def prefill_kv(model: nn.Module, ids: list[int], bf16: bool = False, start: int = 0) -> torch.Tensor:
    """Keys/values ``[layers, 2, kv_heads, len(ids), head_dim]`` (fp32, CPU) of one forward of ``ids``
    at positions ``start, start+1, ...``."""
    device = next(model.parameters()).device
    t = torch.tensor([ids], device=device)
    pos = torch.arange(start, start + len(ids), device=device)[None]
    with autocast(device, bf16):
        cache = cache_of(model(input_ids=t, position_ids=pos, use_cache=True))
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]).float().cpu()


@torch.no_grad()
def attention_received(model: nn.Module, prefix: list[int], rows: list[list[int]], bf16: bool = False) -> torch.Tensor:
    """Attention each of ``prefix``'s positions receives from the positions after it, summed over the
    rows (each ``prefix + query tokens + continuation``), layers and heads, normalized per row: ``[len(prefix)]``."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    old = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")  # the fused kernels return no weights
    try:
        cache = DynamicCache(config=model.config)
        with autocast(device, bf16):
            model(input_ids=torch.tensor([prefix], device=device), use_cache=True, **cache_kw(cache))
        score = torch.zeros(len(prefix), dtype=torch.float64)
        for r in rows:
            if list(r[:len(prefix)]) != list(prefix) or len(r) <= len(prefix):
                raise ValueError("attention rows must extend the prefix")
            rewind(cache, len(prefix))
            tail = torch.tensor([r[len(prefix):]], device=device)
            pos = torch.arange(len(prefix), len(r), device=device)[None]
            with autocast(device, bf16):
                out = model(input_ids=tail, position_ids=pos, **cache_kw(cache), use_cache=True, output_attentions=True)
            a = torch.stack([w[0, :, :, :len(prefix)].float().sum((0, 1)) for w in out.attentions]).sum(0).double().cpu()
            score += a / a.sum()
        rewind(cache, len(prefix))
    finally:
        if old is not None:
            model.set_attn_implementation(old)
    return score


def select_positions(choice: str, n: int, head: int, ctx_len: int, scores: torch.Tensor | None = None) -> list[int]:
    """Context positions kept (indices into the context, ascending): ``n`` of ``ctx_len``."""
    if choice not in POSITION_CHOICES:
        raise SoftPromptError(f"--positions {choice!r}: expected one of {', '.join(POSITION_CHOICES)}")
    if n < 1 or n > ctx_len:
        raise SoftPromptError(f"--tokens {n}: a KV prefix keeps between 1 and {ctx_len} positions of this "
                              f"{ctx_len}-token context")
    if choice == "first" or n == ctx_len:
        return list(range(n))
    if choice == "even":
        return [i * ctx_len // n for i in range(n)]  # distinct since ctx_len / n >= 1
    if scores is None:
        raise ValueError("attention positions need scores")
    ctx_scores = scores[head:head + ctx_len]
    return sorted(int(i) for i in ctx_scores.topk(n).indices)


def kv_prefix_init(model: nn.Module, head_ids: list[int], ctx_ids: list[int], keep: list[int], bf16: bool = False) -> torch.Tensor:
    """``[layers, 2, kv_heads, len(head) + len(keep), head_dim]``: the keys/values of ``head`` and of the
    kept context positions from one prefill of ``head + context``, keys re-rotated to their slots."""
    kv = prefill_kv(model, list(head_ids) + list(ctx_ids), bf16)
    old = list(range(len(head_ids))) + [len(head_ids) + k for k in keep]
    kv = kv[:, :, :, old].clone()
    kv[:, 0] = rerotate(model, kv[:, 0], old, list(range(len(old))))
    return kv
