"""A hook for registering a compressed context as a prompt: the amortized compressor turns the
context into a prompt in one forward and the registry installs it like an uploaded artifact (atomic,
validated against the base model, hot-loaded). No route calls it yet (docs/compressor.md)."""
from __future__ import annotations

from safetensors.torch import save as safetensors_bytes

from softprompt.base_model import check_fingerprint
from softprompt.compress.amortized.store import AmortizedCompressor
from softprompt.serve.registry import PromptEntry, Registry


def register_context(registry: Registry, compressor: AmortizedCompressor, name: str, context: str) -> PromptEntry:
    """Compress ``context`` and install the result in ``registry`` as prompt ``name``."""
    check_fingerprint(compressor.base.fingerprint, registry.base.fingerprint, what=f"compressor {compressor.path}")
    job = compressor.job(context)
    prompt = compressor.prompt(context, job)
    meta = compressor.prompt_meta(job, prompt)
    data = safetensors_bytes(prompt.export_tensors(), {"kind": prompt.kind, "format": "softprompt"})
    return registry.install(name, meta, data)
