"""Spoken word sequences synthesised with espeak-ng, log-mel features, CTC decoding and WER.

The speech domain needs audio no package ships, so it is made here: sequences of 2 to 5 words from
a 20-word vocabulary (the digits plus ten command words) spoken by espeak-ng in several accents
and voice variants, at random speeds, pitches and word gaps, with seeded noise at 10-30 dB SNR.
The held-out split has other word sequences, other noise, and one voice variant training never
hears. Features are 40-band log-mel spectrograms (25 ms windows every 10 ms at 16 kHz),
normalised per utterance and band. The corpus is generated on first use and cached under
``cache_dir() / "domains"``; generating needs the ``espeak-ng`` program, nothing else.

>>> word_error_rate([[1, 2, 3]], [[1, 3]])
33.33...
>>> ctc_greedy(torch.tensor([[[0.0, 9, 0], [0, 9, 0], [9, 0, 0], [0, 0, 9]]]))
[[1, 2]]
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import time
import uuid
import warnings
import wave
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from lowbit.zoo.cache import atomic_write, cache_dir

VOCAB = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "yes", "no", "up", "down", "left", "right", "stop", "go", "on", "off",
)  # fmt: skip
BLANK = 0  # CTC blank; word i of VOCAB is token i + 1
SAMPLE_RATE = 16_000
N_FFT, HOP, N_MELS = 400, 160, 40  # 25 ms windows every 10 ms
CORPUS_VERSION = 1

# Accents x voice variants. Both splits hear every accent; the held-out split also hears a variant
# ("m7") that training never does, so the WER includes a speaker the model has not met.
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc")
TRAIN_VARIANTS = ("m1", "m3", "f1", "f3", "f4", "klatt")
HELDOUT_VARIANTS = ("m1", "f3", "m7")


@dataclass
class Utterance:
    """What espeak-ng is asked to say, and how."""

    words: tuple[int, ...]  # token ids (1-based; 0 is the CTC blank)
    voice: str
    speed: int  # words per minute (espeak-ng -s)
    pitch: int  # 0..99 (espeak-ng -p)
    gap: int  # extra pause between words, in units of 10 ms (espeak-ng -g)
    snr_db: float
    seed: int  # noise seed


def require_espeak() -> str:
    """Path of ``espeak-ng``, or a ``RuntimeError`` saying how to install it (never installs)."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError(
            "the speech domain synthesises its data with espeak-ng, which is not installed; "
            "install it (Debian/Ubuntu: apt-get install espeak-ng) and rerun"
        )
    return path


def synthesize(utt: Utterance, folder: Path, espeak: str | None = None) -> np.ndarray:
    """Speak ``utt`` with espeak-ng and return float32 samples at 16 kHz with its noise added.

    >>> import tempfile
    >>> u = Utterance((2, 3), "en-us+m1", 160, 50, 0, 20.0, 0)
    >>> synthesize(u, Path(tempfile.mkdtemp())).dtype  # doctest: +SKIP
    dtype('float32')
    """
    from scipy.signal import resample_poly  # scipy comes with scikit-learn, a dependency

    espeak = espeak or require_espeak()
    text = " ".join(VOCAB[t - 1] for t in utt.words)
    path = folder / f"{uuid.uuid4().hex}.wav"
    args = [espeak, "-v", utt.voice, "-s", str(utt.speed), "-p", str(utt.pitch), "-g", str(utt.gap)]
    subprocess.run([*args, "-w", str(path), text], check=True, capture_output=True, timeout=60)
    with wave.open(str(path), "rb") as f:
        rate, width, channels = f.getframerate(), f.getsampwidth(), f.getnchannels()
        raw = f.readframes(f.getnframes())
    path.unlink(missing_ok=True)
    if width != 2:
        raise RuntimeError(f"espeak-ng wrote {8 * width}-bit audio; expected 16-bit PCM")
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32).reshape(-1, channels).mean(1) / 32768.0
    if rate != SAMPLE_RATE:
        g = np.gcd(rate, SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, rate // g).astype(np.float32)
    rng = np.random.default_rng(utt.seed)
    # Random lead-in silence, so words do not always start at the same frame.
    x = np.concatenate([np.zeros(int(rng.integers(0, SAMPLE_RATE // 5)), np.float32), x])
    power = float(np.mean(x**2)) + 1e-12
    noise = rng.standard_normal(len(x)).astype(np.float32) * np.sqrt(power / 10 ** (utt.snr_db / 10))
    return (x + noise).astype(np.float32)


def mel_filterbank(
    n_freqs: int = N_FFT // 2 + 1, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """Triangular HTK-mel filters ``[n_freqs, n_mels]`` from 20 Hz to Nyquist.

    >>> fb = mel_filterbank()
    >>> tuple(fb.shape), bool((fb >= 0).all()), bool((fb.sum(0) > 0).all())
    ((201, 40), True, True)
    """

    def to_mel(f: torch.Tensor) -> torch.Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    def from_mel(m: torch.Tensor) -> torch.Tensor:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    edges = from_mel(
        torch.linspace(to_mel(torch.tensor(20.0)), to_mel(torch.tensor(sample_rate / 2)), n_mels + 2)
    )
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lo) / (mid - lo)
    falling = (hi - freqs[:, None]) / (hi - mid)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


_FILTERBANK: torch.Tensor | None = None


def log_mel(samples: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Log-mel spectrogram ``[frames, N_MELS]`` of 16 kHz samples, each band normalised to zero
    mean and unit variance over the utterance (so loudness and channel do not matter).

    >>> f = log_mel(torch.randn(16000))
    >>> tuple(f.shape), bool(f.isfinite().all())
    ((101, 40), True)
    """
    global _FILTERBANK
    if _FILTERBANK is None:
        _FILTERBANK = mel_filterbank()
    x = torch.as_tensor(samples, dtype=torch.float32)
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    power = spec.abs().square().T  # [frames, freqs]
    feats = torch.log(power @ _FILTERBANK + 1e-6)
    return (feats - feats.mean(0)) / (feats.std(0) + 1e-5)


def plan_utterances(
    n: int, variants: Sequence[str], seed: int, avoid: AbstractSet[tuple[int, ...]] = frozenset()
) -> list[Utterance]:
    """``n`` seeded random utterances whose word sequences are not in ``avoid`` (nor repeated)."""
    rng = random.Random(seed)
    seen = set(avoid)
    out = []
    while len(out) < n:
        words = tuple(rng.randint(1, len(VOCAB)) for _ in range(rng.randint(2, 5)))
        if words in seen:
            continue
        seen.add(words)
        voice = f"{rng.choice(ACCENTS)}+{rng.choice(variants)}"
        out.append(
            Utterance(
                words, voice, rng.randint(130, 210), rng.randint(25, 75), rng.randint(0, 4),
                rng.uniform(10.0, 30.0), rng.randrange(2**31),
            )
        )  # fmt: skip
    return out


def featurize(utts: Sequence[Utterance], workers: int = 4) -> list[torch.Tensor]:
    """Synthesise ``utts`` (espeak-ng in parallel subprocesses) and return their log-mels."""
    espeak = require_espeak()
    with tempfile.TemporaryDirectory(prefix="lowbit-speech-") as tmp:
        folder = Path(tmp)
        with ThreadPoolExecutor(workers) as pool:  # threads only wait on the subprocesses
            waves = list(pool.map(lambda u: synthesize(u, folder, espeak), utts))
    return [log_mel(w).half() for w in waves]


@dataclass
class Split:
    """One split, padded: ``features [N, T, N_MELS]``, ``lengths [N]`` (frames),
    ``targets [N, 5]`` (0-padded token ids), ``target_lengths [N]``."""

    features: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor

    def __len__(self) -> int:
        return len(self.lengths)

    def references(self) -> list[list[int]]:
        return [t[:n].tolist() for t, n in zip(self.targets, self.target_lengths, strict=True)]


def _pack(utts: Sequence[Utterance], feats: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    targets = torch.zeros(len(utts), 5, dtype=torch.int64)
    for i, u in enumerate(utts):
        targets[i, : len(u.words)] = torch.tensor(u.words)
    return {
        "frames": torch.cat(list(feats)),  # ragged: every utterance's frames one after another
        "lengths": torch.tensor([len(f) for f in feats], dtype=torch.int64),
        "targets": targets,
        "target_lengths": torch.tensor([len(u.words) for u in utts], dtype=torch.int64),
    }


def _unpack(tensors: dict[str, torch.Tensor], prefix: str) -> Split:
    frames, lengths = tensors[f"{prefix}.frames"].float(), tensors[f"{prefix}.lengths"]
    features = torch.zeros(len(lengths), int(lengths.max()), frames.shape[1])
    for i, chunk in enumerate(torch.split(frames, lengths.tolist())):
        features[i, : len(chunk)] = chunk
    return Split(features, lengths, tensors[f"{prefix}.targets"], tensors[f"{prefix}.target_lengths"])


def corpus_path(n_train: int = 2400, n_heldout: int = 600) -> Path:
    """Where the generated corpus of that size is cached (never committed).

    >>> corpus_path().name
    'speech-words-v1-2400x600.safetensors'
    """
    return cache_dir() / "domains" / f"speech-words-v{CORPUS_VERSION}-{n_train}x{n_heldout}.safetensors"


def load_corpus(n_train: int = 2400, n_heldout: int = 600) -> tuple[Split, Split, float]:
    """``(train, held-out, seconds spent generating)``: from the cache, or synthesised and cached
    (0.0 seconds on a cache hit). Raises ``RuntimeError`` when espeak-ng is missing."""
    path = corpus_path(n_train, n_heldout)
    if path.exists():
        try:
            tensors = load_safetensors_bytes(path.read_bytes())
            return _unpack(tensors, "train"), _unpack(tensors, "heldout"), 0.0
        except Exception as err:  # unreadable or incomplete: make it again
            warnings.warn(
                f"lowbit.domains: cached speech corpus {path} unusable ({err}); regenerating", stacklevel=2
            )
    started = time.perf_counter()
    train_utts = plan_utterances(n_train, TRAIN_VARIANTS, seed=1)
    held_utts = plan_utterances(n_heldout, HELDOUT_VARIANTS, seed=2, avoid={u.words for u in train_utts})
    tensors = {}
    for prefix, utts in (("train", train_utts), ("heldout", held_utts)):
        tensors.update({f"{prefix}.{k}": v for k, v in _pack(utts, featurize(utts)).items()})
    seconds = time.perf_counter() - started
    meta = {"version": str(CORPUS_VERSION), "seconds": f"{seconds:.1f}", "espeak_ng": _espeak_version()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, save_safetensors_bytes(tensors, metadata=meta))
    except OSError as err:  # a read-only cache: the corpus is still usable, just made again next time
        warnings.warn(
            f"lowbit.domains: could not cache the speech corpus in {path.parent}: {err}", stacklevel=2
        )
    return _unpack(tensors, "train"), _unpack(tensors, "heldout"), seconds


def _espeak_version() -> str:
    try:
        out = subprocess.run([require_espeak(), "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError, RuntimeError):
        return "unknown"


def edit_distance(ref: Sequence[int], hyp: Sequence[int]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1).

    >>> edit_distance([1, 2, 3], [1, 3]), edit_distance([], [4, 4]), edit_distance([1, 2], [2, 1])
    (1, 2, 2)
    """
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def word_error_rate(refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> float:
    """Word error rate in **percent**: total word edits over total reference words.

    >>> word_error_rate([[1, 2], [3]], [[1, 2], [4, 5]])
    66.66...
    """
    words = sum(len(r) for r in refs)
    return 100.0 * sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True)) / max(words, 1)


def ctc_greedy(logits: torch.Tensor, lengths: torch.Tensor | None = None) -> list[list[int]]:
    """Best-path CTC decoding of ``[B, T, V]`` scores: argmax per frame, merge repeats, drop blanks.

    ``lengths`` (frames per row) ignores the padding after each row.

    >>> ctc_greedy(torch.tensor([[[0.0, 9, 0], [9, 0, 0], [0, 9, 0], [0, 9, 0]]]))
    [[1, 1]]
    """
    best = logits.argmax(-1)
    out = []
    for i, row in enumerate(best.tolist()):
        if lengths is not None:
            row = row[: int(lengths[i])]
        out.append([t for k, t in enumerate(row) if t != BLANK and (k == 0 or t != row[k - 1])])
    return out
