"""The order in which training sees examples: seeded, length-bucketed, fixed in advance so that a
resumed run sees exactly the batches an uninterrupted run would."""
from __future__ import annotations

import torch


def batch_plan(lengths: list[int], batch_size: int, n_batches: int, seed: int, bucket: bool = True,
               window: int = 16) -> list[list[int]]:
    """``n_batches`` lists of example indices. Each epoch is a seeded permutation; with ``bucket``
    it is cut into windows of ``window`` batches, each window sorted by length (so batches hold
    similar lengths and little padding), and the batches of the epoch shuffled. Within an epoch every
    example appears exactly once."""
    n = len(lengths)
    if n == 0:
        raise ValueError("no examples")
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < n_batches:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        batches: list[list[int]] = []
        if bucket:
            span = batch_size * window
            for start in range(0, n, span):
                chunk = sorted(perm[start:start + span], key=lambda i: lengths[i])
                batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
            order = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in order]
        else:
            batches = [perm[j:j + batch_size] for j in range(0, n, batch_size)]
        plan += batches
        epoch += 1
    return plan[:n_batches]
