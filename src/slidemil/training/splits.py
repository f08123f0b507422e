"""Patient-level, stratified splits (pure functions: a table in, a table out).

The result has one row per slide and fold: ``slide_id, patient_id, label, fold, part`` with part
in ``train``/``val``/``test`` (and ``site`` after ``patient_id`` when the slides have one). A
patient's slides always share a part within a fold. Patients are stratified by their most frequent
label. With ``site_holdout`` every fold's test part is one or more whole sites (hospitals,
scanners), so no site is ever in two parts of a fold: a model is tested on slides from sites it
has never seen, as it will be in use (Howard et al., Nat Commun 2021: site signatures in the
slides inflate accuracy when a site's slides are in training and test alike).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from slidemil.errors import CohortError
from slidemil.evaluation.metrics import AbsentClassWarning

PARTS = ("train", "val", "test")
SPLIT_COLUMNS = ["slide_id", "patient_id", "label", "fold", "part"]


def make_splits(
    slides: pd.DataFrame,
    *,
    folds: int = 1,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    val_fraction: float = 0.2,
    seed: int = 0,
    source: str | None = None,
    site_holdout: bool = False,
    warn: bool = True,
) -> pd.DataFrame:
    """Assign every slide a part per fold.

    Args:
        slides: columns ``slide_id, patient_id, label`` and optionally ``split`` and ``site``; a
            ``split`` column with a value on every row is used as is (one fold).
        folds: 1 for one split by ``fractions``; K > 1 for K-fold CV over patients, with
            ``val_fraction`` of each fold's training patients held out for validation.
        seed: the same seed and slides give the same splits (on every rank).
        source: the cohort file, named in errors.
        site_holdout: test parts of whole sites (see :func:`site_holdout_splits`).
        warn: warn (:class:`AbsentClassWarning`) when a fold's test sites lack a class.
    """
    slides = slides.reset_index(drop=True)
    if site_holdout:
        return site_holdout_splits(
            slides, folds=folds, fractions=fractions, val_fraction=val_fraction, seed=seed,
            source=source, warn=warn,
        )  # fmt: skip
    if "split" in slides.columns and slides["split"].notna().any():
        return _given_split(slides, source)
    if folds == 1:
        parts = _patient_parts(slides, fractions, seed, source)
        return _table(slides, 0, slides["patient_id"].map(parts))
    tables = []
    for fold, (rest_idx, test_idx) in enumerate(_kfold(slides, folds, seed, source)):
        rest = slides.iloc[rest_idx]
        rest_parts = _patient_parts(
            rest, (1 - val_fraction, val_fraction, 0.0), seed + fold, source
        )
        part = slides["patient_id"].map(rest_parts).fillna("test")
        part.iloc[test_idx] = "test"
        tables.append(_table(slides, fold, part))
    return pd.concat(tables, ignore_index=True)


def site_holdout_splits(
    slides: pd.DataFrame,
    *,
    folds: int = 1,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    val_fraction: float = 0.2,
    seed: int = 0,
    source: str | None = None,
    warn: bool = True,
) -> pd.DataFrame:
    """Site-preserved splits: each fold's test part is one or more whole sites.

    With K > 1 folds the sites are dealt into K groups of about equal patient counts (largest
    site first, each to the group with the fewest patients so far; sites of equal size in an
    order drawn from ``seed``), and fold k tests on group k: every site is tested exactly once,
    so K must not exceed the number of sites. With one fold, the smallest sites go to the test
    part until it holds ``fractions[2]`` of the patients (at least one site, never all).
    Validation patients are drawn, stratified by class, from the training sites only
    (``val_fraction`` of them; ``fractions[1] / (fractions[0] + fractions[1])`` with one fold).

    Every slide needs a site, and a patient's slides one site (:class:`CohortError` naming the
    slides or patients otherwise); a ``split`` column cannot be combined with it.
    """
    _check_sites(slides, source)
    sites = _sites_by_patients(slides, seed)
    if folds > len(sites):
        raise CohortError(
            source,
            f"{folds}-fold site holdout needs at least {folds} sites; the cohort has "
            f"{len(sites)} ({', '.join(sites)})",
            f"use --folds {len(sites)} or fewer",
        )
    patients_of = slides.groupby("site")["patient_id"].nunique()
    if folds == 1:
        groups = [_test_sites(sites, patients_of, fractions[2], source)]
        val_share = fractions[1] / (fractions[0] + fractions[1])
    else:
        groups = _deal_sites(sites, patients_of, folds)
        val_share = val_fraction
    classes = sorted(slides["label"].unique())
    tables = []
    for fold, test_sites in enumerate(groups):
        tested = slides["site"].isin(test_sites)
        rest = slides[~tested]
        parts = _patient_parts(rest, (1 - val_share, val_share, 0.0), seed + fold, source)
        part = slides["patient_id"].map(parts).where(~tested, "test")
        absent = sorted(set(classes) - set(slides.loc[tested, "label"]))
        if warn and absent:
            warnings.warn(
                f"{source or 'cohort'}: fold {fold} tests on site(s) {', '.join(test_sites)}, "
                f"which have no slide of class(es) {', '.join(absent)}: their test recall and "
                "AUC in this fold are undefined (NaN)",
                AbsentClassWarning,
                stacklevel=3,
            )
        tables.append(_table(slides, fold, part))
    return pd.concat(tables, ignore_index=True)


def _check_sites(slides: pd.DataFrame, source: str | None) -> None:
    if "split" in slides.columns and slides["split"].notna().any():
        raise CohortError(
            source,
            "the cohort's split column and site holdout both choose the test slides",
            "remove the split column, or train without --site-holdout",
        )
    if "site" not in slides.columns or slides["site"].isna().all():
        raise CohortError(
            source,
            "site holdout needs a site column (each slide's hospital or scanner)",
            "add a site column to the cohort CSV, or train without --site-holdout",
        )
    blank = slides.loc[slides["site"].isna(), "slide_id"].tolist()
    if blank:
        raise CohortError(
            source,
            f"the site column is empty for {len(blank)} slide(s), e.g. {blank[:5]}",
            "fill in every slide's site for --site-holdout",
        )
    sites_of = slides.groupby("patient_id")["site"].unique()
    mixed = sites_of[sites_of.map(len) > 1]
    if len(mixed):
        shown = "; ".join(
            f"{patient!r} in {', '.join(sorted(map(str, sites)))}"
            for patient, sites in list(mixed.items())[:5]
        )
        raise CohortError(
            source,
            f"{len(mixed)} patient(s) have slides from more than one site ({shown}): site "
            "holdout cannot keep both a patient and a site in one part",
            "give each patient's slides one site, or train without --site-holdout",
        )


def _sites_by_patients(slides: pd.DataFrame, seed: int) -> list[str]:
    """The sites, largest (in patients) first; equal sizes in an order drawn from ``seed``."""
    counts = slides.groupby("site")["patient_id"].nunique()
    names = np.array(sorted(counts.index))
    np.random.default_rng(seed).shuffle(names)
    return sorted(names.tolist(), key=lambda site: -counts[site])  # stable: keeps the draw


def _deal_sites(sites: list[str], patients_of: pd.Series, folds: int) -> list[list[str]]:
    groups: list[list[str]] = [[] for _ in range(folds)]
    sizes = [0] * folds
    for site in sites:
        smallest = sizes.index(min(sizes))
        groups[smallest].append(site)
        sizes[smallest] += int(patients_of[site])
    return [sorted(group) for group in groups]


def _test_sites(
    sites: list[str], patients_of: pd.Series, share: float, source: str | None
) -> list[str]:
    if len(sites) < 2:
        raise CohortError(
            source, f"site holdout needs at least 2 sites; the cohort has one ({sites[0]})"
        )
    total, chosen, held = int(patients_of.sum()), [], 0
    for site in sites[:0:-1]:  # smallest first, never every site
        chosen.append(site)
        held += int(patients_of[site])
        if held >= share * total:
            break
    return sorted(chosen)


def patient_labels(slides: pd.DataFrame) -> pd.Series:
    """Each patient's most frequent label (ties: the first in sorted order)."""
    counts = slides.groupby(["patient_id", "label"]).size().reset_index(name="n")
    counts = counts.sort_values(["patient_id", "n", "label"], ascending=[True, False, True])
    return counts.drop_duplicates("patient_id").set_index("patient_id")["label"]


def _table(slides: pd.DataFrame, fold: int, part: pd.Series) -> pd.DataFrame:
    columns = {
        "slide_id": slides["slide_id"].to_numpy(),
        "patient_id": slides["patient_id"].to_numpy(),
        "label": slides["label"].to_numpy(),
        "fold": fold,
        "part": part.to_numpy(),
    }
    table = pd.DataFrame(columns, columns=SPLIT_COLUMNS)
    if "site" in slides.columns:
        table.insert(2, "site", slides["site"].fillna("").to_numpy())  # "": a blank cell
    return table


def _given_split(slides: pd.DataFrame, source: str | None) -> pd.DataFrame:
    missing = slides.loc[slides["split"].isna(), "slide_id"].tolist()
    if missing:
        raise CohortError(
            source,
            f"the split column is empty for {len(missing)} slide(s), e.g. {missing[:5]}",
            "fill it for every slide or remove the column for automatic splits",
        )
    per_patient = slides.groupby("patient_id")["split"].nunique()
    leaking = per_patient[per_patient > 1].index.tolist()
    if leaking:
        raise CohortError(
            source,
            f"patient(s) {leaking[:5]} have slides in more than one split",
            "put all slides of a patient in the same split",
        )
    for needed in ("train", "val"):
        if not (slides["split"] == needed).any():
            raise CohortError(source, f"the split column has no {needed!r} slides")
    return _table(slides, 0, slides["split"])


def _check_class_sizes(labels: pd.Series, needed: int, what: str, source: str | None) -> None:
    counts = labels.value_counts()
    small = counts[counts < needed]
    if len(small):
        listed = ", ".join(f"{name!r} ({n})" for name, n in small.items())
        raise CohortError(
            source,
            f"class(es) {listed} have fewer than {needed} patients, too few for {what}",
            "add patients, merge classes, use fewer folds, or give a split column",
        )


def _patient_parts(
    slides: pd.DataFrame,
    fractions: tuple[float, float, float],
    seed: int,
    source: str | None,
) -> dict[str, str]:
    """Patient -> part, drawing each class's patients by the fractions (each used part >= 1)."""
    labels = patient_labels(slides)
    used = [p for p, f in zip(PARTS, fractions, strict=True) if f > 0]
    _check_class_sizes(labels, len(used), f"a {'/'.join(used)} split", source)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in sorted(labels.unique()):
        patients = np.array(sorted(labels.index[labels == label]))
        rng.shuffle(patients)
        n = len(patients)
        n_val = max(1, round(n * fractions[1]))
        n_test = max(1, round(n * fractions[2])) if fractions[2] > 0 else 0
        while n - n_val - n_test < 1:  # keep at least one training patient
            if n_test > 1 and n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        counts = {"val": n_val, "test": n_test, "train": n - n_val - n_test}
        start = 0
        for part in ("val", "test", "train"):
            for patient in patients[start : start + counts[part]]:
                assignment[str(patient)] = part
            start += counts[part]
    return assignment


def _kfold(slides: pd.DataFrame, folds: int, seed: int, source: str | None):
    labels = patient_labels(slides)
    _check_class_sizes(labels, folds, f"{folds}-fold cross-validation", source)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    return splitter.split(slides, slides["label"], groups=slides["patient_id"])
