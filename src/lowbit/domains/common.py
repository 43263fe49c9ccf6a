"""Helpers every domain module shares: train once and cache, seeded batches, scoring loops.

>>> import torch
>>> from torch import nn
>>> model = nn.Linear(2, 2)
>>> def train(m):
...     with torch.no_grad():
...         m.weight.fill_(1.0)
>>> model, seconds = cached_training("doctest-linear", 1, model, train, cache=False)
>>> model.weight.sum().item(), model.training
(4.0, False)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lowbit.zoo.cache import load_weights, save_weights


def cached_training(
    name: str,
    version: int,
    model: nn.Module,
    train: Callable[[nn.Module], Any],
    *,
    cache: bool = True,
    info: dict[str, Any] | None = None,
) -> tuple[nn.Module, float]:
    """Load ``model``'s weights from the user cache (``lowbit.zoo.cache``, checksummed safetensors)
    or call ``train(model)`` and cache the result; returns the model in eval mode and the seconds
    spent training (0.0 on a cache hit). Bump ``version`` whenever the architecture, data or
    training recipe changes, so stale weights are never reused."""
    state = load_weights(name, version) if cache else None
    if state is not None:
        try:
            model.load_state_dict(state)
            return model.eval(), 0.0
        except RuntimeError:  # an older architecture under the same key: retrain
            pass
    started = time.perf_counter()
    model.train()
    train(model)
    seconds = time.perf_counter() - started
    model.eval()
    if cache:
        save_weights(name, version, model.state_dict(), {"train_seconds": seconds, **(info or {})})
    return model, seconds


class Shuffled:
    """Re-iterable seeded mini-batches over aligned tensors (or lists) ``items``.

    Each pass reshuffles with the next draw of one generator, so two runs with one seed see the
    same batches; ``rewind()`` starts the sequence again, so a fine-tuning row sees the same
    batches whether or not the model was just trained on this data (a cold or a warm cache).

    >>> import torch
    >>> b = Shuffled((torch.arange(10), torch.arange(10) * 2), batch_size=4, seed=0)
    >>> [tuple(x.shape) for x, _ in b]
    [(4,), (4,), (2,)]
    >>> all(bool((y == 2 * x).all()) for x, y in b)
    True
    >>> first = next(iter(b.rewind()))[0]; _ = list(b); bool((next(iter(b.rewind()))[0] == first).all())
    True
    """

    def __init__(self, items: tuple[Any, ...], batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.items = items
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.n = len(items[0])

    def rewind(self) -> Shuffled:
        """Start the pass sequence from the seed again; returns ``self``."""
        self.generator.manual_seed(self.seed)
        return self

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield tuple(_take(item, idx) for item in self.items)


class FirstBatches:
    """The first ``n`` batches of every pass over ``data`` (a re-iterable with a length): a quick
    run's shorter fine-tuning.

    >>> short = FirstBatches(Shuffled((torch.arange(10),), batch_size=2), 3)
    >>> len(short), len(list(short))
    (3, 3)
    """

    def __init__(self, data: Any, n: int) -> None:
        self.data = data
        self.n = max(int(n), 1)

    def __len__(self) -> int:
        return min(self.n, len(self.data))

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.data), self.n)

    def rewind(self) -> FirstBatches:
        rewound(self.data)
        return self


def rewound(data: Any) -> Any:
    """``data`` with its shuffling restarted (``rewind()``) when it has one, else ``data``."""
    rewind = getattr(data, "rewind", None)
    return rewind() if callable(rewind) else data


def _take(item: Any, idx: torch.Tensor) -> Any:
    if isinstance(item, torch.Tensor):
        return item[idx]
    return [item[int(i)] for i in idx]


def train_epochs(
    model: nn.Module,
    data: Any,
    loss: Callable[[nn.Module, Any], torch.Tensor],
    epochs: int,
    lr: float,
    *,
    weight_decay: float = 0.0,
    clip: float | None = 1.0,
    desc: str = "training",
    progress: bool = True,
) -> None:
    """AdamW with a cosine schedule over ``epochs`` passes of ``data`` (a re-iterable of batches),
    with a tqdm bar; the model is left in train mode."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = max(epochs * len(data), 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    # disable=None: no bar when stderr is not a terminal (logs, CI), so they stay small.
    with tqdm(total=steps, desc=desc, disable=True if not progress else None, leave=False) as bar:
        for _ in range(epochs):
            for batch in data:
                opt.zero_grad(set_to_none=True)
                value = loss(model, batch)
                value.backward()
                if clip is not None:
                    nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{value.detach().item():.3f}", refresh=False)
