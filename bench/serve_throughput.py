"""Serving throughput: 16 soft prompts on SmolLM2, 16 concurrent streaming clients against
``softprompt serve`` (a subprocess, through the real CLI), beside the naive baseline in the same run:
one request at a time, HF ``model.generate`` with the soft prompt's vectors placed in the input
embeddings (what PEFT does). The server is measured twice: with the KV-prefix cache and without it.

Every request is greedy with the same ``max_tokens``; output tokens are counted from each side's own
output (the server's usage, the baseline's generated ids up to end-of-sequence). Outputs of the two
sides are compared too (greedy: they should agree).

    python bench/serve_throughput.py [--quick] [--requests 64] [--max-tokens 32] [--clients 16] [--bf16]

With ``--bf16`` both sides run bf16 weights (the naive model converted the same way ``serve --bf16``
converts its own), and the results go to ``serve_throughput_bf16.*``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from softprompt.hardware import hardware_line, hardware_report

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED = REPO.parent / "shared" / "data"
N_PROMPTS = 16
# The configurations, in table order: the naive baseline as users run it (the target's reference),
# the same with prepacked linear weights (what the kernel alone buys), and the server.
CONFIGS = ["naive", "naive_packed", "on", "off", "on_unpacked"]
LABELS = {"naive": "naive", "naive_packed": "naive\n(prepacked)", "on": "serve\n(cache on)", "off": "serve\n(cache off)",
          "on_unpacked": "serve (cache on,\nnot prepacked)"}


def make_prompts(base, root: Path, seed: int = 0) -> list[str]:
    """16 prompt-tuning artifacts with 8..38 virtual tokens, initialized from sampled vocabulary
    embeddings (as ``--init vocab`` does), under a chat template."""
    import torch

    from softprompt.artifact import build_meta, save_artifact
    from softprompt.encoding import PromptFormat
    from softprompt.prompts import PromptTuning
    from softprompt.template import parse_template

    g = torch.Generator().manual_seed(seed)
    emb = base.embedding.weight.detach()
    names = []
    for i in range(N_PROMPTS):
        n = 8 + 2 * i
        ids = torch.randint(0, emb.shape[0], (n,), generator=g)
        prompt = PromptTuning(n, base.hidden_size, init=emb[ids].clone())
        template = f"[soft:{n}] Review: {{input}}\nSentiment:"
        fmt = PromptFormat(base.tokenizer, parse_template(template), chat=True)
        save_artifact(root / f"p{i:02d}", prompt, build_meta(prompt, template, base, format=fmt.describe()))
        names.append(f"p{i:02d}")
    return names


def inputs(n: int) -> list[str]:
    try:
        from softprompt.data import load_recipe, load_split

        exs = load_split(load_recipe("sst2"), str(SHARED), "train", limit=n, seed=0)
        return [e.fields["sentence"] for e in exs]
    except Exception:  # noqa: BLE001 - the shared data is optional
        words = "the film was a quiet and moving portrait of people who never quite say what they mean".split()
        return [" ".join(words[i % 5:i % 5 + 6 + i % 7]) for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summarize(name: str, wall: float, tokens: list[int], lat: list[float], ttft: list[float]) -> dict:
    return {"config": name, "requests": len(tokens), "output_tokens": sum(tokens), "wall_s": wall,
            "tokens_per_s": sum(tokens) / wall, "requests_per_s": len(tokens) / wall,
            "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99)}


def run_naive(base, prompt_dir: Path, jobs: list[tuple[str, str]], max_tokens: int,
              label: str = "naive: HF generate, one at a time") -> tuple[dict, list[str]]:
    """One request at a time: HF generate on inputs_embeds holding the soft prompt's vectors."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from softprompt.artifact import load_artifact
    from softprompt.data.examples import Example

    arts = {name: load_artifact(prompt_dir / name, base=base) for name in {n for n, _ in jobs}}
    fmts = {name: a.prompt_format(base) for name, a in arts.items()}

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # the first put is the (empty) prompt ids
                self.first = time.perf_counter()

        def end(self):
            pass

    eos = set(base.eos_ids())
    tokens, lat, ttft, texts = [], [], [], []
    t_start = time.perf_counter()
    for name, text in jobs:
        t0 = time.perf_counter()
        ids = torch.tensor([fmts[name].prompt_ids(Example({"input": text}))])
        with torch.no_grad():
            embeds = arts[name].prompt.embed(base.embedding, ids)
            streamer = FirstToken()
            out = base.model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=base.tokenizer.pad_token_id, streamer=streamer)
        t1 = time.perf_counter()
        new = [t for t in out[0].tolist()]
        cut = next((i for i, t in enumerate(new) if t in eos), len(new))
        tokens.append(cut)
        texts.append(base.tokenizer.decode(new[:cut], skip_special_tokens=True))
        lat.append(t1 - t0)
        ttft.append((streamer.first or t1) - t0)
    return summarize(label, time.perf_counter() - t_start, tokens, lat, ttft), texts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(prompt_dir: Path, jobs: list[tuple[str, str]], max_tokens: int, clients: int, cache: bool,
               max_batch: int, threads: int, bf16: bool = False, pack: bool = True) -> tuple[dict, list[str], dict]:
    import httpx
    import openai

    port = free_port()
    cmd = [sys.executable, "-m", "softprompt", "serve", "--model", "smollm2", "--device", "cpu", "--prompts", str(prompt_dir),
           "--port", str(port), "--threads", str(threads), "--max-batch", str(max_batch), "--max-queue", str(len(jobs) + clients),
           "--watch-interval", "0"]
    if not cache:
        cmd.append("--no-prefix-cache")
    cmd += ["--precision", "bf16" if bf16 else "fp32"]  # explicit: auto would pick bf16 on a CPU with native bf16
    if not pack:
        cmd.append("--no-pack-weights")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not start in 180 s")
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        # Warm-up (one request, not timed): first-call allocations, not prefix materialization.
        client.completions.create(model="base", prompt="hello", max_tokens=2, temperature=0)
        work: queue.Queue = queue.Queue()
        for i, job in enumerate(jobs):
            work.put((i, job))
        results: dict[int, tuple] = {}
        errors: list[str] = []

        def worker() -> None:
            while True:
                try:
                    i, (name, text) = work.get_nowait()
                except queue.Empty:
                    return
                t0 = time.perf_counter()
                first, parts, usage = None, [], None
                try:
                    for ch in client.completions.create(model=name, prompt=text, max_tokens=max_tokens, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}):
                        if ch.choices and ch.choices[0].text:
                            first = first or time.perf_counter()
                            parts.append(ch.choices[0].text)
                        if ch.usage is not None:
                            usage = ch.usage
                except openai.OpenAIError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                t1 = time.perf_counter()
                results[i] = ("".join(parts), usage.completion_tokens, t1 - t0, (first or t1) - t0)

        t_start = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    rows = [results[i] for i in range(len(jobs))]
    label = f"softprompt serve, {clients} clients, prefix cache {'on' if cache else 'off'}" + ("" if pack else ", weights not prepacked")
    summary = summarize(label, wall, [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    scraped = {}
    for line in metrics.splitlines():
        if line.startswith(("softprompt_prefix_cache_hits_total", "softprompt_prefix_cache_misses_total",
                            "softprompt_forward_total", "softprompt_batch_rows_total")):
            key, value = line.rsplit(" ", 1)
            scraped[key] = float(value)
    forwards = sum(v for k, v in scraped.items() if k.startswith("softprompt_forward_total"))
    summary["forwards"] = forwards
    summary["mean_rows_per_forward"] = scraped.get("softprompt_batch_rows_total", 0) / max(forwards, 1)
    summary["cache_hits"] = scraped.get("softprompt_prefix_cache_hits_total", 0)
    summary["cache_misses"] = scraped.get("softprompt_prefix_cache_misses_total", 0)
    return summary, [r[0] for r in rows], scraped


def plot(rows: list[dict], path: Path, weights: str = "fp32") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [LABELS[r["key"]] for r in rows]
    a.bar(labels, [r["tokens_per_s"] for r in rows], color=["#2a7" if r["key"].startswith("on") or r["key"] == "off" else "#999"
                                                            for r in rows])
    a.tick_params(axis="x", labelsize=7)
    a.set_ylabel("output tokens / s")
    a.set_title("Throughput")
    x = range(len(rows))
    b.bar([i - 0.2 for i in x], [r["latency_p50_s"] for r in rows], 0.4, label="latency p50")
    b.bar([i + 0.2 for i in x], [r["ttft_p50_s"] for r in rows], 0.4, label="time to first token p50")
    b.set_xticks(list(x), labels, fontsize=7)
    b.set_ylabel("seconds")
    b.legend()
    b.set_title("Latency")
    fig.suptitle(f"SmolLM2-135M, 16 soft prompts, CPU, {weights} weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small smoke run (16 requests, 8 tokens)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch CPU threads for both sides (default: all cores; use 1 on a CPU shared with other "
                         "busy processes, where multi-threaded matmuls stall on descheduled threads)")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights on both sides")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of all three measurements; the table shows the median round and the median ratio")
    ap.add_argument("--no-save", action="store_true", help="print only (the --quick run never overwrites results)")
    args = ap.parse_args()
    hw = hardware_report()  # recorded with the results, measured in the same run
    print(hardware_line(hw))
    if args.quick:
        args.requests, args.max_tokens = 16, 8
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from softprompt.base_model import load_base
    from softprompt.serve.packed import pack_linears

    torch.set_num_threads(args.threads)
    base = load_base("smollm2", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        prompt_dir = Path(tmp)
        names = make_prompts(base, prompt_dir)  # fp32 artifacts, as training writes them
        if args.bf16:
            base.model.to(torch.bfloat16)
        texts = inputs(args.requests)
        jobs = [(names[i % N_PROMPTS], texts[i]) for i in range(args.requests)]
        print(f"{args.requests} requests over {N_PROMPTS} prompts, max_tokens={args.max_tokens}, greedy; "
              f"torch threads={torch.get_num_threads()}", flush=True)
        packed_base = None
        rounds = []
        for k in range(args.repeats):
            # Each round measures every configuration, in a rotated order, so a slow spell of a shared
            # machine does not always fall on the same one; ratios are taken within a round.
            order = CONFIGS[k % len(CONFIGS):] + CONFIGS[:k % len(CONFIGS)]
            got = {}
            for what in order:
                if what == "naive":
                    got[what] = run_naive(base, prompt_dir, jobs, args.max_tokens)
                elif what == "naive_packed":
                    if packed_base is None:
                        packed_base = dataclasses.replace(base, model=copy.deepcopy(base.model))
                        pack_linears(packed_base.model)
                    got[what] = run_naive(packed_base, prompt_dir, jobs, args.max_tokens,
                                          "naive: HF generate, one at a time, linear weights prepacked")
                else:
                    got[what] = run_server(prompt_dir, jobs, args.max_tokens, args.clients, what != "off", args.max_batch,
                                           args.threads, args.bf16, pack=what != "on_unpacked")[:2]
                got[what][0]["key"] = what
                print(f"round {k + 1}/{args.repeats}: {what} {got[what][0]['tokens_per_s']:.1f} tok/s", flush=True)
            for what in order:
                got[what][0]["speedup_vs_naive"] = got[what][0]["tokens_per_s"] / got["naive"][0]["tokens_per_s"]
            rounds.append(got)
    rows = []
    for what in CONFIGS:
        runs = sorted((r[what][0] for r in rounds), key=lambda x: x["tokens_per_s"])
        row = dict(runs[len(runs) // 2])  # the median round's measurements
        row["speedup_vs_naive"] = statistics.median(r[what][0]["speedup_vs_naive"] for r in rounds)
        row["speedup_per_round"] = [round(r[what][0]["speedup_vs_naive"], 3) for r in rounds]
        row["tokens_per_s_per_round"] = [round(r[what][0]["tokens_per_s"], 2) for r in rounds]
        row["batching_gain"] = statistics.median(
            r[what][0]["tokens_per_s"] / r["naive_packed" if what in ("on", "off") else "naive"][0]["tokens_per_s"]
            for r in rounds)
        rows.append(row)
    naive, naive_packed, on, off, on_unpacked = rows

    def agreement(what: str) -> float:
        pairs = [(a, b) for r in rounds for a, b in zip(r["naive"][1], r[what][1])]
        return sum(a == b for a, b in pairs) / len(pairs)

    agree_on, agree_off = agreement("on"), agreement("off")
    agree_unpacked = agreement("on_unpacked")
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "requests": args.requests,
           "max_tokens": args.max_tokens, "clients": args.clients, "max_batch": args.max_batch, "prompts": N_PROMPTS,
           "quick": args.quick, "weights": "bf16" if args.bf16 else "fp32", "repeats": args.repeats,
           "hardware": hw}
    head = "| config | tok/s | x naive | p50 s | p99 s | TTFT p50 s | TTFT p99 s | rows/forward |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_naive']:.2f} | {r['latency_p50_s']:.2f} | "
                     f"{r['latency_p99_s']:.2f} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | "
                     f"{r.get('mean_rows_per_forward', 1.0):.1f} |")
    print("\n".join(lines))
    agree_line = (f"Greedy outputs identical to the naive baseline's: {agree_on:.0%} (cache on), {agree_off:.0%} (cache off), "
                  f"{agree_unpacked:.0%} (weights not prepacked), {agreement('naive_packed'):.0%} (naive, prepacked).")
    ratio_line = (f"Throughput ratio, server with prefix cache vs naive: {on['speedup_vs_naive']:.2f}x (median of "
                  f"{args.repeats} round(s); per round: {', '.join(f'{x:.2f}' for x in on['speedup_per_round'])}); "
                  f"without the prefix cache: {off['speedup_vs_naive']:.2f}x (per round: "
                  f"{', '.join(f'{x:.2f}' for x in off['speedup_per_round'])}); with the weights not prepacked: "
                  f"{on_unpacked['speedup_vs_naive']:.2f}x (per round: {', '.join(f'{x:.2f}' for x in on_unpacked['speedup_per_round'])}).")
    split_line = (f"What batching buys alone (server vs naive, both with prepacked weights): {on['batching_gain']:.2f}x with the "
                  f"prefix cache, {off['batching_gain']:.2f}x without; what prepacking buys the naive baseline: "
                  f"{naive_packed['speedup_vs_naive']:.2f}x.")
    print(agree_line, ratio_line, split_line, sep="\n")
    if args.quick or args.no_save:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "serve_throughput_bf16" if args.bf16 else "serve_throughput"
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"env": env, "results": rows, "agreement_with_naive": {"cache_on": agree_on, "cache_off": agree_off,
                                                               "not_prepacked": agree_unpacked}}, indent=2) + "\n")
    md = ([f"# Serving throughput: 16 soft prompts on SmolLM2-135M (CPU, {env['weights']} weights)", ""]
          + [f"- {k}: {v}" for k, v in env.items() if k != "hardware"] + ["", hardware_line(hw), ""])
    md += lines + ["", agree_line, "", "Naive latency is each request's own service time (requests run one after another, "
                   "no queueing); server latency includes queueing behind the other 15 clients.", "", ratio_line, "",
                   split_line, "", f"![plot]({stem}.png)"]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    plot(rows, RESULTS / f"{stem}.png", env["weights"])
    print(f"saved {RESULTS / stem}.json, .md, .png")


if __name__ == "__main__":
    main()
