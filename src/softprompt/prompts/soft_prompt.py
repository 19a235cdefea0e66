"""The one interface every kind of soft prompt implements.

Token sequences carry *slot markers*: a negative id ``-(k + 1)`` stands for row ``k`` of the prompt's
virtual-token table. Input-level kinds (prompt tuning, P-tuning, hybrid templates) scatter their
vectors into those positions of ``inputs_embeds``; padding therefore never sits between soft tokens
and text. Kinds that act elsewhere (prefix tuning) override :meth:`model_inputs`.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


def marker(row: int) -> int:
    return -(row + 1)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a (left-)padded batch: each row's real tokens count from 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class SoftPrompt(nn.Module):
    """Base class. Subclasses define ``kind``, hold their trainable parameters, and implement
    :meth:`vectors` (input-level kinds) or override :meth:`model_inputs`."""

    kind: ClassVar[str] = ""
    input_level: ClassVar[bool] = True  # vectors enter as input embeddings at slot markers

    def __init__(self, n_virtual: int, hidden_size: int):
        super().__init__()
        self.n_virtual = n_virtual
        self.hidden_size = hidden_size

    # -- input-level vectors ----------------------------------------------------------------------
    def vectors(self) -> torch.Tensor:
        """The virtual-token table, shape ``[n_virtual, hidden]``."""
        raise NotImplementedError(f"{type(self).__name__} has no input-level vectors")

    def embed(self, embedding: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed ``input_ids`` whose negative entries are slot markers."""
        soft = input_ids < 0
        embeds = embedding(input_ids.clamp(min=0))
        if soft.any():
            table = self.vectors().to(embeds.dtype)
            embeds = embeds.masked_scatter(soft.unsqueeze(-1), table[(-input_ids[soft] - 1)])
        return embeds

    def model_inputs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Keyword arguments for the base model's forward (prefill) on a batch."""
        return {
            "inputs_embeds": self.embed(model.get_input_embeddings(), input_ids),
            "attention_mask": attention_mask,
            "position_ids": positions(attention_mask),
        }

    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per-layer ``(key, value)``, each ``[n_kv_heads, n_prefix, head_dim]``, that this prompt places
        before every sequence without occupying input positions (prefix tuning). ``None`` for
        input-level kinds: their keys/values come from running their vectors through the model."""
        return None

    @classmethod
    def create(cls, n_virtual: int, base, init: torch.Tensor, options: dict | None = None) -> "SoftPrompt":
        """A new prompt for ``base`` with an initial virtual-token table ``init`` ([n, hidden])."""
        return cls(n_virtual, base.hidden_size, init=init, **(options or {}))

    # -- persistence -------------------------------------------------------------------------------
    def config(self) -> dict:
        """JSON-serializable constructor arguments (besides hidden_size)."""
        return {"n_virtual": self.n_virtual}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved in prompt.safetensors: the inference form plus what training needs to resume."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        self.load_state_dict({k: tensors[k] for k in own}, strict=True)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class Materialized(SoftPrompt):
    """A kind whose tensors are generated during training (by an encoder or a reparameterization)
    and read from a materialized copy at inference. Subclasses implement :meth:`generate`; the copy
    is made by :meth:`materialize` (at save, or by loading) and dropped when training resumes."""

    def __init__(self, n_virtual: int, hidden_size: int):
        super().__init__(n_virtual, hidden_size)
        self.register_buffer("materialized", None, persistent=False)

    def generate(self) -> torch.Tensor:
        raise NotImplementedError

    def table(self) -> torch.Tensor:
        """The materialized copy in eval mode when there is one, else freshly generated."""
        if self.materialized is not None and not self.training:
            return self.materialized
        return self.generate()

    def materialize(self) -> torch.Tensor:
        with torch.no_grad():
            table = self.generate().detach().clone()
        self.materialized = table
        return table

    def train(self, mode: bool = True):
        if mode:
            self.materialized = None
        return super().train(mode)
