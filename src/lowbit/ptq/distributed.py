"""Data-parallel calibration on ``torch.distributed``: each rank sees a share of the batches.

With a process group initialised (``torchrun --nproc-per-node N``, or ``init_process_group`` in
the caller; gloo on CPU, nccl on GPU), ``lowbit.quantize`` gives rank ``r`` the calibration
batches ``r, r + N, r + 2N ...``. Every rank runs the sequential pipeline on its share; after each
stage's statistics pass the statistics are summed over the ranks (``X^T X``, the column sums and
counts; the column maxima by max), so every rank solves GPTQ / AWQ / SmoothQuant on the same
matrices and writes the same weights, and each stage passes on its own share's outputs. Static
activation ranges (the ``minmax`` observer) are combined by min / max. Nothing is broadcast but
statistics: the activations stay where they were computed, so each rank holds ``1/N`` of them.

The sums are exact up to float64 rounding (a different summation order than one process):
weights can differ from a single-process run where a value sits within ~1e-12 of a rounding
boundary; ``tests/test_distributed.py`` measures it. Only rank 0 writes files (``lowbit.save``
and the CLI).

>>> world()  # no process group: one rank
(0, 1)
>>> shard([1, 2, 3])
[1, 2, 3]
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lowbit.errors import DataError

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised default process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """Whether this process writes files (rank 0, or no process group)."""
    return world()[0] == 0


def shard(batches: Sequence[T]) -> list[T]:
    """This rank's calibration batches (every ``world size``-th, from its rank); all of them alone.

    Refuses fewer batches than ranks (a rank with no data would hold no statistics).
    """
    rank, size = world()
    if size == 1:
        return list(batches)
    if len(batches) < size:
        raise DataError(
            f"{len(batches)} calibration batches for {size} ranks: each rank needs at least one; "
            "pass more batches (or smaller ones) or start fewer processes"
        )
    return list(batches[rank::size])


def init_from_environment() -> bool:
    """Initialise the default process group when started by ``torchrun`` (``WORLD_SIZE`` > 1)
    and none exists: nccl when CUDA is available, else gloo. Returns whether one is active."""
    if not dist.is_available():
        return False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.is_initialized() and dist.get_world_size() > 1


def same_everywhere(value: Any, what: str) -> None:
    """Raise ``ValueError`` unless ``value`` (JSON-ready) is the same on every rank: the ranks
    must reduce the same tensors in the same order (else a collective would hang or mix layers
    up), and quantize with the same recipe. Compared by digest (no pickled objects travel)."""
    if world()[1] == 1:
        return
    text = json.dumps(value, sort_keys=True, default=str).encode()
    mine = torch.frombuffer(bytearray(hashlib.sha256(text).digest()), dtype=torch.uint8).to(torch.int64)
    gathered = [torch.zeros_like(mine) for _ in range(world()[1])]
    dist.all_gather(gathered, mine)
    differ = [rank for rank, theirs in enumerate(gathered) if not torch.equal(theirs, mine)]
    if differ:
        raise ValueError(
            f"{what}: rank {world()[0]} and rank {differ[0]} differ; every rank must quantize the same "
            "layers with the same recipe (a mixture-of-experts router can route one rank's tokens "
            "away from an expert: use more calibration batches; a measured activation plan can "
            "differ between ranks' data: set activation_plan: fixed)"
        )


def reduce_statistics(groups: Iterable[Any], what: str) -> None:
    """Sum the ``InputStats`` of ``groups`` (a stage's ``StageObserver.groups``) over all ranks,
    in place. No-op without a process group."""
    if world()[1] == 1:
        return
    items = [(group.names[0], source, stats) for group in groups for source, stats in group.stats.items()]
    keys = [
        (name, source, stats.cols, stats.xtx is not None, stats.abs_sum is not None)
        for name, source, stats in items
    ]
    same_everywhere(keys, what)
    for _, _, stats in items:
        for total in (stats.xtx, stats.abs_sum, stats.sum):
            if total is not None:
                dist.all_reduce(total, op=dist.ReduceOp.SUM)
        if stats.abs_max is not None:
            dist.all_reduce(stats.abs_max, op=dist.ReduceOp.MAX)
        count = torch.tensor([stats.count], dtype=torch.float64, device=_device(stats))
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        stats.count = int(count.item())


def _device(stats: Any) -> torch.device:
    tensor = next(t for t in (stats.xtx, stats.abs_sum) if t is not None)
    return tensor.device


def reduce_ranges(quantizers: Sequence[Any]) -> None:
    """Combine the static activation ranges observed on every rank (min of minima, max of maxima,
    summed counts), in place, before the quantizers freeze. Only the ``minmax`` observer's ranges
    combine exactly; others are refused under a process group."""
    if world()[1] == 1:
        return
    keys = [(q.name, q.observer.name) for q in quantizers]
    same_everywhere(keys, "static activation calibration")
    for q in quantizers:
        observer = q.observer
        if observer.name != "minmax":
            raise ValueError(
                f"{q.name}: the {q.spec.observer} observer's statistics do not combine across ranks; "
                "use observer minmax for static activations under torch.distributed"
            )
        dist.all_reduce(observer.min_val, op=dist.ReduceOp.MIN)
        dist.all_reduce(observer.max_val, op=dist.ReduceOp.MAX)
        count = torch.tensor([observer.count], dtype=torch.float64)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        observer.count = int(count.item())
