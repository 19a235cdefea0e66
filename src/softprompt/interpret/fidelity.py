"""Projection fidelity ("waywardness", Khashabi et al. 2022): replace every virtual token by its
nearest vocabulary token and measure what is lost, as the task metric on a dev set and as the KL
divergence from the soft-prompted model's next-token distributions."""
from __future__ import annotations

import torch

from softprompt.data.examples import Example
from softprompt.encoding import PromptFormat, collate
from softprompt.interpret.nearest import nearest_tokens
from softprompt.objectives import target_logits
from softprompt.precision import autocast
from softprompt.prompts import PromptTuning, SoftPrompt
from softprompt.scoring import label_accuracy, mean_loss


def input_vectors(prompt: SoftPrompt) -> torch.Tensor:
    from softprompt.errors import SoftPromptError

    if not prompt.input_level:
        raise SoftPromptError(f"a {prompt.kind} prompt has no input vectors: it acts on every layer's keys and "
                              "values, so nearest tokens and projections do not apply to it")
    with torch.no_grad():
        return prompt.vectors().detach().float()


def hard_prompt(ids: torch.Tensor | list[int], embedding: torch.nn.Embedding) -> PromptTuning:
    """A prompt whose virtual tokens are exactly the embeddings of vocabulary tokens ``ids``."""
    ids = torch.as_tensor(ids, device=embedding.weight.device)
    table = embedding.weight[ids].detach().float()
    p = PromptTuning(len(ids), table.shape[1], init=table).to(embedding.weight.device)
    p.requires_grad_(False)
    return p


def project(prompt: SoftPrompt, embedding: torch.nn.Embedding, metric: str = "l2") -> tuple[PromptTuning, list[int]]:
    """The prompt with every virtual token replaced by its nearest vocabulary token."""
    ids = nearest_tokens(input_vectors(prompt), embedding.weight, k=1, metric=metric).ids[:, 0].tolist()
    return hard_prompt(ids, embedding), ids


def _example_with_target(e: Example, eos: str) -> Example:
    # without a target only the next-token distribution after the prompt is compared: a placeholder
    # target makes that position the one scored (its logits do not depend on the placeholder)
    return e if e.target is not None else Example(e.fields, eos, e.source, e.line, e.meta)


@torch.no_grad()
def next_token_logits(model, prompt: SoftPrompt | None, fmt: PromptFormat, examples: list[Example],
                      batch_size: int = 16, bf16: bool = False) -> torch.Tensor:
    """Logits at every position that predicts a target token (teacher forcing on the examples'
    targets; the first answer position when an example has none), concatenated: ``[positions, vocab]``."""
    device = next(model.parameters()).device
    eos = fmt.tok.eos_token or ""
    items = [fmt.encode(_example_with_target(e, eos)) for e in examples]
    out = []
    for i in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(items[i:i + batch_size], fmt.tok.pad_token_id).items()}
        with autocast(device, bf16):
            logits, _, _ = target_logits(model, prompt, batch)
        out.append(logits.float().cpu())
    return torch.cat(out)


def divergence(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """Mean KL(ref || other) per position (nats) and top-1 agreement between two logit sets."""
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(other, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": float((ref.argmax(-1) == other.argmax(-1)).float().mean()),
            "positions": int(ref.shape[0])}


def task_score(model, prompt, fmt, examples, labels: list[str] | None, bf16: bool = False) -> dict:
    if labels:
        return {"metric": "accuracy", "value": label_accuracy(model, prompt, fmt, examples, labels, bf16=bf16)}
    return {"metric": "target_loss", "value": mean_loss(model, prompt, fmt, examples, bf16=bf16)}


def projection_fidelity(base, prompt: SoftPrompt, fmt: PromptFormat, examples: list[Example],
                        labels: list[str] | None = None, metric: str = "l2", bf16: bool = False) -> dict:
    """What is lost when the prompt is replaced by its nearest tokens: KL from the soft-prompted
    model, top-1 agreement, and the task metric of both."""
    proj, ids = project(prompt, base.embedding, metric)
    soft_logits = next_token_logits(base.model, prompt, fmt, examples, bf16=bf16)
    proj_logits = next_token_logits(base.model, proj, fmt, examples, bf16=bf16)
    return {"projection_metric": metric, "projected_ids": ids,
            "projected_tokens": [base.tokenizer.decode([i]) for i in ids],
            **divergence(soft_logits, proj_logits),
            "soft": task_score(base.model, prompt, fmt, examples, labels, bf16),
            "projected": task_score(base.model, proj, fmt, examples, labels, bf16)}
