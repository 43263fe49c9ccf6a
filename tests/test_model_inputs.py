"""What is not an eager nn.Module gets one ModelError naming the fix; scikit-learn models convert."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowbit

sklearn = pytest.importorskip("sklearn")


def _verbs(model):
    calib = [torch.randn(2, 4)]
    return {
        "quantize": lambda: lowbit.quantize(model, "int8-dynamic"),
        "prepare": lambda: lowbit.prepare(model, "int8-static"),
        "save": lambda: lowbit.save(model, "/nonexistent/never-written"),
        "load": lambda: lowbit.load("/nonexistent", model),
        "evaluate": lambda: lowbit.evaluate(model, model, calib),
        "sensitivity": lambda: lowbit.sensitivity(model, calib, "cosine"),
        "search": lambda: lowbit.search(model, calib, "cosine", max_drop=0.01),
        "qat.prepare": lambda: lowbit.qat.prepare(model, "int8-static"),
        "export_onnx": lambda: lowbit.export_onnx(model, "/nonexistent/x.onnx", calib[0]),
    }


def _script():
    return torch.jit.script(nn.Linear(4, 2))


def _forest():
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=2).fit(np.eye(4), [0, 1, 0, 1])


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: "model.onnx", "ONNX file, quantize the PyTorch model"),
        (lambda: "weights.pt", "weights_only=True"),
        (_script, "TorchScript"),
        (_forest, "lowbit.from_sklearn"),
        (lambda: {"weight": torch.zeros(2)}, "got dict, not a torch.nn.Module"),
    ],
    ids=["onnx-path", "pt-path", "torchscript", "sklearn", "state-dict"],
)
def test_not_a_module_is_one_model_error_in_every_verb(make, says):
    model = make()
    for verb, call in _verbs(model).items():
        with pytest.raises(lowbit.ModelError, match=says) as info:
            call()
        assert str(info.value).startswith(f"{verb}:"), verb


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y


def _estimators():
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.svm import LinearSVC

    return {
        "mlp-classifier": lambda: MLPClassifier(hidden_layer_sizes=(32,), max_iter=60, random_state=0),
        "mlp-binary": lambda: MLPClassifier(
            hidden_layer_sizes=(16,), activation="tanh", max_iter=60, random_state=0
        ),
        "mlp-regressor": lambda: MLPRegressor(hidden_layer_sizes=(16, 8), max_iter=60, random_state=0),
        "logistic": lambda: LogisticRegression(max_iter=300),
        "logistic-binary": lambda: LogisticRegression(max_iter=300),
        "linear-regression": lambda: LinearRegression(),
        "linear-svc": lambda: LinearSVC(),
    }


@pytest.mark.parametrize("kind", list(_estimators()))
def test_from_sklearn_predicts_what_the_estimator_predicts(kind):
    x, y = _digits()
    x, y = x[:600], y[:600]
    if "binary" in kind:
        y = (y >= 5).astype(int)
    elif "regress" in kind:
        y = y.astype(np.float64) / 9.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings of the short fits
        est = _estimators()[kind]().fit(x, y)
    model = lowbit.from_sklearn(est)
    pred = model.predict(x)
    if "regress" in kind:
        assert pred.shape == est.predict(x).shape
        np.testing.assert_allclose(pred, est.predict(x), atol=1e-4)
    else:
        assert (pred == est.predict(x)).mean() >= 0.998  # float32 vs float64 on near ties only
        if hasattr(est, "predict_proba"):
            proba = torch.softmax(model(torch.as_tensor(x)), -1).detach().numpy()
            np.testing.assert_allclose(proba, est.predict_proba(x), atol=1e-4)
    q = lowbit.quantize(model, "int8-weight-only")
    if "regress" not in kind:
        assert (q.predict(x) == est.predict(x)).mean() > 0.95


def test_from_sklearn_refuses_what_it_cannot_convert():
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(lowbit.ModelError, match="RandomForestClassifier has no neural-network form"):
        lowbit.from_sklearn(_forest())
    with pytest.raises(lowbit.ModelError, match="not fitted"):
        lowbit.from_sklearn(LogisticRegression())
    with pytest.raises(lowbit.ModelError, match="not a scikit-learn estimator"):
        lowbit.from_sklearn(nn.Linear(2, 2))


DOCUMENTED = ["lowbit.modelcheck", "lowbit.from_sklearn", "lowbit.ptq.plan", "lowbit.nn.base"]


@pytest.mark.parametrize("module", DOCUMENTED)
def test_documented_examples_run(module):
    import doctest
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
