"""An export folder as ``slidemil predict`` sees it: the same interface as a training run.

``ExportedRun`` reads ``model.json`` (which keeps the run's classes, encoder, feature size and
patch / extract options) and gives an ``ExportedEnsemble`` that scores bags with the exported
graph (ONNX Runtime or TorchScript) instead of the run's checkpoints, so prediction from raw
slides or from feature files works without the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidemil.deployment.card import EXPORT_FORMAT_VERSION, MODEL_JSON, read_model_record
from slidemil.deployment.graph import (
    COORDS_NAME,
    INPUT_NAME,
    OUTPUT_NAMES,
    torchscript_warnings_silenced,
)
from slidemil.encoders.weights import file_sha256, require
from slidemil.errors import ArtifactError, ConfigError
from slidemil.prediction.ensemble import SlideInference
from slidemil.prediction.trained_run import REQUIRED_KEYS, TrainedRun


@dataclass(frozen=True)
class ExportedRun(TrainedRun):
    """``model.json`` of a folder written by ``slidemil export``."""

    @staticmethod
    def is_export(folder: str | Path) -> bool:
        """True for a folder written by ``slidemil export`` (it has ``model.json``)."""
        return (Path(folder) / MODEL_JSON).is_file()

    @classmethod
    def open(cls, run_dir: str | Path) -> ExportedRun:
        path = Path(run_dir).resolve()
        try:
            info = read_model_record(path)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ArtifactError(path / MODEL_JSON, f"unreadable model record: {e}") from e
        missing = [k for k in (*REQUIRED_KEYS, "graph", "folds") if k not in info]
        if missing:
            raise ArtifactError(path / MODEL_JSON, f"lacks {', '.join(missing)}: not an export")
        if int(info.get("format_version", 0)) > EXPORT_FORMAT_VERSION:
            raise ArtifactError(
                path / MODEL_JSON,
                f"export format {info['format_version']} is newer than this slidemil reads",
                "upgrade slidemil",
            )
        return cls(path, info)

    @property
    def n_folds(self) -> int:
        return len(self.info["folds"])

    @property
    def graph_path(self) -> Path:
        return self.path / str(self.info["graph"]["file"])

    def checkpoints(self, model: str) -> dict[str, Path]:
        """Model name -> graph file; an export predicts with the folds it was exported with."""
        if model != "mean":
            raise ConfigError(
                self.path / MODEL_JSON,
                f"an export holds {', '.join(self.info['folds'])} as one graph; --model {model} "
                "does not apply",
                "export the fold you want with slidemil export --fold k",
            )
        if not self.graph_path.is_file():
            raise ArtifactError(self.graph_path, "exported graph file not found")
        return {name: self.graph_path for name in self.info["folds"]}

    @property
    def calibration(self) -> str:
        """``"temperature"`` when the graph scales logits by calibrated temperatures."""
        return str(self.info.get("calibration") or "none")

    def ensemble(self, device: torch.device, calibrate: str = "none") -> ExportedEnsemble:
        """The graph, ready to score bags; refuses a graph file that is not the exported one,
        and a ``calibrate`` choice other than the one the graph was exported with."""
        if calibrate != self.calibration:
            raise ConfigError(
                self.path / MODEL_JSON,
                f"the export's calibration is {self.calibration!r}, not {calibrate!r}: it is "
                "chosen at export time",
                f"predict with --calibrate {self.calibration}, or export with --calibrate "
                f"{calibrate}",
            )
        expected = self.info["graph"].get("sha256")
        if expected and file_sha256(self.graph_path) != expected:
            raise ArtifactError(
                self.graph_path,
                "the graph file differs from the one model.json describes (sha256)",
                "export again",
            )
        ensemble = ExportedEnsemble(
            self.graph_path, str(self.info["graph"]["format"]), list(self.info["folds"]), device,
            takes_coords=COORDS_NAME in (self.info["graph"].get("input") or {}),
        )  # fmt: skip
        ensemble.calibration = self.calibration
        ensemble.temperatures = dict(self.info.get("temperatures") or {})
        return ensemble


class ExportedEnsemble:
    """Runs an exported graph on one bag at a time, with ``Ensemble``'s interface."""

    def __init__(
        self,
        path: Path,
        graph_format: str,
        names: list[str],
        device: torch.device,
        takes_coords: bool = False,
    ):
        self.path = path
        self.names = names
        self.takes_coords = takes_coords
        self.device = device
        self.calibration = "none"  # recorded with each prediction, as Ensemble's
        self.temperatures: dict[str, float | None] = dict.fromkeys(names)
        self.graph_format = graph_format
        if graph_format == "onnx":
            ort = require("onnxruntime", "export", "predicting with an ONNX export")
            providers = ["CPUExecutionProvider"]
            if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self._session: Any = ort.InferenceSession(str(path), providers=providers)
        elif graph_format == "torchscript":
            with torchscript_warnings_silenced():
                self._session = torch.jit.load(str(path), map_location=device)
        else:
            raise ArtifactError(path, f"unknown graph format {graph_format!r}")

    def infer(self, features: np.ndarray, coords: np.ndarray | None = None) -> SlideInference:
        """The graph on the whole bag ``features`` (N, D), any float dtype, with the patches'
        level-0 ``coords`` (N, 2) for a graph that takes them (which refuses a bag without)."""
        inputs = {INPUT_NAME: np.ascontiguousarray(features, dtype=np.float32)}
        if self.takes_coords:
            if coords is None:
                raise ArtifactError(
                    self.path,
                    "this export's model lays patches out by their coordinates and the bag has "
                    "none (a .pt bag)",
                    "predict from feature files with /coords, or from the run folder",
                )
            inputs[COORDS_NAME] = np.ascontiguousarray(coords, dtype=np.float32)
        if self.graph_format == "onnx":
            values = self._session.run(list(OUTPUT_NAMES), inputs)
        else:
            with torch.inference_mode():
                tensors = [torch.from_numpy(v).to(self.device) for v in inputs.values()]
                outputs = self._session(*tensors)
            values = [v.float().cpu().numpy() for v in outputs]
        out = dict(zip(OUTPUT_NAMES, values, strict=True))
        return SlideInference(
            np.asarray(out["fold_probabilities"], np.float64),
            np.asarray(out["attention"], np.float32),
            np.asarray(out["scores"], np.float32),
        )
