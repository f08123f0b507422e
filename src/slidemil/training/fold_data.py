"""One fold's data: its train/val/test slide ids, their class indices, the feature standardiser
fitted on its training part, and the one place its datasets and loaders are built."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from slidemil.evaluation.metrics import AbsentClassWarning
from slidemil.training.augment import bag_augmentation
from slidemil.training.bags import BagDataset, Standardizer, fit_standardizer, pad_bags
from slidemil.training.config import TrainConfig
from slidemil.training.data import TrainData
from slidemil.training.distributed import DistContext

PARTS = ("train", "val", "test")


@dataclass
class FoldData:
    """The slides of fold ``fold`` by part, each slide's class index, and the standardiser
    (None: ``standardize`` off) fitted on the training part only."""

    fold: int
    parts: dict[str, list[str]]
    label_index: dict[str, int]
    standardizer: Standardizer | None
    data: TrainData
    config: TrainConfig

    @classmethod
    def of(cls, fold: int, split: pd.DataFrame, data: TrainData, config: TrainConfig) -> FoldData:
        """The fold's parts from its rows of ``splits.csv`` (columns ``slide_id``, ``part``)."""
        parts = {p: split.loc[split["part"] == p, "slide_id"].tolist() for p in PARTS}
        names = list(data.cohort.class_names)
        label_index = {s: names.index(data.cohort[s].label) for s in data.bags}
        standardizer = _fit_standardizer(parts["train"], data) if config.standardize else None
        return cls(fold, parts, label_index, standardizer, data, config)

    @property
    def class_names(self) -> list[str]:
        return list(self.data.cohort.class_names)

    def dataset(self, part: str, sample: bool) -> BagDataset:
        """The bags of ``part``; ``sample`` draws at most ``max_patches`` instances per bag
        (training), otherwise every instance (validation, test)."""
        ids = self.parts[part]
        return BagDataset(
            [self.data.bags[s] for s in ids],
            [self.label_index[s] for s in ids],
            max_patches=self.config.max_patches,
            sample=sample,
            cache=self.data.cache,
            standardizer=self.standardizer,
            seed=self.config.seed + 1000 * self.fold,
            augment=bag_augmentation(self.config, self.data.views),  # applied if sample only
        )

    def loader(
        self,
        dataset: BagDataset,
        device: torch.device,
        sampler: Sampler | None,
        batch_size: int = 1,
    ) -> DataLoader:
        """Batches of padded bags (:func:`pad_bags`) in ``sampler``'s order."""
        # Inference runs bag by bag: all instances, no padding. Cached bags are already in RAM,
        # and worker processes would only copy them, so only file reading gets workers. Workers
        # are not persistent: each epoch's workers get the dataset with that epoch's seed.
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=pad_bags,
            num_workers=0 if self.data.cache is not None else self.config.workers,
            pin_memory=device.type == "cuda",
        )

    def warn_absent_classes(self, fold_dir: Path) -> None:
        """Once per fold (not every epoch): classes missing from the training or validation
        part."""
        names = self.class_names
        for part, consequence in (
            ("train", "the model cannot learn them"),
            ("val", "their validation recall and AUC are undefined (NaN)"),
        ):
            present = {self.label_index[s] for s in self.parts[part]}
            absent = [name for i, name in enumerate(names) if i not in present]
            if absent:
                warnings.warn(
                    f"{fold_dir}: fold {self.fold} has no {part} slide of class(es) "
                    f"{', '.join(absent)}: {consequence}",
                    AbsentClassWarning,
                    stacklevel=3,
                )


def inference_shard(dataset: BagDataset, context: DistContext) -> DistributedSampler | None:
    """Inference: each rank predicts its share of the bags (None: one process, all of them)."""
    if not context.distributed:
        return None
    return DistributedSampler(
        dataset, num_replicas=context.world_size, rank=context.rank, shuffle=False
    )


def _fit_standardizer(train_ids: list[str], data: TrainData) -> Standardizer:
    if data.cache is not None:
        return fit_standardizer([data.cache[s] for s in train_ids])
    return fit_standardizer([data.bags[s].path for s in train_ids])
