"""``from_sklearn``: a scikit-learn linear model or MLP as an ``nn.Module`` lowbit can quantize.

The module computes the estimator's scores in float32: ``decision_function`` for linear classifiers,
the output layer's logits for ``MLPClassifier``, the prediction itself for regressors. For a binary
classifier the single score ``d`` becomes the two columns ``[0, d]``, so ``argmax`` is the predicted
class index and ``softmax`` is ``predict_proba`` (logistic models). ``module.predict(x)`` returns the
estimator's labels (``classes_``) like ``estimator.predict``.

>>> import numpy as np
>>> from sklearn.linear_model import LogisticRegression
>>> X, y = np.random.default_rng(0).normal(size=(40, 5)), np.arange(40) % 3
>>> clf = LogisticRegression(max_iter=500).fit(X, y)
>>> model = from_sklearn(clf)
>>> bool((model.predict(X) == clf.predict(X)).all())
True
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import ModelError

_ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "logistic": nn.Sigmoid}
_LINEAR = ("LinearRegression", "Ridge", "Lasso", "ElasticNet", "LogisticRegression", "LinearSVC",
           "LinearSVR", "RidgeClassifier", "SGDClassifier", "SGDRegressor")  # fmt: skip
_CLASSIFIERS = ("LogisticRegression", "LinearSVC", "RidgeClassifier", "SGDClassifier", "MLPClassifier")


class SklearnModel(nn.Module):
    """The converted estimator: ``net`` (Linear layers and activations) plus its labels."""

    def __init__(
        self, net: nn.Sequential, classes: list[Any] | None, binary: bool, flat: bool, source: str
    ) -> None:
        super().__init__()
        self.net = net
        self.classes = classes
        self.binary = binary  # one score for two classes
        self.flat = flat  # a single-target regressor: predictions of shape (n,), as sklearn's
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.binary:  # one score d -> [0, d]: argmax is the class index, softmax the probability
            out = torch.cat([torch.zeros_like(out), out], dim=-1)
        elif self.flat:
            out = out.squeeze(-1)
        return out

    def predict(self, x: Any) -> np.ndarray:
        """Labels (classifiers) or values (regressors), as ``estimator.predict`` returns them."""
        device = next(self.parameters()).device
        xt = torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)
        with torch.no_grad():
            out = self(xt).cpu().numpy()
        if self.classes is None:
            return out
        return np.asarray(self.classes)[out.argmax(-1)]


def _linear(weight: np.ndarray, bias: np.ndarray | float) -> nn.Linear:
    w = torch.as_tensor(np.atleast_2d(np.asarray(weight, dtype=np.float64)), dtype=torch.float32)
    layer = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(torch.as_tensor(np.broadcast_to(bias, (w.shape[0],)).astype(np.float64)))
    return layer


def from_sklearn(estimator: Any) -> SklearnModel:
    """Convert a fitted scikit-learn ``MLPClassifier``, ``MLPRegressor``, or linear model
    (``LogisticRegression``, ``LinearRegression``, ``LinearSVC``, ridge / lasso / SGD) to an
    ``nn.Module``; other estimators raise ``ModelError`` naming what is supported.

    >>> import numpy as np
    >>> from sklearn.neural_network import MLPRegressor
    >>> X = np.random.default_rng(0).normal(size=(30, 4))
    >>> reg = MLPRegressor(hidden_layer_sizes=(8,), max_iter=300, random_state=0).fit(X, X.sum(1))
    >>> bool(np.allclose(from_sklearn(reg).predict(X), reg.predict(X), atol=1e-5))
    True
    """
    name = type(estimator).__name__
    supported = "MLPClassifier, MLPRegressor, " + ", ".join(_LINEAR)
    if not any(c.__module__.startswith("sklearn.") for c in type(estimator).__mro__):
        raise ModelError(f"from_sklearn: {name} is not a scikit-learn estimator")
    if name not in ("MLPClassifier", "MLPRegressor") + _LINEAR:
        raise ModelError(
            f"from_sklearn: {name} has no neural-network form lowbit converts (supported: {supported}); "
            "tree ensembles, kernels and pipelines are not layers of weights"
        )
    if not hasattr(estimator, "coefs_" if name.startswith("MLP") else "coef_"):
        raise ModelError(f"from_sklearn: the {name} is not fitted; call fit(X, y) first")
    classes = list(estimator.classes_) if name in _CLASSIFIERS else None
    if name.startswith("MLP"):
        layers: list[nn.Module] = []
        for i, (w, b) in enumerate(zip(estimator.coefs_, estimator.intercepts_, strict=True)):
            layers.append(_linear(w.T, b))
            if i < len(estimator.coefs_) - 1:
                layers.append(_ACTIVATIONS[estimator.activation]())
        if classes is not None and estimator.out_activation_ == "logistic" and len(classes) > 2:
            raise ModelError("from_sklearn: a multi-label MLPClassifier has no single predicted class")
        binary = classes is not None and estimator.out_activation_ == "logistic"
        flat = classes is None and estimator.n_outputs_ == 1
    else:
        coef = np.asarray(estimator.coef_)
        layers = [_linear(coef, estimator.intercept_)]
        binary = classes is not None and coef.ndim == 2 and coef.shape[0] == 1 and len(classes) == 2
        flat = classes is None and coef.ndim == 1
    return SklearnModel(nn.Sequential(*layers), classes, binary, flat, name).eval()
