"""Data-parallel training across processes (``torchrun --nproc_per_node=N -m training.fit ...``).

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init` then opens a
process group (``gloo`` on the CPU, ``nccl`` on CUDA, one GPU per local rank). Every rank holds the full model,
trains on its shard of every epoch (``torch.utils.data.DistributedSampler`` over the plane indices, same seed on
all ranks) and, after each backward pass, the gradients of the trainable parameters are averaged across ranks
(``all_reduce``: what ``DistributedDataParallel`` does, done explicitly because the decoder is called through
``forward_with_aux`` and several times per iteration), so all ranks apply identical updates; BatchNorm buffers
are averaged after each step. Only rank 0 validates and writes checkpoints, logs and plots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0, 1, 0


def init(device: str = "cpu") -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op context otherwise."""
    rank, world, local = env_world()
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of PyTorch")
    backend = "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank, world, local, backend)


def device_for(ctx: DistContext, device: str) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` under nccl, else the requested device."""
    if ctx.backend == "nccl":
        return f"cuda:{ctx.local_rank}"
    return device


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def allreduce_gradients(params, ctx: DistContext) -> None:
    """Average the gradients of ``params`` over all ranks (missing gradients count as zero)."""
    if not ctx.active:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(ctx.world_size)


def average_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over all ranks."""
    if not ctx.active:
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(ctx.world_size)


def allreduce_mean(value: float, ctx: DistContext) -> float:
    if not ctx.active:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world_size


def allreduce_max(value: int, ctx: DistContext) -> int:
    if not ctx.active:
        return int(value)
    t = torch.tensor([float(value)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if ``flag`` is True on any rank."""
    if not ctx.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def shard_indices(n: int, ctx: DistContext, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
    """This rank's plane indices of one epoch (``DistributedSampler`` semantics; also used with one process)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return list(sampler)


def cleanup(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
