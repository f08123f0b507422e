"""A training run as prediction sees it: its classes, encoder, fold checkpoints, and the patching
and extraction options its slides were processed with (so new slides get exactly the same)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slidemil.config import read_yaml
from slidemil.errors import ArtifactError, ConfigError

RUN_FILE = "run.json"
CHECKPOINT = "checkpoint_best.pt"
REQUIRED_KEYS = ("class_names", "encoder", "feature_dim")


@dataclass(frozen=True)
class TrainedRun:
    """``run.json`` of a run folder written by ``slidemil train``, and where its models are."""

    path: Path
    info: dict[str, Any]

    @classmethod
    def open(cls, run_dir: str | Path) -> TrainedRun:
        path = Path(run_dir).resolve()
        record = path / RUN_FILE
        if not record.is_file():
            raise ArtifactError(
                path,
                f"no {RUN_FILE}: not a training run",
                "give the --out folder of slidemil train",
            )
        try:
            info = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(record, f"unreadable run record: {e}") from e
        missing = [k for k in REQUIRED_KEYS if not isinstance(info, dict) or k not in info]
        if missing:
            raise ArtifactError(record, f"lacks {', '.join(missing)}: not a slidemil run record")
        return cls(path, info)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(str(c) for c in self.info["class_names"])

    @property
    def encoder(self) -> str:
        """The feature folder the run trained on (``work/features/<encoder>``)."""
        return str(self.info["encoder"])

    @property
    def feature_dim(self) -> int:
        return int(self.info["feature_dim"])

    @property
    def n_folds(self) -> int:
        recorded = self.info.get("folds")
        if recorded is not None:
            return int(recorded)
        return len(list(self.path.glob("fold_*")))

    @property
    def work(self) -> Path | None:
        """The work folder the run was trained from, if it recorded one."""
        work = self.info.get("work")
        return Path(work) if work else None

    def checkpoints(self, model: str) -> dict[str, Path]:
        """Fold name -> best checkpoint, for ``model`` ``"mean"`` (every fold) or ``"fold_<k>"``."""
        names = [f"fold_{k}" for k in range(self.n_folds)]
        if model != "mean":
            if model not in names:
                raise ConfigError(
                    self.path / RUN_FILE,
                    f"no fold {model!r}: the run has {', '.join(names) or 'no folds'}",
                    "choose one of those, or 'mean'",
                )
            names = [model]
        missing = [n for n in names if not (self.path / n / CHECKPOINT).is_file()]
        if missing or not names:
            raise ArtifactError(
                self.path / (missing[0] if missing else ""),
                f"no {CHECKPOINT} for {', '.join(missing) or 'any fold'} (not trained yet?)",
                "finish training, or predict with --model fold_<k> of a trained fold",
            )
        return {name: self.path / name / CHECKPOINT for name in names}

    def patch_options(self) -> dict[str, Any] | None:
        """The ``patch`` options the training slides were cut with: from ``run.json``, else from
        the run's work folder; ``None`` when neither has them (features made elsewhere)."""
        recorded = self.info.get("patch_config")
        if isinstance(recorded, dict):
            return recorded
        section = self._work_yaml(Path("patch_config.yaml")).get("patch")
        return section if isinstance(section, dict) else None

    def extract_record(self) -> dict[str, Any] | None:
        """The ``extract`` options and feature ``identity`` of the training features: from
        ``run.json``, else from the work folder's ``features/<encoder>/extract_config.yaml``."""
        recorded = self.info.get("extract_config")
        if not isinstance(recorded, dict):
            recorded = self._work_yaml(Path("features") / self.encoder / "extract_config.yaml")
        return recorded if isinstance(recorded.get("extract"), dict) else None

    def identity(self) -> dict[str, Any] | None:
        """Encoder, weights, dtype and transform of the training features, when recorded."""
        record = self.extract_record()
        identity = None if record is None else record.get("identity")
        return identity if isinstance(identity, dict) else None

    def _work_yaml(self, relative: Path) -> dict[str, Any]:
        if self.work is None or not (self.work / relative).is_file():
            return {}
        try:
            return read_yaml(self.work / relative)
        except ConfigError:
            return {}
