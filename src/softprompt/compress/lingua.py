"""LLMLingua (Jiang et al. 2023) as the hard-compression peer: the context cut to a token budget by
dropping the tokens the frozen model finds least surprising, with our own model as the scorer.

LLMLingua counts its budget with tiktoken's GPT-3.5 encoding, which would need a download; here the
budget is counted with the compressed model's own tokenizer instead (the same tokens the soft prompt
is measured in), so the run is offline and "N tokens" means the same on both sides.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


class _Counter:
    """The tiktoken interface LLMLingua uses (``encode``), backed by a Hugging Face tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str, *args, **kwargs) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


@contextmanager
def _local_counter(tokenizer):
    import llmlingua.prompt_compressor as pc

    orig = pc.tiktoken.encoding_for_model
    pc.tiktoken.encoding_for_model = lambda name: _Counter(tokenizer)
    try:
        yield
    finally:
        pc.tiktoken.encoding_for_model = orig


def model_dir(base) -> Path:
    """The local directory of ``base``'s weights (LLMLingua loads the scorer itself)."""
    from softprompt.base_model import EMBEDDED, ensure_embedded

    for attr in ("path", "model_dir", "directory"):
        p = getattr(base, attr, None)
        if p and Path(p).is_dir():
            return Path(p)
    p = getattr(base.model.config, "_name_or_path", "")
    if p and Path(p).is_dir():
        return Path(p)
    if base.name in EMBEDDED:
        return ensure_embedded(base.name)
    raise FileNotFoundError(f"no local weights directory for {base.name!r}")


_CACHE: dict[str, object] = {}


def compressor(base, tokenizer):
    """A cached ``llmlingua.PromptCompressor`` scoring with ``base``'s weights on the CPU/GPU it runs on."""
    from llmlingua import PromptCompressor

    d = str(model_dir(base))
    if d not in _CACHE:
        device = "cuda" if base.device.type == "cuda" else "cpu"
        with _local_counter(tokenizer):
            _CACHE[d] = PromptCompressor(model_name=d, device_map=device, model_config={"trust_remote_code": False})
    return _CACHE[d]


def lingua_compress(context: str, target_tokens: int, base, tokenizer) -> str:
    """LLMLingua's compressed text of ``context`` at ``target_tokens`` tokens (its own API, its defaults)."""
    pc = compressor(base, tokenizer)
    return pc.compress_prompt([context], target_token=target_tokens)["compressed_prompt"]
