"""Pruning: magnitude (unstructured), N:M semi-structured (2:4), structured channels (the model
shrinks), an iterative prune-and-fine-tune schedule, sparse storage, and the Deep Compression pipeline.

>>> import torch, lowbit.pruning as P
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> masks = P.prune(model, 0.5)
>>> round(P.sparsity(model), 2)
0.5
"""

from lowbit.pruning.deep_compression import (
    DeepCompressionResult,
    deep_compress,
    deep_compression_recipe,
    disk_size,
    pack_kmeans,
)
from lowbit.pruning.masks import (
    Masks,
    magnitude_masks,
    nm_mask,
    prunable_weights,
    prune,
    semi_structured_masks,
    sparsity,
)
from lowbit.pruning.schedule import PruneResult, cubic_schedule, iterative_prune
from lowbit.pruning.sparse import SparseSize, sparse_report
from lowbit.pruning.structured import prune_channels

__all__ = [
    "DeepCompressionResult",
    "Masks",
    "PruneResult",
    "SparseSize",
    "cubic_schedule",
    "deep_compress",
    "deep_compression_recipe",
    "disk_size",
    "iterative_prune",
    "magnitude_masks",
    "nm_mask",
    "pack_kmeans",
    "prunable_weights",
    "prune",
    "prune_channels",
    "semi_structured_masks",
    "sparse_report",
    "sparsity",
]
