"""The engine: continuous batching over one frozen model, in a background thread.

Every iteration admits waiting requests into free batch slots (one batched prefill for the newcomers),
then runs one decode step for all running rows, and retires finished or cancelled rows. A row is a
request with any prompt, of any kind, or none ("base"). Each row's keys/values start with its prompt's
cached prefix (:mod:`softprompt.serve.kv_cache`); prefixes of different lengths are left-padded to a
common width and masked out, and every row carries explicit position ids, so a row computes exactly
what it would compute alone.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from softprompt.base import BaseModel
from softprompt.generate import SamplingParams, sample_next
from softprompt.serve.kv_cache import PrefixCache, PrefixKV, materialize
from softprompt.serve.metrics import Metrics
from softprompt.serve.registry import LoadedPrompt

log = logging.getLogger(__name__)

EMPTY = PrefixKV([], [], [], 0, 0)


class QueueFull(Exception):
    """The waiting queue is at its limit."""


@dataclass
class Request:
    """One generation request. ``emit`` receives ``("delta", text)``, then ``("done", finish_reason,
    usage)`` or ``("error", message)``; it is called from the engine thread."""

    id: str
    prompt: LoadedPrompt | None
    ids: list[int]
    params: SamplingParams
    emit: Callable[[tuple], None]
    created: float = field(default_factory=time.monotonic)


@dataclass
class _Row:
    req: Request
    out: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    next_pos: int = 0  # position of the next token fed
    last: int = 0  # the token to feed next
    gen: torch.Generator | None = None
    finished: str | None = None
    prefix_tokens: int = 0


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


class Engine:
    def __init__(self, base: BaseModel, cache: PrefixCache, metrics: Metrics | None = None,
                 max_batch: int = 16, max_queue: int = 64):
        self.base, self.model, self.tok = base, base.model, base.tokenizer
        self.cache, self.metrics = cache, metrics or Metrics()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = base.device
        self.eos = set(base.eos_ids())
        self._waiting: deque[Request] = deque()
        self._cancelled: set[str] = set()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.rows: list[_Row] = []
        self._kv = None  # DynamicCache of the running batch
        self._mask: torch.Tensor | None = None
        self.joins = 0  # prefilled rows that joined a running batch (continuous batching at work)
        self.cancelled_rows = 0  # running rows dropped because their client went away

    # -- client side (any thread) ------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            self._waiting.append(req)
            self.metrics.queue_length = len(self._waiting)
            self._cond.notify()

    def cancel(self, req_id: str) -> None:
        with self._cond:
            self._cancelled.add(req_id)
            self._cond.notify()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="softprompt-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def forget(self, prompt_hash: str) -> None:
        """Drop a replaced or removed prompt's cached prefix (stale entries could never be hit, since
        keys are content hashes, but they would hold memory)."""
        self.cache.discard(prompt_hash)

    # -- the loop (engine thread) ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self.rows and not self._cancelled:
                    self._cond.wait()
                if self._stop:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                if cancelled:
                    self._waiting = deque(r for r in self._waiting if r.id not in cancelled)
                free = self.max_batch - len(self.rows)
                new = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                self.metrics.queue_length = len(self._waiting)
            for row in self.rows:
                if row.req.id in cancelled and row.finished is None:
                    row.finished = "cancelled"
                    self.cancelled_rows += 1
            try:
                self._retire()
                if new:
                    self._prefill(new)
                    self._retire()
                if self.rows:
                    self._decode()
                    self._retire()
            except Exception as e:  # noqa: BLE001 - never let one bad step kill the server
                log.exception("engine step failed")
                for r in [row.req for row in self.rows] + [r for r in new if all(r is not x.req for x in self.rows)]:
                    r.emit(("error", f"internal error during generation: {type(e).__name__}: {e}"))
                self.rows, self._kv, self._mask = [], None, None
            self.metrics.batch_size = len(self.rows)

    # -- prefill -----------------------------------------------------------------------------------
    def _prefix(self, req: Request) -> tuple[PrefixKV, bool]:
        """The cached prefix to start ``req`` from (cut to what its ids share with it), and whether
        this row should fill the cache: on a miss the row runs its whole prompt in the batched
        prefill and its prefix's keys/values are copied out of that forward (no extra forward)."""
        lp = req.prompt
        if lp is None:
            return EMPTY, False
        if self.cache.enabled:
            pre = self.cache.get(lp.hash)
            if pre is not None:
                n = 0
                for a, b in zip(pre.ids, req.ids):
                    if a != b:
                        break
                    n += 1
                return pre.truncated(min(n, len(req.ids) - 1)), False
        # Only a prefix-tuning prompt's own keys/values come ready-made; the tokens run in the prefill.
        fill = (self.cache.enabled and len(req.ids) > len(lp.prefix_ids)
                and req.ids[:len(lp.prefix_ids)] == lp.prefix_ids)
        return materialize(self.model, lp.prompt, []), fill

    def _embed(self, prompt, ids: torch.Tensor) -> torch.Tensor:
        emb = self.model.get_input_embeddings()
        return prompt.embed(emb, ids) if prompt is not None else emb(ids)

    @torch.no_grad()
    def _prefill(self, reqs: list[Request]) -> None:
        from transformers import DynamicCache

        parts, fills = [], []
        for r in reqs:
            pre, fill = self._prefix(r)
            parts.append((pre, r.ids[len(pre.ids):]))
            fills.append(fill)
        B = len(reqs)
        P = max(p.n_slots for p, _ in parts)
        S = max(len(s) for _, s in parts)
        dev = self.device
        dtype = next(self.model.parameters()).dtype
        hidden = self.base.hidden_size
        mask = torch.zeros(B, P + S, dtype=torch.long, device=dev)
        embeds = torch.zeros(B, S, hidden, dtype=dtype, device=dev)
        pos = torch.zeros(B, S, dtype=torch.long, device=dev)
        cache = DynamicCache()
        if P:
            layers = next(p for p, _ in parts if p.n_slots).keys
            kshape = [(B, k.shape[0], P, k.shape[2]) for k in layers]
            K = [torch.zeros(s, dtype=dtype, device=dev) for s in kshape]
            V = [torch.zeros(s, dtype=dtype, device=dev) for s in kshape]
        rows = []
        for b, ((pre, suf), r) in enumerate(zip(parts, reqs)):
            n = pre.n_slots
            if n:
                for i in range(len(K)):
                    K[i][b, :, P - n:] = pre.keys[i]
                    V[i][b, :, P - n:] = pre.values[i]
                mask[b, P - n:P] = 1
            mask[b, P + S - len(suf):] = 1
            ids = torch.tensor([suf], device=dev)
            prompt = r.prompt.prompt if r.prompt is not None else None
            embeds[b, S - len(suf):] = self._embed(prompt, ids)[0].to(dtype)
            start = pre.start_pos + len(pre.ids)
            pos[b, S - len(suf):] = torch.arange(start, start + len(suf), device=dev)
            row = _Row(r, next_pos=start + len(suf), prefix_tokens=len(pre.ids))
            p = r.params
            if p.temperature > 0:
                seed = p.seed if p.seed is not None else random.getrandbits(63)
                row.gen = torch.Generator(device=dev).manual_seed(seed)
            rows.append(row)
        if P:
            for i in range(len(K)):
                cache.update(K[i], V[i], i)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        self.metrics.step("prefill", B)
        for b, (fill, (pre, suf), r) in enumerate(zip(fills, parts, reqs)):
            if fill and r.prompt.hash not in self.cache:
                self._store_prefix(r.prompt, out.past_key_values, b, P, P + S - len(suf), pre.n_fixed)
        self._sample(rows, out.logits[:, -1])
        self._merge(rows, out.past_key_values, mask)

    def _store_prefix(self, lp: LoadedPrompt, kv, b: int, fixed_end: int, first: int, n_fixed: int) -> None:
        """Copy row ``b``'s prefix (its ``n_fixed`` ready-made slots ending at column ``fixed_end``, then
        the prefix tokens from column ``first``) out of a prefill's keys/values into the cache."""
        L = len(lp.prefix_ids)
        cols = list(range(fixed_end - n_fixed, fixed_end)) + list(range(first, first + L))
        idx = torch.tensor(cols, device=self.device)
        keys = [layer.keys[b].index_select(1, idx) for layer in kv.layers]
        values = [layer.values[b].index_select(1, idx) for layer in kv.layers]
        self.cache.put(lp.hash, PrefixKV(keys, values, list(lp.prefix_ids), n_fixed, n_fixed))

    def _merge(self, rows: list[_Row], kv, mask: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding the narrower side's keys/values."""
        from transformers import DynamicCache

        if not self.rows:
            self.rows, self._kv, self._mask = rows, kv, mask
            return
        self.joins += len(rows)
        Ta, Tn = self._mask.shape[1], mask.shape[1]
        T = max(Ta, Tn)

        def pad(t: torch.Tensor, width: int) -> torch.Tensor:
            if t.shape[-2 if t.dim() == 4 else -1] == width:
                return t
            if t.dim() == 2:
                return torch.nn.functional.pad(t, (width - t.shape[1], 0))
            return torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0))

        merged = DynamicCache()
        for i, (a, n) in enumerate(zip(self._kv.layers, kv.layers)):
            merged.update(torch.cat([pad(a.keys, T), pad(n.keys, T)]), torch.cat([pad(a.values, T), pad(n.values, T)]), i)
        self._mask = torch.cat([pad(self._mask, T), pad(mask, T)])
        self._kv = merged
        self.rows = self.rows + rows

    # -- decode ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _decode(self) -> None:
        dev = self.device
        B = len(self.rows)
        ids = torch.tensor([[r.last] for r in self.rows], device=dev)
        pos = torch.tensor([[r.next_pos] for r in self.rows], device=dev)
        self._mask = torch.cat([self._mask, torch.ones(B, 1, dtype=self._mask.dtype, device=dev)], 1)
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=pos, past_key_values=self._kv,
                         use_cache=True, logits_to_keep=1)
        self._kv = out.past_key_values
        for r in self.rows:
            r.next_pos += 1
        self.metrics.step("decode", B)
        self._sample(self.rows, out.logits[:, -1])

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        greedy = logits.argmax(-1).tolist()
        produced = 0
        for i, row in enumerate(rows):
            p = row.req.params
            tok = greedy[i] if p.temperature <= 0 else int(sample_next(logits[i:i + 1], p, row.gen)[0])
            row.last = tok
            produced += self._accept(row, tok)
        self.metrics.tokens(produced)

    def _accept(self, row: _Row, tok: int) -> int:
        """Record one sampled token; emit text; decide whether the row is finished."""
        p = row.req.params
        if tok in self.eos:
            self._send(row, self.tok.decode(row.out, skip_special_tokens=True))  # flush held-back text
            self._finish(row, "stop")
            return 0
        row.out.append(tok)
        text = self.tok.decode(row.out, skip_special_tokens=True)
        hit = [text.find(s) for s in p.stop if s and s in text]
        if hit:
            self._send(row, text[:min(hit)])
            self._finish(row, "stop")
            return 1
        safe = len(text) - _holdback(text, p.stop)
        if text.endswith("\ufffd"):
            safe = min(safe, len(text.rstrip("\ufffd")))
        self._send(row, text[:safe])
        if len(row.out) >= p.max_new_tokens or row.next_pos + 1 >= self.base.max_positions:
            self._send(row, text)
            self._finish(row, "length")
        return 1

    def _send(self, row: _Row, text: str) -> None:
        if len(text) > row.sent:
            row.req.emit(("delta", text[row.sent:]))
            row.sent = len(text)

    def _finish(self, row: _Row, reason: str) -> None:
        if row.finished is None:
            row.finished = reason
            usage = {"prompt_tokens": len(row.req.ids), "completion_tokens": len(row.out),
                     "total_tokens": len(row.req.ids) + len(row.out), "cached_tokens": row.prefix_tokens}
            row.req.emit(("done", reason, usage))

    def _retire(self) -> None:
        """Drop finished and cancelled rows and key/value columns no remaining row attends to."""
        from transformers import DynamicCache

        keep = [i for i, r in enumerate(self.rows) if r.finished is None]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._kv, self._mask = None, None
            return
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask[idx]
        cols = mask.any(0).nonzero().flatten()
        kv = DynamicCache()
        for i, layer in enumerate(self._kv.layers):
            kv.update(layer.keys[idx][:, :, cols], layer.values[idx][:, :, cols], i)
        self._kv, self._mask = kv, mask[:, cols]
