"""Training objectives over a frozen model with a soft prompt, and the two exact shortcuts that make
them cheap:

* the LM head runs only at positions that have targets (the head over a large vocabulary is a big
  share of the cost, and most positions, the prompt, have no target);
* a *shared prefix* (the leading tokens every row of the batch has in common: the chat header, the
  soft tokens, the template's text before the first field) runs once, as one row, and its keys and
  values are broadcast to every row for the rest of the sequence. Attention is causal, so these
  positions do not depend on the row; gradients from all rows sum back into the one copy
  (:func:`softprompt.kv_prefix.forward_with_prefix`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from softprompt.encoding import IGNORE
from softprompt.kv_prefix import batch_prefix_len, forward_with_prefix
from softprompt.prompts import SoftPrompt, as_prompt


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
    """The forward's inputs for ``batch`` under ``prompt`` (``None``: the bare model)."""
    return as_prompt(prompt).model_inputs(model, batch["input_ids"], batch["attention_mask"])


def shared_prefix_len(batch: dict) -> int:
    """Leading positions identical in every row (ids and mask) and before every row's first target,
    leaving at least one position to run per row."""
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.shape[0] < 2:
        return 0
    m = batch_prefix_len(ids, batch["attention_mask"])
    has_target = (labels != IGNORE).any(0).long()
    first_target = int(has_target.argmax()) if bool(has_target.any()) else ids.shape[1]
    return max(0, min(m, first_target - 1, ids.shape[1] - 1))


def target_logits(model: nn.Module, prompt: SoftPrompt | None, batch: dict, target_only_head: bool = True,
                  share_prefix: bool = True, compiled: nn.Module | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a target token (next-token shifted), with those targets
    and each one's row: ``([n, vocab], [n], [n])``, row by row; with ``target_only_head`` the LM head
    runs only there. ``share_prefix`` runs the batch's common leading tokens once (exact; see the
    module docstring). ``compiled`` is a compiled stand-in (see ``compile_forward``) for the module
    that runs the positions: the backbone when the head runs apart, else the whole model."""
    inputs = model_inputs(model, prompt, batch)
    m = shared_prefix_len(batch) if share_prefix else 0
    labels = batch["labels"][:, m + 1:]
    sel = labels != IGNORE
    rows = sel.nonzero()[:, 0]
    parts = split_model(model) if target_only_head else None
    if parts is not None:
        backbone, head = parts
        net = backbone if compiled is None else compiled
        out = forward_with_prefix(net, inputs, m) if m else net(**inputs, use_cache=False)
        hidden = out.last_hidden_state
        hidden = hidden[:, hidden.shape[1] - labels.shape[1] - 1:-1]  # drops a kind's extra positions
        logits = head(hidden[sel])
    else:
        net = model if compiled is None else compiled
        out = forward_with_prefix(net, inputs, m) if m else net(**inputs, use_cache=False)
        logits = out.logits
        logits = logits[:, logits.shape[1] - labels.shape[1] - 1:-1][sel]
    return logits, labels[sel], rows


def lm_loss(model: nn.Module, prompt: SoftPrompt | None, batch: dict, target_only_head: bool = True,
            reduction: str = "mean", share_prefix: bool = False, compiled: nn.Module | None = None) -> torch.Tensor:
    """Cross-entropy of the target tokens (labels != IGNORE). ``share_prefix`` runs the batch's common
    leading tokens once (exact; see the module docstring)."""
    logits, targets, _ = target_logits(model, prompt, batch, target_only_head, share_prefix, compiled)
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


def class_loss(model: nn.Module, prompt: SoftPrompt | None, batch: dict, n_labels: int, gold: torch.Tensor,
               target_only_head: bool = True, share_prefix: bool = True, compiled: nn.Module | None = None,
               reduction: str = "sum") -> torch.Tensor:
    """Rank classification: cross-entropy of the gold label among the ``n_labels`` candidates, each
    scored as scoring ranks them (the summed log-probability of the label's tokens). ``batch`` holds
    every example once per candidate label, example-major (``[b * n_labels]`` rows); ``gold`` is ``[b]``."""
    logits, targets, rows = target_logits(model, prompt, batch, target_only_head, share_prefix, compiled)
    lp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    total = torch.zeros(batch["input_ids"].shape[0], device=lp.device).index_add(0, rows, lp)
    return F.cross_entropy(total.view(-1, n_labels), gold, reduction=reduction)


def sequence_scores(model: nn.Module, prompt: SoftPrompt | None, batch: dict, share_prefix: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of its target tokens' log-probabilities, and whether every target token is the
    model's greedy (argmax) choice; two tensors of shape [batch]."""
    logits, targets, rows = target_logits(model, prompt, batch, True, share_prefix)
    lp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    n = batch["input_ids"].shape[0]
    total = torch.zeros(n, device=lp.device).index_add_(0, rows, lp)
    misses = torch.zeros(n, device=lp.device).index_add_(0, rows, (logits.argmax(-1) != targets).float())
    return total, misses == 0


def sequence_logprobs(model: nn.Module, prompt: SoftPrompt | None, batch: dict, share_prefix: bool = True) -> torch.Tensor:
    """Sum of target-token log-probabilities per row, shape [batch]."""
    return sequence_scores(model, prompt, batch, share_prefix)[0]
