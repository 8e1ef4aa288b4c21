"""Distributed start-up that works the same under torchrun / the deepspeed launcher and as one plain process.

Why the single-process defaults: without RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT in the environment,
``deepspeed.init_distributed`` tries MPI discovery and fails on machines without mpi4py. A plain
``python -m ar2diff.train`` therefore gets a one-rank world on 127.0.0.1 and a free port.

Devices and backends come from DeepSpeed's accelerator abstraction only (gloo on CPU, nccl on CUDA, rccl via
nccl on ROCm), never from ``torch.cuda``, so the same code runs on every accelerator DeepSpeed supports.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import NamedTuple

import deepspeed
import torch
import torch.distributed as torch_dist
from torch.distributed import distributed_c10d
from deepspeed.accelerator import get_accelerator

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistContext(NamedTuple):
    """Where this process sits in the job; unpacks as ``rank, world_size, local_rank, device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def single_process_env(environ: dict[str, str]) -> dict[str, str]:
    """The launcher variables missing from ``environ`` for a one-rank world; raises if half a launch is set.

    Returns only the keys to add, so it is pure apart from picking a free port.
    """
    rank_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    present = [key for key in rank_keys if key in environ]
    if present and len(present) != len(rank_keys):
        missing = [key for key in rank_keys if key not in environ]
        raise ValueError(f"environment has {present} but not {missing}: launch with torchrun/deepspeed, "
                         "or unset all of RANK, WORLD_SIZE, LOCAL_RANK for a single-process run")
    if present and int(environ["WORLD_SIZE"]) > 1:
        missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if key not in environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={environ['WORLD_SIZE']} but {missing} not set: launch with "
                             "torchrun/deepspeed, which set them")
    added = {}
    if not present:
        added.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if "MASTER_ADDR" not in environ:
        added["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in environ:
        added["MASTER_PORT"] = str(free_port())
    return added


def init_distributed(timeout_minutes: float | None = None, rank0_timeout_minutes: float | None = None) -> DistContext:
    """Initialise torch.distributed through DeepSpeed and bind this process to its device.

    timeout_minutes: how long a collective waits for a peer before it fails (`trainer.collective_timeout_minutes`;
    None: DeepSpeed's 10 minutes). rank0_timeout_minutes: the wait group of `rank0_wait_group` is created here, at a
    point every rank passes before any rank-0-only work (creating it later, beside that work, leaves the others in a
    store wait that neither rank 0's exit nor a signal ends). Safe to call twice: a second call only reads the already-initialised world (its
    timeout is the first call's). On CPU the first call in a fresh ``TORCH_EXTENSIONS_DIR`` compiles DeepSpeed's
    shared-memory comm op (~30 s, cached afterwards).
    """
    os.environ.update(single_process_env(dict(os.environ)))
    accelerator = get_accelerator()
    local_rank = int(os.environ["LOCAL_RANK"])
    accelerator.set_device(local_rank)  # before the process group, so NCCL/RCCL binds this rank's device
    # Idempotent, and adopts a process group someone else already initialised with torch.distributed.
    timeout = {}
    if timeout_minutes is not None and not torch_dist.is_initialized():
        timeout["timeout"] = timedelta(minutes=timeout_minutes)
        # the groups DeepSpeed creates later (data, expert, sequence parallel) take torch's module default, not the
        # world's timeout: set that default too, or a hung peer is waited on for torch's 30 minutes
        distributed_c10d.default_pg_timeout = timeout["timeout"]
        distributed_c10d.default_pg_nccl_timeout = timeout["timeout"]
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False,
                               **timeout)
    if rank0_timeout_minutes is not None:
        rank0_wait_group(rank0_timeout_minutes)
    device = torch.device(accelerator.device_name(local_rank))
    return DistContext(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, device)


_WAIT_GROUPS: dict[float, object] = {}


def rank0_wait_group(timeout_minutes: float):
    """A process group over the whole world whose collectives wait up to `timeout_minutes`: for the barriers where
    every rank waits on rank 0 alone (the export, the decoder check: tens of minutes at 8B), so that the collective
    timeout of the training steps can stay short. Created once per timeout (a collective call: every rank calls
    it at the same point; `init_distributed(rank0_timeout_minutes=...)` does, before any rank-0-only work); None in
    a one-rank world."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return None
    if timeout_minutes not in _WAIT_GROUPS:
        backend = get_accelerator().communication_backend_name()
        _WAIT_GROUPS[timeout_minutes] = torch_dist.new_group(backend=backend,
                                                             timeout=timedelta(minutes=timeout_minutes))
    return _WAIT_GROUPS[timeout_minutes]


def wait_for_rank0(timeout_minutes: float) -> None:
    """Every rank waits here until all arrive, up to `timeout_minutes` (see `rank0_wait_group`)."""
    group = rank0_wait_group(timeout_minutes)
    if group is not None:
        torch_dist.barrier(group=group)
