"""Read-only views of the prompts a key may use, for the studio (docs/studio.md): a summary row per
prompt, one prompt's details (metadata, training log, eval, compression and inspection reports,
nearest tokens), its training log alone (polled while ``softprompt train`` writes it), and two
prompts' similarity. Scoped like ``/v1/models``: a prompt the key may not use is a 404 identical to
a missing one."""
from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

from fastapi import APIRouter

from softprompt.artifact import META, TENSORS
from softprompt.serve.auth import Tenant
from softprompt.serve.errors import APIError, model_not_found
from softprompt.serve.registry import BASE_NAME
from softprompt.serve.routes.deps import ServerDep, TenantDep
from softprompt.serve.server import Server

router = APIRouter(prefix="/v1/prompts")

MAX_METRIC_POINTS = 5000  # the newest lines of metrics.jsonl beyond this are what a chart shows
NEAREST_K = 5


def _dir(server: Server, tenant: Tenant, name: str) -> Path:
    if name == BASE_NAME or not tenant.may_use(name) or name not in server.registry.names():
        raise model_not_found(name)
    return server.registry.entries[name].path


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def tensor_stats(path: Path) -> tuple[int, int]:
    """(parameters, bytes) of a safetensors file, from its header alone."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        params = 0
        for key, t in header.items():
            if key != "__metadata__":
                p = 1
                for d in t["shape"]:
                    p *= d
                params += p
        return params, path.stat().st_size
    except (OSError, ValueError, KeyError, struct.error):
        return 0, 0


def metrics_points(path: Path) -> list[dict]:
    """The training log's lines ({"type": "train" | "eval", "step", ...}); a torn last line is skipped."""
    text = _read_text(path) or ""
    out = []
    for line in text.splitlines()[-MAX_METRIC_POINTS:]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("type") in ("train", "eval"):
            out.append(rec)
    return out


def _best(meta: dict, points: list[dict]) -> dict | None:
    best = (meta.get("metrics") or {}).get("best")
    if best:
        return best
    evals = [p for p in points if p.get("type") == "eval"]
    if not evals:
        return None
    if any("dev_accuracy" in p for p in evals):
        return max(evals, key=lambda p: p.get("dev_accuracy", float("-inf")))
    return min(evals, key=lambda p: p.get("dev_loss", float("inf")))


def _task(meta: dict, path: Path) -> str | None:
    if (path / "compression_report.json").exists():
        return "context compression"
    labels = meta.get("labels")
    data = meta.get("data") or {}
    if not (labels or data.get("train")):
        return None
    what = f"classification ({len(labels)} labels)" if labels else "generation"
    if data.get("train"):
        what += f" on {Path(str(data['train'])).name}"
    return what


def summary(name: str, path: Path) -> dict:
    meta = _read_json(path / META) or {}
    points = metrics_points(path / "metrics.jsonl")
    params, nbytes = tensor_stats(path / TENSORS)
    steps = (meta.get("metrics") or {}).get("steps")
    if steps is None:
        steps = max((p.get("step", 0) for p in points if p.get("type") == "train"), default=None)
    best = _best(meta, points)
    metric = None
    if best:
        key = "dev_accuracy" if "dev_accuracy" in best else "dev_loss" if "dev_loss" in best else None
        metric = {"name": key, "value": best[key], "step": best.get("step")} if key else None
    mtimes = [f.stat().st_mtime for f in path.iterdir() if f.is_file()]
    return {"name": name, "kind": meta.get("kind"), "base": (meta.get("base_model") or {}).get("id"),
            "n_virtual": meta.get("n_virtual"), "params": params, "bytes": nbytes, "task": _task(meta, path),
            "steps": steps, "best_dev": metric, "modified": max(mtimes, default=None), "template": meta.get("template")}


def _nearest(server: Server, name: str) -> dict | None:
    """Nearest vocabulary tokens of each virtual token (computed on the served model's embedding)."""
    from softprompt.interpret.fidelity import input_vectors
    from softprompt.interpret.report import nearest_report

    lp = server.registry.get(name)
    if lp is None or not lp.prompt.input_level:
        return None
    emb = server.base.embedding.weight
    return nearest_report(input_vectors(lp.prompt).to(emb.device), emb, server.base.tokenizer, NEAREST_K)


def details(server: Server, name: str, path: Path) -> dict:
    inspect = _read_json(path / "inspect" / "inspect.json")
    out = {**summary(name, path), "meta": _read_json(path / META), "metrics": metrics_points(path / "metrics.jsonl"),
           "eval": _read_json(path / "eval.json") or _read_json(path / "eval" / "eval.json"),
           "eval_md": _read_text(path / "eval.md") or _read_text(path / "eval" / "eval.md"),
           "compression": _read_json(path / "compression_report.json"),
           "compression_md": _read_text(path / "compression_report.md"),
           "inspect": inspect, "harden": _read_json(path / "harden" / "harden.json")}
    out["nearest"] = (inspect or {}).get("nearest") or _nearest(server, name)
    return out


@router.get("")
async def list_prompts(server: ServerDep, tenant: TenantDep):
    names = [n for n in server.registry.names() if tenant.may_use(n)]
    paths = {n: server.registry.entries[n].path for n in names if n in server.registry.entries}
    rows = await asyncio.to_thread(lambda: [summary(n, p) for n, p in paths.items()])
    return {"object": "list", "data": rows}


@router.get("/{name}/details")
async def prompt_details(name: str, server: ServerDep, tenant: TenantDep):
    path = _dir(server, tenant, name)
    return await asyncio.to_thread(details, server, name, path)


@router.get("/{name}/metrics")
async def prompt_metrics(name: str, server: ServerDep, tenant: TenantDep):
    path = _dir(server, tenant, name)
    return {"name": name, "metrics": await asyncio.to_thread(metrics_points, path / "metrics.jsonl")}


@router.get("/{name}/similarity/{other}")
async def prompt_similarity(name: str, other: str, server: ServerDep, tenant: TenantDep):
    from softprompt.interpret.fidelity import input_vectors
    from softprompt.interpret.nearest import compare_prompts

    _dir(server, tenant, name)
    _dir(server, tenant, other)

    def run() -> dict:
        a, b = server.registry.get(name), server.registry.get(other)
        if a is None or b is None:
            raise model_not_found(name if a is None else other)
        if not (a.prompt.input_level and b.prompt.input_level):
            raise APIError(400, "similarity needs two prompts with input vectors (a prefix-tuning prompt acts on keys "
                                "and values)", param="name")
        return {"a": name, "b": other, **compare_prompts(input_vectors(a.prompt), input_vectors(b.prompt))}

    return await asyncio.to_thread(run)
