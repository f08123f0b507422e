"""slidemil: attention-based multiple-instance learning for whole-slide histology images.

The pipeline, one function per stage (each also a ``slidemil`` command)::

    slidemil.synth(out, slides=48)            # a synthetic cohort of real SVS slides
    slidemil.patch("cohort.csv", "work/")     # tissue + patch coordinates
    slidemil.extract("work/", encoder="resnet50-trunc")
    slidemil.train("work/", "runs/exp1", model="abmil-gated", folds=5)
    slidemil.evaluate("runs/exp1")
    slidemil.predict("runs/exp1", "new.csv", "preds/")   # new slides -> predictions + attention
    slidemil.heatmap("preds/")                 # attention -> heat maps, QuPath / TIFF exports
    slidemil.explain(model, features, "ig")    # per-class patch scores of a bag, any model
    slidemil.sweep("work/", "sweep.yaml", "runs/sweep1")  # hyperparameter search (Optuna)
    slidemil.export("runs/exp1", "model/")     # ONNX / TorchScript graph + model card
    slidemil.view("preds/")                    # the slides + attention in the browser
    slidemil.demo("demo/")                     # all of the above on a synthetic cohort

Heavy modules (torch, OpenSlide) load on first use, so ``import slidemil`` is cheap.
"""

from __future__ import annotations

from slidemil.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "Slide": "slidemil.slide",
    "ReadPlan": "slidemil.slide",
    "Cohort": "slidemil.cohort",
    "SlideRecord": "slidemil.cohort",
    "load_cohort": "slidemil.cohort",
    "synth": "slidemil.synthetic",
    "SynthConfig": "slidemil.synthetic",
    "patch": "slidemil.patching",
    "PatchConfig": "slidemil.patching",
    "extract": "slidemil.extraction",
    "ExtractConfig": "slidemil.extraction",
    "list_encoders": "slidemil.encoders",
    "get_encoder": "slidemil.encoders",
    "train": "slidemil.training",
    "TrainConfig": "slidemil.training",
    "list_models": "slidemil.models",
    "build_model": "slidemil.models",
    "evaluate": "slidemil.evaluation",
    "export": "slidemil.deployment",
    "EvaluateConfig": "slidemil.evaluation",
    "predict": "slidemil.prediction",
    "PredictConfig": "slidemil.prediction",
    "heatmap": "slidemil.heatmaps",
    "explain": "slidemil.explanation",
    "sweep": "slidemil.tuning",
    "HeatmapConfig": "slidemil.heatmaps",
    "view": "slidemil.viewer",
    "demo": "slidemil.demonstration",
    "DemoConfig": "slidemil.demonstration",
}

__all__ = ["__version__", *_API]


__getattr__, __dir__ = lazy_exports(__name__, _API)
