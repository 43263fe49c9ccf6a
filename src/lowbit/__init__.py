"""lowbit: quantize PyTorch models, measure what it bought and cost, ship a smaller artifact.

>>> import torch, lowbit
>>> q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(8, 2)), "int8-weight-only")
>>> type(q[0]).__name__
'QuantizedLinear'
"""

__version__ = "0.1.0"

from lowbit import pruning, qat, train  # noqa: E402
from lowbit.analysis import search, sensitivity  # noqa: E402
from lowbit.api import calibrate, convert, load, prepare, quantize, save, size_report  # noqa: E402
from lowbit.distill import DistillationLoss, distill  # noqa: E402
from lowbit.doctor import doctor  # noqa: E402  (the function: lowbit.doctor; the module stays importable)
from lowbit.errors import ArtifactError, BudgetError, CheckpointError, DataError, ModelError, RecipeError  # noqa: E402
from lowbit.eval.evaluate import evaluate  # noqa: E402
from lowbit.from_sklearn import from_sklearn  # noqa: E402
from lowbit.recipes import Recipe  # noqa: E402

__all__ = [
    "ArtifactError",
    "BudgetError",
    "CheckpointError",
    "DataError",
    "DistillationLoss",
    "KVCache",
    "ModelError",
    "Recipe",
    "RecipeError",
    "__version__",
    "calibrate",
    "convert",
    "distill",
    "doctor",
    "evaluate",
    "export_gguf",
    "export_onnx",
    "from_sklearn",
    "load",
    "prepare",
    "pruning",
    "qat",
    "quantize",
    "quantize_checkpoint",
    "quantize_for_gguf",
    "save",
    "save_pretrained",
    "search",
    "sensitivity",
    "size_report",
    "train",
]


def __getattr__(name: str) -> object:
    # ONNX export imports onnx and onnxruntime: only when it is first used.
    if name == "export_onnx":
        from lowbit.export.onnx import export_onnx

        return export_onnx
    # GGUF and compressed-tensors need their packages (gguf, compressed-tensors): imported on use.
    if name in ("export_gguf", "quantize_for_gguf"):
        from lowbit.interop import gguf_export

        return getattr(gguf_export, name)
    # The KV cache is a transformers Cache: transformers is imported on use.
    if name == "KVCache":
        from lowbit.kvcache import KVCache

        return KVCache
    # Onloading builds the model from its config with transformers: imported on use.
    if name == "quantize_checkpoint":
        from lowbit.ptq.onload import quantize_checkpoint

        return quantize_checkpoint
    if name == "save_pretrained":
        from lowbit.interop.compressed_tensors import save_pretrained

        return save_pretrained
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
