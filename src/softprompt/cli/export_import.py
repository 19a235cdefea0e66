"""softprompt export / softprompt import: prompts to and from HF PEFT's adapter format."""
from __future__ import annotations

import argparse
from pathlib import Path

from softprompt.cli.common import add_model_args, load_prompt_and_base
from softprompt.errors import SoftPromptError


def register(sub) -> None:
    e = sub.add_parser("export", help="export a prompt to another format (PEFT, vLLM, TensorRT-LLM)",
                       description="Export a prompt as a PEFT adapter (adapter_config.json + adapter_model.safetensors), "
                                   "for vLLM's prompt embeds (soft_rows.pt + vllm_prompt.json; see docs/vllm.md) or as a "
                                   "TensorRT-LLM prompt table (prompt_table.npy + task_ids.json + trtllm_prompt.json).")
    e.add_argument("prompt", help="prompt artifact directory")
    e.add_argument("--format", default="peft", choices=["peft", "vllm", "trtllm"])
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the exported rows (vllm: the server's --dtype, default float32; trtllm: default float16)")
    e.add_argument("--out", required=True, help="directory to write")
    e.add_argument("--overwrite", action="store_true")
    add_model_args(e, default=None)
    e.set_defaults(func=run_export)

    i = sub.add_parser("import", help="import a PEFT prompt adapter", description=(
        "Import a PEFT PROMPT_TUNING, P_TUNING or PREFIX_TUNING adapter as a prompt artifact. PEFT places the "
        "virtual tokens before the whole input, so the default template is '[soft:N]{input}' ('{input}' for a "
        "prefix) without the chat template."))
    i.add_argument("adapter", help="PEFT adapter directory")
    i.add_argument("--out", required=True, help="prompt artifact directory to write")
    i.add_argument("--template", help="template to record (default reproduces PEFT's placement)")
    i.add_argument("--chat", action="store_true", help="wrap inputs in the chat template (PEFT does not)")
    i.add_argument("--system", help="system message with --chat")
    i.add_argument("--force", action="store_true", help="accept an adapter whose recorded base model name differs")
    i.add_argument("--overwrite", action="store_true")
    add_model_args(i)
    i.set_defaults(func=run_import)


def _check_out(out: Path, overwrite: bool, marker: str) -> None:
    if (out / marker).exists() and not overwrite:
        raise SoftPromptError(f"{out} already holds {marker}: pass --overwrite to replace it")


def run_export(args: argparse.Namespace) -> int:
    from softprompt.peft_io import CONFIG, export_peft

    out = Path(args.out)
    if args.format in ("vllm", "trtllm"):
        from softprompt.export_formats import export_trtllm, export_vllm

        _check_out(out, args.overwrite, f"{args.format}_prompt.json")
        art, base = load_prompt_and_base(args.prompt, args.model, args.device)
        if args.format == "vllm":
            files = export_vllm(art, base, out, dtype=args.dtype or "float32")
        else:
            if args.dtype == "bfloat16":
                raise SoftPromptError("--format trtllm writes numpy, which has no bfloat16: use float16 or float32")
            files = export_trtllm(art, base, out, Path(args.prompt).resolve().name, dtype=args.dtype or "float16")
        print(f"wrote {', '.join(str(f) for f in files)} ({art.kind}, {art.prompt.n_virtual} virtual tokens)")
        return 0
    _check_out(out, args.overwrite, CONFIG)
    art, base = load_prompt_and_base(args.prompt, args.model, args.device)
    export_peft(art, base, out)
    print(f"wrote PEFT adapter {out} ({art.kind}, {art.prompt.n_virtual} virtual tokens)")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from softprompt.base_model import load_base
    from softprompt.peft_io import import_peft

    out = Path(args.out)
    _check_out(out, args.overwrite, "prompt.json")
    base = load_base(args.model, device=args.device)
    import_peft(args.adapter, base, out, template=args.template, chat=args.chat, system=args.system, force=args.force)
    print(f"imported {args.adapter} as {out}")
    return 0
