"""The engine's pure-decode forward written out for Llama-architecture models, eager or compiled.

Most of a server's forwards are decode steps: one new token for each running row and no prompt
chunk. transformers' generic forward spends a third of such a step outside the matrix products
(SmolLM2, 16 rows, fp32, 2 cores: the 211 linear layers alone take 40 ms of a 62 ms step). This
module runs the same step from the model's own modules (its norms, rotary embedding, activation and
projections) straight over the slot pools of :mod:`softprompt.serve.slots`:

- eager, it computes bit for bit what the packed transformers forward computes, a little faster;
- ``compile=True`` runs it through ``torch.compile`` (inductor, dynamic row counts and lengths,
  frozen weights): elementwise work is fused into generated kernels and inductor packs the linear
  weights for oneDNN itself. Logits then differ from the eager step's by summation order (about
  1e-4 relative in fp32). The first step compiles (a minute or more on 2 cores); the engine does
  that at start-up, not on a request. It holds a dense copy of the linear weights for inductor.

Both forms are checked against the transformers forward when built (:meth:`DecodeStep.verify`),
and a model this module does not know is served by the transformers forward as before.
"""
from __future__ import annotations

import logging

import torch
import torch._inductor.config  # noqa: F401 - the config patches below
import torch.fx.experimental._config  # noqa: F401
import torch.nn.functional as F
from torch import nn

from softprompt.hf_cache import cache_kw
from softprompt.serve.packed import PackedLinear
from softprompt.serve.slots import Chunk, Plan, SlotKV

log = logging.getLogger(__name__)

MODEL_TYPES = ("llama",)  # decoder layers exactly as transformers' LlamaDecoderLayer
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def unsupported(model: nn.Module) -> str | None:
    """Why :class:`DecodeStep` cannot run ``model`` (``None`` when it can)."""
    cfg = model.config
    kind = getattr(cfg, "model_type", type(model).__name__)
    if kind not in MODEL_TYPES:
        return f"model type {kind!r} is not one of {', '.join(MODEL_TYPES)}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return "the model lacks model.layers, model.rotary_emb or lm_head"
    for layer in inner.layers:
        a = getattr(layer, "self_attn", None)
        if a is None or any(not hasattr(a, n) for n in _LINEARS[:4]) or any(not hasattr(layer.mlp, n) for n in _LINEARS[4:]):
            return "a decoder layer lacks the Llama projections"
        if any(hasattr(a, n) for n in ("q_norm", "k_norm")):
            return "the attention normalizes queries/keys"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp is not 1"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _dense(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as a plain dense tensor (a packed layer's is reordered back)."""
    if isinstance(module, PackedLinear):
        return module.packed.to_dense()
    return module.weight.detach()


class DecodeStep(nn.Module):
    """``step(embeds, positions, cols)``: logits ``[n, vocab]`` of one decode forward for the rows in
    slots ``0..n-1`` (``embeds [n, hidden]`` their new tokens' embeddings, ``positions [n]`` the
    tokens' positions, ``cols [n]`` the pool columns the new keys/values go to: the rows' lengths).
    The new keys/values are written into ``kv``'s pools, as the transformers forward would. The other
    slots must be free (compiled, a lone row borrows slot 1)."""

    def __init__(self, model: nn.Module, kv: SlotKV, compile: bool = False):
        super().__init__()
        why = unsupported(model)
        if why:
            raise ValueError(f"no written-out decode step for this model: {why}")
        self.model, self.kv, self.compiled = [model], kv, compile  # a list: not a submodule of this one
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, kv.kv_heads
        self.head_dim = kv.head_dim
        self.scaling = model.model.layers[0].self_attn.scaling
        if compile:
            # inductor freezes parameters and buffers of the module it compiles: a dense copy of each
            # linear weight as a buffer here (packed layers keep theirs in oneDNN's layout).
            for i, layer in enumerate(model.model.layers):
                for owner, name in [(layer.self_attn, n) for n in _LINEARS[:4]] + [(layer.mlp, n) for n in _LINEARS[4:]]:
                    self.register_buffer(f"w{i}_{name}", _dense(getattr(owner, name)), persistent=False)
            self.register_buffer("w_lm_head", _dense(model.lm_head), persistent=False)
            self._forward = torch.compile(self._run, dynamic=True)
        else:
            self._forward = self._run

    def _linear(self, owner: nn.Module, name: str, key: str, x: torch.Tensor) -> torch.Tensor:
        mod = getattr(owner, name)
        if not self.compiled:
            return mod(x)
        return F.linear(x, getattr(self, key), mod.bias)

    def _run(self, embeds: torch.Tensor, positions: torch.Tensor, cols: torch.Tensor, bias: torch.Tensor,
             keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        model = self.model[0]
        inner = model.model
        n, width = embeds.shape[0], bias.shape[-1]
        H, KH, D = self.heads, self.kv_heads, self.head_dim
        cos, sin = inner.rotary_emb(embeds[None], positions[None])
        cos, sin = cos[0][:, None], sin[0][:, None]  # [n, 1, D] against [n, heads, D]
        rows = torch.arange(n, device=embeds.device)
        x = embeds
        for i, layer in enumerate(inner.layers):
            a, mlp = layer.self_attn, layer.mlp
            h = layer.input_layernorm(x)
            q = self._linear(a, "q_proj", f"w{i}_q_proj", h).view(n, H, D)
            k = self._linear(a, "k_proj", f"w{i}_k_proj", h).view(n, KH, D)
            v = self._linear(a, "v_proj", f"w{i}_v_proj", h).view(n, KH, D)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            K, V = keys[i], values[i]
            K[rows, :, cols] = k.to(K.dtype)
            V[rows, :, cols] = v.to(V.dtype)
            kk, vv = K[:n, :, :width], V[:n, :, :width]
            qg = q.reshape(n, KH, H // KH, D)  # grouped-query heads as query positions, as slots.py does
            scores = torch.matmul(qg.to(kk.dtype), kk.transpose(-1, -2)).float() * self.scaling + bias
            o = torch.matmul(torch.softmax(scores, -1).to(vv.dtype), vv).reshape(n, H * D).to(x.dtype)
            x = x + self._linear(a, "o_proj", f"w{i}_o_proj", o)
            h = layer.post_attention_layernorm(x)
            gate = self._linear(mlp, "gate_proj", f"w{i}_gate_proj", h)
            up = self._linear(mlp, "up_proj", f"w{i}_up_proj", h)
            x = x + self._linear(mlp, "down_proj", f"w{i}_down_proj", mlp.act_fn(gate) * up)
        return self._linear(model, "lm_head", "w_lm_head", inner.norm(x))

    @torch.no_grad()
    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        width = int(cols.max()) + 1
        keep = (torch.arange(width, device=cols.device) <= cols[:, None])[:, None, None, :]
        bias = torch.zeros(keep.shape, device=cols.device).masked_fill(~keep, float("-inf"))
        if not self.compiled:
            return self._forward(embeds, positions, cols, bias, self.kv.keys, self.kv.values)
        n = embeds.shape[0]
        if n == 1 and self.kv.slots > 1:
            # One graph for every row count: torch.compile specializes a size of 1, so a lone row runs
            # with a copy of itself in slot 1, which is free in a pure decode step (rows use slots
            # 0..n-1); its keys/values land there unread, and its logits are dropped (as vLLM pads
            # batches to the sizes it captured graphs for).
            embeds, positions, cols, bias = (torch.cat([t, t]) for t in (embeds, positions, cols, bias))
        # Frozen weights (read when compiling; torch.compile's options= did not freeze them here), and no
        # sizes assumed equal because they were at the first call (duck sizing: a width equal to the slot
        # count would be guarded on, and the step where they differ would recompile).
        with torch._inductor.config.patch(freezing=True), torch.fx.experimental._config.patch(use_duck_shape=False):
            return self._forward(embeds, positions, cols, bias, self.kv.keys, self.kv.values)[:n]

    @torch.no_grad()
    def verify(self, tol: float | None = None, ids: list[int] | None = None) -> float:
        """Check this step against the transformers forward on two short rows in slots 0 and 1, for
        three decode steps (rows of 4 and 2 tokens, one row alone for the last; one row in a one-slot
        pool); returns the largest logit difference relative to the logits' scale, and raises
        ``ValueError`` past ``tol``. ``ids`` (11 at least: ordinary text, as the engine passes) feed the
        rows; rare ids such as special tokens drive a model into ranges where half-precision rounding
        alone moves logits by a third (SmolLM2 in bf16 against fp32, measured), ordinary text by about 3 %.
        Default ``tol``: 1e-5 eager (it is bit-equal), 1e-3 compiled in fp32, 0.1 compiled in half
        precision (inductor rounds at other points than eager). Uses the first two slots of the pools
        and zeroes what it wrote: call it with no row running."""
        model, kv = self.model[0], self.kv
        if tol is None:
            tol = 1e-5 if not self.compiled else 1e-3 if kv.dtype == torch.float32 else 0.1
        emb = model.get_input_embeddings()
        dev = emb.weight.device
        vocab = emb.weight.shape[0]
        ids = list(ids) if ids is not None and len(ids) >= 11 else [3 + i for i in range(11)]
        feed = torch.tensor(ids[:11], device=dev) % vocab  # 4 + 2 prompt tokens, then 3 + 2 decode tokens
        lengths = [4, 2][:kv.slots]  # an engine of one slot: one row
        rows = len(lengths)
        worst = 0.0
        states = []
        for use_self in (False, True):
            kv.reserve(8)
            for t in kv.keys + kv.values:
                t[:rows, :, :8] = 0
            prompt = [feed[:4], feed[4:6]][:rows]
            plan = Plan([], [], [Chunk(i, 0, n) for i, n in enumerate(lengths)], dev)
            pos = torch.tensor([[p for n in lengths for p in range(n)]], device=dev)
            with kv.packed(model, plan):
                model(inputs_embeds=emb(torch.cat(prompt))[None].to(kv.dtype), position_ids=pos, **cache_kw(kv),
                      use_cache=True, slot_kv=kv)
            got, cols = [], list(lengths)
            for step in range(3):
                n = rows if step < 2 else 1
                tok = torch.stack([feed[6 + step], feed[9 + min(step, 1)]])[:n]
                e = emb(tok).to(kv.dtype)
                c = torch.tensor(cols[:n], device=dev)
                if use_self:
                    logits = self(e, c.clone(), c)
                else:
                    plan = Plan(list(range(n)), cols[:n], [], dev)
                    with kv.packed(model, plan):
                        logits = model(inputs_embeds=e[None], position_ids=c[None], **cache_kw(kv), use_cache=True,
                                       logits_to_keep=torch.arange(n, device=dev), slot_kv=kv, ).logits[0]
                got.append(logits.float())
                cols = [x + 1 for x in cols[:n]]
            states.append(got)
        for t in kv.keys + kv.values:
            t[:rows, :, :8] = 0
        for ref, mine in zip(*states):
            worst = max(worst, float((ref - mine).abs().max()) / max(1.0, float(ref.abs().max())))
        if worst > tol:
            raise ValueError(f"the written-out decode step differs from the transformers forward: relative logit "
                             f"difference {worst:.3g} > {tol:g}")
        return worst
