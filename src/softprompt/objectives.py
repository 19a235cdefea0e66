"""Training objectives over a frozen model with a soft prompt. The log-likelihood loss runs the LM
head only at positions that have targets: the head over a large vocabulary is a big share of the
cost, and most positions (the prompt) have no target."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from softprompt.encoding import IGNORE
from softprompt.prompts.base import SoftPrompt, base_model_inputs


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, head) when running the head separately is exact for this model, else None."""
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings()
    if backbone is None or head is None or backbone is model:
        return None
    return backbone, head


def model_inputs(model: nn.Module, prompt: SoftPrompt | None, batch: dict) -> dict:
    if prompt is None:
        return base_model_inputs(model, batch["input_ids"], batch["attention_mask"])
    return prompt.model_inputs(model, batch["input_ids"], batch["attention_mask"])


def lm_loss(model: nn.Module, prompt: SoftPrompt | None, batch: dict, target_only_head: bool = True,
            reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the target tokens (labels != IGNORE), next-token shifted."""
    inputs = model_inputs(model, prompt, batch)
    labels = batch["labels"][:, 1:]
    sel = labels != IGNORE
    parts = split_model(model) if target_only_head else None
    if parts is not None:
        backbone, head = parts
        hidden = backbone(**inputs, use_cache=False).last_hidden_state
        n_prefix = hidden.shape[1] - batch["labels"].shape[1]  # 0 unless a kind adds positions
        hidden = hidden[:, n_prefix:-1]
        logits = head(hidden[sel])
    else:
        logits = model(**inputs, use_cache=False).logits
        n_prefix = logits.shape[1] - batch["labels"].shape[1]
        logits = logits[:, n_prefix:-1][sel]
    return F.cross_entropy(logits.float(), labels[sel], reduction=reduction)


def sequence_logprobs(model: nn.Module, prompt: SoftPrompt | None, batch: dict) -> torch.Tensor:
    """Sum of target-token log-probabilities per row, shape [batch]."""
    inputs = model_inputs(model, prompt, batch)
    logits = model(**inputs, use_cache=False).logits
    n_prefix = logits.shape[1] - batch["labels"].shape[1]
    logits = logits[:, n_prefix:-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)
