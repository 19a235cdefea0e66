"""The null prompt: the bare base model, as a :class:`SoftPrompt` with nothing in it.

It has no virtual tokens, no parameters and no tensors; its model inputs are the plain token ids. Code
that takes "a prompt, or none" normalises ``None`` to it once (:func:`as_prompt`) and then treats
every row alike, instead of branching on ``prompt is None``.
"""
from __future__ import annotations

import torch
from torch import nn

from softprompt.prompts.soft_prompt import SoftPrompt, positions


class NoPrompt(SoftPrompt):
    kind = "none"
    input_level = False  # no vectors to put anywhere: the ids enter as they are

    def __init__(self):
        super().__init__(0, 0)

    def embed(self, embedding: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain token embeddings (``input_ids`` must hold no slot markers)."""
        return embedding(input_ids)

    def model_inputs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Inputs for the bare base model; ids must hold no slot markers."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions(attention_mask)}


NO_PROMPT = NoPrompt()


def as_prompt(prompt: SoftPrompt | None) -> SoftPrompt:
    """``prompt``, or the null prompt for ``None``."""
    return NO_PROMPT if prompt is None else prompt
