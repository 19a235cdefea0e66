"""The name transformers gives a model's KV cache, in its forward's keyword and in its outputs.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still works there, with a
FutureWarning, and goes in 5.40); earlier releases know only ``past_key_values``. Every call site
that hands a cache to a model or reads one back goes through these helpers, so neither release warns.
"""
from __future__ import annotations

from functools import cache
from typing import Any


@cache
def kv_name() -> str:
    """``"cache"`` where transformers has the new name, else ``"past_key_values"``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kw(kv: Any) -> dict[str, Any]:
    """The keyword argument that passes ``kv`` to a transformers model's forward."""
    return {kv_name(): kv}


def cache_of(out: Any) -> Any:
    """The KV cache a transformers model's forward returned (``None`` when it returned none)."""
    return getattr(out, kv_name(), None)
