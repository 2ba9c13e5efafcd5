"""Diagnostics: what attention pooling does, and whether it is failing.

    from attnpool.diagnostics import capture, analyze

    model.eval()
    with torch.no_grad(), capture(model) as rec:
        for x, mask, tokens in loader:
            rec.label(tokens)                  # optional element labels for the heatmaps
            model(x, mask)
    report = analyze(rec)
    print(report)                              # Markdown: alerts, then per-module signals
    report.save("diagnostics/")                # report.json, report.md, report.html + PNGs (with matplotlib)

* :func:`capture` records the weights of every attnpool module inside a model through the one weights hook of
  :mod:`attnpool.nn.base`; with no capture active, no module computes weights.
* :mod:`~attnpool.diagnostics.signals`: normalized entropy, effective number of elements, max weight, top-k mass,
  Gini, position bias, Jensen–Shannon divergence between heads and across queries.
* :func:`analyze` summarizes each module over the data set and raises the alerts of
  :mod:`~attnpool.diagnostics.alerts` (thresholds, severities, likely cause, usual fix: :data:`RULES`).
* :func:`faithfulness` tests whether removing the most-weighted elements changes the output more than removing
  random ones.
"""

from attnpool.diagnostics import signals
from attnpool.diagnostics.alerts import RULES, Alert, Rule, Thresholds, check
from attnpool.diagnostics.analysis import ModuleSummary, summarize, summarize_module
from attnpool.diagnostics.capture import CallRecord, Recording, capture
from attnpool.diagnostics.faithfulness import Faithfulness, faithfulness
from attnpool.diagnostics.report import Report, analyze

__all__ = [
    "RULES",
    "Alert",
    "CallRecord",
    "Faithfulness",
    "ModuleSummary",
    "Recording",
    "Report",
    "Rule",
    "Thresholds",
    "analyze",
    "capture",
    "check",
    "faithfulness",
    "signals",
    "summarize",
    "summarize_module",
]
