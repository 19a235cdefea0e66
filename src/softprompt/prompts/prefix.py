"""Prefix tuning (Li & Liang 2021): trainable keys and values for ``n`` positions at every layer.

The prefix occupies no input positions. It is handed to the model as a fresh
:class:`transformers.DynamicCache` holding ``n`` entries per layer, the attention mask gains ``n``
leading ones, and the tokens after it take positions ``n, n+1, ...`` (as in PEFT, so prompts move
between the two unchanged). Keys and values have the model's key/value head count, so grouped-query
attention (fewer key/value heads than query heads) is handled by the model's own attention.

Stored layout: ``prefix_key_values`` of shape ``[layers, 2, kv_heads, n, head_dim]`` (index 0 keys,
1 values). With ``reparam`` the table is produced during training by a Linear-Tanh-Linear network
from an ``[n, hidden]`` embedding (stabler optimization); at save the keys/values are materialized
for inference and the network is saved too, so training can resume.
"""
from __future__ import annotations

import torch
from torch import nn

from softprompt.errors import SoftPromptError
from softprompt.hf_cache import cache_of, kv_name
from softprompt.prompts.soft_prompt import Materialized, positions

KV_KEY = "prefix_key_values"


def cache_layout(model: nn.Module) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder whose cache holds plain full-attention layers;
    other layouts (sliding-window, linear-attention, encoder-decoder) are refused."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kind = getattr(cfg, "model_type", "?")
    if getattr(cfg, "is_encoder_decoder", False):
        raise SoftPromptError(f"prefix tuning supports decoder-only models; {kind!r} is encoder-decoder")
    try:
        layers = DynamicCache(config=cfg).layers
    except Exception as e:  # noqa: BLE001 - any failure means an unknown layout
        raise SoftPromptError(f"prefix tuning: cannot build a cache for model type {kind!r} ({e})") from None
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if not layers or odd:
        raise SoftPromptError(f"prefix tuning is not supported for model type {kind!r}: its cache has "
                              f"{', '.join(odd) or 'no'} layers (supported: full-attention decoder layers)")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return len(layers), kv_heads, head_dim


@torch.no_grad()
def activations_kv(model: nn.Module, table: torch.Tensor) -> torch.Tensor:
    """Keys/values the frozen model computes for the input vectors ``table`` ([n, hidden]) at
    positions ``0..n-1``: a prefix that starts out behaving like those tokens. ``[L, 2, H, n, D]``."""
    device = next(model.parameters()).device
    out = model(inputs_embeds=table.to(device, next(model.parameters()).dtype).unsqueeze(0), use_cache=True)
    cache = cache_of(out)
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]).float().cpu()


def _compute_dtype(device: torch.device, fallback: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return fallback


class PrefixTuning(Materialized):
    kind = "prefix"
    input_level = False

    def __init__(self, n_virtual: int, hidden_size: int, num_layers: int, kv_heads: int, head_dim: int,
                 reparam: bool = False, reparam_hidden: int | None = None, init: torch.Tensor | None = None):
        super().__init__(n_virtual, hidden_size)
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.shape = (num_layers, 2, kv_heads, n_virtual, head_dim)
        self.reparam = reparam
        self.reparam_hidden = reparam_hidden or hidden_size
        if reparam:
            emb = torch.randn(n_virtual, hidden_size) * 0.02 if init is None else init.detach().clone().float()
            if emb.shape != (n_virtual, hidden_size):
                raise ValueError(f"init shape {tuple(emb.shape)} != ({n_virtual}, {hidden_size})")
            self.embedding = nn.Parameter(emb)
            out = num_layers * 2 * kv_heads * head_dim
            self.net = nn.Sequential(nn.Linear(hidden_size, self.reparam_hidden), nn.Tanh(),
                                     nn.Linear(self.reparam_hidden, out))
        else:
            kv = torch.zeros(self.shape) if init is None else init.detach().clone().float()
            if kv.shape != self.shape:
                raise ValueError(f"prefix init shape {tuple(kv.shape)} != {self.shape}")
            self.kv = nn.Parameter(kv)

    @classmethod
    def create(cls, n_virtual: int, base, init: torch.Tensor, options: dict | None = None) -> "PrefixTuning":
        """A prefix for ``base``. Without reparameterization the keys/values start as the frozen
        model's own activations for the initial vectors ``init`` (e.g. real token embeddings)."""
        options = dict(options or {})
        layers, kv_heads, head_dim = cache_layout(base.model)
        reparam = bool(options.pop("reparam", False))
        if options.keys() - {"reparam_hidden"}:
            raise SoftPromptError(f"unknown prefix option(s): {', '.join(sorted(options.keys() - {'reparam_hidden'}))}")
        start = init if reparam else activations_kv(base.model, init)
        return cls(n_virtual, base.hidden_size, layers, kv_heads, head_dim, reparam=reparam,
                   reparam_hidden=options.get("reparam_hidden"), init=start)

    # -- the keys and values -----------------------------------------------------------------------
    def key_values(self) -> torch.Tensor:
        """``[layers, 2, kv_heads, n, head_dim]``."""
        return self.table()

    def generate(self) -> torch.Tensor:
        if not self.reparam:
            return self.kv
        flat = self.net(self.embedding)  # [n, L*2*H*D]
        return flat.view(self.n_virtual, self.num_layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)

    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        kv = self.key_values()
        return [(kv[i, 0], kv[i, 1]) for i in range(self.num_layers)]

    def cache(self, model: nn.Module, batch_size: int):
        """A fresh DynamicCache holding the prefix for ``batch_size`` rows (the model appends to it)."""
        from softprompt.kv_prefix import kv_cache

        device = next(model.parameters()).device
        dtype = _compute_dtype(device, next(model.parameters()).dtype)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return kv_cache(self.prefix_kv(), batch_size, device, dtype, config=cfg)

    def model_inputs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        if (input_ids < 0).any():
            raise SoftPromptError("a prefix prompt takes no [soft] spans in its template; use --tokens N")
        n, b = self.n_virtual, input_ids.shape[0]
        mask = torch.cat([torch.ones(b, n, dtype=attention_mask.dtype, device=attention_mask.device), attention_mask], 1)
        position_ids = n + positions(attention_mask)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
                kv_name(): self.cache(model, b)}

    # -- persistence -------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"n_virtual": self.n_virtual, "num_layers": self.num_layers, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "reparam": self.reparam,
                **({"reparam_hidden": self.reparam_hidden} if self.reparam else {})}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = {KV_KEY: self.materialize().cpu().contiguous()}
        if self.reparam:
            out.update({f"reparam.{k}": v.detach().cpu().contiguous() for k, v in self.state_dict().items()})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        kv = tensors[KV_KEY]
        if tuple(kv.shape) != self.shape:
            raise ValueError(f"{KV_KEY} has shape {tuple(kv.shape)}, expected {self.shape}")
        with torch.no_grad():
            if self.reparam:
                own = {k[len("reparam."):]: v for k, v in tensors.items() if k.startswith("reparam.")}
                self.load_state_dict(own, strict=True)
            else:
                self.kv.copy_(kv)
        self.materialized = kv.float().clone()
        self.train(False)
