"""Soak: many concurrent clients against a running ``softprompt serve`` for a bounded time, with the
official ``openai`` client. Requests mix completions and chat, streamed and not, ``n`` of 1 to 3,
logprobs, greedy and seeded sampling, two tenants and prompts of every kind, plus a trickle of
hostile requests (seed out of range, unknown field, deep nesting). Checks:

- no 5xx, and no transport error, for any request;
- every greedy or seeded answer equals the same request's answer alone (sent first, one at a time);
- hostile requests get a 400 naming their field;
- 429s (a full queue or a tenant's full share) carry Retry-After; clients wait that long and go on;
- the server's resident memory stays bounded (sampled from /proc twice a second).

As a benchmark it starts its own server on SmolLM2 with 16 prompts and two tenants, and writes
bench/results/soak.{json,md}; tests/test_soak.py runs the same load on the tiny model.

    python bench/soak.py [--clients 64] [--seconds 60] [--max-tokens 16] [--precision fp32]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a gorgeous, witty film", "dull and far too long", "the actors shine", "I walked out after an hour",
         "a quiet masterpiece", "loud, empty spectacle", "funny from start to end", "nothing works here"]


@dataclass(frozen=True)
class Job:
    """One kind of request a client sends: where, as whom, and with what sampling."""

    key: str
    model: str
    text: str
    chat: bool
    stream: bool
    n: int = 1
    logprobs: bool = False
    seed: int | None = None  # None: greedy; else sampled at temperature 0.8 with this seed
    max_tokens: int = 16

    def body(self) -> dict:
        b: dict = {"model": self.model, "max_tokens": self.max_tokens, "n": self.n}
        b.update({"temperature": 0.8, "seed": self.seed} if self.seed is not None else {"temperature": 0})
        if self.chat:
            b["messages"] = [{"role": "user", "content": self.text}]
            if self.logprobs:
                b.update(logprobs=True, top_logprobs=2)
        else:
            b["prompt"] = self.text
            if self.logprobs:
                b["logprobs"] = 2
        return b


HOSTILE = [({"seed": 2**64, "temperature": 1}, "seed"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
           ({"temprature": 0}, "temprature"), ({"user": json.loads("[" * 40 + "]" * 40)}, "user")]


def make_jobs(models: dict[str, list[str]], max_tokens: int, count: int = 48, seed: int = 0) -> list[Job]:
    """``count`` distinct jobs over every (key, model) pair in ``models`` (key -> models it may use)."""
    rng = random.Random(seed)
    pairs = [(k, m) for k, ms in models.items() for m in ms]
    jobs: set[Job] = set()
    while len(jobs) < count:
        key, model = pairs[len(jobs) % len(pairs)]
        jobs.add(Job(key, model, rng.choice(TEXTS), chat=rng.random() < 0.5, stream=rng.random() < 0.5,
                     n=rng.choice([1, 1, 2, 3]), logprobs=rng.random() < 0.3,
                     seed=rng.randrange(1000) if rng.random() < 0.3 else None, max_tokens=max_tokens))
    return sorted(jobs, key=lambda j: (j.key, j.model, j.text, j.chat, j.stream, j.n, j.logprobs, j.seed or -1))


@dataclass
class Outcome:
    status: int
    texts: list[str] = field(default_factory=list)
    latency: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    retry_after: str | None = None
    error: str | None = None
    code: str | None = None  # the error's code (429s: queue_full, tenant_queue_full, queue_timeout)


async def send(client, job: Job) -> Outcome:
    """One request through the openai client; the texts of its choices in index order."""
    import openai

    body = job.body()
    create = client.chat.completions.create if job.chat else client.completions.create
    t0 = time.perf_counter()
    try:
        if not job.stream:
            r = await create(**body)
            texts = [c.message.content if job.chat else c.text for c in sorted(r.choices, key=lambda c: c.index)]
            return Outcome(200, texts, time.perf_counter() - t0, tokens=r.usage.completion_tokens)
        parts: dict[int, list[str]] = {i: [] for i in range(job.n)}
        ttft, tokens = None, 0
        stream = await create(**body, stream=True, stream_options={"include_usage": True})
        async for ev in stream:
            if ev.usage is not None:
                tokens = ev.usage.completion_tokens
            for c in ev.choices:
                piece = (c.delta.content if job.chat else c.text) or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                parts[c.index].append(piece)
        return Outcome(200, ["".join(parts[i]) for i in range(job.n)], time.perf_counter() - t0, ttft, tokens)
    except openai.APIStatusError as e:
        return Outcome(e.status_code, latency=time.perf_counter() - t0, retry_after=e.response.headers.get("retry-after"),
                       error=str(e)[:300], code=getattr(e, "code", None))
    except openai.APIError as e:  # transport: connection reset, broken stream
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        return Outcome(-1, latency=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}{cause}"[:300])


async def send_hostile(http, url: str, key: str, model: str, i: int) -> tuple[bool, int]:
    """A bad request; True when it got a 400 naming the bad field."""
    extra, param = HOSTILE[i % len(HOSTILE)]
    r = await http.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                        json={"model": model, "prompt": "x", "max_tokens": 4, **extra})
    try:
        return r.status_code == 400 and r.json()["error"]["param"] == param, r.status_code
    except (ValueError, KeyError, TypeError):
        return False, r.status_code


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class RSSSampler:
    """The resident memory of process ``pid``, sampled every ``every`` seconds in a thread."""

    def __init__(self, pid: int, every: float = 0.5):
        self.pid, self.every, self.samples = pid, every, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), rss_bytes(self.pid)))
            except OSError:
                return
            self._stop.wait(self.every)

    def __enter__(self) -> "RSSSampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(5)


def _q(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


async def _soak(url: str, jobs: list[Job], clients: int, seconds: float, hostile_every: int, seed: int) -> dict:
    import httpx
    import openai

    keys = sorted({j.key for j in jobs})
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    http = httpx.AsyncClient(timeout=600, limits=limits)
    api = {k: openai.AsyncOpenAI(base_url=url + "/v1", api_key=k, max_retries=0, timeout=600, http_client=http) for k in keys}
    # The answers alone: every job once, one at a time, before any load.
    alone: dict[Job, Outcome] = {}
    for j in jobs:
        alone[j] = await send(api[j.key], j)
        if alone[j].status != 200:
            raise RuntimeError(f"a request alone failed: {j} -> {alone[j].status} {alone[j].error}")
    results: list[tuple[Job, Outcome]] = []
    hostile: list[tuple[bool, int]] = []
    deadline = time.monotonic() + seconds

    async def client_loop(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        k = 0
        while time.monotonic() < deadline:
            k += 1
            if hostile_every and (c + k) % hostile_every == 0:
                j = rng.choice(jobs)
                hostile.append(await send_hostile(http, url, j.key, j.model, c + k))
                continue
            j = rng.choice(jobs)
            out = await send(api[j.key], j)
            results.append((j, out))
            if out.status == 429:
                await asyncio.sleep(float(out.retry_after or 1))

    t0 = time.monotonic()
    await asyncio.gather(*(client_loop(c) for c in range(clients)))
    wall = time.monotonic() - t0
    await http.aclose()
    ok = [(j, o) for j, o in results if o.status == 200]
    mismatches = [{"job": asdict(j), "alone": alone[j].texts, "under_load": o.texts} for j, o in ok if o.texts != alone[j].texts]
    statuses: dict[str, int] = {}
    for _, o in results:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    lat = [o.latency for _, o in ok]
    ttft = [o.ttft for _, o in ok if o.ttft is not None]
    return {
        "_load_t0": t0, "clients": clients, "seconds": round(wall, 1), "distinct_jobs": len(jobs), "requests": len(results),
        "statuses": statuses, "server_errors": sum(n for s, n in statuses.items() if s.startswith("5")),
        "transport_errors": statuses.get("-1", 0),
        "errors": sorted({o.error for _, o in results if o.status not in (200, 429) and o.error})[:10],
        "rate_limit_codes": {c: sum(1 for _, o in results if o.status == 429 and str(o.code) == c)
                             for c in sorted({str(o.code) for _, o in results if o.status == 429})},
        "rate_limited_without_retry_after": sum(1 for _, o in results if o.status == 429 and not o.retry_after),
        "compared": len(ok), "mismatches": len(mismatches), "mismatch_examples": mismatches[:3],
        "hostile": len(hostile), "hostile_400_naming_field": sum(1 for h, _ in hostile if h),
        "hostile_statuses": sorted({s for _, s in hostile}),
        "by_kind": {
            "stream": sum(1 for j, _ in ok if j.stream), "chat": sum(1 for j, _ in ok if j.chat),
            "n>1": sum(1 for j, _ in ok if j.n > 1), "logprobs": sum(1 for j, _ in ok if j.logprobs),
            "seeded": sum(1 for j, _ in ok if j.seed is not None)},
        "output_tokens": sum(o.tokens for _, o in ok), "tokens_per_s": round(sum(o.tokens for _, o in ok) / wall, 1),
        "p50_latency_s": _q(lat, .5), "p99_latency_s": _q(lat, .99), "p50_ttft_s": _q(ttft, .5),
    }


def run_soak(url: str, jobs: list[Job], pid: int, clients: int = 64, seconds: float = 30, hostile_every: int = 25,
             seed: int = 0) -> dict:
    """The load, with the server's memory sampled throughout. ``rss`` reports MB at the start of the
    load (after the answers alone), its peak, at the end, and the growth over the load's second half."""
    with RSSSampler(pid) as rss:
        res = asyncio.run(_soak(url, jobs, clients, seconds, hostile_every, seed))
    t0 = res.pop("_load_t0")
    load = [b for t, b in rss.samples if t >= t0] or [b for _, b in rss.samples[-1:]]
    half = load[len(load) // 2:]
    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    res["rss_mb"] = {"before_load": mb(rss.samples[0][1]), "start": mb(load[0]), "peak": mb(max(load)), "end": mb(load[-1]),
                     "second_half_growth": mb(half[-1] - half[0]), "samples": len(load)}
    return res


# -- the benchmark: its own server on SmolLM2 -----------------------------------------------------------
def _make_prompts(model: str, root: Path, precision: str) -> dict[str, list[str]]:
    """16 prompts of every input-level and prefix kind on ``model``, vocab-initialized (a soak needs
    real shapes and kinds, not trained quality); two tenants."""
    import torch

    from softprompt.artifact import build_meta, save_artifact
    from softprompt.base_model import load_base
    from softprompt.encoding import PromptFormat
    from softprompt.prompts import PrefixTuning, PromptTuning, PTuning
    from softprompt.template import parse_template

    base = load_base(model, device="cpu")  # fp32: only the shapes and the embedding rows matter here
    emb = base.model.get_input_embeddings().weight.detach().float()
    g = torch.Generator().manual_seed(0)
    names: list[str] = []
    for i in range(16):
        rows = emb[torch.randint(0, emb.shape[0], (8,), generator=g)]
        template = ["[soft:8] {input}", "[soft:4] Review: {input} [soft:4] Sentiment:", "[soft:8] {input}", "{input}"][i % 4]
        if i % 4 in (0, 1):
            prompt = PromptTuning(8, emb.shape[1], init=rows)
        elif i % 4 == 2:
            prompt = PTuning.create(8, base, rows, {"encoder": "mlp"})
        else:
            prompt = PrefixTuning.create(8, base, rows)
        prompt.eval()
        fmt = PromptFormat(base.tokenizer, parse_template(template), chat=True)
        name = f"p{i:02d}"
        save_artifact(root / name, prompt, build_meta(prompt, template, base, format=fmt.describe()))
        names.append(name)
    return {"sk-soak-a": names[:12] + ["base"], "sk-soak-b": names[12:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--precision", default="fp32", help="fp32 (default): greedy answers are compared exactly")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "soak"))
    ap.add_argument("--render", action="store_true", help="rewrite the Markdown from the saved JSON (adding the "
                    "hardware description if the run predates it: same machine only)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from softprompt.hardware import hardware_report

    if args.render:
        res = json.loads(Path(args.out + ".json").read_text())
        if "hardware" not in res:
            res["hardware"] = hardware_report(measure=False)
            res["hardware_recorded"] = "when the results were rendered, on the machine (same boot) that ran them"
        Path(args.out + ".json").write_text(json.dumps(res, indent=2) + "\n")
        Path(args.out + ".md").write_text(markdown(res))
        return
    import yaml

    from softprompt.serve.auth import hash_key

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "prompts"
        models = _make_prompts(args.model, root, args.precision)
        keys = Path(tmp) / "keys.yaml"
        keys.write_text(yaml.safe_dump({"keys": [{"name": k[3:], "sha256": hash_key(k), "prompts": ms, "max_queued": 48}
                                                 for k, ms in models.items()]}))
        port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "softprompt", "serve", "--model", args.model, "--prompts", str(root),
                                 "--keys", str(keys), "--port", str(port), "--precision", args.precision,
                                 "--max-queue", "96", "--watch-interval", "0"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc)
            jobs = make_jobs(models, args.max_tokens)
            res = run_soak(url, jobs, proc.pid, clients=args.clients, seconds=args.seconds)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    res.update(model=args.model, precision=args.precision, max_tokens=args.max_tokens, cpu=platform.processor() or _cpu(),
               cores=os.cpu_count(), load_avg_start=os.getloadavg()[0], hardware=hardware_report(measure=False))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(res, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(res))
    print(markdown(res))
    if res["server_errors"] or res["transport_errors"] or res["mismatches"]:
        sys.exit(1)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def markdown(r: dict) -> str:
    from softprompt.hardware import hardware_line

    rss = r["rss_mb"]
    kinds = ", ".join(f"{k} {v}" for k, v in r["by_kind"].items())
    return "\n".join([
        f"# Soak: {r['clients']} clients for {r['seconds']} s on {r.get('model', '?')} ({r.get('precision', '?')})",
        "",
        f"CPU: {r.get('cpu', '?')}, {r.get('cores', '?')} cores; load average at the start {r.get('load_avg_start', 0):.2f}. "
        f"{r['distinct_jobs']} distinct requests, each first sent alone; then every client picks one at random, "
        f"again and again, and one request in 25 is hostile.",
        "",
        *([hardware_line(r["hardware"]) + (f" (recorded {r['hardware_recorded']})" if r.get("hardware_recorded") else ""), ""]
          if r.get("hardware") else []),
        "| figure | value |", "|---|---|",
        f"| requests under load | {r['requests']} |",
        f"| HTTP statuses | {', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items()))} |",
        f"| 5xx | {r['server_errors']} |",
        f"| transport errors | {r['transport_errors']} |",
        f"| 429s by code | {', '.join(f'{k}: {v}' for k, v in r.get('rate_limit_codes', {}).items()) or '-'} |",
        f"| 429 without Retry-After | {r['rate_limited_without_retry_after']} |",
        f"| answers compared with the same request alone | {r['compared']} |",
        f"| answers that differ | {r['mismatches']} |",
        f"| answered requests by kind | {kinds} |",
        f"| hostile requests / 400 naming the field | {r['hostile']} / {r['hostile_400_naming_field']} |",
        f"| output tokens/s | {r['tokens_per_s']} |",
        f"| p50 / p99 latency (s) | {_f(r['p50_latency_s'])} / {_f(r['p99_latency_s'])} |",
        f"| p50 time to first token, streamed (s) | {_f(r['p50_ttft_s'])} |",
        f"| server RSS: start / peak / end (MB) | {rss['start']} / {rss['peak']} / {rss['end']} |",
        f"| RSS growth over the load's second half (MB) | {rss['second_half_growth']} |",
        "",
    ])


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
