"""Starting and stopping a local vLLM server (scripts/serve_vllm.sh, from .venv-vllm) for tests and
benchmarks: its own process group, so its engine and worker processes stop with it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def start_vllm(port: int, log: Path, **env: str) -> subprocess.Popen:
    """scripts/serve_vllm.sh on 127.0.0.1:``port`` (extra environment: MAX_MODEL_LEN, EAGER, BLOCK_SIZE, ...)."""
    full = {**os.environ, "PORT": str(port), "SOFTPROMPT_PYTHON": sys.executable, **env}
    with open(log, "w") as out:
        return subprocess.Popen(["bash", str(REPO / "scripts" / "serve_vllm.sh")], cwd=REPO, env=full, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 600, what: str = "vLLM") -> None:
    """Poll ``url``/health until it answers 200; raise with the tail of ``log`` if ``proc`` exits or time runs out."""
    import httpx

    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n" + log.read_text()[-3000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{what} did not start in {timeout:.0f} s:\n" + log.read_text()[-3000:])
        time.sleep(0.5)


def stop_vllm(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever of it is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
