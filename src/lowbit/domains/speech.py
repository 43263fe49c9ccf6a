"""Speech recognition for the domain tables: CTC acoustic models on spoken word sequences.

The data is synthesised with espeak-ng (``lowbit.domains.speech_data``): 2400 training and 600
held-out utterances of 2 to 5 words from a 20-word vocabulary (digits plus command words), in six
accents and several voice variants, with noise; the held-out split has other word sequences,
other noise and one voice variant training never hears. The models (``speech_models``) read
40-band log-mels and emit one of the 20 words or the CTC blank every 40 ms; decoding is greedy.
The metric is the word error rate in **percent** over the held-out split (lower is better).

Building needs the ``espeak-ng`` program the first time (the corpus and weights are cached
afterwards); without it a builder raises ``RuntimeError`` naming ``apt-get install espeak-ng``.

>>> sorted(BUILDERS)
['ctc-conformer-lite', 'ctc-lstm']
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lowbit.domains.common import Shuffled, cached_training, train_epochs
from lowbit.domains.speech_data import CORPUS_VERSION, Split, ctc_greedy, load_corpus, word_error_rate
from lowbit.domains.speech_models import CTCLSTM, CTCConformerLite, output_lengths
from lowbit.domains.task import DomainTask

BATCH = 32
HELDOUT_QUICK = 300  # held-out utterances scored in quick mode (600 otherwise)


def ctc_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean CTC loss of ``model`` on a training batch ``(features, lengths, targets, target_lengths)``.

    The features are padded to the longest utterance of the whole split; they are cut to the
    longest of this batch first, so padding costs only what the batch itself needs.
    """
    features, lengths, targets, target_lengths = batch
    logits = model(features[:, : int(lengths.max())])
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # [T', B, V], as ctc_loss wants
    return nn.functional.ctc_loss(
        log_probs, targets, output_lengths(lengths), target_lengths, blank=0, zero_infinity=True
    )


def padded_batches(split: Split, n: int, batch: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` utterances of ``split`` as ``(features [B, T, n_mels], lengths)`` batches,
    each padded only to its own longest utterance (held-out scoring, calibration)."""
    out = []
    for start in range(0, min(n, len(split)), batch):
        stop = min(start + batch, n)
        lengths = split.lengths[start:stop]
        out.append((split.features[start:stop, : int(lengths.max())], lengths))
    return out


def score_wer(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], references: list[list[int]]
) -> float:
    """Word error rate (percent) of ``model``'s greedy CTC transcripts of ``batches``."""
    hyps: list[list[int]] = []
    with torch.no_grad():
        for features, lengths in batches:
            hyps += ctc_greedy(model(features), output_lengths(lengths))
    return word_error_rate(references[: len(hyps)], hyps)


def _build(
    name: str,
    factory: Callable[[], nn.Module],
    quick: bool,
    *,
    version: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    finetune_utterances: int,
    description: str,
) -> DomainTask:
    train, heldout, gen_seconds = load_corpus()
    columns = (train.features, train.lengths, train.targets, train.target_lengths)
    data = Shuffled(columns, BATCH, seed=0)
    # QAT / pruning fine-tune on a share of the training split, sized to take ~15-25 s on 2 cores.
    tune = Shuffled(tuple(c[:finetune_utterances] for c in columns), BATCH, seed=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = factory()
    model, train_seconds = cached_training(
        f"domains-speech-{name}",
        version * 100 + CORPUS_VERSION,  # new data means new weights too
        model,
        lambda m: train_epochs(
            m, data, ctc_loss, epochs, lr, weight_decay=weight_decay, desc=f"training {name}"
        ),
        info={"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "corpus_version": CORPUS_VERSION},
    )
    n = HELDOUT_QUICK if quick else len(heldout)
    batches = padded_batches(heldout, n)
    references = heldout.references()
    calibration = [f for f, _ in padded_batches(train, 8 * BATCH)]  # training utterances
    notes = []
    if gen_seconds:
        notes.append(f"speech corpus synthesised with espeak-ng in {gen_seconds:.0f} s (cached)")

    def score(m: nn.Module) -> dict[str, float]:
        return {"wer": score_wer(m, batches, references)}

    return DomainTask(
        domain="speech",
        name=name,
        model=model,
        calibration=calibration,
        train_data=tune,
        loss=ctc_loss,
        score=score,
        metrics={"wer": False},
        inputs=[f for f, _ in batches[:3]],
        description=f"{description}; WER % on {n} held-out espeak-ng utterances",
        train_seconds=gen_seconds + train_seconds,
        notes=notes,
        # One pass at 1e-4: W4A4 QAT then recovers most of PTQ's loss on both models; 3e-4 moved the
        # converged weights too far (WER up by ~0.5-1 point on the conformer).
        finetune_epochs=1,
        finetune_lr=1e-4,
    )


def build_ctc_lstm(quick: bool = False) -> DomainTask:
    """Conv front-end + bidirectional LSTM (128 per direction) + linear, CTC over 20 words."""
    return _build(
        "ctc-lstm",
        CTCLSTM,
        quick,
        version=1,
        epochs=10,
        lr=2e-3,
        weight_decay=0.01,
        finetune_utterances=2400,
        description="2 Conv1d (stride 4) + BiLSTM 128 + linear, CTC over 20 spoken words",
    )


def build_ctc_conformer_lite(quick: bool = False) -> DomainTask:
    """Conv front-end + two conformer-lite blocks (attention, depthwise conv, feed-forward) + linear."""
    return _build(
        "ctc-conformer-lite",
        CTCConformerLite,
        quick,
        version=1,
        epochs=5,
        lr=2e-3,
        weight_decay=0.01,
        finetune_utterances=1200,  # a third slower per step than the LSTM
        description="2 Conv1d (stride 4) + 2 conformer-lite blocks (d 128) + linear, CTC over 20 words",
    )


# The first builder synthesises the corpus the second reads: a parallel build runs them in order
# in one worker (``lowbit.domains.prebuild``), not side by side (twice the espeak-ng work).
BUILD_TOGETHER = True
BUILDERS: dict[str, Callable[[bool], DomainTask]] = {
    "ctc-lstm": build_ctc_lstm,
    "ctc-conformer-lite": build_ctc_conformer_lite,
}

__all__ = ["BUILDERS", "ctc_loss", "padded_batches", "score_wer"]
