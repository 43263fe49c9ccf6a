"""Speech domain: WER, CTC decoding, log-mel features, espeak-ng synthesis, corpus cache, models.

No training here: the models are only run forward (and one loss backward) on tiny inputs.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from lowbit.domains import speech, speech_data
from lowbit.domains.speech import ctc_loss, padded_batches, score_wer
from lowbit.domains.speech_data import (
    BLANK,
    N_MELS,
    VOCAB,
    Utterance,
    ctc_greedy,
    edit_distance,
    log_mel,
    plan_utterances,
    synthesize,
    word_error_rate,
)
from lowbit.domains.speech_models import CTCLSTM, CTCConformerLite, output_lengths

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.mark.parametrize(
    ("ref", "hyp", "distance"),
    [
        ([1, 2, 3], [1, 2, 3], 0),
        ([1, 2, 3], [1, 3], 1),  # one deletion
        ([1, 2], [1, 4, 2], 1),  # one insertion
        ([1, 2, 3], [1, 5, 3], 1),  # one substitution
        ([1, 2, 3], [3, 2, 1], 2),  # two substitutions, not a cheaper path
        ([], [7, 7], 2),
        ([4, 4, 4], [], 3),
        ([1, 2, 3, 4], [2, 3, 4, 5], 2),  # drop the first, add one at the end
    ],
)
def test_edit_distance_hand_computed(ref: list[int], hyp: list[int], distance: int) -> None:
    assert edit_distance(ref, hyp) == distance
    assert edit_distance(hyp, ref) == distance  # symmetric for unit costs


def test_word_error_rate_is_percent_over_all_reference_words() -> None:
    refs = [[1, 2, 3, 4], [5, 6]]
    assert word_error_rate(refs, refs) == 0.0
    # 1 substitution + 1 deletion over 6 reference words.
    assert word_error_rate(refs, [[1, 2, 9, 4], [5]]) == pytest.approx(100 * 2 / 6)
    # Insertions can push WER above 100 %.
    assert word_error_rate([[1]], [[2, 3]]) == pytest.approx(200.0)
    with pytest.raises(ValueError):
        word_error_rate(refs, [[1]])  # one hypothesis per reference


def test_ctc_greedy_merges_repeats_drops_blanks_and_honours_lengths() -> None:
    # Frame-by-frame best tokens: 3 3 _ 3 1 1 _ _ 2 | 4 4 (padding after frame 9).
    path = [3, 3, BLANK, 3, 1, 1, BLANK, BLANK, 2, 4, 4]
    logits = torch.full((1, len(path), len(VOCAB) + 1), -5.0)
    logits[0, torch.arange(len(path)), torch.tensor(path)] = 5.0
    assert ctc_greedy(logits) == [[3, 3, 1, 2, 4]]
    assert ctc_greedy(logits, torch.tensor([9])) == [[3, 3, 1, 2]]
    assert ctc_greedy(torch.zeros(2, 4, 5)) == [[], []]  # all blank (argmax ties pick index 0)


def test_log_mel_shape_finite_and_normalised() -> None:
    samples = torch.randn(speech_data.SAMPLE_RATE // 2, generator=torch.Generator().manual_seed(0))
    feats = log_mel(samples)
    assert feats.shape == (1 + len(samples) // speech_data.HOP, N_MELS)
    assert bool(feats.isfinite().all())
    torch.testing.assert_close(feats.mean(0), torch.zeros(N_MELS), atol=1e-4, rtol=0)
    assert log_mel(torch.zeros(400)).shape == (3, N_MELS)  # silence stays finite too


def test_mel_filterbank_covers_the_band_in_order() -> None:
    fb = speech_data.mel_filterbank()
    assert fb.shape == (speech_data.N_FFT // 2 + 1, N_MELS) and bool((fb >= 0).all())
    peaks = fb.argmax(0)
    assert bool((peaks[1:] > peaks[:-1]).all())  # one filter per band, low to high
    hz_per_bin = speech_data.SAMPLE_RATE / speech_data.N_FFT
    assert peaks[0] * hz_per_bin < 100 and peaks[-1] * hz_per_bin > 7000
    assert float(fb.max()) <= 1.0


def test_splits_differ_in_sentences_and_voices() -> None:
    train = plan_utterances(300, speech_data.TRAIN_VARIANTS, seed=1)
    held = plan_utterances(100, speech_data.HELDOUT_VARIANTS, seed=2, avoid={u.words for u in train})
    assert not {u.words for u in train} & {u.words for u in held}
    unseen = {u.voice.split("+")[1] for u in held} - {u.voice.split("+")[1] for u in train}
    assert unseen == {"m7"}
    assert all(2 <= len(u.words) <= 5 and min(u.words) >= 1 for u in train + held)
    assert plan_utterances(5, ("m1",), seed=3) == plan_utterances(5, ("m1",), seed=3)  # seeded


def test_missing_espeak_raises_with_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(speech_data.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        speech_data.require_espeak()
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))  # no cached corpus: the builder must synthesise
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        speech.BUILDERS["ctc-lstm"](True)


@needs_espeak
def test_synthesise_two_utterances(tmp_path: Path) -> None:
    utts = [
        Utterance((2, 3, 17), "en-us+m1", 170, 50, 1, 20.0, 0),
        Utterance((11,), "en-gb+f3", 150, 60, 0, 15.0, 1),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        waves = [synthesize(u, Path(tmp)) for u in utts]
        assert list(Path(tmp).iterdir()) == []  # the WAV files are removed once read
    for w in waves:
        assert w.dtype.name == "float32"
        assert 0.2 * speech_data.SAMPLE_RATE < len(w) < 5 * speech_data.SAMPLE_RATE
        assert 0.01 < float(abs(w).max()) < 2.0
    assert len(waves[0]) > len(waves[1])  # three words take longer than one
    again = synthesize(utts[0], tmp_path)
    assert (again == waves[0]).all()  # same utterance, same noise seed: same samples
    feats = speech_data.featurize(utts, workers=2)
    assert [f.shape[1] for f in feats] == [N_MELS, N_MELS] and all(f.float().isfinite().all() for f in feats)


def test_corpus_cache_round_trip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    calls = []

    def fake_featurize(utts: list[Utterance], workers: int = 4) -> list[torch.Tensor]:
        calls.append(len(utts))
        return [torch.randn(10 + 7 * len(u.words), N_MELS).half() for u in utts]

    monkeypatch.setattr(speech_data, "featurize", fake_featurize)
    train, held, seconds = speech_data.load_corpus(n_train=6, n_heldout=3)
    assert calls == [6, 3] and seconds > 0
    assert train.features.shape == (6, int(train.lengths.max()), N_MELS) and len(held) == 3
    assert train.lengths.tolist() == [10 + 7 * int(n) for n in train.target_lengths]
    assert (
        speech_data.corpus_path(6, 3).exists()
        and speech_data.corpus_path(6, 3).parent == tmp_path / "domains"
    )
    train2, held2, seconds2 = speech_data.load_corpus(n_train=6, n_heldout=3)
    assert calls == [6, 3] and seconds2 == 0.0  # served from the cache
    torch.testing.assert_close(train2.features, train.features, rtol=0, atol=0)
    assert held2.references() == held.references()
    speech_data.load_corpus(n_train=5, n_heldout=3)  # another size: its own file, not a stale one
    assert calls == [6, 3, 5, 3]
    speech_data.corpus_path(6, 3).write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unusable"):
        speech_data.load_corpus(n_train=6, n_heldout=3)
    assert calls == [6, 3, 5, 3, 6, 3]


@pytest.mark.parametrize("factory", [CTCLSTM, CTCConformerLite])
def test_models_forward_shapes_and_loss(factory: type[torch.nn.Module]) -> None:
    torch.manual_seed(0)
    model = factory()
    for frames in (1, 7, 100, 163):
        out = model(torch.randn(2, frames, N_MELS))
        assert out.shape == (2, int(output_lengths(torch.tensor(frames))), len(VOCAB) + 1)
    lengths = torch.tensor([60, 41])
    features = torch.randn(2, 80, N_MELS)  # padded past the longest, as the training split is
    targets = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]])
    loss = ctc_loss(model, (features, lengths, targets, torch.tensor([3, 2])))
    assert loss.isfinite() and loss > 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    split = speech_data.Split(features, lengths, targets, torch.tensor([3, 2]))
    batches = padded_batches(split, 2, batch=1)
    assert [tuple(f.shape) for f, _ in batches] == [(1, 60, N_MELS), (1, 41, N_MELS)]
    assert 0.0 <= score_wer(model, batches, split.references())


def test_docstring_examples() -> None:
    import doctest

    from lowbit.domains import speech_models

    for module in (speech_data, speech_models, speech):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
