"""Training-time augmentation of bags of frozen features: augmented views, instance dropout and
feature noise.

With frozen patch features, image augmentation cannot happen in the training loop. Extraction
can store K augmented *views* of every patch next to the plain features (``/views`` (K, N, D) in
the feature file); ``views="random"`` then gives each instance of a training bag, afresh each
epoch, its plain features or one of its K views (each with probability 1 / (K + 1)). Two more
augmentations need no views: *instance dropout* removes each instance of a training bag with
probability P (after ``max_patches`` sampling, keeping at least one), so the model cannot lean on
a few instances; *feature noise* adds Gaussian noise of S × each feature's training std (after
standardisation, where that std is 1), a small jitter against memorising exact feature values.

Only the training part is augmented (:class:`~slidemil.training.bags.BagDataset` applies the
augmentation where ``sample=True``); validation and test bags are always the plain features.
Every draw comes from ``(seed, fold, epoch, bag)``, so a resumed run sees the same bags.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch

from slidemil.errors import ArtifactError
from slidemil.formats.feature_file import read_views

if TYPE_CHECKING:
    from slidemil.training.bags import BagInfo
    from slidemil.training.config import TrainConfig

# Added to a bag's seed keys, so the augmentation draws never change the max_patches draws.
AUGMENT_STREAM = 1
# h5py's row-list selection costs ~10x a whole read of a few MiB, so a view is read whole and
# indexed in RAM when it is this small or when more than this share of its rows is needed.
_WHOLE_VIEW_BYTES = 32 * 2**20
_WHOLE_VIEW_SHARE = 0.25


@dataclass(frozen=True)
class BagAugmentation:
    """What happens to a training bag after ``max_patches`` sampling.

    Args:
        views: give each instance its plain features or one of its K views, uniformly.
        instance_dropout: probability P of dropping each instance (at least one is kept).
        feature_noise: std of the Gaussian noise added to the standardised features.
        views_cache: slide id -> views (K, N, D) in RAM; None reads them from the feature files.
    """

    views: bool = False
    instance_dropout: float = 0.0
    feature_noise: float = 0.0
    views_cache: dict[str, np.ndarray] | None = None

    def draw_instances(
        self,
        info: BagInfo,
        features: np.ndarray,
        rows: np.ndarray | None,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The bag's instances after dropout, each from the plain features or a view: (n, D) in
        the stored dtype, and their rows (n,) in the bag. ``rows`` are the instances
        ``max_patches`` sampling kept (None: all)."""
        if rows is None:
            rows = np.arange(len(features))
        if self.instance_dropout > 0:
            kept = rng.random(len(rows)) >= self.instance_dropout
            if not kept.any():
                kept[rng.integers(len(rows))] = True
            rows = rows[kept]
        if not self.views:
            return features[rows], rows
        choice = rng.integers(0, info.n_views + 1, size=len(rows))  # 0: the plain features
        values = features[rows]  # a copy: fancy indexing never aliases the cache
        with self._view_reader(info) as view_rows:
            for view in np.unique(choice[choice > 0]):
                picked = choice == view
                drawn = view_rows(int(view) - 1, rows[picked])
                if drawn.dtype != values.dtype:  # e.g. float32 views next to float16 features
                    values = values.astype(np.result_type(values.dtype, drawn.dtype))
                values[picked] = drawn
        return values, rows

    def add_noise_(self, bag: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Add the feature noise to a standardised float32 bag (n, D), in place."""
        if self.feature_noise > 0:
            # torch draws normals about twice as fast as numpy; its generator is seeded from rng
            generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
            noise = torch.randn(tuple(bag.shape), generator=generator)
            bag.add_(noise.mul_(self.feature_noise))
        return bag

    @contextmanager
    def _view_reader(self, info: BagInfo) -> Iterator[Callable[[int, np.ndarray], np.ndarray]]:
        """``(view, sorted rows) -> (rows, D)`` of one bag's views: from the cache, or from its
        file, opened once for the bag."""
        if self.views_cache is not None:
            cached = self.views_cache[info.slide_id]
            yield lambda view, rows: cached[view, rows]
            return
        view_bytes = info.views_nbytes // max(1, info.n_views)
        with h5py.File(info.path, "r") as f:
            stored = f["views"]

            def view_rows(view: int, rows: np.ndarray) -> np.ndarray:
                if (
                    view_bytes <= _WHOLE_VIEW_BYTES
                    or len(rows) > _WHOLE_VIEW_SHARE * info.n_instances
                ):
                    return stored[view][rows]
                return stored[view, rows]  # rows are sorted and unique, as h5py needs

            yield view_rows


def bag_augmentation(
    config: TrainConfig, views_cache: dict[str, np.ndarray] | None = None
) -> BagAugmentation | None:
    """The augmentation ``config`` asks for (``views``, ``instance_dropout``,
    ``feature_noise``); None when all are off."""
    views = config.views == "random"
    if not views and config.instance_dropout == 0 and config.feature_noise == 0:
        return None
    return BagAugmentation(
        views=views,
        instance_dropout=config.instance_dropout,
        feature_noise=config.feature_noise,
        views_cache=views_cache if views else None,
    )


def check_views(folder: Path, bags: dict[str, BagInfo]) -> int:
    """K, the number of views every bag has; :class:`ArtifactError` naming the files when some
    bag has none (e.g. extracted without ``--views``, or a CLAM/TRIDENT file) or bags disagree
    on K (an extraction with another ``--views`` not finished)."""
    lacking = [info for info in bags.values() if info.n_views == 0]
    if lacking:
        shown = ", ".join(
            f"{info.path.name} ({info.views_problem or 'no /views dataset'})"
            for info in lacking[:5]
        )
        more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
        raise ArtifactError(
            folder,
            f"--views random needs augmented views in every feature file; {len(lacking)} of "
            f"{len(bags)} have none: {shown}{more}",
            "extract with `slidemil extract --views K`, or train with --views none",
        )
    counts: dict[int, list[str]] = {}
    for info in bags.values():
        counts.setdefault(info.n_views, []).append(info.path.name)
    if len(counts) > 1:
        listed = "; ".join(
            f"K={k}: {len(names)} file(s), e.g. {names[0]}" for k, names in sorted(counts.items())
        )
        raise ArtifactError(
            folder,
            f"feature files disagree on the number of views ({listed})",
            "finish the extraction with one --views K for every slide",
        )
    return next(iter(counts))


def load_views_cache(bags: dict[str, BagInfo]) -> dict[str, np.ndarray]:
    """Every bag's views (K, N, D) in RAM, in the stored dtype."""
    return {slide_id: read_views(info.path, dtype=None) for slide_id, info in bags.items()}
