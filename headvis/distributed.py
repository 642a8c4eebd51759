"""One scan across processes: `torchrun --nproc-per-node N -m headvis.scan ...` (and --nnodes / --rdzv-* across
machines, e.g. under SLURM's srun).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `Ranks.from_env` joins the
process group it describes (gloo on the CPU, NCCL on GPUs, each rank on GPU
LOCAL_RANK). Without them, or with WORLD_SIZE 1, nothing changes: one process,
no process group. The scan has no collective inside its loop (uneven work
cannot deadlock): ranks take the work units u with u % world == rank (under --tp T,
the groups of T consecutive ranks take them as one rank each), write
each unit's state to its own file, and meet once at a barrier after pass 1,
with a long timeout; rank 0 then folds every unit in unit order and writes
the tree alone, the others leave.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Callable

from headvis.errors import HeadvisError

__all__ = ["BARRIER_TIMEOUT_S", "Ranks", "peer_failed", "replica_gpus", "tp_group", "tp_rank"]

BARRIER_TIMEOUT_S = 6 * 3600.0  # a rank may wait this long for the slowest one at the end of pass 1


_TP_GROUP = None  # this process's tensor-parallel group when several sit side by side (--tp below the world)


def tp_group():
    """The process group of this process's --tp group, for the collectives among its processes: None (the
    default group, the whole world) when one group takes every process."""
    return _TP_GROUP


def tp_rank() -> int:
    """This process's place in its --tp group (which share of every layer's heads it holds)."""
    import torch.distributed as dist

    return dist.get_rank(group=_TP_GROUP) if _TP_GROUP is not None else dist.get_rank()


def peer_failed() -> HeadvisError:
    """What a process says when a collective fails because another process of the scan stopped."""
    return HeadvisError("stopped: another process of the scan failed (its own message says why); the saved units "
                        "stay beside --out for a rerun")


def replica_gpus(local_rank: int, local_world: int, n_gpus: int) -> list[int]:
    """The GPUs of process `local_rank` of the `local_world` on one machine, when each spreads its model over
    several (`--device-map`): an equal, contiguous share of the machine's `n_gpus` (a remainder stays idle)."""
    per = n_gpus // max(1, local_world)
    if per < 1:
        raise HeadvisError(f"--device-map: {local_world} processes on this machine share {n_gpus} GPU(s); run at "
                           f"most {n_gpus} per machine (--nproc-per-node), each spreads its model over its share")
    return list(range(local_rank * per, (local_rank + 1) * per))


@dataclass
class Ranks:
    """This process's place in the scan: rank `rank` of `world`."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine (torchrun's LOCAL_WORLD_SIZE)
    joined: bool = False  # a torch.distributed process group was joined (and is left by `close`)
    tp: int = 1  # processes sharing one model's heads (--tp); world / tp such groups take work units side by side
    wait: Callable[[], object] | None = None  # the barrier of ranks that are threads of one process (tests)

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """This process's place among the model replicas that take work units (its TP group's, under --tp)."""
        return self.rank // self.tp

    @property
    def dp_world(self) -> int:
        """The model replicas that take work units: the processes, or their TP groups under --tp."""
        return self.world // self.tp

    @property
    def leader(self) -> bool:
        """Whether this process computes and writes for its replica: always, but for the helpers of a TP group,
        which run the same forward passes and hand their heads to it."""
        return self.rank % self.tp == 0

    def from_leader(self, obj):
        """`obj` of the TP group's leader, on every process of the group (what the helpers must mirror)."""
        if self.tp == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        try:
            dist.broadcast_object_list(box, src=self.rank - self.rank % self.tp, group=tp_group())
        except Exception as e:  # gloo / NCCL: a peer that died closes the connection
            raise peer_failed() from e
        return box[0]

    @classmethod
    def from_env(cls, device: str | None, spread: bool = False, tp: int = 1) -> "Ranks":
        """The torchrun environment's ranks, the process group joined when there is more than one.

        spread: each process spreads its model over a share of the machine's GPUs (`replica_gpus`), and its
        collectives run on the first of them. tp: --tp, the processes that share one model's heads."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        except ValueError as e:
            raise HeadvisError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them): {e}") from None
        if tp > 1 and world == 1:
            raise HeadvisError(f"--tp {tp} splits the model over {tp} processes: run it as `torchrun "
                               f"--nproc-per-node {tp} -m headvis.scan ... --tp {tp}`")
        if tp > 1 and world % tp:
            raise HeadvisError(f"--tp {tp} with {world} processes: the processes must make whole groups of {tp} "
                               f"(one model each, side by side); run a multiple of {tp} processes")
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if cuda:
            torch.cuda.set_device(replica_gpus(local_rank, local_world, torch.cuda.device_count())[0] if spread
                                  else local_rank)
        else:
            # the CPU kernel's threads as many as torch's (torchrun gives each rank OMP_NUM_THREADS=1): numba reads
            # this when it is first imported, later; its default, one per core in every rank, made 2 ranks on 2
            # cores run pass 1 3.4x slower than one process (measured)
            os.environ.setdefault("NUMBA_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
        dist.init_process_group(backend="nccl" if cuda else "gloo",
                                timeout=dt.timedelta(seconds=BARRIER_TIMEOUT_S))
        if 1 < tp < world:  # groups of tp consecutive ranks, as transformers' (dp_replicate, tp) mesh places them
            global _TP_GROUP
            _TP_GROUP, _ = dist.new_subgroups(group_size=tp, timeout=dt.timedelta(seconds=BARRIER_TIMEOUT_S))
        return cls(rank=rank, world=world, local_rank=local_rank, local_world=local_world, joined=True, tp=tp)

    def device(self, device: str | None) -> str | None:
        """The device of this rank: GPU LOCAL_RANK when the scan runs on CUDA across processes."""
        if self.world > 1 and device in (None, "cuda"):
            import torch

            if torch.cuda.is_available():
                return f"cuda:{self.local_rank}"
        return device

    def gpus(self) -> list[int]:
        """The GPUs this process spreads its model over (`--device-map`): its share of the machine's."""
        import torch

        return replica_gpus(self.local_rank, self.local_world, torch.cuda.device_count())

    def barrier(self) -> None:
        if self.wait is not None:
            self.wait()
        elif self.joined:
            import torch.distributed as dist

            try:
                dist.barrier()
            except Exception as e:  # gloo / NCCL: a peer that died closes the connection
                raise peer_failed() from e

    def close(self) -> None:
        if self.joined:
            import torch.distributed as dist

            global _TP_GROUP
            dist.destroy_process_group()  # every group with it
            _TP_GROUP = None
            self.joined = False
