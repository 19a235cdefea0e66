"""Six ways to serve the same 16 soft prompts, on the same 16 greedy requests of 32 tokens sent at once:

- naive HF generate: one request at a time, ``model.generate(inputs_embeds=...)``;
- batched HF generate: all 16 rows left-padded into one ``inputs_embeds`` batch, one ``generate`` call
  (the fair baseline a user with a queue would write);
- our engine, behind our API (``softprompt serve``, streamed);
- the same with its decode step compiled (``softprompt serve --compile``), the peer of compiled vLLM;
- our API on vLLM-CPU (``softprompt serve --engine vllm``, streamed);
- vLLM-CPU called directly with the prompt embeds our gateway would send (streamed).

Prompts: 16 prompt-tuning prompts (8 virtual tokens, chat format) on SmolLM2 in fp32. Every system gets
the identical request texts. A warm-up round per system first; then ``--repeats`` rounds (default 3) in
which the order of the systems rotates, and vLLM's prefix cache is flushed (``/reset_prefix_cache``,
dev mode) before each vLLM-backed run, so neither finds the other's blocks; the hit rate within each run
is read from vLLM's /metrics. Each system gets the same compute threads (``--threads``, default 1: vLLM-CPU
binds its worker to one core of the two here and keeps the other for its API server). The servers run
as their own processes, as deployed; CPU seconds per process and run are recorded (where the gateway's
overhead goes). Reports medians over the repeats of output tokens/s, p50/p99 latency and p50 TTFT, the
load average around each run, and whether each system's greedy texts equal batched HF generate's.
Results: bench/results/serve_vllm.{json,md}.

    bash scripts/vllm_venv.sh && python bench/serve_vllm.py   # starts and stops its own servers
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N, MAX_TOKENS, SOFT = 16, 32, 8
INPUTS = [f"review {i}: {t}" for i, t in enumerate(["a gorgeous, witty film", "dull and far too long", "the actors shine",
                                                     "I walked out", "a quiet masterpiece", "loud, empty spectacle",
                                                     "funny from start to end", "nothing works here"] * 2)]
OURS, COMPILED = "our engine (our API)", "our engine --compile (our API)"
SYSTEMS = ["naive HF generate", "batched HF generate", OURS, COMPILED, "our API on vLLM-CPU", "vLLM-CPU direct (prompt embeds)"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quantile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def summary(res: list[tuple[float, float, int, str]], wall: float) -> dict:
    """``res``: per request (ttft, latency, tokens, text), all measured from the moment the batch was sent."""
    toks = sum(r[2] for r in res)
    return {"tokens": toks, "wall_s": round(wall, 3), "tokens_per_s": round(toks / wall, 2),
            "p50_latency_s": round(quantile([r[1] for r in res], .5), 3), "p99_latency_s": round(quantile([r[1] for r in res], .99), 3),
            "p50_ttft_s": round(quantile([r[0] for r in res], .5), 3), "texts": [r[3] for r in res]}


def run_concurrent(send) -> dict:
    """Send the N requests at once; ``send(i, t0)`` streams one and returns (ttft, latency, tokens, text)."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(N) as ex:
        res = list(ex.map(lambda i: send(i, t0), range(N)))
    return summary(res, time.perf_counter() - t0)


def stream(url: str, body: dict, t0: float) -> tuple[float, float, int, str]:
    import httpx

    first, tokens, text = None, 0, []
    with httpx.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}}, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("choices") and ev["choices"][0].get("text"):
                first = first or time.perf_counter() - t0
                text.append(ev["choices"][0]["text"])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - t0, tokens, "".join(text)


def vllm_counters(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(url + "/metrics").text
    get = lambda n: sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(n)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))  # noqa: E731
    return get("vllm:prefix_cache_hits_total"), get("vllm:prefix_cache_queries_total")


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by every live process in process group ``pgid``."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: the process group
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


class HF:
    """The two HF generate baselines on the bench's own copy of the model (fp32, ``threads`` threads)."""

    def __init__(self, base, prompts, fmts, examples):
        import torch

        self.base, self.torch = base, torch
        emb = base.model.get_input_embeddings()
        with torch.no_grad():
            self.embeds = [p.embed(emb, torch.tensor([f.prompt_ids(e)]))[0] for p, f, e in zip(prompts, fmts, examples)]
        self.eos = base.eos_ids()

    @staticmethod
    def _streamer(t0: float):
        from transformers.generation.streamers import BaseStreamer

        class FirstToken(BaseStreamer):
            """When the batch's first new token appeared (generate puts the prompt's ids first)."""

            def __init__(self):
                self.first, self.calls = None, 0

            def put(self, value):
                self.calls += 1
                if self.first is None and self.calls > 1 and value.numel():
                    self.first = time.perf_counter() - t0

            def end(self):
                pass

        return FirstToken()

    def _new_tokens(self, row) -> list[int]:
        out = []
        for t in row.tolist():
            if t in self.eos:
                break
            out.append(t)
        return out

    def generate(self, embeds: list, t0: float) -> tuple[list[list[int]], float]:
        torch = self.torch
        hidden = embeds[0].shape[1]
        longest = max(e.shape[0] for e in embeds)
        batch = torch.zeros(len(embeds), longest, hidden, dtype=embeds[0].dtype)
        mask = torch.zeros(len(embeds), longest, dtype=torch.long)
        for i, e in enumerate(embeds):  # left padding
            batch[i, longest - e.shape[0]:] = e
            mask[i, longest - e.shape[0]:] = 1
        s = self._streamer(t0)
        with torch.no_grad():
            out = self.base.model.generate(inputs_embeds=batch, attention_mask=mask, max_new_tokens=MAX_TOKENS, do_sample=False,
                                           pad_token_id=self.base.tokenizer.pad_token_id, streamer=s)
        return [self._new_tokens(r) for r in out], s.first or 0.0

    def _result(self, ids: list[int], ttft: float, latency: float) -> tuple[float, float, int, str]:
        return ttft, latency, len(ids), self.base.tokenizer.decode(ids, skip_special_tokens=True)

    def naive(self) -> dict:
        t0 = time.perf_counter()
        res = []
        for e in self.embeds:
            ids, ttft = self.generate([e], t0)
            res.append(self._result(ids[0], ttft, time.perf_counter() - t0))
        return summary(res, time.perf_counter() - t0)

    def batched(self) -> dict:
        t0 = time.perf_counter()
        ids, ttft = self.generate(self.embeds, t0)
        lat = time.perf_counter() - t0
        return summary([self._result(x, ttft, lat) for x in ids], lat)


def start_server(args: list[str], log: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "softprompt", "serve", *args, "--port", str(port), "--watch-interval", "0"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def seq_line(name: str, v: dict) -> str:
    return (f"{name}: TTFT {v['median_ttft_s']} s, latency {v['median_latency_s']} s, {v['median_tokens_per_s']} tokens/s, "
            f"GET /health {v['median_health_rtt_ms']} ms")


def vllm_threads(log: Path) -> str:
    """vLLM-CPU's OpenMP binding, from its log (e.g. "core ids=[0], reserved_cpus=[1]")."""
    text = log.read_text(errors="replace")
    got = [m.group(0) for k in ("core ids", "reserved_cpus") for m in [re.search(rf"{k}=\[[^\]]*\]", text)] if m]
    return ", ".join(got) or "not reported"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="compute threads for every system (vLLM: its worker's OMP threads)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    ap.add_argument("--name", default="serve_vllm", help="results file name under bench/results")
    ap.add_argument("--note", default="", help="a line about the machine's state (e.g. 'shared, other jobs running')")
    ap.add_argument("--sequential", type=int, default=8, help="single requests, alternating gateway and direct, on an "
                                                                "otherwise idle vLLM: the gateway's added latency per request")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="every system's weights and arithmetic (float32: greedy texts comparable across systems)")
    ap.add_argument("--no-pause", action="store_true", help="leave the other servers running (not stopped with SIGSTOP) "
                                                            "while a system is measured")
    ap.add_argument("--vllm-compile", action="store_true", help="run vLLM with its torch.compile graphs (its default; "
                                                                "starts in minutes here) instead of eager")
    ap.add_argument("--profile", metavar="PY_SPY", help="py-spy executable: sample the gateway process during its runs "
                                                        "(raw stacks into bench/results/NAME_gateway_profile.txt)")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import httpx
    import torch

    torch.set_num_threads(args.threads)
    from softprompt.artifact import build_meta, load_artifact, save_artifact
    from softprompt.base_model import load_base
    from softprompt.data.examples import Example
    from softprompt.encoding import PromptFormat
    from softprompt.hardware import hardware_line, hardware_report
    from softprompt.prompts import PromptTuning
    from softprompt.serve.vllm_engine import encode_embeds
    from softprompt.serve.vllm_process import start_vllm, stop_vllm, wait_ready
    from softprompt.template import parse_template

    systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    base = load_base("smollm2", device="cpu")
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    prompts = work / "prompts"
    g = torch.Generator().manual_seed(0)
    emb = base.embedding.weight.detach()
    tmpl = "[soft:8] {input}"
    for i in range(N):
        p = PromptTuning(SOFT, emb.shape[1], init=emb[torch.randint(100, 5000, (SOFT,), generator=g)])
        save_artifact(prompts / f"p{i}", p, build_meta(p, tmpl, base, format=PromptFormat(base.tokenizer, parse_template(tmpl)).describe()))
    arts = [load_artifact(prompts / f"p{i}", base=base) for i in range(N)]
    fmts = [a.prompt_format(base) for a in arts]
    examples = [Example({"input": t}) for t in INPUTS]
    hf = HF(base, [a.prompt for a in arts], fmts, examples)
    bf16 = args.dtype == "bfloat16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    body = lambda i: {"model": f"p{i}", "prompt": INPUTS[i], "max_tokens": MAX_TOKENS, "temperature": 0}  # noqa: E731
    # vLLM direct gets the embeddings the gateway builds (fp32, the same ids), encoded before the clock starts
    direct = [{"model": "smollm2", "prompt_embeds": encode_embeds(hf.embeds[i].to(dtype)), "max_tokens": MAX_TOKENS,
               "temperature": 0, "return_token_ids": True} for i in range(N)]
    if bf16:  # the HF baselines in bf16 too, on the same embeddings cast as the gateway casts them
        base.model.to(torch.bfloat16)
        hf.embeds = [e.to(torch.bfloat16) for e in hf.embeds]

    procs: dict[str, subprocess.Popen] = {}
    urls: dict[str, str] = {}
    try:
        if any("vLLM" in s for s in systems):
            vport = free_port()
            vlog = work / "vllm.log"
            eager = {} if args.vllm_compile else {"EAGER": "1"}
            eager["DTYPE"] = args.dtype
            procs["vllm"] = start_vllm(vport, vlog, MAX_MODEL_LEN="1024", **eager, BLOCK_SIZE="32", VLLM_SERVER_DEV_MODE="1",
                                       **({"VLLM_CPU_OMP_THREADS_BIND": os.environ["VLLM_CPU_OMP_THREADS_BIND"]}
                                          if "VLLM_CPU_OMP_THREADS_BIND" in os.environ else {}))
            urls["vllm"] = f"http://127.0.0.1:{vport}"
        for name, key, extra in ((OURS, "native", []), (COMPILED, "compiled", ["--compile"])):
            if name in systems:
                procs[key], urls[key] = start_server(["--model", "smollm2", "--prompts", str(prompts), "--threads", str(args.threads),
                                                      "--precision", "bf16" if bf16 else "fp32", *extra],
                                                     work / f"{key}.log", args.threads)
        if "vllm" in urls:
            wait_ready(procs["vllm"], urls["vllm"], work / "vllm.log")
            if "our API on vLLM-CPU" in systems:
                procs["gateway"], urls["gateway"] = start_server(["--engine", "vllm", "--upstream", urls["vllm"], "--upstream-dtype",
                                                                  args.dtype, "--model", "smollm2", "--prompts", str(prompts)],
                                                                 work / "gateway.log", args.threads)
        for k in ("native", "compiled", "gateway"):
            if k in procs:
                wait_ready(procs[k], urls[k], work / f"{k}.log", what=k)
        # what each of our engines logged about its decode step (the compiled one: how long compiling and checking took)
        decode_logs = {k: re.findall(r"decode steps[^\n]*", (work / f"{k}.log").read_text()) for k in ("native", "compiled") if k in procs}

        def flush() -> bool:
            r = httpx.post(urls["vllm"] + "/reset_prefix_cache", timeout=30)
            return r.status_code == 200

        uses = {OURS: {"native"}, COMPILED: {"compiled"}, "our API on vLLM-CPU": {"vllm", "gateway"},
                "vLLM-CPU direct (prompt embeds)": {"vllm"}}

        def pause_others(name: str) -> list[str]:
            """SIGSTOP the servers this system does not use (an idle compiled vLLM keeps a core busy: measured 0.94 CPU s
            during a 4 s run of our engine), so each system runs alone; the gateway stops with its upstream."""
            if args.no_pause:
                return []
            keep = uses.get(name, set())
            paused = [k for k in procs if k not in keep and not (k == "gateway" and "vllm" in keep)]
            for k in paused:
                os.killpg(procs[k].pid, signal.SIGSTOP)
            return paused

        def resume(paused: list[str]) -> None:
            for k in paused:
                os.killpg(procs[k].pid, signal.SIGCONT)

        def gateway_sees_upstream(timeout: float = 15.0) -> None:
            """Wait until the gateway's health check has seen vLLM up (a check cut by a pause may have marked it down)."""
            deadline = time.time() + timeout
            while time.time() < deadline:
                if re.search(r"^softprompt_upstream_up\{[^}]*\} 1$", httpx.get(urls["gateway"] + "/metrics").text, re.M):
                    return
                time.sleep(0.2)
            raise RuntimeError("the gateway does not see its vLLM upstream as up")

        def once(name: str) -> dict:
            paused = pause_others(name)
            try:
                return measure(name)
            finally:
                resume(paused)

        def measure(name: str, flush_first: bool = True) -> dict:
            flushed = None
            if "vLLM" in name:
                flushed = flush() if flush_first else False
                h0, q0 = vllm_counters(urls["vllm"])
            load0 = os.getloadavg()[0]
            cpu0 = {k: group_cpu(p.pid) for k, p in procs.items()}
            me0 = sum(os.times()[:2])
            if name == "naive HF generate":
                r = hf.naive()
            elif name == "batched HF generate":
                r = hf.batched()
            elif name in (OURS, COMPILED):
                url = urls["native" if name == OURS else "compiled"]
                r = run_concurrent(lambda i, t0: stream(url + "/v1/completions", body(i), t0))
            elif name == "our API on vLLM-CPU":
                gateway_sees_upstream()
                spy = None
                if args.profile:
                    spy = subprocess.Popen([args.profile, "record", "--pid", str(procs["gateway"].pid), "--rate", "250", "--format",
                                            "raw", "--output", str(work / f"profile-{time.time():.0f}.txt"), "--nonblocking"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1.0)
                r = run_concurrent(lambda i, t0: stream(urls["gateway"] + "/v1/completions", body(i), t0))
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=60)
            else:
                r = run_concurrent(lambda i, t0: stream(urls["vllm"] + "/v1/completions", direct[i], t0))
            r["cpu_s"] = {"bench process (clients, HF)": round(sum(os.times()[:2]) - me0, 2),
                          **{k: round(group_cpu(p.pid) - cpu0[k], 2) for k, p in procs.items()}}
            r["load_avg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
            if flushed is not None:
                h1, q1 = vllm_counters(urls["vllm"])
                r["vllm_prefix_cache_hit_rate"] = round((h1 - h0) / max(q1 - q0, 1), 3)
                r["prefix_cache_flushed"] = flushed
            return r

        for name in systems:  # warm-up round (discarded)
            once(name)
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        orders = []
        for rep in range(args.repeats):
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]
            if rep % 2:
                order = order[::-1]
            orders.append(order)
            for name in order:
                runs[name].append(once(name))
                r = runs[name][-1]
                print(f"[{rep}] {name}: {r['tokens_per_s']} tok/s, p50 {r['p50_latency_s']} s, load {r['load_avg_1m']}", flush=True)
        warm = {}
        if "our API on vLLM-CPU" in systems:  # the same 16 requests again, on the cache the first pass filled
            paused = pause_others("our API on vLLM-CPU")
            try:
                measure("our API on vLLM-CPU")
                w = measure("our API on vLLM-CPU", flush_first=False)
            finally:
                resume(paused)
            warm = {k: w[k] for k in ("tokens_per_s", "p50_latency_s", "p50_ttft_s", "vllm_prefix_cache_hit_rate")}
            print(f"warm cache: {warm}", flush=True)
        sequential = {}
        if args.sequential and "gateway" in urls:
            pairs = {"our API on vLLM-CPU": lambda i, t0: stream(urls["gateway"] + "/v1/completions", body(i), t0),
                     "vLLM-CPU direct (prompt embeds)": lambda i, t0: stream(urls["vllm"] + "/v1/completions", direct[i], t0)}
            seq: dict[str, list] = {k: [] for k in pairs}
            for j in range(args.sequential):
                for k in (list(pairs) if j % 2 == 0 else list(pairs)[::-1]):
                    flush()
                    t0 = time.perf_counter()
                    seq[k].append(pairs[k](j % N, t0))
            sequential = {k: {"requests": len(v), "median_ttft_s": round(statistics.median(r[0] for r in v), 4),
                              "median_latency_s": round(statistics.median(r[1] for r in v), 4),
                              "median_tokens_per_s": round(statistics.median(r[2] / r[1] for r in v), 2)} for k, v in seq.items()}
            for k, u in (("our API on vLLM-CPU", urls["gateway"]), ("vLLM-CPU direct (prompt embeds)", urls["vllm"])):
                rtt = []
                for _ in range(20):  # the bare HTTP round trip to each server (GET /health), under the same load
                    t0 = time.perf_counter()
                    httpx.get(u + "/health", timeout=10)
                    rtt.append(time.perf_counter() - t0)
                sequential[k]["median_health_rtt_ms"] = round(1000 * statistics.median(rtt), 2)
            print(json.dumps(sequential, indent=1), flush=True)
        vthreads = vllm_threads(work / "vllm.log") if "vllm" in procs else None
        if args.profile:
            raw = "".join(p.read_text() for p in sorted(work.glob("profile-*.txt")))
            (REPO / "bench" / "results" / f"{args.name}_gateway_profile.txt").write_text(raw)
    finally:
        for k, p in procs.items():
            (stop_vllm if k == "vllm" else stop)(p)

    ref = runs.get("batched HF generate", [{}])[0].get("texts")
    med = {}
    for name, rs in runs.items():
        m = {k: round(statistics.median(r[k] for r in rs), 3) for k in ("tokens_per_s", "p50_latency_s", "p99_latency_s", "p50_ttft_s")}
        if "vllm_prefix_cache_hit_rate" in rs[0]:
            m["vllm_prefix_cache_hit_rate"] = round(statistics.median(r["vllm_prefix_cache_hit_rate"] for r in rs), 3)
        m["cpu_s"] = {k: round(statistics.median(r["cpu_s"][k] for r in rs), 2) for k in rs[0]["cpu_s"]}
        if ref:
            m["texts_equal_batched_hf"] = f"{sum(a == b for a, b in zip(rs[0]['texts'], ref))}/{N}"
        med[name] = m
    hw = hardware_line(hardware_report(measure=False))
    gw, dv = med.get("our API on vLLM-CPU"), med.get("vLLM-CPU direct (prompt embeds)")
    loss = round(100 * (1 - gw["tokens_per_s"] / dv["tokens_per_s"]), 1) if gw and dv else None
    ratios = {}  # each of our engines against vLLM direct: over the medians, and within each round
    for name in (OURS, COMPILED):
        if name in med and dv:
            # the same ratio within each round (the two runs minutes apart at most): robust to the host's drift
            ratios[name] = (round(med[name]["tokens_per_s"] / dv["tokens_per_s"], 3),
                            [round(a["tokens_per_s"] / b["tokens_per_s"], 3)
                             for a, b in zip(runs[name], runs["vLLM-CPU direct (prompt embeds)"])])
    ours_vs_vllm, by_round = ratios.get(OURS, (None, []))
    loss_by_round = ([round(100 * (1 - a["tokens_per_s"] / b["tokens_per_s"]), 1) for a, b in
                      zip(runs["our API on vLLM-CPU"], runs["vLLM-CPU direct (prompt embeds)"])] if gw and dv else [])
    result = {"hardware": hw, "cpu_count": os.cpu_count(), "threads": args.threads, "vllm_threads": vthreads,
              "vllm_compiled": args.vllm_compile, "dtype": args.dtype, "others_paused": not args.no_pause, "note": args.note,
              "requests": N, "max_tokens": MAX_TOKENS, "soft_tokens": SOFT, "repeats": args.repeats, "orders": orders,
              "median": med, "gateway_loss_vs_direct_pct": loss, "ours_vs_vllm_direct": ours_vs_vllm,
              "ours_vs_vllm_direct_by_round": by_round,
              "compiled_vs_vllm_direct": ratios.get(COMPILED, (None, []))[0],
              "compiled_vs_vllm_direct_by_round": ratios.get(COMPILED, (None, []))[1],
              "gateway_loss_vs_direct_pct_by_round": loss_by_round, "sequential": sequential,
              "gateway_warm_cache": warm, "decode_step_logs": decode_logs,
              "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "texts"} for r in rs] for k, rs in runs.items()},
              "texts": {k: rs[0]["texts"] for k, rs in runs.items()}}
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = ["| system | tokens/s | p50 latency s | p99 latency s | p50 TTFT s | vLLM prefix-cache hit rate | greedy texts = batched HF |",
            "|---|---|---|---|---|---|---|"]
    for k, m in med.items():
        rows.append(f"| {k} | {m['tokens_per_s']} | {m['p50_latency_s']} | {m['p99_latency_s']} | {m['p50_ttft_s']} | "
                    f"{m.get('vllm_prefix_cache_hit_rate', '-')} | {m.get('texts_equal_batched_hf', '-')} |")
    cpu_rows = ["| system | " + " | ".join(f"CPU s: {k}" for k in next(iter(med.values()))["cpu_s"]) + " |",
                "|---|" + "---|" * len(next(iter(med.values()))["cpu_s"])]
    for k, m in med.items():
        cpu_rows.append(f"| {k} | " + " | ".join(str(v) for v in m["cpu_s"].values()) + " |")
    loads = [x for rs in runs.values() for r in rs for x in r["load_avg_1m"]]
    md = (f"# bench/{Path(__file__).name}\n\n{hw}; {os.cpu_count()} CPUs.\n\n"
          + (f"{args.note}\n\n" if args.note else "")
          + f"{N} prompts (prompt tuning, {SOFT} virtual tokens, chat format, SmolLM2 {'bf16' if bf16 else 'fp32'}), the same {N} greedy requests of "
          f"{MAX_TOKENS} tokens for every system, sent at once (HF naive: one after the other; HF batched: one left-padded "
          f"`inputs_embeds` batch). {args.threads} compute thread(s) per system (vLLM-CPU: {vthreads}); "
          f"vLLM {'compiled (torch.compile)' if args.vllm_compile else 'eager'}, block size 32. "
          f"A warm-up round, then {args.repeats} rounds with the order of systems rotated (and reversed every other round), "
          f"vLLM's prefix cache flushed before each vLLM-backed run"
          + ("" if args.no_pause else "; the servers a system does not use are paused (SIGSTOP) while it runs")
          + f". Medians over the rounds; 1-minute load average during the "
          f"runs {min(loads):.2f} to {max(loads):.2f}.\n\n" + "\n".join(rows) + "\n\n"
          + (f"Our API on vLLM-CPU against vLLM-CPU direct: {loss:+.1f} % tokens/s lost (goal: at most 10 %); within each round: "
             f"{', '.join(f'{x:+.1f}' for x in loss_by_round)} % (median {statistics.median(loss_by_round):+.1f} %).\n\n"
             if loss is not None else "")
          + "".join(f"{'Our engine' if name == OURS else 'Our engine compiled'} against vLLM-CPU direct: {r:.3f}x the tokens/s "
                    f"(goal: ahead, above 1); within each round: {', '.join(f'{x:.3f}' for x in rr)} (median "
                    f"{statistics.median(rr):.3f}, {sum(x > 1 for x in rr)} of {len(rr)} rounds ahead).\n\n"
                    for name, (r, rr) in ratios.items())
          + (f"Our API on vLLM-CPU, the same 16 requests again on the prefix cache the previous pass filled: "
             f"{warm['tokens_per_s']} tokens/s, p50 TTFT {warm['p50_ttft_s']} s, vLLM prefix-cache hit rate "
             f"{warm['vllm_prefix_cache_hit_rate']}.\n\n" if warm else "")
          + "".join(f"Our engine{' --compile' if k == 'compiled' else ''} at start-up: {'; '.join(v)}.\n\n"
                    for k, v in decode_logs.items() if v)
          + "CPU seconds per run (medians) by process group: where each system's time goes.\n\n" + "\n".join(cpu_rows) + "\n"
          + ("\nOne request at a time (prefix cache flushed before each, alternating), medians over "
             f"{args.sequential} each: " + "; ".join(seq_line(k, v) for k, v in sequential.items()) + "\n" if sequential else ""))
    (out / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":  # vLLM's engine uses multiprocessing spawn; the guard keeps imports side-effect free
    sys.exit(main())
