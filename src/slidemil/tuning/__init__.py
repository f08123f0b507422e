"""Hyperparameter search: ``sweep(work, space, out, trials=20)`` searches TrainConfig options
with Optuna (TPE, random or grid; median pruning), scoring every trial on validation parts only,
in a sweep folder that many processes share and a rerun continues. Names load on first use.
"""

from __future__ import annotations

from slidemil.lazy import lazy_exports

# public name -> module that defines it
_API = {
    "SweepResult": "slidemil.tuning.run",
    "SweepSpace": "slidemil.tuning.space",
    "load_space": "slidemil.tuning.space",
    "sweep": "slidemil.tuning.run",
}

__all__ = list(_API)


__getattr__, __dir__ = lazy_exports(__name__, _API)
