"""Where a prediction's features come from: raw slides or an existing feature folder.

Raw slides are patched and encoded under ``out/work/`` with the options the training run
recorded (only runtime options and, for denser maps, the step change), so new features cannot
differ from the training features in resolution, patch size, tissue rules, encoder, weights or
normalisation. Training features that were stain-normalised record the normaliser's fitted state;
new slides get the same normaliser rebuilt from that state (the target image is not needed).
Existing feature folders are checked file by file (``bags.read_slide_bag``)
against the recorded encoder identity and the model's feature size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from slidemil.config import StageConfig, build, read_yaml
from slidemil.errors import ArtifactError, ConfigError, SlidemilError
from slidemil.formats.feature_file import FEATURE_IDENTITY_KEYS
from slidemil.formats.foreign_features import feature_folder, find_feature_file
from slidemil.prediction.bags import GeometryHints
from slidemil.prediction.config import PredictConfig
from slidemil.prediction.trained_run import RUN_FILE, TrainedRun
from slidemil.runner import earlier_failure, read_failures
from slidemil.stain.describe import describe_stain_state

if TYPE_CHECKING:
    from slidemil.stain import StainNormalizer

# Options of the recorded stages that only change how a run goes; prediction sets its own.
PATCH_RUNTIME = ("workers", "quiet", "shard", "overwrite", "reader")
EXTRACT_RUNTIME = ("device", "batch_size", "workers", "quiet", "shard", "reader", "decode")
# Replaced by the recorded stain normaliser itself (the target file may not exist here).
STAIN_OPTIONS = ("stain_norm", "stain_target")


@dataclass
class FeatureSource:
    """The folder of ``<slide_id>.h5`` (or ``.pt``) bags to predict from, why slides have
    none, and where to find the patch geometry the bags do not record."""

    folder: Path
    identity: dict[str, Any] | None = None
    upstream: dict[str, dict[str, str]] = field(default_factory=dict)  # slide id -> failure
    stages: dict[str, StageConfig] = field(default_factory=dict)  # resolved patch / extract
    hints: GeometryHints = field(default_factory=GeometryHints)

    def feature_path(self, slide_id: str) -> Path:
        """The slide's bag: ``<slide_id>.h5``, else ``<slide_id>.pt`` (CLAM ``pt_files``)."""
        return find_feature_file(self.folder, slide_id)

    def missing(self, slide_id: str, path: Path) -> SlidemilError:
        """The error for a slide without a feature file: its patching or extraction failure."""
        record = self.upstream.get(slide_id)
        if record is None:
            return ArtifactError(
                path, "feature file not found", "extract it, or leave the slide out of the CSV"
            )
        return earlier_failure(record)


def existing_features(
    folder: Path,
    run: TrainedRun,
    patches: Path | None = None,
    patch_size_level0: float | None = None,
) -> FeatureSource:
    """A folder of existing bags (a CLAM ``--feat_dir`` is read from its ``h5_files/``, else
    its ``pt_files/``), with where the patch geometry comes from when the bags lack it."""
    if not folder.is_dir():
        raise ConfigError(folder, "features folder not found", "give a folder of <slide_id>.h5")
    if patches is not None and not Path(patches).is_dir():
        raise ConfigError(
            patches, "patches folder not found", "give the folder of the slides' patch files"
        )
    hints = GeometryHints(None if patches is None else Path(patches).resolve(), patch_size_level0)
    return FeatureSource(feature_folder(folder).resolve(), run.identity(), hints=hints)


def recorded_stages(run: TrainedRun) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's recorded ``patch`` options and extraction record, or a ConfigError saying
    that raw slides cannot be processed like the training slides."""
    recorded_patch = run.patch_options()
    recorded_extract = run.extract_record()
    if recorded_patch is None or recorded_extract is None:
        lacking = "patching" if recorded_patch is None else "extraction"
        raise ConfigError(
            run.path / RUN_FILE,
            f"the run records no {lacking} options (neither in {RUN_FILE} nor in its work "
            f"folder {run.work}), so new slides cannot be processed like the training slides",
            "extract features with the run's encoder yourself and pass them with --features",
        )
    return recorded_patch, recorded_extract


def features_from_slides(
    slides_csv: Path, out: Path, run: TrainedRun, config: PredictConfig
) -> FeatureSource:
    """Patch and encode the slides under ``out/work`` exactly as the training slides were."""
    from slidemil.encoders import get_encoder_spec
    from slidemil.extraction import ExtractConfig, extract
    from slidemil.patching import PatchConfig, patch

    recorded_patch, recorded_extract = recorded_stages(run)
    patch_options = _without(recorded_patch, PATCH_RUNTIME)
    if config.step is not None:
        patch_options["step"] = config.step
    workers = config.workers
    patch_options.update(
        workers=None if workers is None else max(1, workers), quiet=config.quiet,
        shard=config.shard, strict=config.strict, reader=config.reader,
    )  # fmt: skip
    patch_config = _recorded(PatchConfig, "patch", patch_options, run)
    normalizer = recorded_stain_normalizer(recorded_extract, run)
    skipped = EXTRACT_RUNTIME + (STAIN_OPTIONS if normalizer is not None else ())
    extract_options = _without(recorded_extract["extract"], skipped)
    # Hub weights: load the very commit the training features came from, not today's main.
    commit = hub_commit((recorded_extract.get("identity") or {}).get("weights_identity"))
    if commit is not None:
        extract_options["revision"] = commit
    extract_options.update(
        device=config.device, batch_size=config.batch_size, workers=workers,
        quiet=config.quiet, shard=config.shard, strict=config.strict, reader=config.reader,
        views=0,  # augmented views are for training: prediction encodes the plain patches only
    )  # fmt: skip
    extract_config = _recorded(ExtractConfig, "extract", extract_options, run)

    work = out / "work"
    patch(slides_csv, work, patch_config)
    if normalizer is not None and not config.quiet:
        tqdm.write(
            f"stain normalisation: {describe_stain_state(normalizer.to_state())}, as the run's "
            "training features"
        )
    extract(work, extract_config, stain_normalizer=normalizer)
    name = extract_config.features_name or get_encoder_spec(extract_config.encoder).name
    folder = work / "features" / name
    identity = recorded_extract.get("identity")
    _check_same_identity(folder, identity, run)
    upstream = _failures(folder)
    upstream.update(_failures(work / "patches"))  # the earliest stage's reason wins
    return FeatureSource(
        folder, identity, upstream, {"patch": patch_config, "extract": extract_config}
    )


def recorded_stain_normalizer(
    recorded_extract: dict[str, Any], run: TrainedRun
) -> StainNormalizer | None:
    """The stain normaliser the training features were made with (``None``: none was used)."""
    state = (recorded_extract.get("identity") or {}).get("stain_normalization")
    if state is None:
        return None
    from slidemil.stain import StainNormalizer

    return StainNormalizer.from_state(state, source=run.path / RUN_FILE)


def hub_commit(weights_identity: str | None) -> str | None:
    """The commit hash of a Hugging Face weights identity (``hf-hub:<repo>@<commit>``)."""
    head, at, commit = str(weights_identity or "").rpartition("@")
    return commit if at and head.startswith(("hf-hub:", "hf:", "hf-file:")) else None


def _without(options: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in keys}


def _recorded(model: type[StageConfig], section: str, options: dict, run: TrainedRun):
    try:
        return build(model, section=section, overrides=options)
    except ConfigError as e:
        raise ConfigError(
            run.path / RUN_FILE,
            f"its recorded {section} options no longer validate: {e.problem}",
            "pass --features made with the run's encoder",
        ) from e


def _check_same_identity(folder: Path, identity: dict | None, run: TrainedRun) -> None:
    """The new features must come from the encoder, weights, dtype and transform trained on."""
    record = folder / "extract_config.yaml"
    if identity is None or not record.is_file():
        return
    now = read_yaml(record).get("identity") or {}
    changed = [
        k for k in FEATURE_IDENTITY_KEYS if k in identity and k in now and identity[k] != now[k]
    ]
    if changed:
        shown = ", ".join(f"{k}: {identity[k]} -> {now[k]}" for k in changed)
        raise ConfigError(
            folder,
            f"features differ from those run {run.path.name} was trained on ({shown})",
            "make the training weights available (same file or hub revision) and delete this "
            "folder",
        )


def _failures(folder: Path) -> dict[str, dict[str, str]]:
    frame = read_failures(folder)
    return {row["slide_id"]: dict(row) for row in frame.to_dict("records")}
