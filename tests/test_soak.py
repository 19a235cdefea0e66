"""The soak (bench/soak.py) on the tiny model: 64 concurrent openai clients for a bounded time against
`softprompt serve` in its own process, mixing completions and chat, streaming, n, logprobs, seeded
sampling, two tenants, every prompt kind and hostile requests. No 5xx, no transport error, every
answer equal to the same request alone, hostile requests refused with a 400 naming the field,
bounded memory."""
from __future__ import annotations

import contextlib
import http.client
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from serve_helpers import KEY_A, KEY_B, _free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the soak's load lives with the benchmarks
import soak  # noqa: E402

MODELS = {KEY_A: ["trained", "pt", "hybrid", "ptune", "prefix", "pt-plain", "base"], KEY_B: ["secret"]}


@contextlib.contextmanager
def serve_process(tiny_dir, prompts_dir, keys_file, *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`softprompt serve` on the tiny model in its own process, ready: (its URL, the process)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "softprompt", "serve", "--model", str(tiny_dir), "--prompts", str(prompts_dir),
                             "--keys", str(keys_file), "--port", str(port), "--watch-interval", "0", "--threads", "1", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        soak.wait_ready(url, proc, timeout=120)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(60)


def test_make_jobs_covers_every_prompt_and_every_kind_of_request():
    jobs = soak.make_jobs(MODELS, 8, count=48)
    assert len(set(jobs)) == 48 and {(j.key, j.model) for j in jobs} == {(k, m) for k, ms in MODELS.items() for m in ms}
    for flag in (lambda j: j.chat, lambda j: j.stream, lambda j: j.n > 1, lambda j: j.logprobs, lambda j: j.seed is not None):
        assert any(flag(j) for j in jobs) and not all(flag(j) for j in jobs)


def test_soak_64_clients(tiny_dir, prompts_dir, keys_file):
    with serve_process(tiny_dir, prompts_dir, keys_file, "--max-batch", "16", "--max-queue", "96") as (url, proc):
        res = soak.run_soak(url, soak.make_jobs(MODELS, 8), proc.pid, clients=64, seconds=20)
    print(soak.markdown(res))
    assert res["requests"] >= 64 and res["compared"] >= 64, res
    assert res["server_errors"] == 0 and res["transport_errors"] == 0, res["errors"]
    assert res["rate_limited_without_retry_after"] == 0
    assert res["mismatches"] == 0, res["mismatch_examples"]
    assert res["hostile"] > 0 and res["hostile_400_naming_field"] == res["hostile"], res["hostile_statuses"]
    assert all(res["by_kind"][k] > 0 for k in ("stream", "chat", "n>1", "logprobs", "seeded")), res["by_kind"]
    # Bounded memory: the batch's KV pools shrink back when idle, nothing accumulates per request.
    rss = res["rss_mb"]
    assert rss["peak"] - rss["start"] < 150 and rss["second_half_growth"] < 50, rss


def test_an_idle_connection_outlives_the_clients_pool_expiry(tiny_dir, prompts_dir, keys_file):
    """httpx (and so the openai client) reuses an idle connection for up to 5 s: the server must keep it
    open longer, or a request sent as the server closes it fails with a connection error."""
    with serve_process(tiny_dir, prompts_dir, keys_file) as (url, _):
        conn = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=30)
        first = None
        for _ in range(2):
            conn.request("GET", "/health")  # on the same connection: a closed one raises, it is not reopened
            r = conn.getresponse()
            assert r.status == 200 and b'"ok"' in r.read()
            first = first or conn.sock
            assert conn.sock is first
            time.sleep(6.5)  # past the clients' 5 s
        conn.close()
