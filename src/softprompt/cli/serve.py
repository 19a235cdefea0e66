"""softprompt serve, and softprompt studio (the same server with the web studio on)"""
from __future__ import annotations

import argparse
import logging

from softprompt.cli.common import add_model_args


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve many prompts on one frozen model (OpenAI-compatible API)",
                       description="Serve the prompt artifacts in a directory (one subdirectory each, named by its "
                                   "subdirectory) over an OpenAI-compatible HTTP API, with continuous batching and a "
                                   "KV-prefix cache. See docs/serving.md.")
    _add_args(p)
    p.add_argument("--studio", action="store_true", help="also serve the web studio at /studio (docs/studio.md)")
    p.set_defaults(func=run)
    s = sub.add_parser("studio", help="browse, compare and try prompts in the browser (softprompt serve --studio)",
                       description="Start the server with the web studio at http://HOST:PORT/studio/: the prompts "
                                   "table, each prompt's training curves and reports, a side-by-side playground and a "
                                   "comparison of two prompts. Takes every option of softprompt serve. See docs/studio.md.")
    _add_args(s)
    s.set_defaults(func=run, studio=True)


def _add_args(p) -> None:
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
    p.add_argument("--tenant-max-queued", type=int, default=None,
                   help="rows one key may have waiting before its requests get 429 (default: no cap besides "
                        "--max-queue; keys.yaml's max_queued overrides it per key)")
    p.add_argument("--tenant-max-running", type=int, default=None,
                   help="rows of one key in the running batch at once (default: no cap besides --max-batch; "
                        "keys.yaml's max_running overrides it per key)")
    p.add_argument("--max-queue-wait", type=float, default=60.0,
                   help="seconds a request may wait for a batch slot before it gets 429 with Retry-After (default: 60; "
                        "0: as long as it takes)")
    p.add_argument("--max-tokens", type=int, default=512, help="cap on a request's max_tokens (default: 512)")
    p.add_argument("--max-input-tokens", type=int, default=2048, help="cap on a prompt's length in tokens")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="cap on a request body (default: 1 MiB)")
    p.add_argument("--prompt-memory-mb", type=float, default=256, help="memory budget for loaded prompts (LRU)")
    p.add_argument("--cache-memory-mb", type=float, default=512, help="memory budget for the KV-prefix cache (LRU)")
    p.add_argument("--no-pack-weights", action="store_true",
                   help="keep the linear layers as they are (by default, on CPU, their weights are prepacked for oneDNN once "
                        "at load: about 2x faster forwards in fp32, same outputs)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (Llama-family models; about a minute more at start-up, "
                        "then faster decoding; logits within about 1e-4 of the eager step's, docs/serving.md)")
    p.add_argument("--no-prefix-cache", action="store_true", help="recompute every prompt's prefix per request")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice; 1 "
                   "is often faster on a machine shared with other busy processes)")
    p.add_argument("--engine", choices=["native", "vllm"], default="native",
                   help="native (default): generate here, on our engine; vllm: keep this API (keys, registry, metrics, "
                        "streaming) and forward generation to the vLLM servers given by --upstream, as prompt embeddings "
                        "(only the model's tokenizer and embedding matrix are loaded here)")
    p.add_argument("--upstream", action="append", default=[], metavar="URL",
                   help="with --engine vllm: a vLLM server started with --enable-prompt-embeds (repeat for several: "
                        "least-loaded with health checks and failover)")
    p.add_argument("--upstream-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="with --engine vllm: dtype of the prompt embeddings sent (auto: the checkpoint's, as vLLM's "
                        "--dtype auto; give the upstream's --dtype if it differs)")
    p.add_argument("--upstream-policy", choices=["least-loaded", "round-robin"], default="least-loaded")
    p.add_argument("--watch-interval", type=float, default=1.0, help="seconds between directory scans (0: off)")
    c = p.add_argument_group("contexts (an amortized compressor, docs/compressor.md)")
    c.add_argument("--compressor", metavar="DIR", help="an amortized compressor for this base model (softprompt compressor "
                   "train): requests may then carry a 'context' compressed on the fly into their prompt, and "
                   "PUT /admin/contexts/NAME registers a compressed context as a prompt")
    c.add_argument("--context-cache", type=int, default=64, help="compressed contexts kept in memory, LRU by content hash "
                   "(default: 64; 0: compress every request's context)")
    c.add_argument("--max-context-tokens", type=int, default=2048, help="cap on a context's length in tokens (default: 2048)")


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
    for flag in ("tenant_max_queued", "tenant_max_running"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SoftPromptError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.context_cache < 0 or args.max_context_tokens < 1:
        raise SoftPromptError("--context-cache must be >= 0 and --max-context-tokens >= 1")
    if args.compressor and (args.engine == "vllm" or args.upstream):
        raise SoftPromptError("--compressor needs the native engine: the compressor runs the whole model, and --engine vllm "
                              "loads only its embedding matrix here")
    if args.compile and (args.engine == "vllm" or args.upstream):
        raise SoftPromptError("--compile compiles the native engine's decode step; with --engine vllm, vLLM compiles its own "
                              "(start it without --enforce-eager)")
    if args.max_queue_wait < 0:
        raise SoftPromptError("--max-queue-wait must be 0 (no cap) or more seconds")
    import torch
    import uvicorn  # noqa: F401 - without the serve extra, fail before the model is loaded

    from softprompt.serve.app import build_server, build_vllm_server, serve_forever
    from softprompt.serve.schemas import Limits

    limits = Limits(args.max_tokens, args.max_input_tokens, args.max_body_bytes,
                    tenant_max_queued=args.tenant_max_queued, tenant_max_running=args.tenant_max_running,
                    max_queue_wait=args.max_queue_wait or None, max_context_tokens=args.max_context_tokens)
    if args.engine == "vllm" or args.upstream:
        if args.engine != "vllm":
            raise SoftPromptError("--upstream is for --engine vllm")
        if not args.upstream:
            raise SoftPromptError("--engine vllm needs --upstream URL (a vLLM server started with --enable-prompt-embeds, "
                                  "e.g. by scripts/serve_vllm.sh)")
        logging.getLogger("softprompt").setLevel(logging.INFO)
        server = build_vllm_server(args.model, args.prompts, args.upstream, keys=args.keys, dtype=args.upstream_dtype,
                                   policy=args.upstream_policy, prompt_memory_bytes=int(args.prompt_memory_mb * 2**20),
                                   limits=limits, max_inflight=args.max_batch * 4, max_queue=args.max_queue,
                                   watch_interval=args.watch_interval or None)
        if not server.auth.enabled:
            logging.getLogger("softprompt.serve").warning("no --keys: the API is open to anyone who can reach %s:%d",
                                                          args.host, args.port)
        return serve_forever(server, args.host, args.port, log_level="info" if args.verbose else "warning", studio=args.studio)

    if args.threads is not None:
        if args.threads < 1:
            raise SoftPromptError("--threads must be at least 1")
        torch.set_num_threads(args.threads)

    logging.getLogger("softprompt").setLevel(logging.INFO)  # the server logs what it loads, refuses and packs
    server = build_server(args.model, args.prompts, device=args.device, keys=args.keys, precision=args.precision,
                          pack_weights=not args.no_pack_weights,
                          prompt_memory_bytes=int(args.prompt_memory_mb * 2**20),
                          limits=limits,
                          max_batch=args.max_batch, max_batch_tokens=args.max_batch_tokens, max_queue=args.max_queue,
                          prefix_cache=not args.no_prefix_cache, cache_bytes=int(args.cache_memory_mb * 2**20),
                          watch_interval=args.watch_interval or None, compressor=args.compressor,
                          context_cache=args.context_cache, decode="compiled" if args.compile else "eager")
    if not server.auth.enabled:
        logging.getLogger("softprompt.serve").warning("no --keys: the API is open to anyone who can reach %s:%d",
                                                      args.host, args.port)
    if server.contexts is not None:
        logging.getLogger("softprompt.serve").info("compressor %s (%s form, %d memory tokens): requests may carry a context",
                                                   args.compressor, server.contexts.compressor.form, server.contexts.compressor.memory)
    if args.studio:
        logging.getLogger("softprompt.serve").info("studio at http://%s:%d/studio/", args.host, args.port)
    return serve_forever(server, args.host, args.port, log_level="info" if args.verbose else "warning", studio=args.studio)
