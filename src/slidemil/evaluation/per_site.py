"""Metrics per site (hospital, scanner): ``per_site.csv`` and the per-site tables of the report.

A model that does well pooled can still fail on one site whose slides stain or scan differently;
the per-site table shows it. Each site's rows are taken from the pooled out-of-fold predictions
(under ``--site-holdout`` a site is tested in exactly one fold, by a model that never saw it) and
from the external cohort when its ``predictions.csv`` has a ``site`` column; each row keeps the
decision of the fold that predicted it (its operating point).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from slidemil.evaluation.metrics import SCALAR_METRICS, compute_metrics
from slidemil.formats.prediction_table import probability_columns

if TYPE_CHECKING:
    from rich.table import Table

    from slidemil.evaluation.report import EvaluationReport, PartResult

SITE_COLUMN = "site"
NO_SITE = "(no site)"  # the name of a blank site cell in the tables
PER_SITE_COLUMNS = ["cohort", "level", "site", "n", "n_patients", "folds", *SCALAR_METRICS]


def per_site_table(report: EvaluationReport) -> pd.DataFrame:
    """Per level and cohort (internal pooled, external), one row per site: ``n`` evaluated rows,
    ``n_patients``, the ``folds`` that tested it (``;``-joined) and accuracy, balanced accuracy,
    macro F1 and macro AUC (NaN where undefined, e.g. a class absent from the site). Empty when
    no evaluated table has a ``site`` column."""
    rows = []
    for result in report.results:
        if result.part not in ("pooled", "all") or SITE_COLUMN not in result.frame.columns:
            continue
        rows += _site_rows(result, report.class_names)
    return pd.DataFrame(rows, columns=PER_SITE_COLUMNS)


def _site_rows(result: PartResult, class_names: tuple[str, ...]) -> list[dict]:
    frame = result.frame
    sites = frame[SITE_COLUMN].fillna("").astype(str).replace("", NO_SITE)
    rows = []
    for site, part in frame.groupby(sites, sort=True):
        metrics = compute_metrics(
            part["label_index"].to_numpy(),
            part[probability_columns(class_names)].to_numpy(),
            class_names,
            source=f"{result.cohort} {result.level} level, site {site}",
            y_pred=part["predicted_index"].to_numpy(),
        )
        folds = sorted({str(f) for f in part["fold"]}, key=lambda f: (not f.isdigit(), f.zfill(9)))
        rows.append(
            {
                "cohort": result.cohort,
                "level": result.level,
                "site": site,
                "n": metrics.n,
                "n_patients": int(part["patient_id"].nunique()),
                "folds": ";".join(folds),
                **{name: getattr(metrics, name) for name in SCALAR_METRICS},
            }
        )
    return rows


def per_site_markdown(table: pd.DataFrame) -> list[str]:
    """The ``## Per site`` section of ``summary.md`` (no lines when there are no sites)."""
    if table.empty:
        return []
    lines = ["", "## Per site (pooled out-of-fold predictions; external cohort apart)", ""]
    head = ["cohort", "level", "site", "n", "patients", "folds", *SCALAR_METRICS]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in table.iterrows():
        values = [_number(row[name]) for name in SCALAR_METRICS]
        cells = [row["cohort"], row["level"], row["site"], str(row["n"]), str(row["n_patients"])]
        lines.append("| " + " | ".join([*cells, row["folds"], *values]) + " |")
    return lines


def per_site_rich_table(table: pd.DataFrame, title: str) -> Table:
    """The terminal's per-site table: balanced accuracy and macro AUC per site."""
    from rich.table import Table

    shown = Table(title=title)
    for column in ("cohort", "level", "site"):
        shown.add_column(column)
    for column in ("n", "folds", "balanced_accuracy", "macro_auc"):
        shown.add_column(column, justify="right")
    for _, row in table.iterrows():
        shown.add_row(
            row["cohort"], row["level"], row["site"], str(row["n"]), row["folds"],
            _number(row["balanced_accuracy"]), _number(row["macro_auc"]),
        )  # fmt: skip
    return shown


def _number(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:.3f}"
