"""torch.distributed for training: who this process is, and the few collectives the loop needs.

``t2i train`` runs one process per GPU under ``torchrun`` (``train.nproc_per_node``,
``train.nnodes``); torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and this module joins the process
group: NCCL on CUDA, gloo on the CPU. A plain run (no torchrun) is world size 1 and touches none of
torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, writes checkpoints and exports the model."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """Under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_rank() -> int | None:
    """This process's rank under torchrun, read from the environment before the process group
    is joined (None without torchrun): rank 0 runs the stage's flow and logs, the others only train."""
    return int(os.environ.get("RANK", "0")) if launched() else None


def setup(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun; returns who this process is."""
    if not launched():
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def device_for(device: torch.device, d: Dist) -> torch.device:
    """Each rank's own GPU on a multi-GPU node."""
    return torch.device("cuda", d.local_rank) if device.type == "cuda" and d.active else device


def gather(obj: Any, d: Dist) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a plain list of one without torchrun)."""
    if not d.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_max(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world
    return value


def teardown(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def torchrun_command(argv: list[str], nproc_per_node: int, nnodes: int, rdzv_endpoint: str, rdzv_id: str) -> list[str]:
    """The torchrun command line that reruns ``t2i <argv>`` once per process: one node
    (``--standalone``), or several meeting at ``rdzv_endpoint`` (c10d rendezvous; start the same
    command on every node)."""
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if nnodes > 1:
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "flows.cli", *argv]
