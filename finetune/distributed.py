"""torchrun support: ``edge-tl finetune`` under ``torchrun --nproc-per-node N`` runs DistributedDataParallel.

The process group comes from torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``...): NCCL on GPUs, gloo on CPU. Every rank decodes the data
and trains on its shard of each epoch's order; validation is sharded and gathered, so every
rank sees the same metrics and takes the same decisions; only rank 0 writes files and draws
progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (a one-element list when not distributed)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: tuple, device: torch.device) -> tuple:
        """Element-wise sum of ``values`` over all ranks, on every rank (``values`` itself when not distributed)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return tuple(t.tolist())

    def sync_buffers(self, module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics drift apart between DDP's syncs)."""
        if self.world > 1:
            for buffer in module.buffers():
                dist.broadcast(buffer, 0)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str) -> Dist:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    owns = not dist.is_initialized()
    if owns:
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns)
