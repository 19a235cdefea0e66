"""softprompt serve's prompt registry at run time: a changed prompt is never served stale, broken
artifacts are refused and logged, the admin endpoints add, replace and remove prompts, and the
memory budget evicts least recently used prompts."""
from __future__ import annotations

import base64
import json
import logging
import shutil
import threading
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from serve_helpers import KEY_A, KEY_ADMIN, _err, _save, _wait, http

from softprompt.artifact import TENSORS
from softprompt.base_model import load_base
from softprompt.encoding import PromptFormat
from softprompt.generate import SamplingParams, generate
from softprompt.prompts import PromptTuning, PTuning
from softprompt.serve.registry import Registry
from softprompt.template import parse_template


def test_updated_prompt_is_never_served_stale(live, base, prompts_dir):
    c = live.client()
    target = prompts_dir / "replace-me"
    torch.manual_seed(1)
    _save(base, target, PromptTuning(4, 32, init=torch.randn(4, 32) * 3), "[soft:4] {input}")
    _wait(lambda: "replace-me" in live.server.registry.names())
    old = c.completions.create(model="replace-me", prompt="hello there", max_tokens=8, temperature=0).choices[0].text
    old_hash = live.server.registry.entries["replace-me"].hash
    assert old_hash in live.server.cache
    new_prompt = PromptTuning(4, 32, init=torch.randn(4, 32) * 3)
    _save(base, target, new_prompt, "[soft:4] {input}")
    _wait(lambda: live.server.registry.entries["replace-me"].hash != old_hash)
    new = c.completions.create(model="replace-me", prompt="hello there", max_tokens=8, temperature=0).choices[0].text
    fmt = PromptFormat(base.tokenizer, parse_template("[soft:4] {input}"))
    assert new == generate(base, new_prompt, fmt, ["hello there"], SamplingParams(8))[0]
    assert new != old and old_hash not in live.server.cache
    shutil.rmtree(target)
    _wait(lambda: "replace-me" not in live.server.registry.names())
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="replace-me", prompt="x", max_tokens=2)


def test_broken_artifacts_are_refused_and_logged(live, base, prompts_dir, other_tiny_dir, caplog):
    caplog.set_level(logging.ERROR, logger="softprompt")
    (prompts_dir / "corrupt").mkdir()
    (prompts_dir / "corrupt" / "prompt.json").write_text("{not json")
    other = load_base(str(other_tiny_dir), device="cpu")
    _save(other, prompts_dir / "wrong-base", PromptTuning(2, 32, init=torch.randn(2, 32)), "[soft:2] {input}")
    shutil.copytree(prompts_dir / "pt", prompts_dir / "truncated")
    (prompts_dir / "truncated" / TENSORS).write_bytes(b"\x00" * 10)
    try:
        _wait(lambda: {"corrupt", "wrong-base", "truncated"} <= {e["name"] for e in live.server.registry.status()})
        status = {e["name"]: e for e in live.server.registry.status()}
        assert "corrupt metadata" in status["corrupt"]["error"]
        assert "trained on base model" in status["wrong-base"]["error"]
        assert "corrupt tensor file" in status["truncated"]["error"]
        assert not {"corrupt", "wrong-base", "truncated"} & set(live.server.registry.names())
        logged = caplog.text
        assert "'corrupt' refused" in logged and "'wrong-base' refused" in logged
        r = live.client(KEY_ADMIN).completions.create(model="pt", prompt="x", max_tokens=2)  # others keep serving
        assert r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.NotFoundError):
            live.client(KEY_ADMIN).completions.create(model="corrupt", prompt="x", max_tokens=2)
    finally:
        for n in ("corrupt", "wrong-base", "truncated"):
            shutil.rmtree(prompts_dir / n)


def test_admin_endpoint_adds_replaces_and_removes(live, base, prompts_dir, tmp_path):
    h = {"Authorization": f"Bearer {KEY_ADMIN}"}
    _err(http.get(live.url + "/admin/prompts", headers={"Authorization": f"Bearer {KEY_A}"}), 403)
    _err(http.get(live.url + "/admin/prompts"), 401)
    prompt = PromptTuning(3, 32, init=torch.randn(3, 32))
    art = _save(base, tmp_path / "up", prompt, "[soft:3] Answer: {input}")
    body = {"meta": json.loads((art / "prompt.json").read_text()),
            "tensors": base64.b64encode((art / TENSORS).read_bytes()).decode()}
    r = http.put(live.url + "/admin/prompts/uploaded", headers=h, json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert (prompts_dir / "uploaded" / "prompt.json").exists()
    got = live.client().completions.create(model="uploaded", prompt="hi", max_tokens=5, temperature=0).choices[0].text
    fmt = PromptFormat(base.tokenizer, parse_template("[soft:3] Answer: {input}"))
    assert got == generate(base, prompt, fmt, ["hi"], SamplingParams(5))[0]
    bad = dict(body, tensors=base64.b64encode(b"garbage").decode())
    assert "refused" in _err(http.put(live.url + "/admin/prompts/uploaded", headers=h, json=bad), 400)["message"]
    assert live.client().completions.create(model="uploaded", prompt="hi", max_tokens=5, temperature=0).choices[0].text == got
    _err(http.put(live.url + "/admin/prompts/base", headers=h, json=body), 400)
    _err(http.put(live.url + "/admin/prompts/x", headers=h, json={"meta": 1, "tensors": "x"}), 400)
    assert http.delete(live.url + "/admin/prompts/uploaded", headers=h).status_code == 200
    assert not (prompts_dir / "uploaded").exists()
    _err(http.delete(live.url + "/admin/prompts/uploaded", headers=h), 404)
    with pytest.raises(openai.NotFoundError):
        live.client().completions.create(model="uploaded", prompt="hi", max_tokens=2)


def test_registry_memory_budget_evicts_lru_and_reloads(base, prompts_dir):
    registry = Registry(base, prompts_dir, budget_bytes=1)  # room for one prompt at a time
    registry.scan()
    loaded = [n for n, e in registry.entries.items() if e.loaded is not None]
    assert len(loaded) == 1 and registry.evictions >= len(registry.names()) - 1
    a, b = registry.get("pt"), registry.get("hybrid")
    assert a is not None and b is not None and registry.entries["pt"].loaded is None
    assert registry.get("pt").hash == a.hash


def test_hostile_artifacts_are_refused_with_the_reason(live, base, prompts_dir, tmp_path, caplog):
    """Beside good prompts: NaN and infinite vectors, tensors with fewer rows than prompt.json
    declares (for prompt tuning, where a single row would broadcast, and P-tuning), a link out of the
    prompts directory (the whole directory, or only its tensor file), a header claiming 2 GB, a
    truncated tensor file: each is refused at load with its reason (logged and listed by
    /admin/prompts), never listed for a key, never served; the good prompts keep serving."""
    caplog.set_level(logging.ERROR, logger="softprompt")
    made = []

    def prompt_dir(name: str, prompt, template: str = "[soft:4] {input}") -> Path:
        made.append(name)
        return _save(base, prompts_dir / name, prompt, template)

    nan = torch.randn(4, 32)
    nan[2, 5] = float("nan")
    prompt_dir("h-nan", PromptTuning(4, 32, init=nan))
    inf = torch.randn(4, 32)
    inf[0, 0] = float("inf")
    prompt_dir("h-inf", PromptTuning(4, 32, init=inf))
    short = prompt_dir("h-short", PromptTuning(4, 32, init=torch.randn(4, 32)))
    save_file({"prompt_embeddings": torch.randn(1, 32)}, str(short / TENSORS))  # broadcasts into 4 rows on copy
    pt = PTuning.create(6, base, torch.randn(6, 32), {"encoder": "mlp"})
    pt.eval()
    ptune = prompt_dir("h-ptune-short", pt, "[soft:6] {input}")
    stored = load_file(str(ptune / TENSORS))
    save_file({**stored, "prompt_embeddings": stored["prompt_embeddings"][:3].contiguous()}, str(ptune / TENSORS))
    outside = _save(base, tmp_path / "outside", PromptTuning(4, 32, init=torch.randn(4, 32)), "[soft:4] {input}")
    (prompts_dir / "h-link").symlink_to(outside, target_is_directory=True)
    made.append("h-link")
    half = prompt_dir("h-file-link", PromptTuning(4, 32, init=torch.randn(4, 32)))
    (half / TENSORS).unlink()
    (half / TENSORS).symlink_to(outside / TENSORS)
    huge = prompt_dir("h-huge-header", PromptTuning(4, 32, init=torch.randn(4, 32)))
    (huge / TENSORS).write_bytes((2 << 30).to_bytes(8, "little") + b"{" + b" " * 100)
    cut = prompt_dir("h-truncated", PromptTuning(4, 32, init=torch.randn(4, 32)))
    (cut / TENSORS).write_bytes((cut / TENSORS).read_bytes()[:-20])
    want = {"h-nan": "NaN or infinite", "h-inf": "NaN or infinite", "h-short": "shape (1, 32)",
            "h-ptune-short": "shape (3, 32)", "h-link": "symbolic link out of the prompts directory",
            "h-file-link": "symbolic link out of the prompts directory", "h-huge-header": "header claims 2147483648 bytes",
            "h-truncated": "corrupt tensor file"}
    try:
        _wait(lambda: set(want) <= {e["name"] for e in live.server.registry.status()})
        listed = {e["name"]: e for e in http.get(live.url + "/admin/prompts",
                                                   headers={"Authorization": f"Bearer {KEY_ADMIN}"}).json()["prompts"]}
        for name, reason in want.items():
            assert reason in (listed[name]["error"] or ""), (name, listed[name])
            assert not listed[name]["loaded"] and listed[name]["hash"] is None
            assert f"{name!r} refused" in caplog.text
        assert not set(want) & set(live.server.registry.names())
        admin = live.client(KEY_ADMIN)
        assert not set(want) & {m.id for m in admin.models.list().data}
        for name in want:
            with pytest.raises(openai.NotFoundError):
                admin.completions.create(model=name, prompt="x", max_tokens=2)
        r = admin.completions.create(model="pt", prompt="x", max_tokens=2, temperature=0)  # the others keep serving
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        for name in made:
            p = prompts_dir / name
            p.unlink() if p.is_symlink() else shutil.rmtree(p)


def test_a_second_watch_starts_no_second_watcher_and_close_ends_it(base, prompts_dir):
    reg = Registry(base, prompts_dir)
    watchers = lambda: [t for t in threading.enumerate() if t.name == "softprompt-registry-watch"]  # noqa: E731
    before = len(watchers())
    try:
        reg.watch(0.05)
        first = reg._thread
        reg.watch(0.05)  # what a second Server.start (an ASGI client running the lifespan) does
        assert reg._thread is first and len(watchers()) == before + 1
    finally:
        reg.close()
    assert not first.is_alive() and len(watchers()) == before
    reg.watch(0.05)  # watching again after close works
    try:
        assert reg._thread.is_alive()
    finally:
        reg.close()
