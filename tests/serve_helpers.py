"""Helpers for the serve tests (tests/test_serve_*.py): prompts of every kind on the tiny model,
a live uvicorn server on a loopback port, references computed by softprompt.generate alone, and
small assertions. The fixtures that use them (base, prompts_dir, keys_file, live) are in
conftest.py."""
from __future__ import annotations

import functools
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import httpx
import openai
import torch

from softprompt.artifact import build_meta, save_artifact
from softprompt.data.examples import Example
from softprompt.encoding import PromptFormat
from softprompt.generate import SamplingParams, generate, generate_ids
from softprompt.prompts import PrefixTuning, PromptTuning, PTuning
from softprompt.serve.app import create_app
from softprompt.serve.registry import Registry
from softprompt.serve.server import Server
from softprompt.template import parse_template
from softprompt.train import TrainConfig, Trainer

KEY_A, KEY_B, KEY_ADMIN = "sk-tenant-a", "sk-tenant-b", "sk-admin"
A_PROMPTS = ["trained", "pt", "pt-plain", "hybrid", "ptune", "prefix", "prefix-plain", "base"]
TEXTS = ["hello there", "the movie was bad", "x", "a much longer input text to see that padding works well"]


# httpx's module functions with a 60 s timeout instead of httpx's 5 s. No test here measures latency,
# and a loaded 2-core CI runner once took longer than 5 s to answer a first /openapi.json.
http = types.SimpleNamespace(**{m: functools.partial(getattr(httpx, m), timeout=60)
                                for m in ("get", "post", "put", "delete", "request", "stream")})


def _save(base, directory: Path, prompt, template: str, chat: bool = True) -> Path:
    fmt = PromptFormat(base.tokenizer, parse_template(template), chat=chat)
    return save_artifact(directory, prompt, build_meta(prompt, template, base, format=fmt.describe()))


def _make_prompts(base, root: Path, tmp: Path) -> None:
    torch.manual_seed(0)
    data = [Example({"input": t}, y) for t, y in [("good movie", "positive"), ("bad film", "negative")]] * 4
    cfg = TrainConfig(model=base.name, kind="prompt-tuning", tokens=4, steps=8, lr=0.05, init="vocab", batch_size=4)
    res = Trainer(cfg, data, data[:2], tmp / "trained", base=base, progress=False).run()
    shutil.copytree(res.out, root / "trained", ignore=shutil.ignore_patterns("checkpoint*"))
    _save(base, root / "pt", PromptTuning(4, 32, init=torch.randn(4, 32)), "[soft:4] {input}")
    _save(base, root / "pt-plain", PromptTuning(3, 32, init=torch.randn(3, 32)), "Review: [soft:3] {input} Sentiment:", chat=False)
    _save(base, root / "hybrid", PromptTuning(5, 32, init=torch.randn(5, 32)), "[soft:2] Q: {input} [soft:3] A:")
    pt = PTuning.create(6, base, torch.randn(6, 32), {"encoder": "mlp"})
    pt.eval()
    _save(base, root / "ptune", pt, "[soft:6] {input}")
    pf = PrefixTuning.create(5, base, torch.randn(5, 32))
    pf.eval()
    _save(base, root / "prefix", pf, "{input}")
    _save(base, root / "prefix-plain", pf, "{input} =>", chat=False)
    _save(base, root / "secret", PromptTuning(2, 32, init=torch.randn(2, 32)), "[soft:2] {input}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A uvicorn server in a thread on a free loopback port."""

    def __init__(self, server: Server, studio: bool = False):
        import uvicorn

        self.server = server
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.uv = uvicorn.Server(uvicorn.Config(create_app(server, studio=studio), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)

    def client(self, key: str | None = KEY_A, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60, **kw)


def reference(base, registry: Registry, name: str, text: str, params: SamplingParams) -> str:
    """The same prompt and input run alone through softprompt.generate."""
    lp = registry.get(name)
    return generate(base, lp.prompt, lp.fmt, [text], params)[0]


def base_reference(base, ids: list[int], params: SamplingParams) -> str:
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    return base.tokenizer.decode(generate_ids(base.model, None, batch, params, base.eos_ids())[0], skip_special_tokens=True)


def _err(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _wait(pred, timeout=20.0):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "softprompt", *args], capture_output=True, text=True, timeout=120)
