"""Patient-level stratified splits: no leaks, classes balanced, a split column honoured."""

from __future__ import annotations

import pandas as pd
import pytest

from slidemil.errors import CohortError
from slidemil.evaluation.metrics import AbsentClassWarning
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


# --- site holdout ---------------------------------------------------------------------------------


def sited(patients: int = 36, classes: int = 2, sites: str = "ABCD") -> pd.DataFrame:
    """Patients nested in sites, sites of different sizes, every class in every site."""
    slides = cohort(patients=patients, classes=classes)
    # patient p to site (p // classes) mod the cycle, where A is twice: A twice the others' size
    weights = [2] + [1] * (len(sites) - 1)
    cycle = [s for s, w in zip(sites, weights, strict=True) for _ in range(w)]
    number = slides["patient_id"].str[1:].astype(int)
    slides["site"] = [cycle[(p // classes) % len(cycle)] for p in number]
    return slides


def assert_no_site_in_two_parts(splits: pd.DataFrame) -> None:
    """No site is both tested and used for fitting (training or validation) in one fold."""
    tested = splits["part"] == "test"
    kinds = splits.assign(tested=tested).groupby(["fold", "site"])["tested"].nunique()
    assert kinds.max() == 1, kinds[kinds > 1]


def test_site_holdout_tests_each_site_once_and_never_puts_a_site_in_two_parts():
    slides = sited()
    splits = make_splits(slides, folds=3, val_fraction=0.25, seed=4, site_holdout=True)
    assert list(splits.columns) == ["slide_id", "patient_id", "site", "label", "fold", "part"]
    assert_no_site_in_two_parts(splits)
    assert_no_patient_in_two_parts(splits)
    tested = splits[splits["part"] == "test"]
    # every site tested in exactly one fold, every slide once
    assert tested.groupby("site")["fold"].nunique().max() == 1
    assert set(tested["site"]) == set("ABCD") and tested["slide_id"].is_unique
    # fold sizes balanced in patients: A (the largest site) alone, the others shared out
    sizes = tested.groupby("fold")["patient_id"].nunique()
    assert sizes.max() - sizes.min() <= max(slides.groupby("site")["patient_id"].nunique())
    for _, fold in splits.groupby("fold"):
        test_sites = set(fold.loc[fold["part"] == "test", "site"])
        fit_sites = set(fold.loc[fold["part"] != "test", "site"])
        assert test_sites and fit_sites and not test_sites & fit_sites
        val = fold[fold["part"] == "val"].drop_duplicates("patient_id")
        assert val["label"].nunique() == 2  # validation stratified, from the training sites
    assert splits.equals(make_splits(slides, folds=3, val_fraction=0.25, seed=4, site_holdout=True))


def test_without_site_holdout_sites_are_spread_over_the_parts():
    # the effect the option has: plain K-fold puts one site in the test and training parts
    splits = make_splits(sited(), folds=3, seed=4)
    with pytest.raises(AssertionError):
        assert_no_site_in_two_parts(splits)


def test_one_fold_site_holdout_tests_on_the_smallest_sites_about_the_test_fraction():
    slides = sited(patients=40, sites="ABCDEF")
    splits = make_splits(slides, fractions=(0.7, 0.15, 0.15), seed=1, site_holdout=True)
    assert set(splits["fold"]) == {0}
    assert_no_site_in_two_parts(splits)
    tested = splits.loc[splits["part"] == "test"]
    share = tested["patient_id"].nunique() / slides["patient_id"].nunique()
    assert 0.15 <= share < 0.4 and "A" not in set(tested["site"])


def test_site_holdout_needs_complete_sites_and_patients_in_one_site():
    with pytest.raises(CohortError, match="needs a site column"):
        make_splits(cohort(), folds=3, site_holdout=True)
    slides = sited()
    slides.loc[[0, 5], "site"] = None
    with pytest.raises(CohortError, match=r"site column is empty for 2 slide\(s\), e.g. \['p0_s0'"):
        make_splits(slides, folds=3, site_holdout=True)
    slides = sited()
    of_p2 = slides[slides["patient_id"] == "p2"].index
    slides.loc[of_p2[-1], "site"] = "D" if slides.loc[of_p2[0], "site"] != "D" else "C"
    with pytest.raises(
        CohortError, match=r"1 patient\(s\) have slides from more than one site \('p2' in"
    ):
        make_splits(slides, folds=3, site_holdout=True)
    with pytest.raises(
        CohortError, match="5-fold site holdout needs at least 5 sites; the cohort has 4"
    ):
        make_splits(sited(), folds=5, site_holdout=True)
    slides = sited()
    slides["split"] = "train"
    with pytest.raises(CohortError, match="split column and site holdout"):
        make_splits(slides, folds=3, site_holdout=True)


def test_a_test_site_without_a_class_warns_once_per_fold():
    slides = sited(patients=24, classes=2, sites="ABC")
    # site C: class c0 only
    slides = slides[~((slides["site"] == "C") & (slides["label"] == "c1"))]
    absent = r"fold \d tests on site\(s\) C, which have no slide of class\(es\) c1"
    with pytest.warns(AbsentClassWarning, match=absent) as caught:
        splits = make_splits(slides, folds=3, seed=0, site_holdout=True)
    assert len([w for w in caught if issubclass(w.category, AbsentClassWarning)]) == 1
    assert_no_site_in_two_parts(splits)
