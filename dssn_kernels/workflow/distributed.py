"""torch.distributed plumbing for sharded certification.

Launched by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT), ``Context.from_env`` joins the process group: gloo for CPU work, nccl for
GPU work (each rank then uses ``cuda:LOCAL_RANK``). Without those variables, or with
WORLD_SIZE=1, it is a single process and every collective is the identity. Only small
Python objects travel (row lines and decisions), through rank 0; no file has to be
visible to every node.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

# Ranks wait at the final gather for the slowest one: allow long certification runs.
DEFAULT_TIMEOUT = datetime.timedelta(hours=72)


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "cpu", backend: str | None = None,
                 timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> "Context":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        on_gpu = torch.device(device).type == "cuda"
        if backend is None:
            backend = "nccl" if on_gpu else "gloo"
        if on_gpu:
            torch.cuda.set_device(local_rank)
        if dist.is_initialized():
            return cls(rank, world, local_rank, dist.get_backend(), owns_group=False)
        dist.init_process_group(backend=backend, timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, backend, owns_group=True)

    def device_for(self, device: str) -> torch.device:
        """``cuda`` means this rank's GPU (cuda:LOCAL_RANK) when distributed."""
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and self.distributed:
            return torch.device("cuda", self.local_rank)
        return dev

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False

    def shard(self, items: list) -> list:
        """This rank's share: the items at positions p with p % world_size == rank."""
        return list(items[self.rank::self.world_size])

    def agree(self, fn, errors=(Exception,), *, local=None):
        """Runs ``local()`` on every rank (if given) and ``fn(gathered_local_results)`` on
        rank 0; returns rank 0's result on every rank. An exception of one of ``errors``
        on any rank is re-raised, with the same type and message, on every rank (so all
        ranks stop cleanly together instead of waiting for one that failed)."""
        def attempt(f, *args):
            try:
                return ("ok", f(*args))
            except errors as exc:
                return ("err", type(exc), str(exc))

        mine = attempt(local) if local is not None else ("ok", None)
        gathered = self.gather(mine)
        if self.is_main:
            failed = [g for g in gathered if g[0] == "err"]
            decision = failed[0] if failed else attempt(fn, [g[1] for g in gathered])
        else:
            decision = None
        decision = self.broadcast(decision)
        if decision[0] == "err":
            raise decision[1](decision[2])
        return decision[1]
