"""The KV-prefix cache: each prompt's fixed leading part materialized once into per-layer keys/values.

A prompt's *prefix* is everything a request puts before the text of the template's first field: for
prefix tuning its trained keys/values (no input positions), then the rendered tokens up to the first
field (the chat header, hard text, soft tokens of input-level kinds). They are run through the frozen
model once, at the positions they would have in a full sequence, so a request only prefills its own
tokens. Entries are keyed by a content hash of the prompt's tensors, template and format, so an
updated prompt can never be served from a stale entry.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from softprompt.kv_prefix import layer_kv, run_prefix
from softprompt.prompts import SoftPrompt, as_prompt


@dataclass
class PrefixKV:
    """Materialized keys/values of a prompt's prefix.

    ``keys[i]``/``values[i]`` are layer ``i``'s ``[kv_heads, n_fixed + len(ids), head_dim]``: first the
    ``n_fixed`` slots a prefix-tuning prompt adds without positions, then one slot per token of ``ids``
    (which may hold slot markers). The first token of ``ids`` sits at position ``start_pos``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    ids: list[int]
    n_fixed: int
    start_pos: int

    @property
    def n_slots(self) -> int:
        return self.n_fixed + len(self.ids)

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(self.keys, self.values))

    def truncated(self, n_tokens: int) -> "PrefixKV":
        """The first ``n_tokens`` tokens of the prefix (attention is causal: their keys/values do not
        depend on what follows)."""
        if n_tokens >= len(self.ids):
            return self
        end = self.n_fixed + n_tokens
        return PrefixKV([k[:, :end] for k in self.keys], [v[:, :end] for v in self.values], self.ids[:n_tokens],
                        self.n_fixed, self.start_pos)


def content_hash(prompt: SoftPrompt, template_source: str, fmt: dict) -> str:
    """sha256 over the prompt's kind, inference tensors, template and chat format."""
    h = hashlib.sha256()
    h.update(json.dumps({"kind": prompt.kind, "template": template_source, "format": fmt}, sort_keys=True).encode())
    tensors = prompt.export_tensors()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def materialize(model: torch.nn.Module, prompt: SoftPrompt | None, ids: list[int]) -> PrefixKV:
    """Run a prompt's prefix (``ids``, slot markers allowed) through the frozen ``model`` once."""
    prompt = as_prompt(prompt)
    fixed = prompt.prefix_kv()
    n_fixed = int(fixed[0][0].shape[1]) if fixed else 0
    if not ids:
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        return PrefixKV([k.to(device, dtype) for k, _ in fixed or []], [v.to(device, dtype) for _, v in fixed or []],
                        [], n_fixed, n_fixed)
    t = torch.tensor([ids], device=next(model.parameters()).device)
    keys, values = layer_kv(run_prefix(model, prompt.model_inputs(model, t, torch.ones_like(t)), len(ids)))
    return PrefixKV(keys, values, list(ids), n_fixed, n_fixed)


class PrefixCache:
    """A byte-bounded LRU of :class:`PrefixKV` by content hash; thread-safe; counts hits and misses."""

    def __init__(self, budget_bytes: int = 512 * 2**20, enabled: bool = True):
        self.budget, self.enabled = budget_bytes, enabled
        self._items: OrderedDict[str, PrefixKV] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> PrefixKV | None:
        with self._lock:
            item = self._items.get(key) if self.enabled else None
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: str, item: PrefixKV) -> None:
        if not self.enabled or item.nbytes > self.budget:
            return
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while self.nbytes > self.budget:
                self._items.popitem(last=False)
                self.evictions += 1

    def discard(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._items.values())
