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


def compile_forward(model: nn.Module, target_only_head: bool = True) -> nn.Module:
    """``torch.compile`` of what ``lm_loss`` runs over every position (the backbone, or the whole
    model when the head cannot run apart). Shapes vary from batch to batch, so it is compiled with
    dynamic shapes. The frozen base itself is left untouched (other users of it run eagerly)."""
    parts = split_model(model) if target_only_head else None
    return torch.compile(parts[0] if parts is not None else model, dynamic=True)


def model_inputs(model: nn.Module, prompt: SoftPrompt | None, batch: dict) -> dict:
    if prompt is None:
        return base_model_inputs(model, batch["input_ids"], batch["attention_mask"])
    return prompt.model_inputs(model, batch["input_ids"], batch["attention_mask"])


def lm_loss(model: nn.Module, prompt: SoftPrompt | None, batch: dict, target_only_head: bool = True,
            reduction: str = "mean", compiled: nn.Module | None = None) -> torch.Tensor:
    """Cross-entropy of the target tokens (labels != IGNORE), next-token shifted. ``compiled`` is a
    compiled stand-in (see ``compile_forward``) for the module that runs the positions: the backbone
    when the head runs apart, else the whole model."""
    inputs = model_inputs(model, prompt, batch)
    labels = batch["labels"][:, 1:]
    sel = labels != IGNORE
    parts = split_model(model) if target_only_head else None
    if parts is not None:
        backbone, head = parts
        hidden = (backbone if compiled is None else compiled)(**inputs, use_cache=False).last_hidden_state
        n_prefix = hidden.shape[1] - batch["labels"].shape[1]  # 0 unless a kind adds positions
        hidden = hidden[:, n_prefix:-1]
        logits = head(hidden[sel])
    else:
        logits = (model if compiled is None else compiled)(**inputs, use_cache=False).logits
        n_prefix = logits.shape[1] - batch["labels"].shape[1]
        logits = logits[:, n_prefix:-1][sel]
    return F.cross_entropy(logits.float(), labels[sel], reduction=reduction)


def sequence_logprobs(model: nn.Module, prompt: SoftPrompt | None, batch: dict) -> torch.Tensor:
    """Sum of target-token log-probabilities per row, shape [batch]. Like ``lm_loss``, runs the LM
    head only at target positions when that is exact for the model."""
    inputs = model_inputs(model, prompt, batch)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    parts = split_model(model)
    if parts is not None:
        backbone, head = parts
        hidden = backbone(**inputs, use_cache=False).last_hidden_state
        n_prefix = hidden.shape[1] - batch["labels"].shape[1]
        logits = head(hidden[:, n_prefix:-1][mask]).float()
        lp = torch.zeros(labels.shape, dtype=logits.dtype, device=logits.device)
        lp[mask] = torch.log_softmax(logits, -1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
        return lp.sum(-1)
    logits = model(**inputs, use_cache=False).logits
    n_prefix = logits.shape[1] - batch["labels"].shape[1]
    logits = logits[:, n_prefix:-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)
