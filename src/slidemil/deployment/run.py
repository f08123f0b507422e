"""``export()``: a training run's fold models -> one deployable graph with its model card.

Layout under ``out``::

    model.onnx | model.pt   the graph (ONNX, or TorchScript for ``format="torchscript"``)
    model.json              classes, encoder identity, patch size and µm/px, cohort, metrics
    MODEL_CARD.md           intended use, data, metrics, limits

The graph holds every exported fold's weights and feature standardisation (see
``deployment.graph``); before the files are written it is run once on a random bag and compared
with the run's own models, so an export that would predict differently is never written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidemil import atomic
from slidemil.config import build
from slidemil.deployment.card import MODEL_CARD, MODEL_JSON, model_card, model_record
from slidemil.deployment.config import ExportConfig
from slidemil.deployment.graph import (
    COORDS_NAME,
    INPUT_NAME,
    OUTPUT_NAMES,
    BagClassifier,
    torchscript_warnings_silenced,
)
from slidemil.encoders.weights import file_sha256, require
from slidemil.errors import ArtifactError
from slidemil.prediction.ensemble import Ensemble
from slidemil.prediction.trained_run import TrainedRun

GRAPH_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
# Tolerance of the self-check (probabilities, float32): exporters reorder float operations.
SELF_CHECK_TOLERANCE = 1e-5
EXAMPLE_INSTANCES = 16  # not 1: an exporter would treat a size-1 axis as a constant
SELF_CHECK_INSTANCES = 257
PATCH_STEP = 256  # level-0 px between the example bags' grid patches


def grid_patch_coords(n: int, seed: int = 0) -> np.ndarray:
    """Level-0 x, y (n, 2) float32 of n patches scattered over a patch grid with holes (an
    irregular tissue shape, rows in random order): the example and self-check bags of a graph
    whose models use coordinates."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(2 * n)))
    cells = rng.choice(side * side, size=n, replace=False)
    return np.stack([cells % side, cells // side], axis=1).astype(np.float32) * PATCH_STEP


@dataclass
class ExportSummary:
    """What :func:`export` wrote: the folder, the graph file and the ``model.json`` dict."""

    out: Path
    graph: Path
    record: dict[str, Any]

    def line(self) -> str:
        folds = ", ".join(self.record["folds"])
        return f"exported {folds} of {self.record['model']} as {self.graph.name} -> {self.out}"


def export(
    run_dir: str | Path, out: str | Path, config: ExportConfig | None = None, **options: Any
) -> ExportSummary:
    """Export the models of training run ``run_dir`` to ``out`` (see the module docstring).

    Options are :class:`ExportConfig` fields: ``format="onnx"`` or ``"torchscript"``, ``fold=k``
    for one fold (default: all folds, whose probabilities the graph averages).
    """
    config = config or build(ExportConfig, section="export", overrides=options)
    run = TrainedRun.open(run_dir)
    choice = "mean" if config.fold is None else f"fold_{config.fold}"
    checkpoints = run.checkpoints(choice)
    ensemble = Ensemble.load(
        checkpoints, run.class_names, run.feature_dim, torch.device("cpu"),
        calibrate=config.calibrate == "temperature",
    )  # fmt: skip
    graph = BagClassifier(ensemble.folds, run.feature_dim).eval()
    out = Path(out)
    path = out / GRAPH_FILES[config.format]
    example = (
        torch.randn(EXAMPLE_INSTANCES, run.feature_dim, generator=torch.Generator().manual_seed(0)),
    )
    if graph.uses_coords:
        example = (*example, torch.from_numpy(grid_patch_coords(EXAMPLE_INSTANCES)))
    with atomic.atomic_path(path) as tmp:
        if config.format == "onnx":
            _write_onnx(graph, example, tmp, config.opset)
        else:
            _write_torchscript(graph, example, tmp)
        _self_check(ensemble, tmp, config.format, run.feature_dim, graph.uses_coords)
    record = model_record(
        run, ensemble.names, path.name, config.format, file_sha256(path), graph.uses_coords
    )
    record["calibration"] = ensemble.calibration
    record["temperatures"] = ensemble.temperatures
    atomic.write_text(out / MODEL_JSON, json.dumps(record, indent=2))
    atomic.write_text(out / MODEL_CARD, model_card(record))
    return ExportSummary(out, path, record)


def _write_onnx(
    graph: BagClassifier, example: tuple[torch.Tensor, ...], path: Path, opset: int
) -> None:
    require("onnxscript", "export", "ONNX export")
    require("onnx", "export", "ONNX export")
    instances = torch.export.Dim("instances", min=1)
    names = graph.input_names()
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            graph,
            example,
            str(path),
            dynamo=True,
            verbose=False,
            opset_version=opset,
            input_names=names,
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={name: {0: instances} for name in names},
        )


def _write_torchscript(graph: BagClassifier, example: tuple[torch.Tensor, ...], path: Path) -> None:
    # Tracing, not scripting: the models' forward returns a Union of tuples that the script
    # compiler refuses; every op here is shape-generic, so the trace serves any N.
    with torchscript_warnings_silenced(), torch.no_grad():
        traced = torch.jit.trace(graph, example, check_trace=False)
        torch.jit.save(traced, str(path))


def run_graph(
    path: Path, graph_format: str, features: np.ndarray, coords: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Run an exported graph file on one bag ``features`` (N, D), with its patches' ``coords``
    (N, 2) for a graph that takes them: output name -> array."""
    inputs = {INPUT_NAME: np.ascontiguousarray(features, dtype=np.float32)}
    if coords is not None:
        inputs[COORDS_NAME] = np.ascontiguousarray(coords, dtype=np.float32)
    if graph_format == "onnx":
        ort = require("onnxruntime", "export", "running an ONNX export")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        values = session.run(list(OUTPUT_NAMES), inputs)
    else:
        with torchscript_warnings_silenced():
            module = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            values = [v.numpy() for v in module(*map(torch.from_numpy, inputs.values()))]
    return dict(zip(OUTPUT_NAMES, values, strict=True))


def _self_check(
    ensemble: Ensemble, path: Path, graph_format: str, feature_dim: int, uses_coords: bool
) -> None:
    """The written graph must give the run's probabilities and attention on a random bag (on
    an irregular patch grid for a graph that takes coordinates)."""
    bag = np.random.default_rng(0).normal(size=(SELF_CHECK_INSTANCES, feature_dim))
    bag = bag.astype(np.float32)
    coords = grid_patch_coords(SELF_CHECK_INSTANCES) if uses_coords else None
    expected = ensemble.infer(bag, coords)
    got = run_graph(path, graph_format, bag, coords)
    gaps = {
        "probabilities": np.abs(got["fold_probabilities"] - expected.probabilities).max(),
        "attention": np.abs(got["attention"] - expected.attention).max(),
    }
    bad = {k: float(v) for k, v in gaps.items() if not v <= SELF_CHECK_TOLERANCE}
    if bad:
        raise ArtifactError(
            path,
            f"the exported graph differs from the run's models ({bad}, tolerance "
            f"{SELF_CHECK_TOLERANCE})",
            "report this with the model name; export --format torchscript meanwhile",
        )
