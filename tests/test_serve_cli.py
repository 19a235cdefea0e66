"""`softprompt serve` on the command line: --hash-key, refused arguments, and the server end to end
in its own process (engine in the main thread, stopped by SIGTERM)."""
from __future__ import annotations

import subprocess
import sys
import time

import openai
from serve_helpers import TEXTS, _cli, _free_port, http, reference

from softprompt.base_model import load_base
from softprompt.generate import SamplingParams
from softprompt.serve.auth import hash_key
from softprompt.serve.registry import Registry


def test_cli_hash_key_and_bad_arguments(tmp_path):
    r = _cli("serve", "--hash-key", "sk-x")
    assert r.returncode == 0 and r.stdout.strip() == hash_key("sk-x")
    r = _cli("serve", "--model", "smollm2")
    assert r.returncode == 2 and "--prompts" in r.stderr
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys:\n  - name: a\n    sha256: plaintext-key\n    prompts: [x]\n")
    r = _cli("serve", "--prompts", str(tmp_path), "--keys", str(bad))
    assert r.returncode == 2 and "sha256" in r.stderr and "Traceback" not in r.stderr


def test_cli_serves_with_the_engine_in_the_main_thread_and_stops_on_sigterm(tiny_dir, prompts_dir):
    """`softprompt serve` end to end in its own process: the engine loop runs in the main thread and
    uvicorn in a thread; --studio serves the studio; a streamed completion equals generate alone; SIGTERM
    shuts down cleanly."""
    import signal

    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "softprompt", "serve", "--model", str(tiny_dir), "--prompts", str(prompts_dir),
                             "--port", str(port), "--max-batch", "4", "--max-batch-tokens", "8", "--watch-interval", "0", "--studio"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if http.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not start"
            time.sleep(0.2)
        assert "softprompt studio" in http.get(f"http://127.0.0.1:{port}/studio/", timeout=10).text  # --studio
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        text = "".join(c.choices[0].text for c in client.completions.create(model="pt", prompt=TEXTS[3], max_tokens=6,
                                                                            temperature=0, stream=True) if c.choices)
        base = load_base(str(tiny_dir), device="cpu")
        registry = Registry(base, prompts_dir)
        registry.scan()
        assert text == reference(base, registry, "pt", TEXTS[3], SamplingParams(max_new_tokens=6))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]


def test_cli_refuses_a_token_budget_below_the_batch(tmp_path):
    r = _cli("serve", "--prompts", str(tmp_path), "--max-batch", "8", "--max-batch-tokens", "4")
    assert r.returncode == 2 and "--max-batch-tokens" in r.stderr and "Traceback" not in r.stderr


def test_cli_refuses_compile_with_the_vllm_engine(tmp_path, capsys):
    from softprompt.cli import main

    assert main(["serve", "--prompts", str(tmp_path), "--compile", "--engine", "vllm", "--upstream", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile compiles the native engine's decode step" in err[0], err
