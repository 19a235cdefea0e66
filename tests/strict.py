"""Skips that CI does not allow: with ``SOFTPROMPT_STRICT_TESTS=1`` (set by .ci/run) a test that
would be skipped because an optional component is missing (peft, ../shared/data, a C compiler for
inductor, the accelerate launcher, oneDNN, ...) fails instead, so CI cannot pass with whole areas
untested. Tests say what they need with :func:`need` and :func:`need_module`; the report hook below
turns any other skip (a ``skipif`` marker, ``pytest.skip``) into a failure too. conftest.py imports
the hooks from here."""
from __future__ import annotations

import importlib
import os

import pytest

ENV = "SOFTPROMPT_STRICT_TESTS"


def strict() -> bool:
    return os.environ.get(ENV) == "1"


def need(present: bool, what: str) -> None:
    """Skip the test when ``present`` is false (``what`` says what is missing); fail it under
    ``SOFTPROMPT_STRICT_TESTS=1``."""
    if present:
        return
    if strict():
        pytest.fail(f"{ENV}=1: {what} (missing optional components fail the run instead of skipping)", pytrace=False)
    pytest.skip(what, allow_module_level=True)


def need_module(name: str):
    """``pytest.importorskip(name)``, failing under ``SOFTPROMPT_STRICT_TESTS=1`` (at module level,
    as a collection error)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        need(False, f"the optional module {name!r} is not installed ({e})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if strict() and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"{ENV}=1: this test was skipped ({reason}); missing optional components fail the run"


def inductor_missing() -> str | None:
    """Why torch.compile's default (inductor) backend cannot build CPU kernels here, or None."""
    import torch

    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - no C++ compiler found: inductor cannot build its CPU kernels
        return f"inductor has no C++ compiler: {e}"
    return None
