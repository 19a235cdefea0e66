"""Data-parallel training across processes (``accelerate launch``, ``torchrun``).

The base model is frozen, so the only state to keep in sync is the prompt: every rank holds the
whole base and the whole prompt, takes a slice of each global batch, and the prompt's gradients are
summed across ranks before the (identical) optimizer step. No DDP wrapper is needed: the base has
no gradients to reduce, and the prompt's are few enough for one flattened all-reduce per step.

With one process nothing here does any work, and the trainer follows exactly its single-process path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # the device the launcher assigned this rank, if any

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: list[int]) -> list[int]:
        """This rank's part of a batch: every ``world``-th example (balanced lengths, since the
        plan's batches hold similar lengths). A rank may get none when the batch is smaller than the
        number of ranks; it still joins the all-reduce with zero gradients."""
        return idx[self.rank::self.world] if self.active else idx

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` across ranks (in place), in one flattened all-reduce."""
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sums of a few scalars across ranks (for logging the global loss and token count)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        """Make every rank start from rank 0's values."""
        if not self.active:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def broadcast_flag(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's value of ``flag`` on every rank (e.g. the early-stopping decision)."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def current() -> Dist:
    """The job this process belongs to. Joins the process group when a launcher started several
    processes (``WORLD_SIZE`` > 1) and none is initialized yet, through accelerate's
    ``PartialState`` (gloo on CPU, NCCL on CUDA, one device per local rank). A launch that sets
    ``WORLD_SIZE`` but leaves accelerate undistributed is an error, not a silent single-rank run."""
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world == 1:
            return Dist()
        device = None
        if torch.cuda.is_available() and dist.get_backend() == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
        return Dist(dist.get_rank(), world, device)
    if launched_world_size() <= 1:
        return Dist()
    from accelerate import PartialState

    # without a GPU, accelerate only picks its multi-CPU (gloo) mode when told the job is CPU-only
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != launched_world_size():
        raise RuntimeError(f"launched with WORLD_SIZE={launched_world_size()} but accelerate set up "
                           f"{state.num_processes} process(es) ({state.distributed_type})")
    return Dist(state.process_index, state.num_processes, state.device)
