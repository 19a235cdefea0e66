"""The environment is the locked one: scripts/bootstrap.sh installs requirements/lock.txt, and the
upper bounds in pyproject.toml are the locked (tested) versions."""
from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def locked() -> dict[str, Version]:
    out = {}
    for line in (REPO / "requirements" / "lock.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[canonicalize_name(name)] = Version(version)
    return out


def test_installed_versions_are_the_locked_ones():
    lock = locked()
    assert {"torch", "transformers", "peft", "fastapi"} <= lock.keys()
    off = {}
    for name, want in lock.items():
        try:
            have = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            off[name] = (str(want), None)
            continue
        if Version(have.base_version) != want and have != want:
            off[name] = (str(want), str(have))
    assert not off, f"installed packages differ from requirements/lock.txt (run scripts/bootstrap.sh): {off}"


def test_pyproject_upper_bounds_are_the_locked_versions():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [e for e in project["optional-dependencies"] if e != "embedded"]  # embedded: installed with --no-deps
    reqs = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    lock = locked()
    for text in reqs:
        req = Requirement(text)
        uppers = [s.version for s in req.specifier if s.operator == "<="]
        assert uppers, f"{text}: no tested upper bound"
        assert Version(uppers[0]) == lock[canonicalize_name(req.name)], f"{text}: bound is not the locked version"


def test_lock_pins_every_line():
    for line in (REPO / "requirements" / "lock.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.]*", line), line
