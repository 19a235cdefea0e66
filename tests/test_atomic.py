"""Directory swaps (softprompt.atomic.atomic_replace_dir, used for checkpoints and admin uploads) never
lose both the old and the new version: a process killed (os._exit, no cleanup runs) at each point of
the swap leaves a complete version under the target's name, or one that recover_dir puts back."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from softprompt.atomic import atomic_replace_dir, recover_dir
from softprompt.errors import SoftPromptError
from softprompt.train import require_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _version(d: Path) -> dict[str, str]:
    return {f.name: f.read_text() for f in sorted(d.iterdir())}


def _crash_during_swap(target: Path, at: str, exchange: bool = True) -> subprocess.CompletedProcess:
    """Swap a new version ({a: new, b: new}) in for ``target`` in a child process that dies with
    os._exit at ``at``: "build" (half the new version written), "rename" (the exchange done, or the
    first rename of the two-rename fallback) or "cleanup" (the swap done, the old version not yet
    removed). ``exchange=False``: as on a system without renameat2."""
    code = textwrap.dedent(f"""
        import os, shutil
        from pathlib import Path
        import softprompt.atomic as atomic
        at, target = {at!r}, Path({str(target)!r})
        real_exchange = atomic._exchange
        def exchange(a, b):
            if not {exchange!r}:
                return False
            done = real_exchange(a, b)
            if at == "rename":
                os._exit(9)
            return done
        atomic._exchange = exchange
        real_replace = os.replace
        calls = []
        def replace(a, b):
            real_replace(a, b)
            calls.append(b)
            if at == "rename" and len(calls) == 1:
                os._exit(9)
        os.replace = replace
        shutil.rmtree = lambda *a, **k: os._exit(9) if at == "cleanup" else None
        def build(tmp):
            (tmp / "a").write_text("new")
            if at == "build":
                os._exit(9)
            (tmp / "b").write_text("new")
        atomic.atomic_replace_dir(build, target)
        os._exit(0)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})


def _old(tmp_path: Path) -> Path:
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "a").write_text("old")
    (target / "b").write_text("old")
    return target


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("at", ["build", "rename", "cleanup"])
def test_a_kill_at_any_point_of_the_swap_keeps_a_complete_version(tmp_path, at, exchange):
    target = _old(tmp_path)
    res = _crash_during_swap(target, at, exchange)
    assert res.returncode == 9, res.stderr
    recover_dir(target)
    got = _version(target)
    assert got in ({"a": "old", "b": "old"}, {"a": "new", "b": "new"}), got
    if at == "build":
        assert got == {"a": "old", "b": "old"}
    if at == "cleanup":
        assert got == {"a": "new", "b": "new"}
    if exchange and at != "build":
        assert got == {"a": "new", "b": "new"}  # one step: the target never stops existing
    # The next swap succeeds and leaves no previous version behind under the reserved name.
    atomic_replace_dir(lambda tmp: (tmp / "a").write_text("next"), target)
    assert _version(target) == {"a": "next"} and not (tmp_path / ".checkpoint.old").exists()


def test_the_two_rename_fallback_without_recovery_would_lose_the_target(tmp_path):
    """The window recover_dir closes: after the first rename only the previous version exists."""
    target = _old(tmp_path)
    assert _crash_during_swap(target, "rename", exchange=False).returncode == 9
    assert not target.exists() and _version(tmp_path / ".checkpoint.old") == {"a": "old", "b": "old"}
    (target.parent / ".checkpoint.old" / "state.json").write_text("{}")
    assert require_checkpoint(tmp_path) == target and (target / "state.json").exists()  # resume finds it


def test_require_checkpoint_refuses_an_empty_directory(tmp_path):
    with pytest.raises(SoftPromptError, match="no checkpoint"):
        require_checkpoint(tmp_path)
