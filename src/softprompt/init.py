"""Initialization of virtual-token vectors: random, sampled vocabulary, a text, or class labels."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from softprompt.errors import SoftPromptError

# Byte-level BPE vocabularies are built in merge order, which tracks corpus frequency, so the lowest
# ids after the special tokens are a good stand-in for "the most frequent tokens" (Lester et al. use
# the 5,000 most frequent SentencePiece tokens).
FREQUENT_VOCAB = 5000


@dataclass(frozen=True)
class InitSpec:
    method: str  # random | vocab | text | labels
    text: str | None = None
    labels: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.method == "text":
            return f"text:{self.text}"
        if self.method == "labels" and self.labels:
            return "labels:" + ",".join(self.labels)
        return self.method


def parse_init(spec: str) -> InitSpec:
    """``random`` | ``vocab`` | ``text:SOME TEXT`` | ``labels`` | ``labels:word1,word2``."""
    head, _, rest = spec.partition(":")
    head = head.strip().lower()
    if head in ("random", "vocab") and not rest:
        return InitSpec(head)
    if head == "text":
        if not rest.strip():
            raise SoftPromptError("--init text: needs a text, e.g. --init text:\"Classify the review:\"")
        return InitSpec("text", text=rest)
    if head == "labels":
        words = tuple(w.strip() for w in rest.split(",") if w.strip()) if rest else ()
        return InitSpec("labels", labels=words)
    raise SoftPromptError(f"--init {spec!r}: expected random, vocab, text:TEXT or labels[:w1,w2]")


def _special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def vocab_ids(tokenizer, n: int, generator: torch.Generator, vocab_size: int) -> torch.Tensor:
    special = _special_ids(tokenizer)
    pool = [i for i in range(min(FREQUENT_VOCAB + len(special), vocab_size)) if i not in special]
    idx = torch.randperm(len(pool), generator=generator)
    if n > len(pool):
        idx = idx.repeat(n // len(pool) + 1)
    return torch.tensor(pool)[idx[:n]]


def text_ids(tokenizer, text: str, n: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise SoftPromptError(f"init text {text!r} tokenizes to nothing")
    return (ids * (n // len(ids) + 1))[:n]  # cut or tile to n


def init_vectors(
    spec: InitSpec,
    n: int,
    embedding: torch.Tensor,
    tokenizer,
    generator: torch.Generator,
    label_words: list[str] | None = None,
) -> torch.Tensor:
    """``[n, hidden]`` initial vectors (float32, CPU)."""
    emb = embedding.detach().float().cpu()
    if spec.method == "random":
        # Match the vocabulary's per-dimension statistics rather than N(0, 1), which is far larger
        # than real token embeddings and trains badly.
        mean, std = emb.mean(0), emb.std(0)
        return mean + std * torch.randn(n, emb.shape[1], generator=generator)
    if spec.method == "vocab":
        return emb[vocab_ids(tokenizer, n, generator, emb.shape[0])].clone()
    if spec.method == "text":
        return emb[torch.tensor(text_ids(tokenizer, spec.text, n))].clone()
    if spec.method == "labels":
        words = list(spec.labels) or list(label_words or [])
        if not words:
            raise SoftPromptError("--init labels: no label words (give --init labels:w1,w2 or data with targets)")
        rows = []
        for w in words[:n]:
            ids = tokenizer(" " + w.strip(), add_special_tokens=False).input_ids
            if not ids:
                raise SoftPromptError(f"label word {w!r} tokenizes to nothing")
            rows.append(emb[torch.tensor(ids)].mean(0))  # multi-token labels: mean of their tokens
        out = torch.stack(rows)
        if len(rows) < n:  # fill the rest with sampled vocabulary, as Lester et al. do
            out = torch.cat([out, emb[vocab_ids(tokenizer, n - len(rows), generator, emb.shape[0])]])
        return out.clone()
    raise SoftPromptError(f"unknown init method {spec.method!r}")


def init_table(template, spec: InitSpec, embedding: torch.Tensor, tokenizer, seed: int, label_words=None) -> torch.Tensor:
    """The whole virtual-token table for a template: spans with their own init text use it, the
    rest use ``spec``."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for span in template.spans():
        if span.init_text:
            parts.append(init_vectors(InitSpec("text", text=span.init_text), span.length, embedding, tokenizer, g))
        else:
            parts.append(init_vectors(spec, span.length, embedding, tokenizer, g, label_words))
    if not parts:
        return torch.zeros(0, embedding.shape[1])
    return torch.cat(parts)
