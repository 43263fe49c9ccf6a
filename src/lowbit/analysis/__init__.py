"""Where does the loss come from, and what is the smallest model that keeps the accuracy?

- ``sensitivity(model, data, metric, recipe)``: quantize one layer at a time, rank the layers.
- ``search(model, data, metric, max_drop=...)``: choose a format per layer under a constraint.
- ``check_calibration(model, calibration)``: warnings about too little / unrepresentative data.

How the CLI (or a script) calls them, for any ``lowbit.zoo.load_model(MODEL)`` result ``zm``::

    report = sensitivity(zm.model, zm.eval_data, zm.metric, "int4-weight-only",
                         calibration=zm.calibration, progress=True)
    print(report.to_markdown()); png = report.plot_png(); data = report.to_dict()

    result = search(zm.model, zm.eval_data, zm.metric, max_drop=0.5,   # or target_bits= / target_size=
                    calibration=zm.calibration, budget_minutes=10, progress=True)
    result.recipe.save("searched.yaml"); print(result.to_markdown(), result.frontier_markdown())
    png = result.plot_png(); lowbit.save(result.model, "out/")  # exit status: result.met

    for warning in check_calibration(zm.model, zm.calibration, "int8-static", data=zm.eval_inputs()):
        print(warning)

>>> from lowbit.analysis import CANDIDATES, search, sensitivity
>>> "int4" in CANDIDATES
True
"""

from lowbit.analysis.common import CANDIDATES, DEFAULT_CANDIDATES
from lowbit.analysis.diagnostics import CalibrationWarning, check_calibration, diagnose, snapshot_ranges
from lowbit.analysis.result import FrontierPoint, LayerChoice, SearchResult
from lowbit.analysis.search import search, split_holdout
from lowbit.analysis.sensitivity import LayerSensitivity, SensitivityReport, sensitivity

__all__ = [
    "CANDIDATES",
    "CalibrationWarning",
    "DEFAULT_CANDIDATES",
    "FrontierPoint",
    "LayerChoice",
    "SearchResult",
    "LayerSensitivity",
    "SensitivityReport",
    "check_calibration",
    "diagnose",
    "search",
    "sensitivity",
    "snapshot_ranges",
    "split_holdout",
]
