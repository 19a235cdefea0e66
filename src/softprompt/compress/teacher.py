"""The teacher: the frozen model reading the full context, run once per query and cached on disk.

The context's KV cache is computed once (the longest prefix shared by every query's token ids, which
with the default layouts is everything up to and including the context) and reused for each query:
the cache is cropped back to that prefix after every query instead of being recomputed. For each query
the teacher decodes a continuation (greedy by default) and keeps, at every step, its next-token
distribution at the distillation temperature: either the whole vocabulary (exact KL) or the top-k
log-probabilities plus the log-mass of the remainder (bounded memory). Everything is saved as
safetensors under a key that hashes all the inputs, so a later run with the same inputs, and every
training step, runs only the student.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import DynamicCache

from softprompt.atomic import atomic_save_tensors
from softprompt.base_model import BaseModel
from softprompt.hf_cache import cache_kw, cache_of
from softprompt.kv_prefix import after_prefix, extends, grow_in_place, kv_cache, layer_kv, rewind
from softprompt.precision import autocast


@dataclass
class TeacherDists:
    """Teacher next-token distributions for a run of tokens: ``full`` log-probs ``[n, vocab]``, or
    ``idx``/``logp`` ``[n, k]`` with ``rest`` ``[n]`` the log-probability of all other tokens."""

    full: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    logp: torch.Tensor | None = None
    rest: torch.Tensor | None = None

    def __len__(self) -> int:
        return (self.full if self.full is not None else self.idx).shape[0]

    def to(self, device) -> "TeacherDists":
        return TeacherDists(*(None if t is None else t.to(device) for t in (self.full, self.idx, self.logp, self.rest)))

    @staticmethod
    def cat(parts: list["TeacherDists"]) -> "TeacherDists":
        if parts[0].full is not None:
            return TeacherDists(full=torch.cat([p.full for p in parts]))
        return TeacherDists(idx=torch.cat([p.idx for p in parts]), logp=torch.cat([p.logp for p in parts]),
                            rest=torch.cat([p.rest for p in parts]))


def compress_dist(logits: torch.Tensor, temperature: float, topk: int) -> TeacherDists:
    """Log-probabilities at ``temperature`` of ``[n, vocab]`` logits, whole or top-k + remainder."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    if topk <= 0:
        return TeacherDists(full=logp)
    top, idx = logp.topk(min(topk, logp.shape[-1]), -1)
    rest_mask = torch.ones_like(logp, dtype=torch.bool).scatter(-1, idx, False)
    rest = torch.logsumexp(logp.masked_fill(~rest_mask, float("-inf")), -1)
    return TeacherDists(idx=idx.to(torch.int32), logp=top, rest=rest)


@dataclass
class TeacherEntry:
    """One query's teacher output: the continuation ids and the distribution at each of its tokens."""

    query: str
    ids: list[int]  # teacher token ids of the query (context included)
    cont: list[int]  # continuation (ends with an end-of-turn id when the teacher stopped)
    dists: TeacherDists | None  # at the qlen query-side targets, then at each continuation token
    qlen: int = 0  # targets after the context, before the continuation (query and template tokens)


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class Teacher:
    """The frozen teacher with the context's KV cache, counting its forward passes."""

    def __init__(self, base: BaseModel, bf16: bool = False):
        self.base, self.model, self.bf16 = base, base.model, bf16
        self.device = base.device
        self.forwards = 0  # model calls made by the teacher (tests count them)
        self._prefix: list[int] | None = None
        self._cache: DynamicCache | None = None

    def _forward(self, ids: list[int] | torch.Tensor, start: int, cache: DynamicCache | None):
        t = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(1, -1)
        pos = torch.arange(start, start + t.shape[1], device=self.device).unsqueeze(0)
        self.forwards += 1
        with autocast(self.device, self.bf16):
            return self.model(input_ids=t, position_ids=pos, **cache_kw(cache), use_cache=True)

    @torch.no_grad()
    def set_prefix(self, prefix: list[int]) -> None:
        """Compute the KV cache of ``prefix`` (the context) once."""
        if self._prefix == prefix:
            return
        self._cache = DynamicCache(config=self.model.config)
        self._forward(prefix, 0, self._cache)
        self._prefix = list(prefix)

    @torch.no_grad()
    def _run(self, ids: list[int], cont: list[int] | tuple = ()):
        """The forward over ``ids + cont`` with a cache holding them, reusing the context's cache when
        ``ids`` extends it (the cache is rewound to the context first); returns the output and the
        position its first logits are at."""
        p, full = self._prefix, list(ids) + list(cont)
        if p is not None and extends(ids, p):
            rewind(self._cache, len(p))
            return self._forward(full[len(p):], len(p), self._cache), len(p)
        return self._forward(full, 0, DynamicCache(config=self.model.config)), 0

    @torch.no_grad()
    def continue_(self, ids: list[int], max_new_tokens: int, temperature: float, topk: int,
                  sample_temperature: float = 0.0, generator: torch.Generator | None = None,
                  from_pos: int | None = None) -> tuple[list[int], TeacherDists]:
        """Decode a continuation of ``ids`` and keep the distribution at each of its tokens; with
        ``from_pos``, also the distributions predicting ``ids[from_pos:]`` (teacher forcing, first)."""
        eos = set(self.base.eos_ids())
        out, start = self._run(ids)
        cont, logits_rows = [], []
        if from_pos is not None and from_pos < len(ids):
            if from_pos <= start:
                raise ValueError(f"targets from position {from_pos} need logits before the reused prefix ({start})")
            logits_rows += list(out.logits[0, from_pos - 1 - start:len(ids) - 1 - start].float())
        pos = len(ids)
        for _ in range(max_new_tokens):
            logits = out.logits[0, -1].float()
            logits_rows.append(logits)
            if sample_temperature > 0:
                nxt = int(torch.multinomial(torch.softmax(logits / sample_temperature, -1), 1, generator=generator))
            else:
                nxt = int(logits.argmax())
            cont.append(nxt)
            if nxt in eos or len(cont) == max_new_tokens:
                break
            out = self._forward([nxt], pos, cache_of(out))
            pos += 1
        return cont, compress_dist(torch.stack(logits_rows), temperature, topk)

    @torch.no_grad()
    def continue_batch(self, rows: list[list[int]], max_new_tokens: int, temperature: float, topk: int,
                       from_pos: int | None = None) -> list[tuple[list[int], TeacherDists]]:
        """:meth:`continue_` (greedy) for many rows at once, each extending the context prefix: the
        context's keys/values are shared by every row (expanded, not copied), the rows' own tokens are
        right-padded and masked, and every row keeps its own positions; a row that ends waits masked
        while the others go on."""
        p = self._prefix
        if p is None or not all(extends(r, p) for r in rows):
            raise ValueError("continue_batch: every row must extend the context prefix (set_prefix first)")
        if from_pos is not None and from_pos <= len(p):
            raise ValueError(f"targets from position {from_pos} need logits before the reused prefix ({len(p)})")
        rewind(self._cache, len(p))
        keys, values = layer_kv(self._cache)
        n, P, dev = len(rows), len(p), self.device
        cache = kv_cache(list(zip(keys, values)), n, dev, keys[0].dtype, config=self.model.config)
        ids, mask, pos, lens = after_prefix(rows, P, dev)
        self.forwards += 1
        with autocast(dev, self.bf16):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kw(cache), use_cache=True)
        eos = set(self.base.eos_ids())
        logits_rows: list[list[torch.Tensor]] = [[] for _ in rows]
        if from_pos is not None:
            for i, r in enumerate(rows):
                logits_rows[i] += list(out.logits[i, from_pos - 1 - P:len(r) - 1 - P].float())
        last = out.logits[torch.arange(n), torch.tensor(lens, device=dev) - 1].float()
        conts: list[list[int]] = [[] for _ in rows]
        done = [False] * n
        grow_in_place(cache_of(out), max_new_tokens)  # decode steps append in place, no copy of the cache
        next_pos = torch.tensor([len(r) for r in rows], device=dev)
        for step in range(max_new_tokens):
            nxt = last.argmax(-1)
            for i in range(n):
                if not done[i]:
                    logits_rows[i].append(last[i])
                    conts[i].append(int(nxt[i]))
                    done[i] = int(nxt[i]) in eos or len(conts[i]) == max_new_tokens
            if all(done):
                break
            mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=dev)], 1)
            self.forwards += 1
            with autocast(dev, self.bf16):
                out = self.model(input_ids=nxt.view(n, 1), attention_mask=mask, position_ids=(next_pos + step).view(n, 1),
                                 **cache_kw(cache_of(out)), use_cache=True)
            last = out.logits[:, -1].float()
        return [(c, compress_dist(torch.stack(lr), temperature, topk)) for c, lr in zip(conts, logits_rows)]

    @torch.no_grad()
    def forced_logits(self, ids: list[int], cont: list[int]) -> torch.Tensor:
        """``[len(cont), vocab]`` teacher logits along ``cont`` (teacher forcing, context cache reused)."""
        out, start = self._run(ids, cont)
        first = len(ids) - start - 1
        return out.logits[0][first:first + len(cont)].float()

def save_entries(path: Path, entries: list[TeacherEntry], info: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    offsets = [0]
    for e in entries:
        offsets.append(offsets[-1] + len(e.cont))
    tensors["cont"] = torch.tensor([t for e in entries for t in e.cont], dtype=torch.long)
    tensors["offsets"] = torch.tensor(offsets, dtype=torch.long)
    tensors["qlens"] = torch.tensor([e.qlen for e in entries], dtype=torch.long)
    if entries and entries[0].dists is not None:
        d = TeacherDists.cat([e.dists for e in entries])
        if d.full is not None:
            tensors["full"] = d.full.to(torch.float16)
        else:
            tensors.update(idx=d.idx, logp=d.logp, rest=d.rest)
    meta = {"info": json.dumps(info), "queries": json.dumps([e.query for e in entries]),
            "ids": json.dumps([e.ids for e in entries])}
    atomic_save_tensors(path, tensors, meta)


def load_entries(path: Path) -> list[TeacherEntry] | None:
    """The cached entries, or None when the file is absent or unreadable."""
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None
    queries, ids = json.loads(meta["queries"]), json.loads(meta["ids"])
    off = t["offsets"].tolist()
    qlens = t["qlens"].tolist() if "qlens" in t else [0] * len(queries)
    out = []
    d_at = 0
    for i, q in enumerate(queries):
        a, b = d_at, d_at + qlens[i] + off[i + 1] - off[i]
        d_at = b
        if "full" in t:
            d = TeacherDists(full=t["full"][a:b].float())
        elif "idx" in t:
            d = TeacherDists(idx=t["idx"][a:b], logp=t["logp"][a:b], rest=t["rest"][a:b])
        else:
            d = None
        out.append(TeacherEntry(q, ids[i], t["cont"][off[i]:off[i + 1]].tolist(), d, qlens[i]))
    return out
