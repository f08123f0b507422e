"""Deployable exports of trained runs: ``export(run_dir, out, format="onnx")`` writes one graph
(ONNX or TorchScript) that takes a bag of raw features and returns class probabilities and
attention, with ``model.json`` and ``MODEL_CARD.md``; ``slidemil predict`` reads such a folder in
place of a run folder. Names load on first use (no torch import for ``--help``).
"""

from __future__ import annotations

from slidemil.lazy import lazy_exports

# public name -> module that defines it
_API = {
    "ExportConfig": "slidemil.deployment.config",
    "ExportSummary": "slidemil.deployment.run",
    "ExportedRun": "slidemil.deployment.exported_run",
    "export": "slidemil.deployment.run",
    "run_graph": "slidemil.deployment.run",
}

__all__ = list(_API)


__getattr__, __dir__ = lazy_exports(__name__, _API)
