"""Patient-level stratified splits: no leaks, classes balanced, a split column honoured."""

from __future__ import annotations

import pandas as pd
import pytest

from slidemil.errors import CohortError
from slidemil.training.splits import make_splits


def cohort(patients: int = 30, classes: int = 3, slides_per_patient: int = 3) -> pd.DataFrame:
    rows = [
        {"slide_id": f"p{p}_s{s}", "patient_id": f"p{p}", "label": f"c{p % classes}"}
        for p in range(patients)
        for s in range(1 + p % slides_per_patient)
    ]
    return pd.DataFrame(rows)


def assert_no_patient_in_two_parts(splits: pd.DataFrame) -> None:
    parts_per_patient = splits.groupby(["fold", "patient_id"])["part"].nunique()
    assert parts_per_patient.max() == 1


def test_default_split_is_70_15_15_by_patient_and_stratified():
    slides = cohort(patients=40, classes=2)
    splits = make_splits(slides, seed=3)
    assert len(splits) == len(slides) and set(splits["fold"]) == {0}
    assert_no_patient_in_two_parts(splits)
    patients = splits.drop_duplicates("patient_id")
    share = patients["part"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.7, abs=0.06)
    assert share["val"] == pytest.approx(0.15, abs=0.06)
    # each class is in every part
    assert patients.groupby("part")["label"].nunique().min() == 2


def test_kfold_tests_every_patient_once_and_carves_validation_from_training():
    slides = cohort(patients=30, classes=3)
    splits = make_splits(slides, folds=5, val_fraction=0.2, seed=1)
    assert sorted(splits["fold"].unique()) == [0, 1, 2, 3, 4]
    assert_no_patient_in_two_parts(splits)
    tested = splits[splits["part"] == "test"]
    assert tested["slide_id"].is_unique and set(tested["slide_id"]) == set(slides["slide_id"])
    for _, fold in splits.groupby("fold"):
        assert set(fold["part"]) == {"train", "val", "test"}
        # stratified: every class in every part of every fold
        assert fold.groupby("part")["label"].nunique().min() == 3


def test_splits_are_deterministic_in_the_seed():
    slides = cohort()
    assert make_splits(slides, folds=3, seed=5).equals(make_splits(slides, folds=3, seed=5))
    assert not make_splits(slides, seed=5).equals(make_splits(slides, seed=6))


def test_a_split_column_wins():
    slides = cohort(patients=9, classes=3)
    slides["split"] = slides["patient_id"].map(lambda p: ("train", "val", "test")[int(p[1:]) % 3])
    splits = make_splits(slides, folds=5, seed=0)
    assert set(splits["fold"]) == {0}
    assert splits["part"].tolist() == slides["split"].tolist()


def test_a_split_column_that_splits_a_patient_is_refused():
    slides = cohort(patients=6, classes=2, slides_per_patient=3)
    slides["split"] = ["train", "val"] * (len(slides) // 2) + ["train"] * (len(slides) % 2)
    with pytest.raises(CohortError, match="more than one split"):
        make_splits(slides)


def test_a_class_with_too_few_patients_gets_a_clear_error():
    slides = cohort(patients=12, classes=2)
    slides.loc[slides["patient_id"] == "p1", "label"] = "rare"
    with pytest.raises(CohortError, match="'rare' \\(1\\)"):
        make_splits(slides)
    with pytest.raises(CohortError, match="5-fold"):
        make_splits(cohort(patients=8, classes=2), folds=5)


def test_a_split_column_must_be_complete_and_have_train_and_val():
    slides = cohort(patients=6, classes=2)
    slides["split"] = "train"
    with pytest.raises(CohortError, match="no 'val' slides"):
        make_splits(slides)
    slides.loc[0, "split"] = None
    with pytest.raises(CohortError, match="empty for 1 slide"):
        make_splits(slides)


def test_kfold_validation_comes_from_the_folds_training_patients_only():
    slides = cohort(patients=20, classes=2)
    splits = make_splits(slides, folds=4, val_fraction=0.25, seed=2)
    for fold, table in splits.groupby("fold"):
        patients = table.drop_duplicates("patient_id")
        tested = set(splits[(splits["fold"] == fold) & (splits["part"] == "test")]["patient_id"])
        val = set(patients.loc[patients["part"] == "val", "patient_id"])
        assert val and not val & tested
        # about val_fraction of the patients that are not tested
        assert len(val) / (len(patients) - len(tested)) == pytest.approx(0.25, abs=0.1)
