"""Tenants: API keys from a YAML file, stored as sha256 hashes, each allowed a set of prompts.

::

    keys:
      - name: acme                 # the tenant (for logs)
        sha256: 9f86d0818...       # sha256 hex of the key (softprompt serve --hash-key KEY prints it)
        prompts: [sst2, trec, base]  # prompt names this key may use ("base": the bare model); "*": all
      - name: ops
        sha256: ...
        prompts: "*"
        admin: true                # may add, replace and remove prompts (only those of its list, if not "*")
        max_queued: 8              # optional: rows this key may have waiting (a request of n choices is n rows)
        max_running: 4             # optional: rows of this key in the running batch at once
"""
from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from softprompt.errors import SoftPromptError

_HEX = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    prompts: frozenset[str] | None  # None: every prompt
    admin: bool = False
    max_queued: int | None = None  # None: the server's default (--tenant-max-queued)
    max_running: int | None = None  # None: the server's default (--tenant-max-running)

    def may_use(self, prompt: str) -> bool:
        return self.prompts is None or prompt in self.prompts


OPEN = Tenant("anonymous", None, admin=False)


class Auth:
    """Looks up the tenant of a bearer key; with no key file every request is the open tenant."""

    def __init__(self, tenants: dict[str, Tenant] | None = None):
        self.tenants = tenants  # sha256 hex -> tenant; None: no authentication

    @property
    def enabled(self) -> bool:
        return self.tenants is not None

    @classmethod
    def from_file(cls, path: str | Path) -> "Auth":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text("utf-8"))
        except OSError as e:
            raise SoftPromptError(f"--keys {path}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise SoftPromptError(f"--keys {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise SoftPromptError(f"--keys {path}: expected a top-level 'keys' list with at least one entry")
        tenants: dict[str, Tenant] = {}
        for i, e in enumerate(entries):
            where = f"--keys {path}: entry {i + 1}"
            if not isinstance(e, dict):
                raise SoftPromptError(f"{where}: expected a mapping with name, sha256, prompts")
            digest = str(e.get("sha256", "")).lower()
            if not _HEX.match(digest):
                raise SoftPromptError(f"{where}: 'sha256' must be 64 hex digits (the key's sha256, never the key itself)")
            prompts = e.get("prompts", [])
            if prompts == "*":
                allowed = None
            elif isinstance(prompts, list) and all(isinstance(p, str) for p in prompts):
                allowed = frozenset(prompts)
            else:
                raise SoftPromptError(f"{where}: 'prompts' must be a list of prompt names or \"*\"")
            if digest in tenants:
                raise SoftPromptError(f"{where}: the same key hash appears twice")
            caps = {}
            for cap in ("max_queued", "max_running"):
                v = e.get(cap)
                if v is not None and (type(v) is not int or v < 1):
                    raise SoftPromptError(f"{where}: '{cap}' must be a positive integer")
                caps[cap] = v
            admin = e.get("admin", False)
            if not isinstance(admin, bool):
                raise SoftPromptError(f"{where}: 'admin' must be true or false")
            unknown = sorted(set(e) - {"name", "sha256", "prompts", "admin", "max_queued", "max_running"})
            if unknown:
                raise SoftPromptError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}")
            tenants[digest] = Tenant(str(e.get("name", f"tenant{i + 1}")), allowed, admin, **caps)
        return cls(tenants)

    def tenant(self, authorization: str | None) -> Tenant | None:
        """The tenant for an ``Authorization: Bearer KEY`` header; None when the key is missing or wrong."""
        if self.tenants is None:
            return OPEN
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        digest = hash_key(authorization[7:].strip())
        for known, tenant in self.tenants.items():
            if hmac.compare_digest(known, digest):
                return tenant
        return None
