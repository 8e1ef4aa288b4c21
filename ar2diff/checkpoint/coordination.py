"""Collectives of ar2diff's checkpoint code, on a process group of its own.

Why: collectives on one group are matched by call order. DeepSpeed's save issues its own collectives on the default
group, and in the 4-rank AutoEP ZeRO-3 test a rank once hashed a peer's RNG file before that peer had written it:
our save barrier had paired with a collective of the peer's still-running DeepSpeed save. Barriers and exchanges on
a group nobody else uses can only pair with each other, so "every rank has finished writing" really holds when
hashing starts.
"""

from __future__ import annotations

from typing import Any

import deepspeed.comm as dist
import torch.distributed as torch_dist

_COORD_GROUP: list = []


def coordination_group():
    """A gloo process group used only by ar2diff's checkpoint coordination (None in a one-rank world). Created
    lazily; every rank reaches the first save/load together, so the creation is collective."""
    if dist.get_world_size() == 1:
        return None
    if not _COORD_GROUP:
        _COORD_GROUP.append(torch_dist.new_group(backend="gloo"))
    return _COORD_GROUP[0]


def barrier() -> None:
    """Wait until every rank reaches this barrier of the coordination group (nothing in a one-rank world)."""
    group = coordination_group()
    if group is not None:
        torch_dist.barrier(group=group)


def run_on_rank0(fn, *args) -> Any:
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its error (no rank hangs)."""
    result: list = [None, None]
    if dist.get_rank() == 0:
        try:
            result = [fn(*args), None]
        except Exception as err:  # re-raised on every rank below
            result = [None, f"{type(err).__name__}: {err}"]
    if dist.get_world_size() > 1:
        torch_dist.broadcast_object_list(result, src=0, group=coordination_group())
    if result[1] is not None:
        raise RuntimeError(f"checkpoint step failed on rank 0: {result[1]}")
    return result[0]


def all_gather_object(out: list, obj) -> None:
    """``torch.distributed.all_gather_object`` on the coordination group (a copy of ``obj`` in a one-rank world)."""
    if dist.get_world_size() == 1:
        out[0] = obj
    else:
        torch_dist.all_gather_object(out, obj, group=coordination_group())
