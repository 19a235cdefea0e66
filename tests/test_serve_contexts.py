"""softprompt serve --compressor: a request's ``context`` is compressed on the fly (one forward of the
amortized compressor, cached by content hash), ``PUT /admin/contexts/{name}`` registers one as a
prompt; bad contexts answer 400 naming the field and never touch other requests. With the official
openai client against a live server on the tiny model."""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import yaml
from serve_helpers import LiveServer, _err, http
from test_amortized import _cfg, _context, _contexts

from softprompt.compress.amortized import Trainer
from softprompt.generate import SamplingParams, generate
from softprompt.serve.auth import Auth, hash_key
from softprompt.serve.from_context import ContextPrompts, context_key
from softprompt.serve.registry import Registry
from softprompt.serve.schemas import Limits
from softprompt.serve.server import Server

USER, ADMIN, NO_BASE = "sk-ctx-user", "sk-ctx-admin", "sk-ctx-nobase"
QUESTIONS = ["Who built the lighthouse?", "When do the boats leave?"]


@pytest.fixture(scope="module")
def compressor(base, tmp_path_factory):
    ctx = _contexts(5)
    tr = Trainer(_cfg(form="kv", steps=3), ctx[:4], ctx[4:], tmp_path_factory.mktemp("comp") / "harbor-kv4", base=base,
                 progress=False)
    tr.prepare()
    tr.train()
    return tr.save()


@pytest.fixture(scope="module")
def ctx_live(base, compressor, prompts_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ctx-prompts")
    shutil.copytree(prompts_dir / "pt", root / "pt")
    keys = tmp_path_factory.mktemp("ctx-keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"name": "user", "sha256": hash_key(USER), "prompts": "*"},
        {"name": "nobase", "sha256": hash_key(NO_BASE), "prompts": ["pt"]},
        {"name": "ops", "sha256": hash_key(ADMIN), "prompts": "*", "admin": True},
    ]}))
    contexts = ContextPrompts(compressor, base, cache_size=3, max_tokens=200)
    server = Server(base, Registry(base, root), Auth.from_file(keys), Limits(max_tokens=32, max_input_tokens=400),
                    max_batch=8, watch_interval=None, contexts=contexts)
    with LiveServer(server) as s:
        yield s


def _ref(base, compressor, text: str, query: str, n: int) -> str:
    """softprompt.generate with the compressor's prompt for ``text`` (the engine is idle meanwhile)."""
    job = compressor.job(text)
    return generate(base, compressor.prompt(text, job), job.student_fmt, [query], SamplingParams(n))[0]


def _client(live, key=USER) -> openai.OpenAI:
    return live.client(key)


def _metric(live, name: str) -> float:
    text = http.get(live.url + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_an_on_the_fly_context_gives_the_tokens_of_the_same_context_compressed_and_served(ctx_live, base, compressor):
    """The Python API (Compressor.compress into the prompts directory, served by name) and a request
    carrying the same context give the same greedy tokens, for completions and chat; both equal
    softprompt.generate with the compressor's prompt."""
    text = _context(41)  # never trained on
    compressor.compress(text, ctx_live.server.registry.dir / "harbor41")
    ctx_live.server.registry.scan()
    c = _client(ctx_live)
    for q in QUESTIONS:
        named = c.completions.create(model="harbor41", prompt=q, max_tokens=8, temperature=0)
        fly = c.completions.create(model="base", prompt=q, max_tokens=8, temperature=0, extra_body={"context": text})
        want = _ref(base, compressor, text, q, 8)
        assert fly.choices[0].text == named.choices[0].text == want
        assert fly.usage.prompt_tokens == named.usage.prompt_tokens
        chat_named = c.chat.completions.create(model="harbor41", messages=[{"role": "user", "content": q}], max_tokens=8,
                                               temperature=0)
        chat_fly = c.chat.completions.create(model=compressor.path.name, messages=[{"role": "user", "content": q}],
                                             max_tokens=8, temperature=0, extra_body={"context": text})
        assert chat_fly.choices[0].message.content == chat_named.choices[0].message.content == want
    # the context changes the answer: without it the bare model answers differently on some question
    bare = [c.completions.create(model="base", prompt=q, max_tokens=8, temperature=0).choices[0].text for q in QUESTIONS]
    other = [c.completions.create(model="base", prompt=q, max_tokens=8, temperature=0,
                                  extra_body={"context": _context(42)}).choices[0].text for q in QUESTIONS]
    fly = [c.completions.create(model="base", prompt=q, max_tokens=8, temperature=0,
                                extra_body={"context": text}).choices[0].text for q in QUESTIONS]
    assert fly != bare or fly != other


def test_a_repeated_context_hits_the_cache(ctx_live):
    c = _client(ctx_live)
    text = _context(50)
    hits, misses, runs = (_metric(ctx_live, f"softprompt_context_{m}") for m in
                          ("cache_hits_total", "cache_misses_total", "compressions_total"))
    first = c.completions.create(model="base", prompt="Who?", max_tokens=4, temperature=0, extra_body={"context": text})
    assert (_metric(ctx_live, "softprompt_context_cache_misses_total"), _metric(ctx_live, "softprompt_context_compressions_total")) \
        == (misses + 1, runs + 1)
    again = c.completions.create(model="base", prompt="Who?", max_tokens=4, temperature=0,
                                 extra_body={"context": "  " + text + "\n"})  # the same text, as the compressor reads it
    assert again.choices[0].text == first.choices[0].text
    assert _metric(ctx_live, "softprompt_context_cache_hits_total") == hits + 1
    assert _metric(ctx_live, "softprompt_context_compressions_total") == runs + 1  # no second forward
    assert context_key(text) in ctx_live.server.contexts._lru
    for i in range(60, 64):  # the LRU holds 3: older contexts are dropped, and compressed again when they return
        c.completions.create(model="base", prompt="Who?", max_tokens=2, temperature=0, extra_body={"context": _context(i)})
    assert len(ctx_live.server.contexts) == 3 and context_key(text) not in ctx_live.server.contexts._lru
    assert _metric(ctx_live, "softprompt_context_cache_evictions_total") >= 2


def test_the_admin_endpoint_registers_a_context_as_a_listed_prompt(ctx_live, compressor):
    text = _context(44)
    r = http.put(ctx_live.url + "/admin/contexts/harbor44", json={"context": text},
                  headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "prefix" and body["compressor"] == compressor.path.name and body["context_tokens"] > 4
    c = _client(ctx_live)
    assert "harbor44" in [m.id for m in c.models.list().data]
    named = c.completions.create(model="harbor44", prompt=QUESTIONS[0], max_tokens=8, temperature=0)
    fly = c.completions.create(model="base", prompt=QUESTIONS[0], max_tokens=8, temperature=0, extra_body={"context": text})
    assert named.choices[0].text == fly.choices[0].text
    art = ctx_live.server.registry.get("harbor44").artifact
    assert art.meta["compression"]["method"] == "amortized"
    want = compressor.prompt(text).export_tensors()
    assert all(bool((v == art.tensors[k]).all()) for k, v in want.items())
    # bad admin input: a bad name, an empty context, an unknown field, a user key
    h = {"Authorization": f"Bearer {ADMIN}"}
    assert _err(http.put(ctx_live.url + "/admin/contexts/bad%20name", json={"context": text}, headers=h), 400)["param"] == "name"
    assert _err(http.put(ctx_live.url + "/admin/contexts/x", json={"context": " "}, headers=h), 400)["param"] == "context"
    assert _err(http.put(ctx_live.url + "/admin/contexts/x", json={"context": text, "zap": 1}, headers=h), 400)["param"] == "zap"
    assert _err(http.put(ctx_live.url + "/admin/contexts/x", json={}, headers=h), 400)["param"] == "context"
    _err(http.put(ctx_live.url + "/admin/contexts/x", json={"context": text}, headers={"Authorization": f"Bearer {USER}"}), 403)
    assert "x" not in ctx_live.server.registry.names()


def _bad(c: openai.OpenAI, **kw) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(prompt="Who?", max_tokens=4, temperature=0, **kw)
    err = e.value.body
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def test_bad_contexts_answer_400_naming_the_field_and_leave_other_requests_alone(ctx_live, live, base, compressor):
    c = _client(ctx_live)
    long_text = " ".join(_context(i) for i in range(8))  # over the server's 200-token cap
    cases = [
        (dict(model="base", extra_body={"context": ""}), "context", "empty"),
        (dict(model="base", extra_body={"context": "   \n"}), "context", "empty"),
        (dict(model="base", extra_body={"context": long_text}), "context", "at most 200 tokens"),
        (dict(model="base", extra_body={"context": "hi"}), "context", "fewer than the compressor's 4 memory tokens"),
        (dict(model="base", extra_body={"context": 5}), "context", "valid string"),
        (dict(model="pt", extra_body={"context": _context(45)}), "model", "cannot be combined"),
    ]
    for kw, param, msg in cases:
        err = _bad(c, **kw)
        assert err["param"] == param and msg in err["message"], (kw, err)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="pt", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                  extra_body={"context": _context(45)})
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):  # a key that may not use the bare model may not send contexts
        ctx_live.client(NO_BASE).completions.create(model="base", prompt="Who?", max_tokens=2, extra_body={"context": _context(45)})
    # a server without a compressor
    err = _bad(live.client(), model="base", extra_body={"context": _context(45)})
    assert err["param"] == "context" and err["code"] == "no_compressor" and "--compressor" in err["message"]
    # bad and good contexts at once: every good answer is what it is alone
    text = _context(46)
    want = _ref(base, compressor, text, "Who?", 6)
    errors_before = _metric(ctx_live, "softprompt_context_errors_total")

    def one(i: int):
        ctx = [text, "hi", long_text, "", _context(47 + i % 3)][i % 5]
        try:
            return c.completions.create(model="base", prompt="Who?", max_tokens=6, temperature=0,
                                        extra_body={"context": ctx}).choices[0].text, ctx
        except openai.BadRequestError as e:
            return e.body["param"], ctx

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(20)))
    for out, ctx in got:
        if ctx == text:
            assert out == want
        elif ctx in ("hi", long_text, ""):
            assert out == "context"
        else:
            assert isinstance(out, str) and out != "context"
    assert _metric(ctx_live, "softprompt_context_errors_total") == errors_before  # refused before any forward
    assert c.completions.create(model="pt", prompt="x", max_tokens=3, temperature=0).choices[0].text is not None


def test_a_compressor_failure_is_its_requests_alone(ctx_live, base, compressor, monkeypatch):
    """An exception inside the compressor's forward answers that request (500) and the engine keeps
    serving: the next request with a context, and the others, are answered."""
    calls = {"n": 0}
    real = ctx_live.server.contexts.build

    def flaky(text):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(text)

    monkeypatch.setattr(ctx_live.server.contexts, "build", flaky)
    c = _client(ctx_live)
    with pytest.raises(openai.InternalServerError):
        c.completions.create(model="base", prompt="Who?", max_tokens=4, temperature=0, extra_body={"context": _context(70)})
    r = c.completions.create(model="base", prompt="Who?", max_tokens=4, temperature=0, extra_body={"context": _context(70)})
    assert r.choices[0].text == _ref(base, compressor, _context(70), "Who?", 4)
    assert _metric(ctx_live, "softprompt_context_errors_total") >= 1


def test_openapi_documents_contexts(ctx_live):
    doc = http.get(ctx_live.url + "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "context" in schema["properties"] and "--compressor" in schema["properties"]["context"]["description"]
    put = doc["paths"]["/admin/contexts/{name}"]["put"]
    assert put["requestBody"]["content"]["application/json"]["schema"]["required"] == ["context"]


def test_a_compressor_for_another_base_is_refused(other_tiny_dir, compressor):
    from softprompt.base_model import load_base
    from softprompt.errors import SoftPromptError

    other = load_base(str(other_tiny_dir), device="cpu")
    with pytest.raises(SoftPromptError, match="trained on base model"):
        ContextPrompts(compressor, other)
    with pytest.raises(SoftPromptError, match="trained on base model"):
        ContextPrompts.load(compressor.path, other)


def test_serve_cli_refuses_a_bad_compressor_with_one_line(tiny_dir, other_tiny_dir, compressor, tmp_path, capsys):
    from softprompt.cli import main

    (tmp_path / "p").mkdir()
    cases = [
        (["--model", str(other_tiny_dir), "--compressor", str(compressor.path)], "trained on base model"),
        (["--model", str(tiny_dir), "--compressor", str(tmp_path / "nothing")], "not a compressor"),
        (["--model", str(tiny_dir), "--compressor", str(compressor.path), "--engine", "vllm", "--upstream", "http://127.0.0.1:9"],
         "needs the native engine"),
        (["--model", str(tiny_dir), "--compressor", str(compressor.path), "--context-cache", "-1"], "--context-cache"),
    ]
    for extra, msg in cases:
        assert main(["serve", "--prompts", str(tmp_path / "p"), "--port", "1", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


@pytest.mark.slow
def test_smollm2_serves_contexts_with_the_shipped_compressor(tmp_path):
    """The real thing: build_server as `softprompt serve --compressor examples/compressors/smollm2-kv16
    --precision fp32` does (weights prepacked, on the server's own copy of the model); a request's context gives the tokens of the same context
    compressed with the Python API and served by name. (In bf16 the two can differ after a few tokens:
    the second request reads the prefix from the KV-prefix cache, the first computed it in its own
    prefill, and bf16 rounds those two differently; the prompts' tensors are identical.)"""
    from conftest import REPO

    from softprompt.serve.app import build_server

    (tmp_path / "p").mkdir()
    server = build_server("smollm2", tmp_path / "p", compressor=REPO / "examples" / "compressors" / "smollm2-kv16",
                          watch_interval=None, max_batch=4, precision="fp32")
    text = ("The harbor town of Vell sits between two cliffs. Its lighthouse was built in 1807 by Ada Moreau, who also "
            "founded the school of Vell. Fishing boats leave at four in the morning and return before noon.")
    with LiveServer(server) as s:
        server.contexts.compressor.compress(text, tmp_path / "p" / "vell")
        server.registry.scan()
        c = s.client(None)
        fly = c.completions.create(model="base", prompt="Who built the lighthouse?", max_tokens=12, temperature=0,
                                   extra_body={"context": text})
        named = c.completions.create(model="vell", prompt="Who built the lighthouse?", max_tokens=12, temperature=0)
        assert fly.choices[0].text == named.choices[0].text and fly.choices[0].text.strip()
        assert _metric(s, "softprompt_context_compressions_total") == 1
