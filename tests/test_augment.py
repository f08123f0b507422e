"""Training-time bag augmentation: augmented views, instance dropout and feature noise change the
bags a model trains on, never the validation or test bags, and are reproducible from the seed.

Feature files are real slidemil files (``tests/random_bags.py``) with a ``/views`` (K, N, D)
dataset written as extraction writes it (``tests/feature_views.py``).
"""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from feature_views import VIEW_SHIFT, add_views, view_of_rows
from random_bags import make_random_work
from slidemil.errors import ArtifactError, ConfigError
from slidemil.evaluation.metrics import AbsentClassWarning
from slidemil.training import TrainConfig, load_checkpoint, train
from slidemil.training.augment import bag_augmentation, load_views_cache
from slidemil.training.bags import BagDataset, fit_standardizer, probe_feature_file, read_bag

TINY = {"hidden_dim": 16, "attention_dim": 8, "quiet": True, "device": "cpu"}


@pytest.fixture
def viewed(tmp_path):
    work = make_random_work(tmp_path / "work", patients=8, dim=8, instances=(60, 80), seed=3)
    ids = pd.read_csv(work.root / "cohort.csv")["slide_id"].tolist()
    for slide_id in ids:
        add_views(work.feature_path(slide_id), 3)
    bags = [probe_feature_file(s, work.feature_path(s)) for s in ids]
    return work, bags


def dataset(bags, config: TrainConfig, *, sample: bool = True, cache=None, views=None, **kw):
    return BagDataset(
        bags, [0] * len(bags), max_patches=config.max_patches, sample=sample, cache=cache,
        augment=bag_augmentation(config, views), seed=7, **kw,
    )  # fmt: skip


def test_a_probe_counts_the_views_and_their_bytes(viewed):
    _, bags = viewed
    info = bags[0]
    assert info.n_views == 3 and info.views_nbytes == 3 * info.n_instances * info.dim * 4
    assert info.views_problem is None


def test_random_views_give_each_training_instance_its_plain_features_or_one_view(viewed):
    _, bags = viewed
    config = TrainConfig(views="random", max_patches=None)
    train_set = dataset(bags, config)
    plain = read_bag(bags[0].path).astype(np.float32)
    drawn = []
    for epoch in range(4):
        train_set.set_epoch(epoch)
        bag = train_set[0][0].numpy()
        assert bag.shape == plain.shape  # no dropout: every instance, in order
        views = view_of_rows(bag)
        # each row is exactly its own instance's plain features or that instance's view
        np.testing.assert_allclose(bag - VIEW_SHIFT * views[:, None], plain, atol=0.05)
        drawn.append(views)
    counts = np.bincount(np.concatenate(drawn), minlength=4) / sum(map(len, drawn))
    np.testing.assert_allclose(counts, 0.25, atol=0.07)  # plain and each view 1 / (K + 1)
    assert not np.array_equal(drawn[0], drawn[1])  # drawn afresh each epoch
    # the same (seed, epoch, bag) gives the same draw; a cached copy of the views the same bag
    cached = dataset(bags, config, views=load_views_cache({b.slide_id: b for b in bags}))
    cached.set_epoch(3)
    assert torch.equal(cached[0][0], train_set[0][0])
    # validation and test (sample=False) always see the plain features
    assert np.array_equal(dataset(bags, config, sample=False)[0][0].numpy(), plain)


@pytest.mark.parametrize("whole_view_bytes", [32 * 2**20, 0], ids=["whole-views", "row-lists"])
def test_views_follow_max_patches_sampling_and_cache_equals_disk(
    viewed, monkeypatch, whole_view_bytes
):
    # both ways of reading views from a file: whole (small views), or the sampled rows only
    monkeypatch.setattr("slidemil.training.augment._WHOLE_VIEW_BYTES", whole_view_bytes)
    _, bags = viewed
    config = TrainConfig(views="random", max_patches=16)
    views_cache = load_views_cache({info.slide_id: info for info in bags})
    features_cache = {info.slide_id: read_bag(info.path) for info in bags}
    from_disk = dataset(bags, config)
    from_ram = dataset(bags, config, cache=features_cache, views=views_cache)
    plain_sampler = dataset(bags, TrainConfig(max_patches=16))
    for epoch in (0, 5):
        for ds in (from_disk, from_ram, plain_sampler):
            ds.set_epoch(epoch)
        for index in range(len(bags)):
            disk, ram = from_disk[index][0], from_ram[index][0]
            assert disk.shape[0] == 16 and torch.equal(disk, ram)
            # the views leave the max_patches draw of instances as it was without them
            plain = plain_sampler[index][0].numpy()
            views = view_of_rows(disk.numpy())
            np.testing.assert_allclose(disk.numpy() - VIEW_SHIFT * views[:, None], plain, atol=0.05)


def test_instance_dropout_drops_training_instances_reproducibly_keeping_one(viewed):
    _, bags = viewed
    config = TrainConfig(instance_dropout=0.5, max_patches=40)
    train_set = dataset(bags, config)
    sizes = [train_set[i][0].shape[0] for i in range(len(bags))]
    assert 12 <= np.mean(sizes) <= 28  # about half of the 40 sampled instances
    again = dataset(bags, config)
    assert all(torch.equal(train_set[i][0], again[i][0]) for i in range(len(bags)))
    train_set.set_epoch(1)
    assert [train_set[i][0].shape[0] for i in range(len(bags))] != sizes
    # every kept row is one of the sampled instances, unchanged
    sampled = dataset(bags, TrainConfig(max_patches=40))[0][0]
    kept = dataset(bags, config)[0][0]
    assert all(any(torch.equal(row, s) for s in sampled) for row in kept)
    nearly_all = dataset(bags, TrainConfig(instance_dropout=0.999, max_patches=None))
    assert all(nearly_all[i][0].shape[0] >= 1 for i in range(len(bags)))
    assert dataset(bags, config, sample=False)[0][0].shape[0] == bags[0].n_instances


def test_feature_noise_is_in_training_stds_after_standardisation(viewed):
    _, bags = viewed
    standardizer = fit_standardizer([info.path for info in bags])
    config = TrainConfig(feature_noise=0.3, max_patches=None)
    noisy = dataset(bags, config, standardizer=standardizer)
    clean = dataset(bags, TrainConfig(max_patches=None), standardizer=standardizer)
    residual = torch.cat([noisy[i][0] - clean[i][0] for i in range(len(bags))])
    assert residual.std().item() == pytest.approx(0.3, rel=0.05)
    assert abs(residual.mean().item()) < 0.02
    assert torch.equal(noisy[0][0], dataset(bags, config, standardizer=standardizer)[0][0])
    untouched = dataset(bags, config, sample=False, standardizer=standardizer)[0][0]
    plain = dataset(bags, TrainConfig(), sample=False, standardizer=standardizer)[0][0]
    assert torch.equal(untouched, plain)
    with pytest.raises(ValueError, match="needs standardize"):
        TrainConfig(feature_noise=0.1, standardize=False)


def test_no_augmentation_when_every_option_is_off():
    assert bag_augmentation(TrainConfig()) is None


def test_a_run_with_views_and_feature_augmentation_trains_on_other_bags(viewed, tmp_path):
    work, _ = viewed
    options = dict(TINY, epochs=2, max_patches=16, lr=3e-3)
    plain = train(work.root, tmp_path / "plain", **options)
    augmented = train(
        work.root, tmp_path / "augmented", views="random", instance_dropout=0.2,
        feature_noise=0.1, **options,
    )  # fmt: skip
    a = load_checkpoint(tmp_path / "plain" / "fold_0" / "checkpoint_latest.pt")["model_state"]
    b = load_checkpoint(tmp_path / "augmented" / "fold_0" / "checkpoint_latest.pt")["model_state"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert plain.finished and augmented.finished
    saved = (tmp_path / "augmented" / "config.yaml").read_text()
    assert "views: random" in saved and "instance_dropout: 0.2" in saved
    # another augmentation is another experiment: the run folder refuses it
    with pytest.raises(ConfigError, match="views"):
        train(work.root, tmp_path / "augmented", instance_dropout=0.2, feature_noise=0.1, **options)


def test_views_asked_for_but_missing_name_the_files(tmp_path):
    work = make_random_work(tmp_path / "work", patients=6, dim=8, seed=4)
    add_views(work.feature_path("p000_s0"), 2)
    with pytest.raises(ArtifactError, match=r"11 of 12 have none: p000_s1.h5 \(no /views") as e:
        train(work.root, tmp_path / "run", views="random", epochs=1, **TINY)
    assert "slidemil extract --views K" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_feature_files_with_different_view_counts_are_refused(tmp_path):
    work = make_random_work(tmp_path / "work", patients=4, dim=8, seed=5)
    ids = pd.read_csv(work.root / "cohort.csv")["slide_id"]
    for n, slide_id in enumerate(ids):
        add_views(work.feature_path(slide_id), 1 if n == 0 else 2)
    with pytest.raises(ArtifactError, match=r"disagree on the number of views \(K=1: 1 file"):
        train(work.root, tmp_path / "run", views="random", epochs=1, **TINY)


def test_a_views_dataset_of_the_wrong_shape_is_reported(tmp_path):
    work = make_random_work(tmp_path / "work", patients=2, dim=8, seed=6)
    with h5py.File(work.feature_path("p000_s0"), "r+") as f:
        f.create_dataset("views", data=np.zeros((2, 3, 8), np.float16))
    info = probe_feature_file("p000_s0", work.feature_path("p000_s0"))
    assert info.n_views == 0 and "does not match" in info.views_problem
    with pytest.raises(ArtifactError, match=r"p000_s0.h5 \('views' \(2, 3, 8\) does not match"):
        train(work.root, tmp_path / "run", views="random", epochs=1, **TINY)


@pytest.mark.slow
def test_views_written_by_extraction_reach_the_training_bags(small_cohort, tmp_path):
    from slidemil.extraction import extract
    from slidemil.formats.feature_file import read_feature_file, read_views
    from slidemil.patching import patch

    work = tmp_path / "work"
    patch(small_cohort / "cohort.csv", work, mpp=2.0, patch_size=32, workers=1, quiet=True,
          previews=False)  # fmt: skip
    summary = extract(
        work, encoder="resnet18", weights="random", device="cpu", quiet=True, batch_size=16,
        workers=0, views=2, augment="flip,rot90,colour", dtype="float32",
    )  # fmt: skip
    assert not summary.failed
    path = sorted((work / "features" / "resnet18").glob("*.h5"))[0]
    info = probe_feature_file(path.stem, path)
    assert info.n_views == 2
    plain, views = read_feature_file(path).features, read_views(path)
    bag = dataset([info], TrainConfig(views="random", max_patches=None))[0][0].numpy()
    # every row is its instance's plain features or one of its two extracted views
    candidates = np.stack([plain, *views])  # (3, N, D)
    distance = np.abs(candidates - bag[None]).max(axis=2)  # (3, N)
    assert (distance.min(axis=0) < 1e-5).all()
    assert (distance[0] > 1e-3).mean() > 0.3  # about 2 in 3 rows are views
    cohort = pd.read_csv(work / "cohort.csv")
    patients = sorted(cohort["patient_id"].unique())
    part_of = {patient: {1: "val", 2: "test"}.get(i, "train") for i, patient in enumerate(patients)}
    cohort["split"] = cohort["patient_id"].map(part_of)
    cohort.to_csv(work / "cohort.csv", index=False)
    with pytest.warns(AbsentClassWarning):  # 6 slides cannot give every part every class
        result = train(work, tmp_path / "run", views="random", epochs=2, max_patches=16, **TINY)
    assert result.finished
