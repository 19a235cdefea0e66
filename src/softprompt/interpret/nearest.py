"""Where a soft prompt's vectors sit among the vocabulary's embeddings: nearest tokens by cosine,
dot product and L2 distance, norms against the vocabulary's, and how alike two prompts are."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softprompt.errors import SoftPromptError

METRICS = ("cosine", "dot", "l2")


@dataclass
class Neighbours:
    metric: str
    ids: torch.Tensor  # [n, k]
    scores: torch.Tensor  # [n, k]: similarity (cosine, dot) or distance (l2)


def _check_k(k: int, vocab: int) -> None:
    if k < 1 or k > vocab:
        raise SoftPromptError(f"--k must be between 1 and the vocabulary size {vocab} (got {k})")


def nearest_tokens(vectors: torch.Tensor, embedding: torch.Tensor, k: int = 10, metric: str = "cosine",
                   chunk: int = 16384) -> Neighbours:
    """The ``k`` vocabulary rows nearest to each of ``vectors`` ([n, hidden]) under ``metric``."""
    if metric not in METRICS:
        raise SoftPromptError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    _check_k(k, embedding.shape[0])
    v = vectors.detach().float()
    best_s, best_i = None, None
    for start in range(0, embedding.shape[0], chunk):  # bounded memory on large vocabularies
        e = embedding[start:start + chunk].detach().float().to(v.device)
        if metric == "cosine":
            s = F.normalize(v, dim=-1) @ F.normalize(e, dim=-1).T
        elif metric == "dot":
            s = v @ e.T
        else:
            s = -torch.cdist(v, e)
        top = s.topk(min(k, s.shape[1]), dim=-1)
        ids = top.indices + start
        if best_s is None:
            best_s, best_i = top.values, ids
        else:
            merged_s, merged_i = torch.cat([best_s, top.values], 1), torch.cat([best_i, ids], 1)
            order = merged_s.topk(k, dim=-1).indices
            best_s, best_i = merged_s.gather(1, order), merged_i.gather(1, order)
    return Neighbours(metric, best_i, -best_s if metric == "l2" else best_s)


def norm_percentiles(vectors: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Each vector's L2 norm, its percentile among the vocabulary's norms, and summary statistics of
    the vocabulary's norms."""
    norms = vectors.detach().float().norm(dim=-1)
    vocab = embedding.detach().float().norm(dim=-1)
    sorted_vocab = vocab.sort().values
    pct = torch.searchsorted(sorted_vocab, norms.contiguous()).float() / len(sorted_vocab) * 100
    q = torch.quantile(sorted_vocab, torch.tensor([0.01, 0.5, 0.99]))
    stats = {"mean": float(vocab.mean()), "p1": float(q[0]), "median": float(q[1]), "p99": float(q[2]),
             "max": float(vocab.max())}
    return norms, pct, stats


def compare_prompts(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Similarity of two virtual-token tables: position by position (when the lengths match), each
    token's best match in the other prompt, and the prompts as wholes (mean vectors)."""
    a, b = a.detach().float(), b.detach().float()
    if a.shape[1] != b.shape[1]:
        raise SoftPromptError(f"the prompts live in different spaces (hidden size {a.shape[1]} vs {b.shape[1]})")
    sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T  # [na, nb]
    out = {
        "n_a": a.shape[0], "n_b": b.shape[0],
        "best_match_a_to_b": sim.max(1).values.tolist(),
        "best_match_index_a_to_b": sim.argmax(1).tolist(),
        "mean_best_match": float((sim.max(1).values.mean() + sim.max(0).values.mean()) / 2),
        "mean_vector_cosine": float(F.cosine_similarity(a.mean(0), b.mean(0), dim=0)),
        "cosine_matrix": sim.tolist(),
    }
    if a.shape == b.shape:
        pos = F.cosine_similarity(a, b, dim=-1)
        out["positionwise_cosine"] = pos.tolist()
        out["mean_positionwise_cosine"] = float(pos.mean())
        out["relative_l2"] = float((a - b).norm() / a.norm().clamp(min=1e-12))
    return out
