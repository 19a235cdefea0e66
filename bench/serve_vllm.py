"""Our API on vLLM against vLLM called directly and against our own engine: the same 16 prompts
(prompt tuning, 8 virtual tokens, chat format, on SmolLM2 in fp32), the same 16 greedy requests of 32
tokens sent at once, streamed. Reports output tokens/s, p50/p99 latency, p50 time to first token and
vLLM's prefix-cache hit rate (from its /metrics), into bench/results/serve_vllm.{json,md}.

Partial: the naive and batched HF generate baselines the issue lists are not in this script yet
(bench/serve_throughput.py has naive HF generate against our engine).

    bash scripts/vllm_venv.sh && python bench/serve_vllm.py   # starts and stops its own vLLM server
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N, MAX_TOKENS = 16, 32
INPUTS = [f"review {i}: {t}" for i, t in enumerate(["a gorgeous, witty film", "dull and far too long", "the actors shine",
                                                     "I walked out", "a quiet masterpiece", "loud, empty spectacle",
                                                     "funny from start to end", "nothing works here"] * 2)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_requests(send) -> dict:
    """Send the N requests at once; ``send(i)`` streams one and returns (ttft, latency, tokens)."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(N) as ex:
        res = list(ex.map(send, range(N)))
    wall = time.perf_counter() - t0
    lat = sorted(r[1] for r in res)
    ttft = sorted(r[0] for r in res)
    toks = sum(r[2] for r in res)
    q = lambda xs, p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]  # noqa: E731
    return {"tokens": toks, "wall_s": round(wall, 3), "tokens_per_s": round(toks / wall, 2), "p50_latency_s": round(q(lat, .5), 3),
            "p99_latency_s": round(q(lat, .99), 3), "p50_ttft_s": round(q(ttft, .5), 3)}


def stream(url: str, body: dict) -> tuple[float, float, int]:
    import httpx

    t0 = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}}, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("choices") and ev["choices"][0].get("text") and first is None:
                first = time.perf_counter() - t0
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - t0, tokens


def counters(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(url + "/metrics").text
    get = lambda n: sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(n)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))  # noqa: E731
    return get("vllm:prefix_cache_hits_total"), get("vllm:prefix_cache_queries_total")


def main() -> int:
    import torch
    import uvicorn

    from softprompt.artifact import build_meta, save_artifact
    from softprompt.base_model import load_base
    from softprompt.encoding import PromptFormat
    from softprompt.generate import SamplingParams
    from softprompt.hardware import hardware_line, hardware_report
    from softprompt.prompts import PromptTuning
    from softprompt.serve.app import build_vllm_server, create_app
    from softprompt.serve.auth import Auth
    from softprompt.serve.engine import Request
    from softprompt.serve.registry import Registry
    from softprompt.serve.server import Server
    from softprompt.serve.vllm_process import start_vllm, stop_vllm, wait_ready
    from softprompt.template import parse_template

    base = load_base("smollm2", device="cpu")
    prompts = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    g = torch.Generator().manual_seed(0)
    emb = base.embedding.weight.detach()
    tmpl = "[soft:8] {input}"
    for i in range(N):
        p = PromptTuning(8, emb.shape[1], init=emb[torch.randint(100, 5000, (8,), generator=g)])
        save_artifact(prompts / f"p{i}", p, build_meta(p, tmpl, base, format=PromptFormat(base.tokenizer, parse_template(tmpl)).describe()))
    # Each system gets its own inputs (the same texts after a per-run tag), so no run finds the previous
    # run's exact prompts in vLLM's prefix cache; what the runs share is each prompt's header and soft rows.
    text = lambda run, i: f"[{run}] {INPUTS[i]}"  # noqa: E731
    body = lambda i, run="gw": {"model": f"p{i}", "prompt": text(run, i), "max_tokens": MAX_TOKENS, "temperature": 0}  # noqa: E731

    def live(server):
        port = free_port()
        uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=uv.run, daemon=True).start()
        while not uv.started:
            time.sleep(0.05)
        return uv, f"http://127.0.0.1:{port}"

    results = {}
    server = Server(base, Registry(base, prompts), Auth(), max_batch=16, watch_interval=None)
    uv, url = live(server)
    stream(url + "/v1/completions", body(0))  # warm-up
    results["our engine (our API)"] = run_requests(lambda i: stream(url + "/v1/completions", body(i, "native")))
    uv.should_exit = True
    time.sleep(1)

    vport = free_port()
    vlog = prompts / "vllm.log"
    proc = start_vllm(vport, vlog, MAX_MODEL_LEN="1024", EAGER="1", BLOCK_SIZE="32")
    vurl = f"http://127.0.0.1:{vport}"
    try:
        wait_ready(proc, vurl, vlog)
        gw = build_vllm_server("smollm2", prompts, [vurl], watch_interval=None)
        uv, gurl = live(gw)
        stream(gurl + "/v1/completions", body(0, "warm-up"))  # warm-up (fills vLLM's cache for p0's header only)
        h0, q0 = counters(vurl)
        results["our API on vLLM-CPU"] = run_requests(lambda i: stream(gurl + "/v1/completions", body(i)))
        h1, q1 = counters(vurl)
        results["our API on vLLM-CPU"]["vllm_prefix_cache_hit_rate"] = round((h1 - h0) / max(q1 - q0, 1), 3)
        eng = gw.engine
        direct = []
        for i in range(N):  # the exact bodies the gateway sends, built before the clock starts
            lp = gw.registry.get(f"p{i}")
            req = Request("b", lp, lp.fmt.prompt_ids(lp.example(text("direct", i))), SamplingParams(MAX_TOKENS, 0.0), lambda ev: None)
            b = eng.body(req, eng.upstreams[0].model)
            b.pop("stream_options")
            direct.append(b)
        h0, q0 = counters(vurl)
        results["vLLM-CPU direct (prompt embeds)"] = run_requests(lambda i: stream(vurl + "/v1/completions", direct[i]))
        h1, q1 = counters(vurl)
        results["vLLM-CPU direct (prompt embeds)"]["vllm_prefix_cache_hit_rate"] = round((h1 - h0) / max(q1 - q0, 1), 3)
        uv.should_exit = True
    finally:
        stop_vllm(proc)
    hw = hardware_line(hardware_report(measure=False))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_vllm.json").write_text(json.dumps({"hardware": hw, "requests": N, "max_tokens": MAX_TOKENS, "results": results}, indent=2) + "\n")
    rows = ["| system | tokens/s | p50 latency s | p99 latency s | p50 TTFT s | vLLM prefix-cache hit rate |", "|---|---|---|---|---|---|"]
    for k, r in results.items():
        rows.append(f"| {k} | {r['tokens_per_s']} | {r['p50_latency_s']} | {r['p99_latency_s']} | {r['p50_ttft_s']} | "
                    f"{r.get('vllm_prefix_cache_hit_rate', '-')} |")
    md = (f"# bench/serve_vllm.py\n\n{hw}\n\n{N} prompts (prompt tuning, 8 virtual tokens, chat format, SmolLM2 fp32), {N} greedy "
          f"requests of {MAX_TOKENS} tokens sent at once, streamed. vLLM-CPU: eager mode, block size 32, one core "
          f"(vLLM reserves the other); the gateway runs first, then vLLM direct, each on inputs of its own. Naive and batched HF "
          f"generate are not in this run.\n\n" + "\n".join(rows) + "\n")
    (out / "serve_vllm.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":  # vLLM's engine uses multiprocessing spawn; the guard keeps imports side-effect free
    sys.exit(main())
