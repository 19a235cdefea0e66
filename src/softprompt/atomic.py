"""Atomic file writes: a temp file in the same directory, fsync, then rename; directories are swapped
whole (:func:`atomic_replace_dir`), so the target path always holds a complete old or new version."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


@contextmanager
def _temp_beside(path: Path):
    """A temp file path next to ``path``; renamed over it (after fsync) if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with _temp_beside(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with _temp_beside(Path(path)) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or
    the file system cannot (then the caller falls back to two renames)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _previous(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_dir(target: str | Path) -> Path:
    """Finish a swap that a crash interrupted: where ``target`` is missing and its previous version
    (``.NAME.old``) is there, put the previous version back; where both are there, the target is
    complete (it is only ever renamed in whole) and the previous version is removed. Returns ``target``."""
    target = Path(target)
    old = _previous(target)
    if old.is_dir():
        if not target.exists():
            os.replace(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)
    return target


def atomic_replace_dir(build, target: str | Path) -> None:
    """Call ``build(tmpdir)`` to fill a fresh directory, then swap it in for ``target``.

    The old version is kept until the new one is complete and in place: the two are exchanged in one
    step where the system can (Linux), so ``target`` never stops existing; elsewhere the old version
    is renamed to ``.NAME.old`` first and :func:`recover_dir` puts it back if a crash comes between
    the two renames. Either way a kill at any moment leaves a complete old or new version."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if target.exists() and not target.is_symlink() and _exchange(tmp, target):
            _fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
            return
        old = None
        if target.exists():
            old = _previous(target)
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
