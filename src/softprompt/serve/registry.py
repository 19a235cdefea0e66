"""The prompt registry: artifacts by name (a subdirectory of the prompts directory), validated against
the base model at load, kept under a memory budget with LRU eviction, and kept in step with the
directory by polling it (added, replaced and removed prompts are picked up while serving).

A prompt that fails to load is refused and logged; the others keep serving. A replacement that fails
to load leaves the previous version in service.
"""
from __future__ import annotations

import logging
import re
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from softprompt.artifact import META, TENSORS, PromptArtifact, load_artifact
from softprompt.atomic import atomic_replace_dir, atomic_write_bytes, atomic_write_json, recover_dir
from softprompt.base_model import BaseModel
from softprompt.data.examples import Example
from softprompt.encoding import PromptFormat
from softprompt.errors import SoftPromptError
from softprompt.kv_prefix import common_prefix_len
from softprompt.serve.kv_cache import content_hash

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
BASE_NAME = "base"


def _signature(path: Path) -> tuple | None:
    try:
        return tuple((f, (path / f).stat().st_mtime_ns, (path / f).stat().st_size) for f in (META, TENSORS))
    except OSError:
        return None


@dataclass
class LoadedPrompt:
    """A servable prompt: the artifact, its format, content hash and the token ids of its prefix."""

    name: str
    artifact: PromptArtifact
    fmt: PromptFormat
    hash: str
    prefix_ids: list[int]
    field: str
    nbytes: int

    @property
    def prompt(self):
        return self.artifact.prompt

    def example(self, text: str, fields: dict[str, str] | None = None) -> Example:
        return Example({**(fields or {}), self.field: text})


@dataclass
class PromptEntry:
    name: str
    path: Path
    signature: tuple | None = None
    loaded: LoadedPrompt | None = None
    hash: str | None = None
    error: str | None = None
    kind: str | None = None


def check_contained(path: Path, root: Path) -> None:
    """Refuse an artifact directory, or a file in it, that is a link leading out of ``root``."""
    root = root.resolve()
    for p in (path, path / META, path / TENSORS):
        if p.is_symlink() or p == path:
            target = p.resolve()
            if target != root and root not in target.parents:
                raise SoftPromptError(f"{p}: a symbolic link out of the prompts directory (to {target}); refused")


def prepare(name: str, path: Path, base: BaseModel, root: Path | None = None) -> LoadedPrompt:
    """Load and validate one artifact for serving (raises SoftPromptError with the reason); with
    ``root``, links leading out of it are refused before anything is read."""
    if root is not None:
        check_contained(path, root)
    return prepare_artifact(name, load_artifact(path, base=base), base, str(path))


def prepare_artifact(name: str, art: PromptArtifact, base: BaseModel, where: str | None = None) -> LoadedPrompt:
    """A loaded artifact (from disk, or built in memory: a compressed context) made servable."""
    fmt = art.prompt_format(base)
    if not art.template.fields:
        raise SoftPromptError(f"{where or name}: the template has no field to put the request text in")
    first = art.template.fields[0]
    # The prefix is what every request shares: the tokens before the first field's text. Two
    # different probe texts diverge exactly there.
    probes = [fmt.prompt_ids(Example({f: p for f in art.template.fields})) for p in ("a", "b")]
    prefix = probes[0][:common_prefix_len(probes)]
    nbytes = sum(t.numel() * t.element_size() for t in art.prompt.export_tensors().values())
    h = content_hash(art.prompt, art.template.to_string(), fmt.describe())
    return LoadedPrompt(name, art, fmt, h, prefix, first, nbytes)


class Registry:
    """Prompts by name from ``directory``; thread-safe."""

    def __init__(self, base: BaseModel, directory: str | Path, budget_bytes: int = 256 * 2**20,
                 on_change=None):
        self.base, self.dir, self.budget = base, Path(directory), budget_bytes
        if not self.dir.is_dir():
            raise SoftPromptError(f"--prompts {self.dir}: not a directory")
        self.entries: dict[str, PromptEntry] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_change = on_change  # called with (name, old_hash) when a prompt is replaced or removed
        self.loads = self.evictions = 0

    # -- scanning ----------------------------------------------------------------------------------
    def scan(self) -> None:
        """Bring the registry in step with the directory."""
        seen = set()
        for sub in list(self.dir.glob(".*.old")):  # a swap a crash interrupted: put the previous version back
            recover_dir(sub.with_name(sub.name[1:-4]))
        for sub in sorted(self.dir.iterdir()) if self.dir.is_dir() else []:
            if not sub.is_dir() or sub.name.startswith("."):
                continue
            name = sub.name
            if not NAME.match(name) or name == BASE_NAME:
                log.warning("prompt directory %s refused: invalid name (letters, digits, . _ -; not 'base')", sub)
                continue
            seen.add(name)
            sig = _signature(sub)
            with self._lock:
                entry = self.entries.get(name)
                if entry is not None and entry.signature == sig:
                    continue
            self._load(name, sub, sig)
        with self._lock:
            for name in [n for n in self.entries if n not in seen]:
                self._drop(name)
                log.info("prompt %r removed (its directory is gone)", name)

    def _load(self, name: str, path: Path, sig: tuple | None) -> PromptEntry:
        with self._lock:
            entry = self.entries.get(name) or PromptEntry(name, path)
            old_hash = entry.hash
        try:
            loaded = prepare(name, path, self.base, self.dir)
        except Exception as e:  # noqa: BLE001 - a bad artifact is refused, never fatal
            with self._lock:
                entry.signature, entry.error = sig, str(e)
                if entry.loaded is None and entry.hash is None:
                    self.entries[name] = entry
            log.error("prompt %r refused: %s%s", name, e, " (the previous version stays in service)" if old_hash else "")
            return entry
        with self._lock:
            entry.signature, entry.error, entry.hash, entry.kind = sig, None, loaded.hash, loaded.artifact.kind
            entry.loaded = loaded
            self.entries[name] = entry
            self._touch(name)
            self.loads += 1
            self._evict()
        log.info("prompt %r loaded (%s, %d virtual tokens, hash %s)", name, loaded.artifact.kind,
                 loaded.prompt.n_virtual, loaded.hash[:12])
        if old_hash and old_hash != loaded.hash and self.on_change:
            self.on_change(name, old_hash)
        return entry

    def _drop(self, name: str) -> None:
        entry = self.entries.pop(name, None)
        self._lru.pop(name, None)
        if entry is not None and entry.hash and self.on_change:
            self.on_change(name, entry.hash)

    # -- memory budget -----------------------------------------------------------------------------
    def _touch(self, name: str) -> None:
        self._lru[name] = None
        self._lru.move_to_end(name)

    @property
    def nbytes(self) -> int:
        return sum(e.loaded.nbytes for e in self.entries.values() if e.loaded is not None)

    def _evict(self) -> None:
        while self.nbytes > self.budget and len(self._lru) > 1:
            name, _ = self._lru.popitem(last=False)
            entry = self.entries.get(name)
            if entry is not None and entry.loaded is not None:
                entry.loaded = None
                self.evictions += 1
                log.info("prompt %r evicted from memory (budget %d bytes)", name, self.budget)

    # -- lookup ------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, e in self.entries.items() if e.hash is not None)

    def get(self, name: str) -> LoadedPrompt | None:
        """The servable prompt, reloaded from disk if it was evicted; None if unknown or refused."""
        with self._lock:
            entry = self.entries.get(name)
            if entry is None or entry.hash is None:
                return None
            if entry.loaded is not None:
                self._touch(name)
                return entry.loaded
        try:
            loaded = prepare(name, entry.path, self.base, self.dir)
        except Exception as e:  # noqa: BLE001
            log.error("prompt %r could not be reloaded: %s", name, e)
            return None
        with self._lock:
            entry.loaded = loaded
            if loaded.hash != entry.hash and self.on_change:
                self.on_change(name, entry.hash)
            entry.hash = loaded.hash
            self._touch(name)
            self.loads += 1
            self._evict()
        return loaded

    def status(self) -> list[dict]:
        with self._lock:
            return [{"name": e.name, "kind": e.kind, "hash": e.hash, "loaded": e.loaded is not None,
                     "error": e.error} for _, e in sorted(self.entries.items())]

    # -- administration ----------------------------------------------------------------------------
    def install(self, name: str, meta: dict, tensors: bytes) -> PromptEntry:
        """Write an artifact into the prompts directory (atomically) and load it."""
        if not NAME.match(name) or name == BASE_NAME:
            raise SoftPromptError(f"invalid prompt name {name!r} (letters, digits, . _ -; not 'base')")
        target = self.dir / name

        def build(tmp: Path) -> None:
            atomic_write_bytes(tmp / TENSORS, tensors)
            atomic_write_json(tmp / META, meta)
            prepare(name, tmp, self.base)  # refuse before anything in service changes

        atomic_replace_dir(build, target)
        return self._load(name, target, _signature(target))

    def remove(self, name: str) -> bool:
        with self._lock:
            entry = self.entries.get(name)
            if entry is None:
                return False
            shutil.rmtree(entry.path, ignore_errors=True)
            self._drop(name)
        log.info("prompt %r removed by the admin endpoint", name)
        return True

    # -- watching ----------------------------------------------------------------------------------
    def watch(self, interval: float = 1.0) -> None:
        """Poll the directory every ``interval`` seconds in a daemon thread; a no-op while that thread
        runs (a second ``Server.start``, as ASGI clients that run the app's lifespan make, would
        otherwise start a second watcher scanning the same directory)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.scan()
                except Exception:  # noqa: BLE001 - the watcher must survive anything on disk
                    log.exception("scanning %s failed", self.dir)

        self._thread = threading.Thread(target=loop, name="softprompt-registry-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
