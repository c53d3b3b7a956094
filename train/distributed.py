"""One process or many (torchrun): DDP with NCCL on CUDA and gloo on CPU; only rank 0 writes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ssb_fast.devices import resolve_device


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_spec: str = "auto") -> DistContext:
    """Read torchrun's environment; start a process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(0, 1, 0, resolve_device(device_spec))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world, local_rank, device)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def mean_across_ranks(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Average a small tensor over ranks (for logging); a no-op on one process."""
    if ctx.distributed:
        values = values.clone()
        dist.all_reduce(values)
        values /= ctx.world_size
    return values


def max_across_ranks(ctx: DistContext, *values: float) -> list[float]:
    """Each value's maximum over ranks: how ranks agree to stop or save at the same step. A no-op on one
    process; one small all-reduce (and host sync) per call under DDP."""
    if not ctx.distributed:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def run_on_main(ctx: DistContext, fn):
    """Run `fn()` on rank 0 only and give every rank its result, or raise its exception on every rank, so
    that no rank waits forever at a collective that a failed rank 0 never reaches."""
    if not ctx.distributed:
        return fn()
    box = [None]
    if ctx.is_main:
        try:
            box[0] = (fn(), None)
        except Exception as err:
            box[0] = (None, err)
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result
