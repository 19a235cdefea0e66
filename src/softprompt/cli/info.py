"""softprompt info"""
from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a prompt artifact", description="Describe a prompt artifact.")
    p.add_argument("prompt", help="prompt artifact directory")
    p.add_argument("--json", action="store_true", help="print prompt.json as is")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from softprompt.artifact import TENSORS, read_meta

    meta = read_meta(args.prompt)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    fp = meta["base_model"]
    rows = [("kind", meta["kind"]), ("kind config", json.dumps(meta.get("kind_config", {}))), ("template", meta["template"]),
            ("virtual tokens", meta["n_virtual"]),
            ("hidden size", meta["hidden_size"]), ("init", meta.get("init")),
            ("base model", f"{fp.get('id')} ({fp.get('model_type')}, vocab {fp.get('vocab_size')}, embedding sha256 {fp.get('embedding_sha256')})"),
            ("chat template", meta.get("format", {}).get("chat")), ("softprompt version", meta.get("softprompt_version")),
            ("created", meta.get("created"))]
    try:
        with safe_open(f"{args.prompt}/{TENSORS}", "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        rows.append(("tensors", ", ".join(f"{k} {list(v)}" for k, v in shapes.items())))
        import math
        rows.append(("stored parameters", sum(math.prod(v) for v in shapes.values())))
    except Exception as e:  # noqa: BLE001 - report, do not fail
        rows.append(("tensors", f"unreadable: {e}"))
    m = meta.get("metrics") or {}
    if m:
        rows.append(("steps", m.get("steps")))
        rows.append(("train loss", f"{m.get('first_train_loss')} -> {m.get('final_train_loss')}"))
        if m.get("best"):
            rows.append(("best dev", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m["best"].items())))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
