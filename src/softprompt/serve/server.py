"""Everything one ``softprompt serve`` process holds: the base model, the prompt registry, tenants,
limits, metrics, the KV-prefix cache and the engine."""
from __future__ import annotations

import time

from softprompt.base_model import BaseModel
from softprompt.serve.auth import Auth
from softprompt.serve.engine import Engine
from softprompt.serve.kv_cache import PrefixCache
from softprompt.serve.metrics import Metrics
from softprompt.serve.registry import Registry
from softprompt.serve.schemas import Limits


class Server:
    """Everything one ``softprompt serve`` process holds."""

    def __init__(self, base: BaseModel, registry: Registry, auth: Auth, limits: Limits | None = None,
                 max_batch: int = 16, max_queue: int = 64, prefix_cache: bool = True, cache_bytes: int = 512 << 20,
                 watch_interval: float | None = 1.0, max_batch_tokens: int = 512, engine=None, contexts=None,
                 decode: str = "eager"):
        self.base, self.registry, self.auth, self.limits = base, registry, auth, limits or Limits()
        self.metrics = Metrics()
        self.cache = PrefixCache(cache_bytes, enabled=prefix_cache)
        # ``engine``: a factory ``(metrics) -> engine`` for another engine (``--engine vllm``); default: ours
        self.engine = (engine(self.metrics) if engine is not None else
                       Engine(base, self.cache, self.metrics, max_batch=max_batch, max_queue=max_queue,
                              max_batch_tokens=max_batch_tokens, decode=decode))
        registry.on_change = lambda name, old_hash: self.engine.forget(old_hash)
        # ``contexts``: a softprompt.serve.from_context.ContextPrompts (``--compressor``), or None
        self.contexts = contexts
        if contexts is not None:
            if not hasattr(self.engine, "call"):
                from softprompt.errors import SoftPromptError

                raise SoftPromptError("--compressor needs the native engine (the compressor runs the whole model here)")
            contexts.on_evict = self.engine.forget
            self.metrics.extra.append(contexts.metrics_lines)
        self.watch_interval = watch_interval
        self.started = time.time()
        self.engine_thread = True  # False: the caller runs ``engine.run()`` itself (the CLI, in its main thread)

    def start(self) -> None:
        self.registry.scan()
        if self.engine_thread:
            self.engine.start()
        if self.watch_interval:
            self.registry.watch(self.watch_interval)

    def stop(self) -> None:
        self.registry.close()
        self.engine.stop()
