"""The KV prefix: every prompt becomes, at run time, keys and values placed before a row's own tokens.

Training (a batch's shared leading tokens), compression (the teacher's context) and serving (each
prompt's fixed prefix) all do the same two things, and this module is where they are written once:

* find the *common prefix*: the leading tokens that several rows share (of token-id lists, or of a
  padded batch's columns);
* run that prefix through the frozen model once and reuse its keys/values: broadcast them to every
  row, slice rows out of a cache, or rewind a cache back to the prefix after a row has appended to it.

Attention is causal, so a position's keys/values depend only on the positions before it: reusing
them is exact. Low-level on purpose: it imports torch, transformers and the cache-name helper only.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from softprompt.hf_cache import cache_of, kv_name


# -- common prefixes -------------------------------------------------------------------------------
def common_prefix_len(rows: Sequence[Sequence[int]], limit: int | None = None) -> int:
    """Length of the longest prefix every row shares, at most ``limit`` (0 for no rows; a single row
    shares all of itself)."""
    if not rows:
        return 0
    n = min(len(r) for r in rows)
    if limit is not None:
        n = min(n, limit)
    first = rows[0]
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def reusable_prefix(rows: Sequence[Sequence[int]], limit: int | None = None) -> list[int]:
    """The longest prefix shared by all rows that is shorter than every row (each row keeps at least
    one token of its own to run, whose logits it needs), at most ``limit`` long."""
    if not rows:
        return []
    n = min(common_prefix_len(rows, limit), min(len(r) for r in rows) - 1)
    return list(rows[0][:max(n, 0)])


def extends(ids: Sequence[int], prefix: Sequence[int]) -> bool:
    """Whether ``ids`` starts with ``prefix`` and goes on past it (so ``prefix``'s cache applies)."""
    return len(ids) > len(prefix) and list(ids[:len(prefix)]) == list(prefix)


def batch_prefix_len(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Leading columns of a ``[batch, seq]`` batch that are identical in every row and unmasked."""
    same = ((ids == ids[:1]) & (mask == 1)).all(0).long()
    return int(same.cumprod(0).sum())


def after_prefix(rows: Sequence[Sequence[int]], prefix_len: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """A batch of rows that share their first ``prefix_len`` tokens (held in a cache), as their own
    tokens after it: right-padded ids ``[n, width]``, the mask over prefix and own tokens
    ``[n, prefix_len + width]`` (padding masked), positions from ``prefix_len`` on, and each row's own length."""
    n, P = len(rows), prefix_len
    lens = [len(r) - P for r in rows]
    width = max(lens)
    ids = torch.zeros(n, width, dtype=torch.long, device=device)
    mask = torch.zeros(n, P + width, dtype=torch.long, device=device)
    mask[:, :P] = 1
    for i, (r, k) in enumerate(zip(rows, lens)):
        ids[i, :k] = torch.as_tensor(list(r[P:]), device=device)
        mask[i, P:P + k] = 1
    return ids, mask, (P + torch.arange(width, device=device)).expand(n, width), lens


# -- caches ----------------------------------------------------------------------------------------
def kv_cache(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], batch_size: int, device, dtype,
             config=None):
    """A fresh DynamicCache holding per-layer ``(key, value)`` of shape ``[kv_heads, n, head_dim]``
    for ``batch_size`` rows (a view, not a copy, of each; the model appends to it)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for i, (k, v) in enumerate(pairs):
        shape = (batch_size, *k.shape)
        cache.update(k.to(device, dtype).unsqueeze(0).expand(shape), v.to(device, dtype).unsqueeze(0).expand(shape), i)
    return cache


def cache_rows(cache, start: int, stop: int):
    """A new DynamicCache holding rows ``start:stop`` of ``cache``."""
    from transformers import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys[start:stop], layer.values[start:stop], i)
    return out


def select_rows(cache, index: torch.Tensor):
    """Keep (and repeat) the rows of ``cache`` that ``index`` picks, in place, every layer copied once;
    returns ``cache``."""
    for layer in cache.layers:
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
    return cache


def broadcast(cache, rows: int):
    """A new DynamicCache with the one row of ``cache`` seen by ``rows`` rows (expanded, not copied;
    gradients from every row sum back into the one copy)."""
    from transformers import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        out.update(k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:]), i)
    return out


try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # transformers releases before the layered caches
    DynamicLayer = None

if DynamicLayer is not None:
    class GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` that appends into spare room of a buffer (doubling it when full) instead
        of concatenating: a decode step copies its one new position, not the whole cache. ``keys`` and
        ``values`` stay views of the filled part, so cropping, reading and masking work as before."""

        def reserve(self, room: int) -> None:
            """Make room for ``room`` more positions after the filled part (one copy of the cache)."""
            k, v = self.keys, self.values
            n = k.shape[-2]
            kb = k.new_empty(*k.shape[:-2], n + room, k.shape[-1])
            vb = v.new_empty(*v.shape[:-2], n + room, v.shape[-1])
            kb[..., :n, :] = k
            vb[..., :n, :] = v
            self._kbuf, self._vbuf = kb, vb
            self.keys, self.values = kb[..., :n, :], vb[..., :n, :]

        def _fits(self, k_new: torch.Tensor, need: int) -> bool:
            buf, k = getattr(self, "_kbuf", None), self.keys
            return (buf is not None and k.data_ptr() == buf.data_ptr() and k.stride() == buf.stride()
                    and k.shape[:-2] == k_new.shape[:-2] and buf.shape[-2] >= need)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
                self.lazy_initialization(key_states, value_states)
                self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
            n0 = self.keys.shape[-2]
            n = n0 + key_states.shape[-2]
            if not self._fits(key_states, n):  # no buffer yet, full, or keys replaced (reorder, select)
                self.reserve(max(n - n0, n0))
            self._kbuf[..., n0:n, :] = key_states
            self._vbuf[..., n0:n, :] = value_states
            self.keys, self.values = self._kbuf[..., :n, :], self._vbuf[..., :n, :]
            return self.keys, self.values


def grow_in_place(cache, room: int):
    """Turn ``cache``'s plain dynamic layers into ones that append in place, with ``room`` positions
    reserved (for a decode loop of that many steps). Other layer kinds (sliding windows) and caches
    of transformers releases without layers are left as they are. Returns ``cache``."""
    layers = getattr(cache, "layers", None)
    if DynamicLayer is None or layers is None:
        return cache
    for i, layer in enumerate(layers):
        if isinstance(layer, GrowingLayer):
            layer.reserve(room)
        elif type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.numel():
            grown = GrowingLayer()
            grown.__dict__.update(layer.__dict__)
            grown.reserve(room)
            layers[i] = grown
    return cache


def rewind(cache, length: int) -> None:
    """Drop everything after the first ``length`` positions of ``cache`` (in place, no recomputation)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def layer_kv(cache, row: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer keys and values of one row of ``cache``, each ``[kv_heads, seq, head_dim]``."""
    return [layer.keys[row] for layer in cache.layers], [layer.values[row] for layer in cache.layers]


# -- running a prefix once -------------------------------------------------------------------------
def _seq_key(inputs: dict) -> str:
    return "inputs_embeds" if "inputs_embeds" in inputs else "input_ids"


def run_prefix(net: nn.Module, inputs: dict, m: int):
    """Run the first ``m`` positions of the first row of a prompt's model inputs (``model_inputs``:
    ids or embeddings, mask, position ids, and the cache a kind may place before them) once, and
    return the cache holding them (the kind's own entries first)."""
    seq = _seq_key(inputs)
    n_extra = inputs["attention_mask"].shape[1] - inputs[seq].shape[1]  # positions a kind placed in the cache
    head = {seq: inputs[seq][:1, :m], "attention_mask": inputs["attention_mask"][:1, :n_extra + m],
            "position_ids": inputs["position_ids"][:1, :m]}
    if inputs.get(kv_name()) is not None:
        head[kv_name()] = cache_rows(inputs[kv_name()], 0, 1)
    return cache_of(net(**head, use_cache=True))


def forward_with_prefix(net: nn.Module, inputs: dict, m: int):
    """``net`` on a batch whose first ``m`` positions are the same in every row: those run once (see
    :func:`run_prefix`) and their keys/values are broadcast to the rows for positions ``m:``. Returns
    the output whose sequence covers positions ``m:`` (no cache)."""
    b = inputs["attention_mask"].shape[0]
    seq = _seq_key(inputs)
    cache = run_prefix(net, inputs, m)
    tail = {seq: inputs[seq][:, m:], "attention_mask": inputs["attention_mask"],
            "position_ids": inputs["position_ids"][:, m:], kv_name(): broadcast(cache, b)}
    return net(**tail, use_cache=False)
