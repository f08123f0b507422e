"""What every fold of a run shares: the labelled cohort, its usable feature bags, the slides left
out (and why) and, when they fit, the bags cached in RAM."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slidemil.cohort import Cohort, load_cohort
from slidemil.errors import ArtifactError, CohortError, ConfigError
from slidemil.formats.foreign_features import feature_folder, find_feature_file
from slidemil.training.augment import check_views, load_views_cache
from slidemil.training.bags import BagInfo, load_cache, probe_feature_file
from slidemil.training.config import TrainConfig


class MissingBagsWarning(UserWarning):
    """Some cohort slides have no usable feature file; training goes on without them."""


@dataclass
class TrainData:
    """What every fold shares: the cohort, the usable bags and the slides left out (and why)."""

    cohort: Cohort
    encoder: str
    bags: dict[str, BagInfo]
    excluded: dict[str, str]
    feature_dim: int
    cache: dict[str, np.ndarray] | None = None
    views: dict[str, np.ndarray] | None = None  # cached (K, N, D) views, with --views random


def resolve_encoder(work: Path, encoder: str | None) -> str:
    """The feature folder to use: the one named, or the only one under ``work/features``."""
    root = work / "features"
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not found:
        raise ArtifactError(root, "no feature folders", "run 'slidemil extract' first")
    if encoder is None:
        if len(found) > 1:
            raise ConfigError(
                root, f"several feature folders: {', '.join(found)}", "choose one with --encoder"
            )
        return found[0]
    if encoder not in found:
        raise ConfigError(root, f"no feature folder {encoder!r}; found {', '.join(found)}")
    return encoder


def load_train_data(work: Path, config: TrainConfig, *, warn: bool = True) -> TrainData:
    """Read the cohort, probe every slide's feature file and set unusable ones aside (with a
    :class:`MissingBagsWarning` when ``warn``); cache the bags in RAM when asked or when they fit.
    """
    cohort = load_cohort(work / "cohort.csv", require_labels=True, check_files=False)
    if len(cohort.class_names) < 2:
        raise CohortError(
            cohort.source,
            f"only one class ({', '.join(cohort.class_names)}): a classifier needs two or more",
        )
    encoder = resolve_encoder(work, config.encoder)
    # a linked CLAM --feat_dir is read from its h5_files/ (or pt_files/)
    folder = feature_folder(work / "features" / encoder)
    bags: dict[str, BagInfo] = {}
    excluded: dict[str, str] = {}
    for record in cohort:
        probed = probe_feature_file(record.slide_id, find_feature_file(folder, record.slide_id))
        if isinstance(probed, str):
            excluded[record.slide_id] = probed
        else:
            bags[record.slide_id] = probed
    if excluded and warn:
        listed = ", ".join(f"{s} ({why})" for s, why in list(excluded.items())[:20])
        more = f" and {len(excluded) - 20} more" if len(excluded) > 20 else ""
        warnings.warn(
            f"{folder}: training without {len(excluded)} slide(s) lacking usable features: "
            f"{listed}{more}",
            MissingBagsWarning,
            stacklevel=3,
        )
    if not bags:
        raise ArtifactError(folder, "no usable feature files for the cohort's slides")
    dims = {info.dim for info in bags.values()}
    if len(dims) > 1:
        raise ArtifactError(folder, f"feature files disagree on the feature size D: {sorted(dims)}")
    data = TrainData(cohort, encoder, bags, excluded, dims.pop())
    with_views = config.views == "random"
    if with_views:
        check_views(folder, bags)
    total_bytes = sum(i.nbytes + (i.views_nbytes if with_views else 0) for i in bags.values())
    use_cache = config.cache
    if use_cache is None:
        use_cache = total_bytes <= config.cache_limit_gb * 2**30
    if use_cache:
        data.cache = load_cache(list(bags.values()))
        data.views = load_views_cache(bags) if with_views else None
    return data
