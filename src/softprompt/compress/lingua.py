"""LLMLingua (Jiang et al. 2023) as the hard-compression peer: the context cut to a token budget by
dropping the tokens the frozen model finds least surprising, with our own model as the scorer.

LLMLingua counts its budget with tiktoken's GPT-3.5 encoding, which would need a download; here the
budget is counted with the compressed model's own tokenizer instead (the same tokens the soft prompt
is measured in), so the run is offline and "N tokens" means the same on both sides.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from softprompt.hf_cache import cache_kw, cache_of, kv_name


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


class _LegacyCacheModel:
    """LLMLingua 0.2 slices and re-feeds the cache as a list of (key, value) pairs (the pre-5 transformers
    format); this wrapper converts those pairs to a DynamicCache on the way in and the model's cache back
    to pairs on the way out. Everything else is the wrapped model's."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, past_key_values=None, **kwargs):
        from transformers import DynamicCache

        if isinstance(past_key_values, (list, tuple)):
            cache = DynamicCache()
            for i, (k, v) in enumerate(past_key_values):
                cache.update(k, v, i)
            past_key_values = cache
        out = self._model(*args, **cache_kw(past_key_values), **kwargs)
        cache = cache_of(out)
        if cache is not None and hasattr(cache, "layers"):
            setattr(out, kv_name(), [(layer.keys, layer.values) for layer in cache.layers])
        return out


_CACHE: dict[str, object] = {}


def compressor(base, tokenizer):
    """A cached ``llmlingua.PromptCompressor`` scoring with ``base``'s weights on the CPU/GPU it runs on."""
    from llmlingua import PromptCompressor

    d = str(model_dir(base))
    if d not in _CACHE:
        device = "cuda" if base.device.type == "cuda" else "cpu"
        with _local_counter(tokenizer):
            pc = PromptCompressor(model_name=d, device_map=device, model_config={"trust_remote_code": False})
        pc.model = _LegacyCacheModel(pc.model)
        _CACHE[d] = pc
    return _CACHE[d]


def lingua_compress(context: str, target_tokens: int, base, tokenizer) -> str:
    """LLMLingua's compressed text of ``context`` at ``target_tokens`` tokens (its own API, its defaults)."""
    pc = compressor(base, tokenizer)
    return pc.compress_prompt([context], target_token=target_tokens)["compressed_prompt"]
