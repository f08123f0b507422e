"""``predict()``: a trained run + new slides (or their features) -> predictions and attention.

Layout under ``out``::

    predictions.csv          slide_id, patient_id, [site], [label], prob_<class> ...,
                             predicted, calibration, n_patches
    attention/<slide_id>.h5  coords, attention, raw scores and per-class scores (by the
                             ``explain`` method) per model (formats.attention_file)
    failures.csv             slides without a prediction, with the reason (no_tissue, ...)
    predict_config.yaml      the resolved options (and the patch / extract options used)
    work/                    raw slides only: cohort.csv, patches/, features/<encoder>/

An attention file marks its slide as done: a rerun (or a SLURM array over shards) skips it, and
``predictions.csv`` is rebuilt from every attention file's attributes at the end of each run, so
it lists every predicted slide whichever invocation predicted it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slidemil import atomic
from slidemil.cohort import Cohort, SlideRecord, load_cohort
from slidemil.config import build, write_resolved
from slidemil.deployment.exported_run import ExportedRun
from slidemil.devices import resolve_device
from slidemil.errors import ConfigError, SlidemilError
from slidemil.explanation.api import ExplanationSettings
from slidemil.formats.attention_file import (
    AttentionMap,
    is_complete_attention_file,
    read_attention_attrs,
    write_attention_file,
)
from slidemil.formats.prediction_table import PROB_PREFIX
from slidemil.prediction.bags import read_slide_bag
from slidemil.prediction.config import PredictConfig
from slidemil.prediction.ensemble import Ensemble
from slidemil.prediction.sources import (
    FeatureSource,
    existing_features,
    features_from_slides,
    recorded_stages,
)
from slidemil.prediction.trained_run import TrainedRun
from slidemil.runner import RunSummary, Shard, Task, run_per_slide

CONFIG_NAME = "predict_config.yaml"


@dataclass
class PredictSummary:
    """What :func:`predict` did: the per-slide run, the full prediction table and the folder."""

    run: RunSummary
    predictions: pd.DataFrame
    out: Path

    @property
    def failed(self) -> dict[str, str]:
        """Slide id -> why it has no prediction (its patching, extraction or model error)."""
        return self.run.failed

    def line(self) -> str:
        return f"{self.run.line()}; {len(self.predictions)} slide(s) in predictions.csv"


def predict(
    run_dir: str | Path,
    slides_csv: str | Path,
    out: str | Path,
    config: PredictConfig | None = None,
    *,
    config_file: str | Path | None = None,
    **options: Any,
) -> PredictSummary:
    """Predict the slides of ``slides_csv`` with the models of training run ``run_dir``.

    ``slides_csv`` is a cohort CSV (``slide_id, path``; ``label``, ``patient_id``,
    ``slide_mpp`` optional). Raw slides are patched and encoded under ``out/work`` with the
    options the run recorded; ``features=`` skips that and reads ``<folder>/<slide_id>.h5``.
    Options are :class:`PredictConfig` fields (``model="fold_0"``, ``step=128``,
    ``explain="ig"``, ...); a YAML ``config_file``'s ``predict`` section supplies defaults. A
    slide that fails (no tissue, a corrupt file) is recorded in ``out/failures.csv`` and the
    others go on.
    """
    config = config or build(
        PredictConfig, section="predict", config_file=config_file, overrides=options
    )
    if config.features is not None and config.step is not None:
        raise ConfigError(
            None,
            "--step re-patches raw slides; it does not apply to existing --features",
            "drop --features to re-infer with overlapping patches",
        )
    out = Path(out)
    # a folder written by `slidemil export` stands in for the run folder
    exported = ExportedRun.is_export(run_dir)
    if exported and config.explain != "attention":
        raise ConfigError(
            run_dir,
            f"--explain {config.explain} differentiates the run's models; an exported graph "
            "gives only its attention",
            "predict with the training run folder, or with --explain attention",
        )
    run = ExportedRun.open(run_dir) if exported else TrainedRun.open(run_dir)
    explanation = ExplanationSettings(config.explain, config.ig_baseline, config.ig_steps)
    checkpoints = run.checkpoints(config.model)
    raw = config.features is None
    if raw:
        recorded_stages(run)  # before any work: can new slides be processed like the run's?
    # a missing or unreadable slide is a bad row (failures.csv), not a cohort error
    cohort = load_cohort(slides_csv, require_labels=False, check_files=False)
    _check_same_predictions(out, run, list(checkpoints), config.calibrate, explanation)
    device = resolve_device(config.device)
    if exported:
        ensemble = run.ensemble(device, config.calibrate)
    else:
        ensemble = Ensemble.load(
            checkpoints, run.class_names, run.feature_dim, device,
            calibrate=config.calibrate == "temperature", explanation=explanation,
        )  # fmt: skip

    if config.features is not None:
        source = existing_features(
            Path(config.features), run, config.patches, config.patch_size_level0
        )
    else:
        source = features_from_slides(Path(slides_csv), out, run, config)
    write_resolved(out / CONFIG_NAME, {"predict": config, **source.stages})

    attention_dir = out / "attention"
    predictor = SlidePredictor(run, ensemble, source, attention_dir, explanation)
    tasks = [
        Task(r.slide_id, str(r.path), (r,)) for r in Shard.parse(config.shard).select(list(cohort))
    ]

    def is_done(task: Task) -> bool:
        return is_complete_attention_file(attention_dir / f"{task.slide_id}.h5")

    def input_problem(task: Task) -> SlidemilError | None:
        path = source.feature_path(task.slide_id)
        return None if path.is_file() else source.missing(task.slide_id, path)

    summary = run_per_slide(
        "predict", tasks, predictor, out_dir=out, is_done=is_done, workers=1, quiet=config.quiet,
        check=input_problem, strict=config.strict, source=slides_csv,
    )  # fmt: skip
    table = prediction_table(cohort, attention_dir, run.class_names)
    atomic.write_csv(out / "predictions.csv", table)
    return PredictSummary(summary, table, out)


class SlidePredictor:
    """The per-slide work: read the bag, run every model, write the attention file."""

    def __init__(
        self,
        run: TrainedRun,
        ensemble: Ensemble,
        source: FeatureSource,
        out: Path,
        explanation: ExplanationSettings | None = None,
    ):
        self.run, self.ensemble, self.source, self.out = run, ensemble, source, out
        self.explanation = explanation or ExplanationSettings()

    def __call__(self, slide_id: str, record: SlideRecord) -> int:
        path = self.source.feature_path(slide_id)
        if not path.is_file():
            raise self.source.missing(slide_id, path)
        bag = read_slide_bag(
            path, record.path, record.slide_mpp, feature_dim=self.run.feature_dim,
            identity=self.source.identity, hints=self.source.hints,
        )  # fmt: skip
        # a bag without coordinates (a CLAM .pt bag) has zeros there: lay it out by its order
        has_coords = bag.geometry.get("has_coords", True) is not False
        result = self.ensemble.infer(bag.features, bag.coords if has_coords else None)
        probabilities = result.mean_probabilities
        names = self.run.class_names
        attrs = {
            "slide_id": slide_id,
            "slide_path": str(record.path),
            "label": record.label,
            "models": self.ensemble.names,
            "class_names": list(names),
            "probabilities": [float(p) for p in probabilities],
            "model_probabilities": {
                name: [float(p) for p in row]
                for name, row in zip(self.ensemble.names, result.probabilities, strict=True)
            },
            "predicted": names[int(np.argmax(probabilities))],
            "calibration": self.ensemble.calibration,
            "temperatures": self.ensemble.temperatures,
            "explanation": result.explanation,
            "class_specific": result.class_specific,
            "explanation_settings": self.explanation.record(),
            "n_patches": len(bag.coords),
            "run": str(self.run.path),
            "features": str(path),
            "encoder": bag.encoder,
            "weights": bag.weights,
            **bag.geometry,
        }
        write_attention_file(
            self.out / f"{slide_id}.h5",
            AttentionMap(
                bag.coords, result.attention, result.scores, attrs, class_scores=result.class_scores
            ),
        )
        return len(bag.coords)


def prediction_table(
    cohort: Cohort, attention_dir: Path, class_names: tuple[str, ...]
) -> pd.DataFrame:
    """One row per cohort slide with an attention file, in cohort order; with a ``site`` column
    when the cohort has sites (third, as in training's tables), for per-site metrics."""
    with_labels, with_sites = cohort.has_labels, cohort.has_sites
    rows = []
    for record in cohort:
        path = attention_dir / f"{record.slide_id}.h5"
        if not is_complete_attention_file(path):
            continue
        attrs = read_attention_attrs(path)
        row: dict[str, Any] = {"slide_id": record.slide_id, "patient_id": record.patient_id}
        if with_sites:
            row["site"] = record.site or ""
        if with_labels:
            row["label"] = record.label
        stored = list(attrs.get("class_names") or [])
        for name in class_names:
            row[f"{PROB_PREFIX}{name}"] = attrs["probabilities"][stored.index(name)]
        row["predicted"] = attrs.get("predicted")
        row["calibration"] = attrs.get("calibration", "none")
        row["n_patches"] = attrs.get("n_patches")
        rows.append(row)
    columns = ["slide_id", "patient_id", *(["site"] if with_sites else [])]
    columns += ["label"] if with_labels else []
    columns += [f"{PROB_PREFIX}{c}" for c in class_names] + ["predicted", "calibration"]
    columns.append("n_patches")
    return pd.DataFrame(rows, columns=columns)


def _check_same_predictions(
    out: Path,
    run: TrainedRun,
    models: list[str],
    calibration: str = "none",
    explanation: ExplanationSettings | None = None,
) -> None:
    """Refuse to mix predictions of another run, model choice, calibration or explanation
    method in one folder (a rerun with the same ones resumes)."""
    folder = out / "attention"
    for path in sorted(folder.glob("*.h5")) if folder.is_dir() else []:
        if atomic.is_temp_file(path) or not is_complete_attention_file(path):
            continue
        attrs = read_attention_attrs(path)
        if attrs.get("run") != str(run.path) or list(attrs.get("models") or []) != models:
            raise ConfigError(
                out,
                f"holds predictions of run {attrs.get('run')} with {attrs.get('models')}, not "
                f"{run.path} with {models}",
                "use a new --out folder",
            )
        if attrs.get("calibration", "none") != calibration:
            raise ConfigError(
                out,
                f"holds predictions with calibration {attrs.get('calibration', 'none')!r}, not "
                f"{calibration!r}",
                "use a new --out folder",
            )
        explanation = explanation or ExplanationSettings()
        stored = (attrs.get("explanation", "attention"), attrs.get("explanation_settings") or {})
        wanted = (explanation.method, explanation.record())
        if stored != wanted:
            raise ConfigError(
                out,
                f"holds scores made by --explain {_describe(*stored)}, not {_describe(*wanted)}",
                "use a new --out folder",
            )
        return


def _describe(method: str, settings: dict[str, Any]) -> str:
    """``ig (baseline zero, steps 32)``: an explanation method and its settings, for messages."""
    detail = ", ".join(f"{key} {value}" for key, value in settings.items())
    return f"{method} ({detail})" if detail else method
