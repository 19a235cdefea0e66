"""Prompt tuning (Lester et al. 2021): a table of trainable input vectors."""
from __future__ import annotations

import torch
from torch import nn

from softprompt.prompts.soft_prompt import SoftPrompt


class PromptTuning(SoftPrompt):
    kind = "prompt-tuning"

    def __init__(self, n_virtual: int, hidden_size: int, init: torch.Tensor | None = None):
        super().__init__(n_virtual, hidden_size)
        weight = torch.zeros(n_virtual, hidden_size) if init is None else init.detach().clone().float()
        if weight.shape != (n_virtual, hidden_size):
            raise ValueError(f"init shape {tuple(weight.shape)} != ({n_virtual}, {hidden_size})")
        self.embeddings = nn.Parameter(weight)

    def vectors(self) -> torch.Tensor:
        return self.embeddings

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embeddings.detach().cpu().contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embeddings.copy_(tensors["prompt_embeddings"])
