"""SOFTPROMPT_STRICT_TESTS=1 (CI) turns skips for missing optional components into failures: need(),
need_module() at module level, and any other skip (a skipif marker, pytest.skip)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

CASES = '''
import pytest
from strict import need, need_module

def test_need():
    need(False, "the thing is missing")

@pytest.mark.skipif(True, reason="no compiler")
def test_skipif_marker():
    pass

def test_plain_skip():
    pytest.skip("no data")

def test_present():
    need(True, "never shown")

@pytest.mark.xfail(reason="expected", strict=True)
def test_xfail_is_left_alone():
    assert False
'''


def _run(tmp_path: Path, strict: bool, body: str = CASES) -> subprocess.CompletedProcess:
    (tmp_path / "test_cases.py").write_text(body)
    (tmp_path / "conftest.py").write_text("from strict import pytest_runtest_makereport  # noqa: F401\n")
    env = {k: v for k, v in os.environ.items() if k != "SOFTPROMPT_STRICT_TESTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    if strict:
        env["SOFTPROMPT_STRICT_TESTS"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def test_skips_pass_without_the_flag(tmp_path):
    res = _run(tmp_path, strict=False)
    assert res.returncode == 0, res.stdout
    assert "3 skipped" in res.stdout and "1 passed" in res.stdout and "1 xfailed" in res.stdout


def test_skips_fail_under_the_flag(tmp_path):
    res = _run(tmp_path, strict=True)
    assert res.returncode == 1, res.stdout
    # A skipif marker skips at setup, so its failure is reported as an error of the setup.
    assert "2 failed" in res.stdout and "1 error" in res.stdout and "1 passed" in res.stdout, res.stdout
    assert "1 xfailed" in res.stdout
    assert "the thing is missing" in res.stdout and "no compiler" in res.stdout and "no data" in res.stdout


@pytest.mark.parametrize("strict", [False, True])
def test_a_missing_module_at_module_level(tmp_path, strict):
    res = _run(tmp_path, strict, 'from strict import need_module\nmod = need_module("no_such_module_x1")\n\n'
                                 'def test_uses_it():\n    pass\n')
    if strict:
        assert res.returncode == 2 and "1 error" in res.stdout and "no_such_module_x1" in res.stdout, res.stdout
    else:
        assert res.returncode in (0, 5) and "1 skipped" in res.stdout, res.stdout  # 5: nothing else was collected


def test_ci_sets_the_flag_and_runs_the_test_script():
    ci = (HERE.parent / ".ci" / "run").read_text()
    assert "SOFTPROMPT_STRICT_TESTS=1" in ci and "scripts/test.sh" in ci
