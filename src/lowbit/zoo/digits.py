"""Digits demo models (CNN, LSTM, MLP) on scikit-learn's bundled 8x8 digits: no download needed.

All three models take the same input, float32 images in [0, 1] shaped ``[N, 1, 8, 8]``, and
return logits ``[N, 10]``. The LSTM reads each image as a sequence of 8 rows of 8 pixels.
Training is seeded and takes seconds on a laptop CPU; weights are cached (see ``lowbit.zoo.cache``).

>>> zm = get_digits("digits-mlp")  # doctest: +SKIP
>>> zm.forward(zm.calibration[0]).shape  # doctest: +SKIP
torch.Size([32, 10])
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.zoo.base import ZooModel
from lowbit.zoo.cache import load_weights, save_weights, weight_paths

SPLIT_SEED = 0  # the train/test split never changes, so accuracies stay comparable across runs
TRAIN_SEED = 0


class DigitsCNN(nn.Module):
    """Three 3x3 conv layers and a two-layer head; about 30k parameters.

    >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DigitsLSTM(nn.Module):
    """A one-layer LSTM over the 8 image rows; the last hidden state feeds a linear head.

    >>> DigitsLSTM()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=8, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], 8, 8)  # [N, 1, 8, 8] -> [N, seq=8 rows, 8 features]
        out, _ = self.lstm(rows)
        return self.head(out[:, -1])


class DigitsMLP(nn.Module):
    """Flatten, one hidden layer of 64, linear head.

    >>> DigitsMLP()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class Recipe:
    """How one digits model is built and trained. Bump ``version`` when anything here changes."""

    build: Callable[[], nn.Module]
    epochs: int
    lr: float
    batch_size: int
    version: int
    description: str


RECIPES: dict[str, Recipe] = {
    # Settings picked for a margin above the target accuracy across several seeds, in ~1-3 s of CPU.
    "digits-cnn": Recipe(
        DigitsCNN, 12, lr=1e-2, batch_size=64, version=1, description="small CNN on 8x8 digits"
    ),
    "digits-lstm": Recipe(
        DigitsLSTM, 15, lr=2e-2, batch_size=64, version=1, description="LSTM over digit rows"
    ),
    "digits-mlp": Recipe(
        DigitsMLP, 20, lr=1e-2, batch_size=64, version=1, description="tiny MLP on 8x8 digits"
    ),
}


def load_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed stratified 80/20 split: ``(x_train, y_train, x_test, y_test)``, x as ``[N, 1, 8, 8]``.

    >>> x_train, y_train, x_test, y_test = load_split()
    >>> tuple(x_train.shape), tuple(x_test.shape), float(x_train.max())
    ((1437, 1, 8, 8), (360, 1, 8, 8), 1.0)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)  # pixels are 0..16
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=0.2, stratify=data.target, random_state=SPLIT_SEED
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``.

    >>> accuracy(nn.Flatten(), torch.eye(3).reshape(3, 1, 1, 3), torch.tensor([0, 1, 0]))
    0.6666666666666666
    """
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def train(name: str, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """Train ``name``'s model from its recipe; deterministic (seeded) and leaves the global RNG alone.

    >>> x, y, _, _ = load_split()
    >>> train("digits-mlp", x[:64], y[:64]).training
    False
    """
    recipe = RECIPES[name]
    batch_size = recipe.batch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN_SEED)
        model = recipe.build()
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        # Cosine decay lets the short run settle instead of bouncing at a large step.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
        model.train()
        for _epoch in range(recipe.epochs):
            order = torch.randperm(len(y))
            for start in range(0, len(y), batch_size):
                batch = order[start : start + batch_size]
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            schedule.step()
    return model.eval()


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def get_digits(
    name: str, calibration_batches: int = 8, batch_size: int = 32, retrain: bool = False
) -> ZooModel:
    """Load (or train and cache) one digits model with its calibration and evaluation data.

    ``calibration``: ``calibration_batches`` tensors of ``batch_size`` images from the training split.
    ``eval_data``: ``(images, labels)`` batches covering the 360 held-out test images.
    ``retrain=True`` ignores and overwrites the cache.

    >>> zm = get_digits("digits-mlp")  # doctest: +SKIP
    >>> zm.metric, len(zm.calibration), sum(len(y) for _, y in zm.eval_data)  # doctest: +SKIP
    ('accuracy', 8, 360)
    """
    if name not in RECIPES:
        raise ValueError(f"unknown digits model {name!r}; choose one of {sorted(RECIPES)}")
    if calibration_batches < 1 or batch_size < 1:
        raise ValueError("calibration_batches and batch_size must be >= 1")
    recipe = RECIPES[name]
    x_train, y_train, x_test, y_test = load_split()
    state = None if retrain else load_weights(name, recipe.version)
    if state is not None:
        model = recipe.build()
        model.load_state_dict(state)
        model.eval()
    else:
        print(f"lowbit.zoo: training {name} (recipe v{recipe.version}, a few seconds)...", file=sys.stderr)
        started = time.perf_counter()
        model = train(name, x_train, y_train)
        seconds = time.perf_counter() - started
        test_acc = accuracy(model, x_test, y_test)
        path = save_weights(name, recipe.version, model.state_dict(), {"test_accuracy": test_acc})
        where = f"cached at {path}" if path else "not cached"
        print(
            f"lowbit.zoo: trained {name} in {seconds:.1f}s, test accuracy {test_acc:.1%}, {where}",
            file=sys.stderr,
        )

    # A fixed permutation of the training split, so calibration is varied but reproducible.
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(SPLIT_SEED))
    calibration = _batches(x_train[order], batch_size)[:calibration_batches]
    eval_data = list(zip(_batches(x_test, 64), _batches(y_test, 64), strict=True))
    return ZooModel(
        name=name,
        model=model,
        calibration=calibration,
        eval_data=eval_data,
        metric="accuracy",
        example_inputs=(calibration[0],),
        description=f"{recipe.description} (sklearn digits, [N,1,8,8] in [0,1] -> 10 logits)",
    )


def cached_weights_path(name: str) -> str:
    """Where ``name``'s weights are (or will be) cached.

    >>> cached_weights_path("digits-cnn").endswith("digits-cnn-v1.safetensors")
    True
    """
    return str(weight_paths(name, RECIPES[name].version)[0])
