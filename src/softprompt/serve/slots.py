"""Slot-pool keys/values and the attention over them: many rows of different lengths in one forward.

Each layer keeps one preallocated pool ``[slots, kv_heads, capacity, head_dim]``; a running request
owns a slot, and its keys/values fill columns ``[0, length)`` of it. A forward is *packed*: the new
tokens of every row (one for a decoding row, a chunk of its prompt for a prefilling row) sit side by
side in one sequence of batch size 1, so the linear layers see no padding at all. Attention is the
only per-row operation, and it is done here, through transformers' attention interface:

- decoding rows attend together, as one batch over their slots, masked to each row's length;
- each prefilling chunk attends to its own slot, causally.

New keys/values are written in place (no growing concatenation, no re-padding when rows join or
leave). Grouped-query heads are folded into the query length, so keys are never repeated.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from softprompt.hf_cache import cache_kw

ATTENTION = "softprompt_slots"


@dataclass
class Chunk:
    """``n`` new tokens of the row in ``slot``, written at columns ``[start, start + n)``."""

    slot: int
    start: int
    n: int


@dataclass
class Plan:
    """What one packed forward holds: first one token per decoding slot, then the prefill chunks."""

    decode_slots: list[int]
    decode_cols: list[int]  # the column each decoding row's new token goes to (its length before)
    chunks: list[Chunk]
    device: torch.device
    _cache: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.decode_slots) + sum(c.n for c in self.chunks)

    def tensors(self) -> dict:
        """Index tensors and masks shared by every layer (built once per forward)."""
        if not self._cache:
            dev, n = self.device, len(self.decode_slots)
            c = self._cache
            if n:
                slots = torch.tensor(self.decode_slots, device=dev)
                cols = torch.tensor(self.decode_cols, device=dev)
                width = max(self.decode_cols) + 1
                c["dec_slots"], c["dec_cols"], c["dec_width"] = slots, cols, width
                c["dec_contiguous"] = self.decode_slots == list(range(n))
                keep = (torch.arange(width, device=dev) <= cols[:, None])[:, None, None, :]
                c["dec_bias"] = torch.zeros(keep.shape, device=dev).masked_fill(~keep, float("-inf"))
            masks = []
            for ch in self.chunks:
                q = torch.arange(ch.start, ch.start + ch.n, device=dev)
                masks.append(torch.arange(ch.start + ch.n, device=dev)[None, :] <= q[:, None])
            c["chunk_masks"] = masks
        return self._cache


class SlotKV:
    """Per-layer key/value pools, and the cache object a packed forward is given.

    transformers' attention modules call :meth:`update` with the layer's new keys/values; the pools
    store them where the current :class:`Plan` says, and :func:`attention` reads them back."""

    def __init__(self, n_layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int = 256):
        self.n_layers, self.slots, self.kv_heads, self.head_dim = n_layers, slots, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.plan: Plan | None = None
        self.reserve(capacity)
        register()

    @classmethod
    def for_model(cls, model: torch.nn.Module, slots: int, capacity: int = 256) -> "SlotKV":
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers, slots, kv_heads, head_dim, p.dtype, p.device, capacity)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` columns per slot (grows by half at least, in steps of 64; keeps
        what is stored)."""
        if columns <= self.capacity:
            return
        cap = -(-max(columns, self.capacity * 3 // 2) // 64) * 64
        self._resize(cap)

    def shrink(self, columns: int) -> None:
        """Give memory back: pools of ``columns`` columns, contents dropped (call with no row running)."""
        if self.capacity > columns:
            self.capacity = 0
            self.keys, self.values = [], []
            self._resize(columns)

    def _resize(self, cap: int) -> None:
        shape = (self.slots, self.kv_heads, cap, self.head_dim)
        old = self.capacity
        for pool in (self.keys, self.values):
            for i in range(self.n_layers):
                # Zeros, not empty: masked-out columns still meet the values (0 x NaN would be NaN).
                t = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if old:
                    t[:, :, :old] = pool[i]
                if i < len(pool):
                    pool[i] = t
                else:
                    pool.append(t)
        self.capacity = cap

    def write(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Put ready-made ``[kv_heads, n, head_dim]`` keys/values per layer at the start of ``slot``."""
        if not keys:
            return
        n = keys[0].shape[1]
        self.reserve(n)
        for i in range(self.n_layers):
            self.keys[i][slot, :, :n] = keys[i]
            self.values[i][slot, :, :n] = values[i]

    def read(self, slot: int, columns: list[int] | range) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of ``slot``'s keys/values at ``columns``, per layer ``[kv_heads, len(columns), head_dim]``."""
        idx = torch.as_tensor(list(columns), device=self.device)
        return ([k[slot].index_select(1, idx) for k in self.keys], [v[slot].index_select(1, idx) for v in self.values])

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` columns of slot ``src`` to slot ``dst``."""
        for pool in (self.keys, self.values):
            for t in pool:
                t[dst, :, :length] = t[src, :, :length]

    # -- what a transformers attention module calls ------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        plan = self.plan
        if plan is None:
            raise RuntimeError("SlotKV.update called outside a packed forward")
        t = plan.tensors()
        K, V = self.keys[layer_idx], self.values[layer_idx]
        n = len(plan.decode_slots)
        if n:
            K[t["dec_slots"], :, t["dec_cols"]] = key_states[0, :, :n].transpose(0, 1).to(K.dtype)
            V[t["dec_slots"], :, t["dec_cols"]] = value_states[0, :, :n].transpose(0, 1).to(V.dtype)
        off = n
        for ch in plan.chunks:
            K[ch.slot, :, ch.start:ch.start + ch.n] = key_states[0, :, off:off + ch.n]
            V[ch.slot, :, ch.start:ch.start + ch.n] = value_states[0, :, off:off + ch.n]
            off += ch.n
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @contextlib.contextmanager
    def packed(self, model: torch.nn.Module, plan: Plan):
        """Run ``model`` with this pool as its cache and :func:`attention` as its attention."""
        cfg = model.config
        before = cfg._attn_implementation
        self.plan = plan
        cfg._attn_implementation = ATTENTION
        try:
            yield
        finally:
            cfg._attn_implementation = before
            self.plan = None

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Attention of the packed queries ``[1, heads, N, head_dim]``; returns ``[1, N, heads, head_dim]``."""
        plan = self.plan
        t = plan.tensors()
        K, V = self.keys[layer_idx], self.values[layer_idx]
        _, H, N, D = query.shape
        G = H // self.kv_heads
        out = query.new_empty(1, N, H, D)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        n = len(plan.decode_slots)
        if n:
            w = t["dec_width"]
            if t["dec_contiguous"]:
                k, v = K[:n, :, :w], V[:n, :, :w]
            else:
                k, v = K[t["dec_slots"], :, :w], V[t["dec_slots"], :, :w]
            q = query[0, :, :n].transpose(0, 1).reshape(n, self.kv_heads, G, D)  # groups as query positions
            # One query per row: plain batched matmuls beat the fused kernel's overhead here (measured
            # 130 vs 200 us per layer for 16 rows on CPU).
            scale = scaling if scaling is not None else D ** -0.5
            scores = torch.matmul(q.to(k.dtype), k.transpose(-1, -2)).float() * scale + t["dec_bias"]
            o = torch.matmul(torch.softmax(scores, -1).to(v.dtype), v)
            out[0, :n] = o.reshape(n, H, D).to(out.dtype)
        off = n
        if ("chunk_masks", G) not in t:  # query rows repeat per head group; built once per forward
            t[("chunk_masks", G)] = [m.repeat(G, 1) for m in t["chunk_masks"]]
        for ch, mask in zip(plan.chunks, t[("chunk_masks", G)]):
            end = ch.start + ch.n
            q = query[:, :, off:off + ch.n].reshape(1, self.kv_heads, G * ch.n, D)
            o = sdpa(q.to(K.dtype), K[ch.slot:ch.slot + 1, :, :end], V[ch.slot:ch.slot + 1, :, :end],
                     attn_mask=mask, scale=scaling)
            out[0, off:off + ch.n] = o.reshape(H, ch.n, D).transpose(0, 1).to(out.dtype)
            off += ch.n
        return out


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              **kwargs):
    """transformers attention-interface entry: the pool's packed attention (keys/values were stored
    by :meth:`SlotKV.update`)."""
    pool = kwargs.get("slot_kv")
    if pool is None:
        raise RuntimeError(f"attention {ATTENTION!r} needs slot_kv=SlotKV in the forward's arguments")
    return pool.attend(module.layer_idx, query, scaling), None


def register() -> None:
    """Make :func:`attention` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, attention)


def check_model(model: torch.nn.Module) -> None:
    """Refuse a model the packed forward would compute wrongly, with the reason: sliding-window or
    soft-capped attention, or any model whose packed logits differ from a plain forward's (checked
    on two short rows, one prefilled in two chunks)."""
    from softprompt.errors import SoftPromptError

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    name = getattr(cfg, "model_type", type(model).__name__)
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < getattr(cfg, "max_position_embeddings", 0):
        raise SoftPromptError(f"model type {name!r} uses sliding-window attention ({window} tokens); the serving "
                              "engine attends to the whole sequence and cannot serve it")
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        raise SoftPromptError(f"model type {name!r} has sliding-window layers; the serving engine cannot serve it")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise SoftPromptError(f"model type {name!r} soft-caps attention logits; the serving engine cannot serve it")
    device = next(model.parameters()).device
    vocab = int(getattr(cfg, "vocab_size", 2))
    rows = [torch.arange(3, 9, device=device) % vocab, torch.arange(11, 14, device=device) % vocab]
    kv = SlotKV.for_model(model, 2, capacity=16)
    emb = model.get_input_embeddings()
    try:
        with torch.no_grad():
            want = [model(input_ids=r[None]).logits[0, -1] for r in rows]
            # Forward 1: row 0's first 4 tokens and all of row 1; forward 2: row 0's last 2 tokens.
            plan = Plan([], [], [Chunk(0, 0, 4), Chunk(1, 0, 3)], device)
            pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device)
            with kv.packed(model, plan):
                got1 = model(inputs_embeds=emb(torch.cat([rows[0][:4], rows[1]]))[None], position_ids=pos,
                             **cache_kw(kv), use_cache=True, slot_kv=kv).logits[0, -1]
            plan = Plan([], [], [Chunk(0, 4, 2)], device)
            with kv.packed(model, plan):
                got0 = model(inputs_embeds=emb(rows[0][4:])[None], position_ids=torch.tensor([[4, 5]], device=device),
                             **cache_kw(kv), use_cache=True, slot_kv=kv).logits[0, -1]
    except Exception as e:  # noqa: BLE001 - any failure means the model is not servable this way
        raise SoftPromptError(f"model type {name!r} cannot run the serving engine's packed forward: "
                              f"{type(e).__name__}: {e}") from None
    tol = 1e-3 if kv.dtype == torch.float32 else 5e-2  # half precision: summation order shows
    for got, ref in ((got0, want[0]), (got1, want[1])):
        err = float((got.float() - ref.float()).abs().max())
        if err > tol * max(1.0, float(ref.float().abs().max())):
            raise SoftPromptError(f"model type {name!r}: the serving engine's packed forward differs from a plain "
                                  f"forward (max logit difference {err:.3g}); its attention is not supported")
