"""The tables of an evaluation report: CSV files, ``summary.json``, ``summary.md`` and the terminal
table, all built from :class:`~slidemil.evaluation.report.EvaluationReport` results."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from slidemil import atomic
from slidemil.evaluation.metrics import json_number
from slidemil.evaluation.per_site import per_site_markdown, per_site_rich_table, per_site_table
from slidemil.evaluation.run_files import RunInfo

if TYPE_CHECKING:
    from slidemil.evaluation.report import EvaluationReport, PartResult

CALIBRATION_METRICS = ("ece", "brier")


def metric_names(class_names: tuple[str, ...]) -> list[str]:
    """Summary metrics, per-class recall and AUC (these have intervals), then ECE and Brier."""
    from slidemil.evaluation.metrics import SCALAR_METRICS

    names = [*SCALAR_METRICS]
    names += [f"recall_{c}" for c in class_names] + [f"auc_{c}" for c in class_names]
    return names


def part_values(result: PartResult) -> dict[str, float]:
    """``metric -> value`` of one part, ECE and Brier included."""
    return {**result.metrics.scalars(), "ece": result.ece, "brier": result.brier}


def part_row(result: PartResult, class_names: tuple[str, ...]) -> dict[str, Any]:
    """One ``metrics.csv`` row: each metric followed by its interval bounds when there are."""
    values = part_values(result)
    row: dict[str, Any] = {"cohort": result.cohort, "level": result.level, "fold": result.part}
    row["n"] = result.metrics.n
    for name in metric_names(class_names):
        row[name] = values[name]
        if result.intervals is not None:
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = result.intervals.interval(name)
    row["ece"], row["brier"] = result.ece, result.brier
    if result.before_calibration is not None:
        row["ece_before_calibration"], row["brier_before_calibration"] = result.before_calibration
    if result.threshold is not None:
        row["threshold"] = result.threshold
    return row


def metrics_table(report: EvaluationReport) -> pd.DataFrame:
    """Per level: a row per fold, ``mean`` and ``std`` over folds (ddof=1, NaN skipped), the
    ``pooled`` out-of-fold row, then the external cohort's ``all`` row."""
    names = report.class_names
    blocks = []
    for level in report.levels:
        folds = pd.DataFrame([part_row(r, names) for r in report.fold_results(level)])
        values = folds[[c for c in folds.columns if _is_value_column(c)]]
        keys = {"cohort": "internal", "level": level}
        mean = {**keys, "fold": "mean", **values.mean(skipna=True).to_dict()}
        std = {**keys, "fold": "std", **values.std(skipna=True, ddof=1).to_dict()}
        rows = [pd.DataFrame([mean, std]), pd.DataFrame([part_row(report.result("pooled", level),
                                                                  names)])]  # fmt: skip
        external = [r for r in report.results if r.cohort == "external" and r.level == level]
        rows += [pd.DataFrame([part_row(r, names)]) for r in external]
        blocks += [folds, *rows]
    table = pd.concat(blocks, ignore_index=True)
    table["n"] = table["n"].astype("Int64")  # empty on the mean and std rows
    return table[_ordered(table.columns)]


def _is_value_column(column: str) -> bool:
    return column not in ("cohort", "level", "fold", "n") and not column.endswith(("_low", "_high"))


def _ordered(columns: pd.Index) -> list[str]:
    first = [c for c in ("cohort", "level", "fold", "n") if c in columns]
    return first + [c for c in columns if c not in first]


def per_class_table(report: EvaluationReport) -> pd.DataFrame:
    """Per part and class: support, recall, precision, F1, AUC (with intervals) and ECE; then
    ``mean`` and ``std`` over folds per class."""
    names = report.class_names
    blocks = []
    for level in report.levels:
        folds = pd.concat([_class_rows(r, names) for r in report.fold_results(level)])
        values = folds.drop(columns=["cohort", "level", "fold"])
        values = values[[c for c in values.columns if not c.endswith(("_low", "_high"))]]
        grouped = values.groupby("class", sort=False)
        summary = [
            grouped.mean().reset_index().assign(cohort="internal", level=level, fold="mean"),
            grouped.std(ddof=1).reset_index().assign(cohort="internal", level=level, fold="std"),
        ]
        others = [r for r in report.results if r.level == level and r.part in ("pooled", "all")]
        blocks += [folds, *summary, *(_class_rows(r, names) for r in others)]
    table = pd.concat(blocks, ignore_index=True)
    first = ["cohort", "level", "fold", "class"]
    return table[first + [c for c in table.columns if c not in first]]


def _class_rows(result: PartResult, names: tuple[str, ...]) -> pd.DataFrame:
    frame = result.metrics.per_class_frame()
    if result.intervals is not None:
        for kind in ("recall", "auc"):
            position = frame.columns.get_loc(kind) + 1
            bounds = [result.intervals.interval(f"{kind}_{c}") for c in names]
            frame.insert(position, f"{kind}_ci_low", [b[0] for b in bounds])
            frame.insert(position + 1, f"{kind}_ci_high", [b[1] for b in bounds])
    frame["ece"] = result.class_ece
    frame.insert(0, "fold", result.part)
    frame.insert(0, "level", result.level)
    frame.insert(0, "cohort", result.cohort)
    return frame


def confusion_table(report: EvaluationReport) -> pd.DataFrame:
    """Long format per part, plus the fold ``sum``: cohort, level, fold, true, predicted, count,
    row_fraction (at the chosen operating point)."""
    rows = []
    for level in report.levels:
        matrices = [
            ("internal", str(r.part), r.metrics.confusion) for r in report.fold_results(level)
        ]
        matrices.append(("internal", "sum", sum(m[2] for m in matrices)))
        matrices += [
            (r.cohort, r.part, r.metrics.confusion)
            for r in report.results
            if r.cohort == "external" and r.level == level
        ]
        for cohort, part, counts in matrices:
            totals = counts.sum(axis=1)
            for (t, p), count in np.ndenumerate(counts):
                fraction = count / totals[t] if totals[t] else float("nan")
                names = report.class_names
                rows.append((cohort, level, part, names[t], names[p], int(count), fraction))
    columns = ["cohort", "level", "fold", "true", "predicted", "count", "row_fraction"]
    return pd.DataFrame(rows, columns=columns)


def predictions_table(report: EvaluationReport) -> pd.DataFrame:
    """Every evaluated row (fold test parts and the external cohort, at each level) with its
    evaluated probabilities and its predicted class at the operating point."""
    frames = []
    for r in report.results:
        if r.part == "pooled":
            continue
        frame = r.frame.drop(columns="predicted_index")
        if report.temperatures and r.cohort == "internal":
            frame["temperature"] = frame["fold"].map(report.temperatures)
        frame.insert(0, "level", r.level)
        frame.insert(0, "cohort", r.cohort)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def calibration_table(report: EvaluationReport) -> pd.DataFrame:
    """With temperature scaling: per level and fold (and pooled), the temperature and the test
    part's ECE and Brier score before and after."""
    rows = []
    for r in report.results:
        if r.before_calibration is None:
            continue
        temperature = report.temperatures.get(int(r.part)) if r.part.isdigit() else math.nan
        rows.append(
            {
                "level": r.level,
                "fold": r.part,
                "temperature": temperature,
                "ece_before": r.before_calibration[0],
                "ece_after": r.ece,
                "brier_before": r.before_calibration[1],
                "brier_after": r.brier,
            }
        )
    return pd.DataFrame(rows)


def thresholds_table(report: EvaluationReport) -> pd.DataFrame:
    """With a threshold operating point: per level and part, the threshold (chosen on the fold's
    validation predictions; the external cohort's is the folds' mean) and the test part's
    sensitivity and specificity at it."""
    from slidemil.evaluation.operating_point import sensitivity_specificity

    rows = []
    for r in report.results:
        if r.threshold is None:
            continue
        sens, spec = sensitivity_specificity(r.y_true == 1, r.frame["predicted_index"] == 1)
        rows.append(
            {
                "cohort": r.cohort,
                "level": r.level,
                "fold": r.part,
                "operating_point": report.config.operating_point,
                "threshold": r.threshold,
                "sensitivity": sens,
                "specificity": spec,
            }
        )
    return pd.DataFrame(rows)


# --- summary.json, summary.md, terminal ----------------------------------------------------------


def summary_rows(report: EvaluationReport, level: str) -> list[dict[str, Any]]:
    """Per metric at ``level``: mean and std over folds, pooled and external values with their
    intervals, and per-fold values with theirs (``None`` for undefined values)."""
    names = metric_names(report.class_names) + list(CALIBRATION_METRICS)
    folds = report.fold_results(level)
    pooled = report.result("pooled", level)
    external = [r for r in report.results if r.cohort == "external" and r.level == level]
    rows = []
    for name in names:
        fold_values = np.array([part_values(r)[name] for r in folds], dtype=np.float64)
        defined = fold_values[np.isfinite(fold_values)]
        std = float(np.std(defined, ddof=1)) if len(defined) > 1 else math.nan
        row = {
            "metric": name,
            "mean": json_number(float(defined.mean()) if len(defined) else math.nan),
            "std": json_number(std),
            "pooled": _valued(pooled, name),
            "folds": {r.part: _valued(r, name) for r in folds},
        }
        if external:
            row["external"] = _valued(external[0], name)
        rows.append(row)
    return rows


def _valued(result: PartResult, name: str) -> dict[str, float | None]:
    value = {"value": json_number(part_values(result)[name])}
    if result.intervals is not None and name in result.intervals.low:
        low, high = result.intervals.interval(name)
        value.update(low=json_number(low), high=json_number(high))
    return value


def format_mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def format_interval(valued: dict[str, float | None]) -> str:
    """``0.812 [0.743, 0.871]``, or the value alone when it has no interval."""
    value = valued.get("value")
    if value is None:
        return "n/a"
    low, high = valued.get("low"), valued.get("high")
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def write_tables(report: EvaluationReport, run: RunInfo) -> None:
    """Write every CSV, ``summary.json`` and ``summary.md`` (atomically) and fill
    ``report.metrics``, ``report.per_class`` and ``report.predictions``."""
    out = report.out_dir
    report.metrics = metrics_table(report)
    report.per_class = per_class_table(report)
    report.predictions = predictions_table(report)
    report.per_site = per_site_table(report)
    tables = {
        "metrics.csv": report.metrics,
        "per_class.csv": report.per_class,
        "confusion_matrices.csv": confusion_table(report),
        "predictions.csv": report.predictions,
    }
    if not report.per_site.empty:
        tables["per_site.csv"] = report.per_site
    if report.temperatures:
        tables["calibration.csv"] = calibration_table(report)
    thresholds = thresholds_table(report)
    if not thresholds.empty:
        tables["thresholds.csv"] = thresholds
    for name, frame in tables.items():
        atomic.write_csv(out / name, frame)
        report.files.append(out / name)

    config = report.config
    summary = {
        "run": str(run.run_dir),
        "levels": list(report.levels),
        "class_names": list(report.class_names),
        "folds": list(report.folds),
        "missing_folds": list(report.missing_folds),
        "external": None if config.external is None else str(config.external),
        "n_evaluated": {
            f"{r.cohort}/{r.level}": r.metrics.n for r in report.results if r.part != "pooled"
        }
        | {f"internal/{lv}": report.result("pooled", lv).metrics.n for lv in report.levels},
        "bootstrap": {
            "resamples": config.bootstrap,
            "confidence": config.confidence,
            "unit": "patient",
            "seed": config.seed,
        },
        "operating_point": config.operating_point,
        "calibration": {
            "method": config.calibrate,
            "ece_bins": config.ece_bins,
            "temperatures": {str(k): v for k, v in report.temperatures.items()},
        },
        "metrics": {level: summary_rows(report, level) for level in report.levels},
        "per_site": [
            {k: json_number(v) if isinstance(v, float) else v for k, v in row.items()}
            for row in report.per_site.to_dict("records")
        ],
    }
    atomic.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic.write_text(out / "summary.md", summary_markdown(report, run))
    report.files += [out / "summary.json", out / "summary.md"]


def _table_columns(report: EvaluationReport, level: str) -> list[str]:
    external = any(r.cohort == "external" and r.level == level for r in report.results)
    return ["pooled"] + (["external"] if external else [])


def summary_markdown(report: EvaluationReport, run: RunInfo) -> str:
    """The report as Markdown: one table per level, calibration and operating point."""
    config = report.config
    ci = f"{round(100 * config.confidence)}% CI"
    folds = [str(f) for f in report.folds]
    lines = [
        f"# Evaluation of {run.run_dir.name}",
        "",
        f"- levels: {', '.join(report.levels)}"
        + (
            f" (patients: {config.patient_aggregation} of their slides)"
            if "patient" in report.levels
            else ""
        ),
        f"- folds reported: {', '.join(folds)}",
        f"- folds missing: {', '.join(map(str, report.missing_folds)) or 'none'}",
        f"- classes: {', '.join(report.class_names)}",
        f"- intervals: {_interval_text(config)}",
        f"- operating point: {config.operating_point}",
        f"- calibration: {config.calibrate} (ECE with {config.ece_bins} equal-mass bins)",
    ]
    if config.external is not None:
        lines.append(f"- external cohort: {config.external}")
    for level in report.levels:
        columns = _table_columns(report, level)
        n = {c: _part(report, c, level).metrics.n for c in columns}
        head = ["metric", "mean ± std over folds"]
        head += [f"{c} (n={n[c]}, {ci})" for c in columns] + [f"fold {f} ({ci})" for f in folds]
        lines += ["", f"## {level.capitalize()} level", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + "---|" * len(head))
        for row in summary_rows(report, level):
            cells = [row["metric"], format_mean_std(row["mean"], row["std"])]
            cells += [format_interval(row[c]) for c in columns]
            cells += [format_interval(v) for v in row["folds"].values()]
            lines.append("| " + " | ".join(cells) + " |")
    if report.temperatures:
        lines += ["", "## Temperature scaling", "", "| level | fold | T | ECE before → after | "
                  "Brier before → after |", "|---|---|---|---|---|"]  # fmt: skip
        for _, r in calibration_table(report).iterrows():
            t = "" if math.isnan(r["temperature"]) else f"{r['temperature']:.3f}"
            lines.append(
                f"| {r['level']} | {r['fold']} | {t} | {r['ece_before']:.3f} → "
                f"{r['ece_after']:.3f} | {r['brier_before']:.3f} → {r['brier_after']:.3f} |"
            )
    lines += per_site_markdown(report.per_site)
    thresholds = thresholds_table(report)
    if not thresholds.empty:
        lines += ["", f"## Operating point ({config.operating_point}, chosen on validation)", "",
                  "| cohort | level | fold | threshold | sensitivity | specificity |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for _, r in thresholds.iterrows():
            lines.append(
                f"| {r['cohort']} | {r['level']} | {r['fold']} | {r['threshold']:.3f} | "
                f"{r['sensitivity']:.3f} | {r['specificity']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def _interval_text(config) -> str:
    if not config.bootstrap:
        return "none (bootstrap 0)"
    return (
        f"{round(100 * config.confidence)}% percentile bootstrap, {config.bootstrap} resamples "
        f"of patients, seed {config.seed}"
    )


def _part(report: EvaluationReport, column: str, level: str) -> PartResult:
    if column == "external":
        return report.result("all", level, cohort="external")
    return report.result("pooled", level)


def print_table(report: EvaluationReport) -> None:
    """Per level: metric, mean ± std over folds, pooled and external values with intervals,
    per-fold values, in the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    ci_width, fold_width = (24 if report.config.bootstrap else 8), 8
    for level in report.levels:
        title = f"{report.run_dir.name}: {level} level, folds " + ", ".join(map(str, report.folds))
        if report.missing_folds:
            title += f" (missing: {', '.join(map(str, report.missing_folds))})"
        columns = _table_columns(report, level)
        # per-fold columns only where the terminal has room for them (summary.md has them all)
        needed = 40 + ci_width * len(columns) + fold_width * len(report.folds)
        show_folds = needed <= console.width
        table = Table(title=title, caption=None if show_folds else "per-fold values: summary.md")
        table.add_column("metric", no_wrap=True)
        table.add_column("mean ± std", justify="right", no_wrap=True, min_width=13)
        ci = f"{round(100 * report.config.confidence)}% CI" if report.config.bootstrap else ""
        for column in columns:
            table.add_column(f"{column} {ci}".strip(), justify="right")
        for fold in report.folds if show_folds else ():
            table.add_column(f"fold {fold}", justify="right")
        for row in summary_rows(report, level):
            per_fold = [
                "n/a" if v["value"] is None else f"{v['value']:.3f}" for v in row["folds"].values()
            ]
            table.add_row(
                row["metric"],
                format_mean_std(row["mean"], row["std"]),
                *(format_interval(row[c]) for c in columns),
                *(per_fold if show_folds else ()),
            )
        console.print(table)
    if not report.per_site.empty:
        console.print(per_site_rich_table(report.per_site, f"{report.run_dir.name}: per site"))
    console.print(f"report: {report.out_dir}")
