"""Contexts on the server (``softprompt serve --compressor DIR``): the amortized compressor turns a
context into a prompt in one forward, either for one request (``context`` in a completion or chat
body: the prompt is built in memory, cached by the context's content hash in a bounded LRU) or for
good (``PUT /admin/contexts/{name}``: the registry installs it like an uploaded artifact: atomic,
validated against the base model, listed and served by name). See docs/serving.md and
docs/compressor.md.

The compressor's forward runs in the engine's thread between two batched forwards (the engine's
packed forward switches the model's attention while it runs), so a context costs the running rows
one pause of that forward's length and no request ever sees another's half-computed state.
"""
from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from safetensors.torch import save as safetensors_bytes

from softprompt.artifact import PromptArtifact
from softprompt.base_model import BaseModel, check_fingerprint
from softprompt.compress.amortized.store import AmortizedCompressor
from softprompt.errors import SoftPromptError
from softprompt.prompts import SoftPrompt
from softprompt.serve.registry import LoadedPrompt, PromptEntry, Registry, prepare_artifact
from softprompt.template import parse_template


class ContextError(SoftPromptError):
    """A context the compressor cannot take (empty, too long, shorter than its memory)."""


def context_key(text: str) -> str:
    """The cache key of a context: sha256 of its text (stripped, as the compressor reads it)."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


class ContextPrompts:
    """The server's compressor, its LRU of compressed contexts and their counters."""

    def __init__(self, compressor: AmortizedCompressor, base: BaseModel, cache_size: int = 64, max_tokens: int = 4096,
                 on_evict: Callable[[str], None] | None = None):
        check_fingerprint(compressor.base.fingerprint, base.fingerprint, what=f"compressor {compressor.path}")
        if cache_size < 0 or max_tokens < 1:
            raise SoftPromptError("the context cache size must be >= 0 and the context token limit >= 1")
        self.compressor, self.base = compressor, base
        self.name = Path(compressor.path).name if compressor.path else "compressor"
        self.cache_size, self.max_tokens, self.on_evict = cache_size, max_tokens, on_evict
        self._lru: OrderedDict[str, LoadedPrompt] = OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = self.compressions = self.errors = self.evictions = 0
        self.compress_seconds = 0.0

    @classmethod
    def load(cls, path: str | Path, base: BaseModel, precision: str = "auto", **kw) -> "ContextPrompts":
        """Load the compressor at ``path`` on the server's ``base`` (refused, one line, on another base)."""
        return cls(AmortizedCompressor.load(path, base=base, precision=precision), base, **kw)

    # -- checks (any thread) -----------------------------------------------------------------------
    def check(self, text, field: str = "context") -> int:
        """The context's length in tokens; :class:`ContextError` naming ``field`` when it cannot be compressed."""
        if not isinstance(text, str) or not text.strip():
            raise ContextError(f"'{field}' is empty: send the text to compress")
        n = len(self.base.tokenizer(text.strip(), add_special_tokens=False).input_ids)
        if n > self.max_tokens:
            raise ContextError(f"'{field}' is {n} tokens; this server compresses contexts of at most {self.max_tokens} tokens")
        if self.compressor.form == "kv" and n < self.compressor.memory:
            raise ContextError(f"'{field}' is {n} tokens, fewer than the compressor's {self.compressor.memory} memory tokens: "
                               "nothing to compress (send it as text instead)")
        return n

    # -- the forward (the engine's thread) ---------------------------------------------------------
    def build(self, text: str) -> tuple[SoftPrompt, dict]:
        """The context's prompt and its prompt.json, from one forward of the compressor."""
        t0 = time.perf_counter()
        try:
            job = self.compressor.job(text)
            prompt = self.compressor.prompt(text, job)
        except SoftPromptError as e:
            raise ContextError(str(e)) from None
        seconds = time.perf_counter() - t0
        with self._lock:
            self.compressions += 1
            self.compress_seconds += seconds
        return prompt, self.compressor.prompt_meta(job, prompt, forward_s=seconds)

    def loaded(self, text: str) -> LoadedPrompt:
        """The context's prompt made servable in memory (never written to disk)."""
        prompt, meta = self.build(text)
        art = PromptArtifact(prompt, parse_template(meta["template"]), meta, None, prompt.export_tensors())
        return prepare_artifact(f"context-{context_key(text)[:16]}", art, self.base)

    # -- the cache (the event loop) ----------------------------------------------------------------
    def cached(self, key: str) -> LoadedPrompt | None:
        with self._lock:
            lp = self._lru.get(key)
            if lp is not None:
                self._lru.move_to_end(key)
            return lp

    def _put(self, key: str, lp: LoadedPrompt) -> None:
        if not self.cache_size:
            return
        dropped = []
        with self._lock:
            self._lru[key] = lp
            self._lru.move_to_end(key)
            while len(self._lru) > self.cache_size:
                dropped.append(self._lru.popitem(last=False)[1])
                self.evictions += 1
        for old in dropped:
            if self.on_evict and all(x.hash != old.hash for x in self._lru.values()):
                self.on_evict(old.hash)

    async def prompt_for(self, text: str, run: Callable[[Callable[[], object]], object]) -> tuple[LoadedPrompt, bool]:
        """The request's prompt for ``text`` and whether it came from the cache; ``run(fn)`` runs ``fn`` in
        the engine's thread and returns a concurrent future (``Engine.call``). Requests for a context being
        compressed wait for that one forward."""
        key = context_key(text)
        lp = self.cached(key)
        if lp is not None:
            with self._lock:
                self.hits += 1
            return lp, True
        pending = self._inflight.get(key)
        if pending is not None:
            lp = await asyncio.shield(pending)
            with self._lock:
                self.hits += 1
            return lp, True
        with self._lock:
            self.misses += 1
        fut = asyncio.wrap_future(run(lambda: self.loaded(text)))
        self._inflight[key] = fut
        try:
            lp = await asyncio.shield(fut)
        except BaseException:
            with self._lock:
                self.errors += 1
            raise
        finally:
            self._inflight.pop(key, None)
        self._put(key, lp)
        return lp, False

    def __len__(self) -> int:
        return len(self._lru)

    def metrics_lines(self) -> list[str]:
        """Prometheus lines (Metrics.extra)."""
        out = []
        for name, kind, help_, value in [
            ("softprompt_context_cache_hits_total", "counter", "requests whose context was already compressed (LRU by content hash)", self.hits),
            ("softprompt_context_cache_misses_total", "counter", "requests whose context had to be compressed", self.misses),
            ("softprompt_context_cache_entries", "gauge", "compressed contexts held", len(self._lru)),
            ("softprompt_context_cache_evictions_total", "counter", "compressed contexts dropped from the LRU", self.evictions),
            ("softprompt_context_compressions_total", "counter", "compressor forwards (requests and the admin endpoint)", self.compressions),
            ("softprompt_context_compress_seconds_total", "counter", "seconds spent in compressor forwards", float(self.compress_seconds)),
            ("softprompt_context_errors_total", "counter", "contexts the compressor refused or failed on", self.errors),
        ]:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}",
                    f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"]
        return out


def install_prompt(registry: Registry, name: str, prompt: SoftPrompt, meta: dict) -> PromptEntry:
    """Install a built prompt in ``registry`` as ``name`` (its own atomic, validated install)."""
    data = safetensors_bytes(prompt.export_tensors(), {"kind": prompt.kind, "format": "softprompt"})
    return registry.install(name, meta, data)


def register_context(registry: Registry, compressor: AmortizedCompressor, name: str, context: str) -> PromptEntry:
    """Compress ``context`` and install the result in ``registry`` as prompt ``name`` (in the calling
    thread: on a running server use ``PUT /admin/contexts/{name}``, which runs it in the engine's)."""
    check_fingerprint(compressor.base.fingerprint, registry.base.fingerprint, what=f"compressor {compressor.path}")
    job = compressor.job(context)
    prompt = compressor.prompt(context, job)
    return install_prompt(registry, name, prompt, compressor.prompt_meta(job, prompt))
