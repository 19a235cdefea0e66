"""A frozen base model made fast for prompt training on CPU.

A soft prompt's gradient needs only the *input* gradient of every linear layer (``dx = dy W``),
never a weight gradient. So the training copy of the base keeps each linear weight prepacked for
oneDNN twice, once as ``W`` for the forward and once as ``W^T`` for the backward, and drops the
plain weights: both products then skip the per-call repacking a plain ``nn.Linear`` pays (the
serving path's trick, :mod:`softprompt.serve.packed`, extended with a backward). In bf16 the copy's
linear weights are bf16 once, instead of autocast casting the fp32 weights in every forward.

Row counts are padded to :func:`softprompt.onednn.bucket` sizes, so a long run over batches of many
lengths keeps a bounded set of oneDNN primitives.

The attention kernel matters as much: on CPU, PyTorch's flash-attention backward in bf16 is slow on
short rows (a third of a SmolLM2 SST-2 step), while the plain ``softmax(q k^T) v`` of transformers'
``eager`` attention runs its backward as batched matmuls. :func:`training_attention` picks it for
bf16 training on CPU, and :func:`with_attention` gives a model another kernel without copying its
weights.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from softprompt.errors import SoftPromptError
from softprompt.onednn import pack, packed_mm, packing_available

log = logging.getLogger(__name__)


class _FrozenLinearFn(torch.autograd.Function):
    """``y = x W^T + b`` whose backward gives ``dx = dy W`` only (the weights are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fwd: torch.Tensor, bwd: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.bwd, ctx.shape, ctx.dtype = bwd, x.shape, x.dtype
        flat = x.reshape(-1, x.shape[-1]).to(fwd.dtype)
        return packed_mm(flat, fwd, bias).reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat = grad.reshape(-1, grad.shape[-1]).to(ctx.bwd.dtype).contiguous()
        dx = packed_mm(flat, ctx.bwd, None).reshape(ctx.shape).to(ctx.dtype)
        return dx, None, None, None


class FrozenLinear(nn.Module):
    """A frozen ``nn.Linear`` with its weight prepacked for the forward and, transposed, for the
    input gradient. No weight gradient, ever."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().to(dtype or linear.weight.dtype)
        self.register_buffer("fwd", pack(w), persistent=False)
        self.register_buffer("bwd", pack(w.t().contiguous()), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(w.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenLinearFn.apply(x, self.fwd, self.bwd, self.bias)
        flat = x.reshape(-1, x.shape[-1]).to(self.fwd.dtype)
        return packed_mm(flat, self.fwd, self.bias).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, frozen, packed=oneDNN (forward and input gradient)"


ATTENTION_CHOICES = ("auto", "sdpa", "eager")


# The eager kernel keeps a [batch, heads, queries, keys] fp32 score tensor (and its softmax) per
# layer for the backward: about 2.5 GB over SmolLM2's 30 layers at 8 x 9 x 600 x 600 (BoolQ rows),
# which ran a 200-step BoolQ run out of memory. Above this many scores a call runs SDPA instead.
EAGER_MAX_SCORES = 1 << 22
EAGER_OR_SDPA = "softprompt_eager_or_sdpa"


def _eager_or_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs):
    """transformers' eager attention where its score tensor is small (short rows: its backward is
    batched matmuls, faster than CPU flash attention's in bf16), SDPA where it is large (memory)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    scores = query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2]
    if scores <= EAGER_MAX_SCORES:
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.dtype != query.dtype:
        attention_mask = attention_mask.to(query.dtype)  # the additive mask in the kernel's dtype
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_eager_or_sdpa() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(EAGER_OR_SDPA, _eager_or_sdpa)
    AttentionMaskInterface.register(EAGER_OR_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["eager"])  # an additive mask: both take it
    return EAGER_OR_SDPA


def training_attention(setting: str, device: torch.device, bf16: bool) -> str | None:
    """The attention implementation to train with: ``setting`` unless "auto"; auto is, for bf16 on
    CPU, eager attention where a layer's score tensor is small and SDPA where it is large
    (:data:`EAGER_MAX_SCORES`; bench/results/prompt_tuning_vs_peft.md measures eager beside sdpa on
    SST-2), and the model's own (None) elsewhere."""
    if setting not in ATTENTION_CHOICES:
        raise SoftPromptError(f"attention {setting!r}: expected one of {', '.join(ATTENTION_CHOICES)}")
    if setting != "auto":
        return setting
    return _register_eager_or_sdpa() if bf16 and device.type == "cpu" else None


def _shared_copy(model: nn.Module) -> nn.Module:
    """New modules (and config) over the same parameters and buffers: nothing is copied."""
    return copy.deepcopy(model, {id(t): t for t in (*model.parameters(), *model.buffers())})


def with_attention(model: nn.Module, impl: str | None) -> nn.Module:
    """``model`` running attention with ``impl`` (a transformers attention implementation): the model
    itself when it already does (or ``impl`` is None), else a copy of its modules and config that
    shares every parameter and buffer (no weight is copied; the original keeps its kernel)."""
    if impl is None or model.config._attn_implementation == impl:
        return model
    out = _shared_copy(model)
    out.set_attn_implementation(impl)
    log.info("training with %s attention (the base model keeps %s)", impl, model.config._attn_implementation)
    return out


def fast_frozen_copy(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module | None:
    """A copy of ``model`` for prompt training whose linear layers are :class:`FrozenLinear` with
    weights in ``dtype`` (their products then run in ``dtype``, as under autocast, without casting the
    weights at every call); the other layers (embeddings, norms) keep their dtype, so the numerics
    are the autocast path's. None where oneDNN cannot prepack ``dtype`` (not on CPU, a torch build
    without it, or bf16 on a CPU without AVX-512)."""
    device = next(model.parameters()).device
    if not packing_available(device, dtype):
        return None
    fast = copy.deepcopy(model)
    fast.requires_grad_(False)
    n = 0
    for module in list(fast.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, FrozenLinear(child, dtype))
                n += 1
    fast.eval()
    log.info("training on a frozen copy of the base: %d linear layers prepacked (forward and input gradient), %s", n,
             str(dtype).removeprefix("torch."))
    return fast


def cast_frozen_copy(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy of ``model`` whose linear layers hold their weights (and biases) in ``dtype``, cast
    once, as frozen parameters; every other parameter and buffer (embeddings, norms, rotary tables) is
    shared with ``model``, not copied. Under autocast to ``dtype`` its products equal the base's bit
    for bit (autocast casts the same weights the same way, but at every call); it is what a compiled
    run trains on, since the graph compiler traces plain ``nn.Linear`` layers but not the oneDNN
    packed ones of :func:`fast_frozen_copy`."""
    out = _shared_copy(model)  # the linear weights are then replaced
    n = 0
    for module in out.modules():
        if type(module) is nn.Linear:  # a head tied to the embedding gets its own cast copy; the embedding stays shared
            module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
            n += 1
    out.eval()
    log.info("training on a copy of the base with %d linear layers cast once to %s (other weights shared)",
             n, str(dtype).removeprefix("torch."))
    return out


def training_model(model: nn.Module, bf16: bool, pack_weights: bool | None = None, attention: str = "auto",
                   compile: bool = False) -> nn.Module:
    """The model a prompt trains on: on CPU, when ``pack_weights`` (None: in bf16 only, where it is
    faster; in fp32 it bought no speed for 1.3 GB more, bench/results/prompt_tuning_vs_peft.md), a
    frozen copy with prepacked weights in the run's precision, or, for a compiled bf16 run (or a CPU
    whose oneDNN cannot prepack bf16: AVX2-only), a copy whose linear weights are cast once to bf16
    (:func:`cast_frozen_copy`; fp32 compiled runs train on ``model``); else ``model`` itself. Each
    runs the attention kernel :func:`training_attention` picks (a copy sharing the weights where that
    differs from the model's own). ``model`` is never modified.
    Each call makes its own copy: callers that run many jobs on one base share theirs (the amortized
    compressor gives every context's job the same one)."""
    device = next(model.parameters()).device
    pack = bf16 if pack_weights is None else pack_weights
    impl = training_attention(attention, device, bf16)
    fast = None
    if pack and device.type == "cpu":
        if not compile:
            fast = fast_frozen_copy(model, torch.bfloat16 if bf16 else torch.float32)
        if fast is None and bf16:  # compiled, or a CPU that cannot prepack bf16: cast once, not at every step
            fast = cast_frozen_copy(model, torch.bfloat16)
    if fast is not None:  # already a copy of its own: switch its kernel in place
        if impl is not None and fast.config._attn_implementation != impl:
            fast.set_attn_implementation(impl)
        return fast
    return with_attention(model, impl)
