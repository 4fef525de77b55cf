"""The processes of one search: ``torch.distributed`` when launched by ``torchrun`` or ``accelerate launch``
(they set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), else this process alone.

NCCL on GPUs, gloo on CPUs. Several machines join through torchrun's rendezvous; nothing here depends on
where a rank runs.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


class World:
    """This process's rank among ``size``; results gathered by index, so they never depend on ``size``."""

    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def first(self) -> bool:
        """The process that reads inputs, writes files and shows progress."""
        return self.rank == 0

    def start(self) -> None:
        """Join the process group (after the caller has chosen this rank's device)."""
        if self.size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    def stop(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def share(self, obj):
        """Rank 0's ``obj``, on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, mine: dict) -> dict:
        """The union of every rank's ``{index: result}``, ordered by index."""
        if self.size > 1:
            parts = [None] * self.size
            dist.all_gather_object(parts, mine)
            mine = {k: v for part in parts for k, v in part.items()}
        return dict(sorted(mine.items()))
