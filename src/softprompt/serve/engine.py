"""The engine: continuous batching over one frozen model, in a background thread.

Every iteration runs one *packed* forward (:mod:`softprompt.serve.slots`): one new token for each
decoding row, plus prompt chunks of newly admitted rows, up to a token budget, side by side in one
sequence with no padding. A row is a request with any prompt, of any kind, or none ("base"). Each
row owns a slot of the key/value pools; it starts with its prompt's cached prefix
(:mod:`softprompt.serve.kv_cache`) copied in, carries explicit position ids, and attends only to its
own slot, so it computes exactly what it would compute alone.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from softprompt.base_model import BaseModel
from softprompt.errors import SoftPromptError
from softprompt.generate import SamplingParams, sample_next
from softprompt.hf_cache import cache_kw
from softprompt.kv_prefix import common_prefix_len, extends
from softprompt.prompts import SoftPrompt, as_prompt
from softprompt.serve.decode_step import DecodeStep, unsupported
from softprompt.serve.kv_cache import PrefixCache, PrefixKV, materialize
from softprompt.serve.metrics import Metrics
from softprompt.serve.registry import LoadedPrompt
from softprompt.serve.slots import Chunk, Plan, SlotKV, check_model

log = logging.getLogger(__name__)

EMPTY = PrefixKV([], [], [], 0, 0)
DECODE_CHOICES = ("eager", "compiled", "transformers")  # how pure decode steps run (Engine's ``decode``)
VERIFY_TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet woods."


class QueueFull(Exception):
    """The waiting queue is at its limit."""

    code = "queue_full"


class TenantQueueFull(QueueFull):
    """The tenant's own share of the waiting queue is at its limit."""

    code = "tenant_queue_full"


class QueueTimeout(Exception):
    """A row waited longer than its request's ``max_wait`` for a batch slot (the error event's code)."""

    code = "queue_timeout"


class Unsupported(SoftPromptError):
    """The engine cannot run this request's prompt (its message says why and what to do)."""


@dataclass
class Request:
    """One generation request. ``emit`` receives ``("delta", text)``, then ``("done", finish_reason,
    usage)`` or ``("error", message)`` (``("error", message, "queue_timeout")`` when it waited longer
    than ``max_wait`` seconds for a slot); it is called from the engine thread. With ``logprobs`` set,
    each generated token is first announced as ``("token", id, logprob, top)`` with the ``logprobs``
    most likely alternatives in ``top``."""

    id: str
    prompt: LoadedPrompt | None
    ids: list[int]
    params: SamplingParams
    emit: Callable[[tuple], None]
    created: float = field(default_factory=time.monotonic)
    logprobs: int | None = None  # also emit ("token", id, logprob, [(id, logprob)] * this many) per token
    tenant: str = ""  # rows of one tenant share its caps below
    max_queued: int | None = None  # the tenant's cap on waiting rows (None: only the engine's max_queue)
    max_running: int | None = None  # the tenant's cap on running rows (None: only the engine's max_batch)
    max_wait: float | None = None  # seconds it may wait for a batch slot (None: as long as it takes)
    error: str | None = None  # set when the engine answered this request with an error

    @property
    def soft_prompt(self) -> SoftPrompt:
        """The request's soft prompt: the null prompt for the bare base model ("base")."""
        return as_prompt(self.prompt.prompt if self.prompt is not None else None)


@dataclass
class _Row:
    req: Request
    slot: int = -1
    length: int = 0  # columns of the row's slot holding keys/values
    pending: torch.Tensor | None = None  # [n, hidden] prompt embeddings not yet run
    fill: bool = False  # copy the prompt's prefix into the cache once the prompt has run
    n_fixed: int = 0  # ready-made prefix-tuning slots at the start of the row's slot
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
    """Continuous batching: ``max_batch`` rows at most; ``max_batch_tokens`` new tokens per forward
    at most (a long prompt is prefilled in chunks, so running rows keep decoding meanwhile)."""

    def __init__(self, base: BaseModel, cache: PrefixCache, metrics: Metrics | None = None,
                 max_batch: int = 16, max_queue: int = 64, max_batch_tokens: int = 512, decode: str = "eager"):
        if max_batch_tokens < max_batch:
            raise SoftPromptError(f"max_batch_tokens ({max_batch_tokens}) must be at least max_batch ({max_batch})")
        self.base, self.model, self.tok = base, base.model, base.tokenizer
        self.cache, self.metrics = cache, metrics or Metrics()
        self.max_batch, self.max_queue, self.max_batch_tokens = max_batch, max_queue, max_batch_tokens
        self.device = base.device
        self.eos = set(base.eos_ids())
        self._waiting: deque[Request] = deque()
        self._cancelled: set[str] = set()
        self._calls: list[tuple[Callable[[], object], Future]] = []  # work on the model between steps
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.rows: list[_Row] = []  # sorted by slot; slots 0..len(rows)-1 are in use
        check_model(self.model)
        self.kv = SlotKV.for_model(self.model, max_batch)
        self.initial_capacity = self.kv.capacity
        self.decode_step = self._decode_step(decode)
        self.joins = 0  # rows admitted while other rows were running (continuous batching at work)
        self.cancelled_rows = 0  # running rows dropped because their client went away

    def _decode_step(self, decode: str) -> DecodeStep | None:
        """The written-out decode step (:mod:`softprompt.serve.decode_step`) for ``decode`` "eager" or
        "compiled", checked against the transformers forward; ``None`` for "transformers", or when the
        model has none ("eager" falls back to the transformers forward; "compiled" refuses)."""
        if decode not in DECODE_CHOICES:
            raise SoftPromptError(f"decode must be one of {', '.join(DECODE_CHOICES)}, not {decode!r}")
        if decode == "transformers":
            return None
        why = unsupported(self.model)
        if why is None:
            try:
                t = time.monotonic()
                step = DecodeStep(self.model, self.kv, compile=decode == "compiled")
                err = step.verify(ids=self.tok(VERIFY_TEXT)["input_ids"])
                log.info("decode steps: written out (%s), checked against transformers (relative logit difference "
                         "%.2g) in %.1f s", decode, err, time.monotonic() - t)
                return step
            except ValueError as e:
                why = str(e)
        if decode == "compiled":
            raise SoftPromptError(f"--compile: {why}; serve without it")
        log.info("decode steps run the transformers forward: %s", why)
        return None

    # -- client side (any thread) ------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        self.submit_all([req])

    def submit_all(self, reqs: list[Request]) -> None:
        """Queue all of ``reqs`` or none of them: :class:`QueueFull` when the queue would hold more
        than ``max_queue`` rows, :class:`TenantQueueFull` when their tenant would have more than its
        ``max_queued`` rows waiting."""
        with self._cond:
            if len(self._waiting) + len(reqs) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            for tenant, cap in {(r.tenant, r.max_queued) for r in reqs if r.max_queued is not None}:
                mine = sum(1 for w in self._waiting if w.tenant == tenant) + sum(1 for r in reqs if r.tenant == tenant)
                if mine > cap:
                    raise TenantQueueFull(f"this key may have at most {cap} rows waiting (a request of n choices is "
                                          f"n rows); retry later")
            self._waiting.extend(reqs)
            self.metrics.queue_length = len(self._waiting)
            self._cond.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn()`` in the engine's thread between two forwards (the model is the engine's: its
        packed forward switches the model's attention while it runs); the future holds the result or
        the exception, which is ``fn``'s alone: the batch goes on."""
        fut: Future = Future()
        with self._cond:
            if self._stop:
                fut.set_exception(SoftPromptError("the engine is stopped"))
                return fut
            self._calls.append((fn, fut))
            self._cond.notify()
        return fut

    def _run_calls(self, calls: list[tuple[Callable[[], object], Future]]) -> None:
        for fn, fut in calls:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - the caller's, delivered through its future
                fut.set_exception(e)

    def cancel(self, req_id: str) -> None:
        with self._cond:
            self._cancelled.add(req_id)
            self._cond.notify()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    def start(self) -> "Engine":
        """Run the loop in a background thread; a no-op while that thread runs (two loops over the same
        rows would race, and ASGI clients that run the app's lifespan call this a second time)."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._thread = threading.Thread(target=self.run, name="softprompt-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def forget(self, prompt_hash: str) -> None:
        """Drop a replaced or removed prompt's cached prefix (stale entries could never be hit, since
        keys are content hashes, but they would hold memory)."""
        self.cache.discard(prompt_hash)

    # -- the loop (engine thread) ------------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool] | None = None) -> None:
        """The loop, in the calling thread, until :meth:`stop` (or ``should_stop()`` turns true).

        Running it in the thread that loaded the model is fastest on CPU: torch's OpenMP workers
        belong to the thread that starts them, and a second pool of them on the same cores makes
        every parallel region wait longer (measured: a SmolLM2 decode step of 16 rows takes 78 ms
        from the main thread and 97 ms from a second thread, 2 cores)."""
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self.rows and not self._cancelled and not self._calls:
                    if should_stop is not None and should_stop():
                        self._stop = True
                        break
                    self._cond.wait(timeout=0.25 if should_stop is not None else None)
                if self._stop or (should_stop is not None and should_stop()):
                    for _, fut in self._calls:
                        fut.set_exception(SoftPromptError("the server is stopping"))
                    self._calls = []
                    break
                cancelled, self._cancelled = self._cancelled, set()
                calls, self._calls = self._calls, []
                if cancelled:
                    self._waiting = deque(r for r in self._waiting if r.id not in cancelled)
                expired = self._take_expired()
                new = self._take_admissible()
                self.metrics.queue_length = len(self._waiting)
            self._run_calls(calls)
            for req in expired:
                self.metrics.queue_timeouts += 1
                req.error = f"waited {req.max_wait:g} s for a batch slot; the server is busy, retry later"
                req.emit(("error", req.error, QueueTimeout.code))
            for row in self.rows:
                if row.req.id in cancelled and row.finished is None:
                    row.finished = "cancelled"
                    self.cancelled_rows += 1
            try:
                self._retire()
                if new:
                    self._admit(new)
                if self.rows:
                    self._step()
                    self._retire()
                if not self.rows:
                    self.kv.shrink(self.initial_capacity)  # one long request must not pin its memory
            except Exception as e:  # noqa: BLE001 - never let one bad step kill the server
                log.exception("engine step failed")
                running = [row.req for row in self.rows if row.finished is None]
                for req in running + [r for r in new if r.error is None and all(r is not x for x in running)]:
                    self._fail(req, f"internal error during generation: {type(e).__name__}: {e}")
                self.rows = []
            self.metrics.batch_size = len(self.rows)

    def _fail(self, req: Request, message: str) -> None:
        req.error = message
        req.emit(("error", message))

    # -- admission ---------------------------------------------------------------------------------
    def _take_expired(self) -> list[Request]:
        """Take the waiting requests that have waited longer than their ``max_wait``."""
        now = time.monotonic()
        late = [r for r in self._waiting if r.max_wait is not None and now - r.created > r.max_wait]
        if late:
            self._waiting = deque(r for r in self._waiting if all(r is not x for x in late))
        return late

    def _take_admissible(self) -> list[Request]:
        """Take waiting requests for the free slots, in order, passing over those whose tenant already
        runs its ``max_running`` rows (they keep their place), so one tenant cannot hold every slot."""
        free = self.max_batch - len(self.rows)
        if free <= 0 or not self._waiting:
            return []
        running = Counter(row.req.tenant for row in self.rows)
        new: list[Request] = []
        keep: deque[Request] = deque()
        for r in self._waiting:
            if len(new) < free and (r.max_running is None or running[r.tenant] < r.max_running):
                new.append(r)
                running[r.tenant] += 1
            else:
                keep.append(r)
        self._waiting = keep
        return new

    def _prefix(self, req: Request) -> tuple[PrefixKV, bool]:
        """The cached prefix to start ``req`` from (cut to what its ids share with it), and whether
        this row should fill the cache: on a miss the row runs its whole prompt, and its prefix's
        keys/values are copied out of its slot afterwards (no extra forward)."""
        lp = req.prompt
        if lp is None:
            return EMPTY, False
        if self.cache.enabled:
            pre = self.cache.get(lp.hash)
            if pre is not None:
                return pre.truncated(min(common_prefix_len([pre.ids, req.ids]), len(req.ids) - 1)), False
        # Only a prefix-tuning prompt's own keys/values come ready-made; the tokens run in the prefill.
        fill = self.cache.enabled and extends(req.ids, lp.prefix_ids)
        return materialize(self.model, lp.prompt, []), fill

    @torch.no_grad()
    def _admit(self, reqs: list[Request]) -> None:
        """Give each request a slot holding its cached prefix, and queue the rest of its prompt. Each
        request is admitted on its own: one that fails here (a seed out of range, ids the embedding
        cannot take, anything) is answered with an error alone and the others are admitted."""
        if self.rows:
            self.joins += len(reqs)
        for r in reqs:
            try:
                row = self._admit_one(r)
            except Exception as e:  # noqa: BLE001 - one request's failure is its own
                log.warning("request %s refused at admission: %s: %s", r.id, type(e).__name__, e)
                self._fail(r, f"request refused: {type(e).__name__}: {e}")
                continue
            self.rows.append(row)

    def _admit_one(self, r: Request) -> _Row:
        gen = None
        p = r.params
        if p.temperature > 0:
            seed = p.seed if p.seed is not None else random.getrandbits(63)
            gen = torch.Generator(device=self.device).manual_seed(seed)
        pre, fill = self._prefix(r)
        suf = r.ids[len(pre.ids):]
        embeds = r.soft_prompt.embed(self.model.get_input_embeddings(), torch.tensor([suf], device=self.device))[0]
        start = pre.start_pos + len(pre.ids)
        row = _Row(r, slot=len(self.rows), length=pre.n_slots, pending=embeds.to(self.kv.dtype), fill=fill,
                   n_fixed=pre.n_fixed, next_pos=start, prefix_tokens=len(pre.ids), gen=gen)
        self.kv.write(row.slot, pre.keys, pre.values)  # last: nothing of a refused request reaches the pools
        return row

    # -- one packed forward ------------------------------------------------------------------------
    @torch.no_grad()
    def _step(self) -> None:
        """One forward: a token for every decoding row, then prompt chunks within the token budget."""
        decoding = [r for r in self.rows if r.pending is None]
        budget = self.max_batch_tokens - len(decoding)
        chunks: list[tuple[_Row, int]] = []
        for r in self.rows:
            if r.pending is not None and budget > 0:
                n = min(len(r.pending), budget)
                chunks.append((r, n))
                budget -= n
        plan = Plan([r.slot for r in decoding], [r.length for r in decoding],
                    [Chunk(r.slot, r.length, n) for r, n in chunks], self.device)
        self.kv.reserve(max([r.length + 1 for r in decoding] + [r.length + n for r, n in chunks]))
        parts, pos = [], []
        if decoding:
            ids = torch.tensor([r.last for r in decoding], device=self.device)
            parts.append(self.model.get_input_embeddings()(ids).to(self.kv.dtype))
            pos += [r.next_pos for r in decoding]
        for r, n in chunks:
            parts.append(r.pending[:n])
            pos += range(r.next_pos, r.next_pos + n)
        embeds = torch.cat(parts).unsqueeze(0)
        position_ids = torch.tensor([pos], device=self.device)
        # The rows that sample this step: decoding rows, and rows whose last prompt chunk runs now.
        sampling = list(decoding)
        keep = list(range(len(decoding)))
        off = len(decoding)
        for r, n in chunks:
            off += n
            if n == len(r.pending):
                sampling.append(r)
                keep.append(off - 1)
        if not chunks and self.decode_step is not None:  # slots 0..n-1: every running row decodes
            logits = self.decode_step(embeds[0], position_ids[0], torch.tensor(plan.decode_cols, device=self.device))
        else:
            with self.kv.packed(self.model, plan):
                logits = self.model(inputs_embeds=embeds, position_ids=position_ids, **cache_kw(self.kv),
                                    use_cache=True, slot_kv=self.kv,
                                    logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device)).logits[0]
        for r in decoding:
            r.length += 1
            r.next_pos += 1
        for r, n in chunks:
            r.length += n
            r.next_pos += n
            r.pending = r.pending[n:] if n < len(r.pending) else None
            if r.pending is None and r.fill and r.req.prompt.hash not in self.cache:
                self._store_prefix(r)
        phase = "decode" if not chunks else "prefill" if not decoding else "mixed"
        self.metrics.step(phase, len(decoding) + len(chunks))
        if sampling:
            self._sample(sampling, logits)

    def _store_prefix(self, row: _Row) -> None:
        """Copy the row's prompt prefix (its ready-made slots, then the prefix tokens) into the cache."""
        lp = row.req.prompt
        n = row.n_fixed + len(lp.prefix_ids)
        keys, values = self.kv.read(row.slot, range(n))
        self.cache.put(lp.hash, PrefixKV(keys, values, list(lp.prefix_ids), row.n_fixed, row.n_fixed))

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        greedy = logits.argmax(-1).tolist()
        produced = 0
        for i, row in enumerate(rows):
            p = row.req.params
            tok = greedy[i] if p.temperature <= 0 else int(sample_next(logits[i:i + 1], p, row.gen)[0])
            row.last = tok
            if row.req.logprobs is not None and tok not in self.eos:
                lp = torch.log_softmax(logits[i].float(), -1)
                top = lp.topk(row.req.logprobs) if row.req.logprobs else None
                row.req.emit(("token", tok, float(lp[tok]),
                              list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []))
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
        """Drop finished and cancelled rows, moving the last rows into the freed slots so the slots
        in use stay ``0..len(rows)-1``."""
        if all(r.finished is None for r in self.rows):
            return
        alive = [r for r in self.rows if r.finished is None]
        holes = sorted(r.slot for r in self.rows if r.finished is not None)
        n = len(alive)
        movers = [r for r in alive if r.slot >= n]
        for r, dst in zip(sorted(movers, key=lambda r: r.slot), [h for h in holes if h < n]):
            self.kv.move(r.slot, dst, r.length)
            r.slot = dst
        self.rows = sorted(alive, key=lambda r: r.slot)
