"""The amortized compressor: ``m`` trainable memory tokens appended to a context and read by the
frozen base model in one forward; their outputs become the student's prompt.

Two forms (both produce ordinary prompt kinds, so ``generate``/``eval``/``serve`` need nothing new):

- ``kv`` (after 500xCompressor, Li et al. 2025): the memory positions' own per-layer keys and values
  *are* the prompt, a ``prefix`` prompt of ``len(head) + m`` positions (``head`` is the template text
  before the context, e.g. ``<|im_start|>system\\n``, whose keys/values come from the frozen model).
  A memory key computed at position ``p`` is re-rotated to its slot in the prefix (as in
  :mod:`softprompt.compress.kv_init`). Only the memory embeddings are trained.
- ``projector`` (after ICAE / xRAG): the memory positions' final hidden states go through a small
  trained MLP (zero-initialized last layer, plus a learned per-slot vector) into ``m`` input vectors,
  a ``prompt-tuning`` prompt.

The base model stays frozen; gradients reach the memory embeddings (and the projector) through its
activations. The encoder pass reads ``head + context + memory`` at positions ``0..n-1``.

Optionally (``--encoder-lora R``, after ICAE and 500xCompressor) the encoder pass runs with a LoRA of
rank ``R`` from ``peft`` on its attention projections: peft injects it into a *twin* of the base model,
a copy of its module tree that shares every weight tensor with it, so the base model object is never
changed and every other pass (the student reading the prompt, the teacher) runs the plain frozen model.
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from softprompt.base_model import BaseModel
from softprompt.compress.kv_init import prefill_kv, rotary
from softprompt.errors import SoftPromptError
from softprompt.hf_cache import cache_kw
from softprompt.precision import autocast
from softprompt.prompts import SoftPrompt
from softprompt.prompts.prefix import PrefixTuning, cache_layout
from softprompt.prompts.prompt_tuning import PromptTuning

FORMS = ("kv", "projector")
LORA_TARGETS = ("q_proj", "v_proj")
INIT_TEXT = "Remember the text above: its facts, names, numbers and rules."


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rerotate_keys(model: nn.Module, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Keys ``[..., n, head_dim]`` rotated by ``shift`` positions (differentiable: a fixed rotation)."""
    inv = rotary(model).inv_freq.detach().to(torch.float64).cpu()
    freqs = torch.full((keys.shape[-2], 1), float(shift), dtype=torch.float64) * inv[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(keys.device, keys.dtype), emb.sin().to(keys.device, keys.dtype)
    return keys * cos + _rotate_half(keys) * sin


class TableVectors(PromptTuning):
    """A prompt-tuning prompt whose vectors are a given (differentiable) tensor: the training student."""

    def __init__(self, table: torch.Tensor):
        super().__init__(table.shape[0], table.shape[1])
        self.table_ = table

    def vectors(self) -> torch.Tensor:
        return self.table_


class TableKV(PrefixTuning):
    """A prefix prompt whose keys/values are a given (differentiable) tensor: the training student."""

    def __init__(self, kv: torch.Tensor, hidden_size: int):
        layers, _, kv_heads, n, head_dim = kv.shape
        super().__init__(n, hidden_size, layers, kv_heads, head_dim)
        self.table_ = kv

    def generate(self) -> torch.Tensor:
        return self.table_


def init_memory(base: BaseModel, m: int, text: str = INIT_TEXT) -> torch.Tensor:
    """``[m, hidden]``: the embeddings of ``text``'s tokens, tiled to ``m``."""
    ids = base.tokenizer(text, add_special_tokens=False).input_ids
    ids = (ids * (m // len(ids) + 1))[:m]
    return base.embedding.weight.detach()[torch.tensor(ids, device=base.device)].float().cpu().clone()


class MemoryEncoder(nn.Module):
    """The trainable part of a compressor: memory embeddings, and for the projector form the MLP."""

    def __init__(self, hidden_size: int, memory: int, form: str, init: torch.Tensor | None = None,
                 projector_hidden: int | None = None, lora: dict | None = None):
        super().__init__()
        if lora is not None and (not isinstance(lora.get("r"), int) or lora["r"] < 1):
            raise SoftPromptError(f"--encoder-lora must be a rank >= 1 (got {lora.get('r')!r})")
        self.lora_config = dict(lora, targets=list(lora.get("targets") or LORA_TARGETS),
                                alpha=float(lora.get("alpha") or 2 * lora["r"])) if lora else None
        self.lora = nn.ParameterDict()  # the LoRA weights (same objects as in the twin's peft layers)
        self._twin: list = []  # [(base model, twin)]: not a submodule, so state_dict holds only the LoRA
        if form not in FORMS:
            raise SoftPromptError(f"--form {form!r}: expected one of {', '.join(FORMS)}")
        if memory < 1:
            raise SoftPromptError(f"--memory must be >= 1 (got {memory})")
        self.form, self.n_memory, self.hidden_size = form, memory, hidden_size
        start = torch.zeros(memory, hidden_size) if init is None else init.detach().clone().float()
        self.memory = nn.Parameter(start)
        if form == "projector":
            self.projector_hidden = projector_hidden or hidden_size
            self.slot = nn.Parameter(start.clone())
            self.proj = nn.Sequential(nn.Linear(hidden_size, self.projector_hidden), nn.GELU(),
                                      nn.Linear(self.projector_hidden, hidden_size))
            nn.init.zeros_(self.proj[2].weight)
            nn.init.zeros_(self.proj[2].bias)

    def config(self) -> dict:
        out = {"form": self.form, "memory": self.n_memory, "hidden_size": self.hidden_size}
        if self.form == "projector":
            out["projector_hidden"] = self.projector_hidden
        if self.lora_config:
            out["encoder_lora"] = self.lora_config
        return out

    def attach(self, model: nn.Module) -> nn.Module:
        """The model the encoder pass runs: ``model`` itself, or with an encoder LoRA its twin (a copy of
        the module tree sharing every parameter and buffer with ``model``) with peft's LoRA layers on the
        target projections. ``model`` is left exactly as it was. Made once per model (seeded by the caller)."""
        if not self.lora_config:
            return model
        if self._twin and self._twin[0][0] is model:
            return self._twin[0][1]
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise SoftPromptError("--encoder-lora needs peft: pip install 'softprompt[compress]' (or peft)") from None
        memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        twin = copy.deepcopy(model, memo)
        c = self.lora_config
        cfg = LoraConfig(r=c["r"], lora_alpha=c["alpha"], lora_dropout=0.0, target_modules=list(c["targets"]), bias="none")
        try:
            twin = inject_adapter_in_model(cfg, twin)
        except ValueError as e:
            raise SoftPromptError(f"--encoder-lora: {str(e).splitlines()[0]} (targets: {', '.join(c['targets'])})") from None
        params = {n: p for n, p in twin.named_parameters() if "lora_" in n}
        if not params:
            raise SoftPromptError(f"--encoder-lora: no layer named {', '.join(c['targets'])} in this model")
        for name, p in params.items():
            p.requires_grad_(True)
            self.lora[name.replace(".", "__")] = p
        self._twin = [(model, twin)]
        return twin


class Encoding:
    """Runs a :class:`MemoryEncoder` through the frozen base: a context's ids in, the prompt's tensor out."""

    def __init__(self, base: BaseModel, encoder: MemoryEncoder, head_ids: list[int], bf16: bool = False,
                 model: nn.Module | None = None):
        """``model``: the frozen model the encoder pass runs when it has no LoRA (default: the base as
        loaded; training passes its prepacked training copy, :func:`softprompt.frozen.training_model`)."""
        self.base, self.encoder, self.head_ids, self.bf16 = base, encoder, list(head_ids), bf16
        self.model = model
        self._head_kv: torch.Tensor | None = None
        if encoder.form == "kv":
            cache_layout(base.model)  # refuses models whose cache a prefix cannot hold
            rotary(base.model)

    @property
    def n_positions(self) -> int:
        return len(self.head_ids) + self.encoder.n_memory if self.encoder.form == "kv" else self.encoder.n_memory

    def head_kv(self) -> torch.Tensor:
        """The frozen model's keys/values of the template before the context: ``[L, 2, H, len(head), D]``."""
        if self._head_kv is None:
            self._head_kv = prefill_kv(self.base.model, self.head_ids, self.bf16).to(self.base.device)
        return self._head_kv

    def tensor(self, ctx_ids: list[int]) -> torch.Tensor:
        """The prompt's tensor for a context: ``[L, 2, H, len(head) + m, D]`` (kv) or ``[m, hidden]``."""
        from transformers import DynamicCache

        enc, device = self.encoder, self.base.device
        model = enc.attach(self.base.model)  # the base itself, or its twin with the encoder LoRA
        if model is self.base.model and self.model is not None:
            model = self.model
        m = enc.n_memory
        ids = torch.tensor(self.head_ids + list(ctx_ids), device=device)
        if len(ids) + m > self.base.max_positions:
            raise SoftPromptError(f"the context is {len(ctx_ids)} tokens; with the template and {m} memory tokens the "
                                  f"compressor needs {len(ids) + m} positions, more than the model's window of "
                                  f"{self.base.max_positions}: shorten or split the context")
        backbone = getattr(model, getattr(model, "base_model_prefix", "model"))
        with autocast(device, self.bf16):
            emb = model.get_input_embeddings()(ids)
            x = torch.cat([emb, enc.memory.to(device, emb.dtype)], 0).unsqueeze(0)
            if enc.form == "kv":
                cache = DynamicCache(config=model.config)
                backbone(inputs_embeds=x, **cache_kw(cache), use_cache=True)
                kv = torch.stack([torch.stack([layer.keys[0, :, -m:], layer.values[0, :, -m:]]) for layer in cache.layers]).float()
                keys = rerotate_keys(model, kv[:, 0], -len(ctx_ids))  # from len(head)+len(ctx)+j to len(head)+j
                kv = torch.stack([keys, kv[:, 1]], 1)
                return torch.cat([self.head_kv(), kv], 3)
            h = backbone(inputs_embeds=x, use_cache=False).last_hidden_state[0, -m:].float()
        return enc.slot.to(device) + enc.proj.to(device)(h)

    def student(self, ctx_ids: list[int]) -> SoftPrompt:
        """The differentiable student prompt for a context (training)."""
        t = self.tensor(ctx_ids)
        return TableKV(t, self.base.hidden_size) if self.encoder.form == "kv" else TableVectors(t)

    @torch.no_grad()
    def prompt(self, ctx_ids: list[int]) -> SoftPrompt:
        """An ordinary prompt (``prefix`` or ``prompt-tuning``) for a context, in eval mode."""
        t = self.tensor(ctx_ids).detach().float()
        if self.encoder.form == "kv":
            layers, _, kv_heads, n, head_dim = t.shape
            p = PrefixTuning(n, self.base.hidden_size, layers, kv_heads, head_dim, init=t.cpu())
        else:
            p = PromptTuning(t.shape[0], t.shape[1], init=t.cpu())
        p = p.to(self.base.device)
        p.requires_grad_(False)
        return p.eval()
