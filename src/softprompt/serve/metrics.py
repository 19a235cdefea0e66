"""Server metrics in the Prometheus text exposition format (version 0.0.4)."""
from __future__ import annotations

import threading
import time
from collections import deque


def label(value: str) -> str:
    """A label value escaped for the text format: backslash, double quote and line feed."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters and gauges the engine and the API update; :meth:`render` writes the text format."""

    def __init__(self, window_s: float = 10.0):
        self._lock = threading.Lock()
        self.window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) for tokens/s
        self.requests: dict[tuple[str, str], int] = {}  # (endpoint, status) -> count
        self.tokens_out = 0
        self.tokens_in = 0
        self.forwards = {"prefill": 0, "decode": 0, "mixed": 0}  # mixed: decode rows and prompt chunks together
        self.batch_size = 0
        self.queue_length = 0
        self.queue_timeouts = 0  # rows that waited longer than their request's max_wait (answered 429)
        self.batch_rows_total = 0
        self.extra: list = []  # callables returning more exposition lines (an engine's own metrics)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def step(self, kind: str, rows: int) -> None:
        with self._lock:
            self.forwards[kind] += 1
            self.batch_rows_total += rows

    def tokens(self, new_tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.tokens_out += new_tokens
            self._recent.append((now, new_tokens))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window_s

    def render(self, cache, registry) -> str:
        tps = self.tokens_per_second()
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

        with self._lock:
            reqs = sorted(self.requests.items())
            metric("softprompt_requests_total", "counter", "HTTP requests by endpoint and status",
                   [(f'{{endpoint="{label(e)}",status="{label(s)}"}}', n) for (e, s), n in reqs])
            metric("softprompt_queue_length", "gauge", "requests waiting for a batch slot", [("", self.queue_length)])
            metric("softprompt_queue_timeouts_total", "counter", "rows that waited too long for a batch slot (429)",
                   [("", self.queue_timeouts)])
            metric("softprompt_batch_size", "gauge", "rows in the running batch", [("", self.batch_size)])
            metric("softprompt_forward_total", "counter", "model forwards by phase",
                   [(f'{{phase="{k}"}}', v) for k, v in self.forwards.items()])
            metric("softprompt_batch_rows_total", "counter", "rows summed over all forwards (mean batch size = this / forwards)",
                   [("", self.batch_rows_total)])
            metric("softprompt_generated_tokens_total", "counter", "output tokens generated", [("", self.tokens_out)])
            metric("softprompt_prompt_tokens_total", "counter", "prompt tokens received", [("", self.tokens_in)])
        metric("softprompt_tokens_per_second", "gauge", f"output tokens/s over the last {self.window_s:g} s", [("", float(tps))])
        metric("softprompt_prefix_cache_hits_total", "counter", "KV-prefix cache hits", [("", cache.hits)])
        metric("softprompt_prefix_cache_misses_total", "counter", "KV-prefix cache misses", [("", cache.misses)])
        metric("softprompt_prefix_cache_entries", "gauge", "KV-prefix cache entries", [("", len(cache))])
        metric("softprompt_prefix_cache_bytes", "gauge", "KV-prefix cache size in bytes", [("", cache.nbytes)])
        metric("softprompt_prompts", "gauge", "prompts in the registry", [("", len(registry.names()))])
        metric("softprompt_prompts_loaded_bytes", "gauge", "bytes of prompt tensors in memory", [("", registry.nbytes)])
        metric("softprompt_prompt_evictions_total", "counter", "prompts evicted from memory (LRU)", [("", registry.evictions)])
        for more in self.extra:
            lines += more()
        return "\n".join(lines) + "\n"
