"""The few process-group operations sp-samp needs under a data-parallel strategy; each is a no-op in one process."""

from __future__ import annotations

from typing import Any


def _group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_from_ranks(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order, on every rank (``[value]`` without a process group)."""
    import torch.distributed as dist

    size = _group_size()
    if size == 1:
        return [value]
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, value)
    return gathered


def gather_unique(keys: Any, *values: Any) -> tuple[Any, ...]:
    """``values`` (tensors whose first dimension matches ``keys``, a 1-D tensor) of every rank, each key once
    (its first occurrence) in key order: a distributed sampler pads its shards with repeats of some rows."""
    import torch

    parts = gather_from_ranks((keys, *values))
    all_keys, *all_values = (torch.cat([part[i] for part in parts]) for i in range(len(values) + 1))
    order = torch.argsort(all_keys, stable=True)
    sorted_keys = all_keys[order]
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]  # a repeat follows its original: keep the first
    keep = order[first]
    return tuple(value[keep] for value in all_values)


def release_process_group() -> None:
    """End a data-parallel run cleanly: every rank waits for the others, then the process group is destroyed.

    Lightning destroys NCCL groups at exit but leaves gloo ones to interpreter shutdown, where gloo's threads
    sometimes die with "terminate called without an active exception" (SIGABRT) after all the work is done.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
