"""lowbit: quantize PyTorch models, measure what it bought and cost, ship a smaller artifact."""

__version__ = "0.1.0"
