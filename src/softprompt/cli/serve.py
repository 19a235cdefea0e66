"""softprompt serve"""
from __future__ import annotations

import argparse
import logging

from softprompt.cli.common import add_model_args


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve many prompts on one frozen model (OpenAI-compatible API)",
                       description="Serve the prompt artifacts in a directory (one subdirectory each, named by its "
                                   "subdirectory) over an OpenAI-compatible HTTP API, with continuous batching and a "
                                   "KV-prefix cache. See docs/serving.md.")
    add_model_args(p)
    for action in p._actions:
        if action.dest == "precision" and action.choices:
            action.help = ("weights' precision (bf16 weights are converted once at load; outputs may differ slightly "
                           "from fp32). auto (default): bf16 where the hardware runs it natively, else fp32")
    p.add_argument("--prompts", help="directory of prompt artifact directories (watched for changes)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keys", help="YAML file of API keys (sha256 hashes) and the prompts each may use; "
                                  "without it the API is open and the admin endpoints are off")
    p.add_argument("--hash-key", metavar="KEY", help="print the sha256 of KEY for the keys file, and exit")
    p.add_argument("--max-batch", type=int, default=16, help="rows in one forward (default: 16)")
    p.add_argument("--max-batch-tokens", type=int, default=512,
                   help="new tokens in one forward: decoding rows plus prompt chunks (default: 512); a longer "
                        "prompt is prefilled in chunks while the other rows keep decoding")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default: 64)")
    p.add_argument("--max-tokens", type=int, default=512, help="cap on a request's max_tokens (default: 512)")
    p.add_argument("--max-input-tokens", type=int, default=2048, help="cap on a prompt's length in tokens")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="cap on a request body (default: 1 MiB)")
    p.add_argument("--prompt-memory-mb", type=float, default=256, help="memory budget for loaded prompts (LRU)")
    p.add_argument("--cache-memory-mb", type=float, default=512, help="memory budget for the KV-prefix cache (LRU)")
    p.add_argument("--no-pack-weights", action="store_true",
                   help="keep the linear layers as they are (by default, on CPU, their weights are prepacked for oneDNN once "
                        "at load: about 2x faster forwards in fp32, same outputs)")
    p.add_argument("--no-prefix-cache", action="store_true", help="recompute every prompt's prefix per request")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice; 1 "
                   "is often faster on a machine shared with other busy processes)")
    p.add_argument("--watch-interval", type=float, default=1.0, help="seconds between directory scans (0: off)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softprompt.errors import SoftPromptError
    from softprompt.serve.auth import hash_key

    if args.hash_key is not None:
        print(hash_key(args.hash_key))
        return 0
    if not args.prompts:
        raise SoftPromptError("serve needs --prompts DIR (a directory of prompt artifacts)")
    if args.max_batch_tokens < args.max_batch:
        raise SoftPromptError("--max-batch-tokens must be at least --max-batch (every running row decodes a token "
                              "in each forward)")
    for flag in ("max_batch", "max_batch_tokens", "max_queue", "max_tokens", "max_input_tokens", "max_body_bytes", "port"):
        if getattr(args, flag) < 1:
            raise SoftPromptError(f"--{flag.replace('_', '-')} must be at least 1")
    import torch
    import uvicorn

    if args.threads is not None:
        if args.threads < 1:
            raise SoftPromptError("--threads must be at least 1")
        torch.set_num_threads(args.threads)

    from softprompt.base import load_base
    from softprompt.serve.api import Limits, Server, create_app
    from softprompt.serve.auth import Auth
    from softprompt.serve.registry import Registry

    logging.getLogger("softprompt").setLevel(logging.INFO)  # the server logs what it loads, refuses and packs
    auth = Auth.from_file(args.keys) if args.keys else Auth()
    base = load_base(args.model, device=args.device)
    from softprompt.precision import resolve_precision

    if resolve_precision(args.precision, base.device).bf16:  # converted once: autocast would re-cast every forward
        base.model.to(torch.bfloat16)
    if not args.no_pack_weights:
        from softprompt.serve.packed import pack_linears

        n = pack_linears(base.model)
        if n:
            logging.getLogger("softprompt.serve").info("%d linear layers prepacked for oneDNN", n)
    registry = Registry(base, args.prompts, budget_bytes=int(args.prompt_memory_mb * 2**20))
    limits = Limits(args.max_tokens, args.max_input_tokens, args.max_body_bytes)
    server = Server(base, registry, auth, limits, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_batch_tokens=args.max_batch_tokens,
                    prefix_cache=not args.no_prefix_cache, cache_bytes=int(args.cache_memory_mb * 2**20),
                    watch_interval=args.watch_interval or None)
    if not auth.enabled:
        logging.getLogger("softprompt.serve").warning("no --keys: the API is open to anyone who can reach %s:%d",
                                                      args.host, args.port)
    return _serve(server, uvicorn.Config(create_app(server), host=args.host, port=args.port,
                                         log_level="info" if args.verbose else "warning"))


def _serve(server, config) -> int:
    """HTTP in a thread, the engine in this (main) thread: the thread that loaded the model keeps
    torch's CPU workers to itself (see Engine.run)."""
    import signal
    import threading

    import uvicorn

    from softprompt.errors import SoftPromptError

    server.engine_thread = False
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, name="softprompt-http", daemon=True)

    def on_signal(signum, frame) -> None:
        web.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    thread.start()
    try:
        server.engine.run(should_stop=lambda: web.should_exit or not thread.is_alive())
    finally:
        web.should_exit = True
        thread.join(timeout=30)
    if not web.started:
        raise SoftPromptError(f"the HTTP server did not start on {config.host}:{config.port} (see the log above)")
    return 0
