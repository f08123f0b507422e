"""The synthetic cohort: real SVS files, ground truth, cohort.csv, determinism."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from slidemil.cli import app
from slidemil.cli import commands as _commands  # noqa: F401  (registers the commands)
from slidemil.cohort import load_cohort
from slidemil.config import build
from slidemil.errors import ConfigError
from slidemil.slide import Slide
from slidemil.synthetic import SynthConfig, load_truth, plan_cohort, synth
from slidemil.synthetic.scene import LABEL_LESION, LABEL_TISSUE


def test_cohort_csv_lists_every_slide_with_patients(small_cohort):
    cohort = load_cohort(small_cohort / "cohort.csv")
    assert len(cohort) == 6
    assert len(cohort.class_names) == 3
    frame = pd.read_csv(small_cohort / "cohort.csv")
    # every patient has a single diagnosis, and some have several slides
    assert frame.groupby("patient_id")["label"].nunique().max() == 1
    for record in cohort:
        assert record.path.is_file()
        assert (small_cohort / "truth" / f"{record.slide_id}.png").is_file()


def test_lesions_are_a_minority_of_the_tissue(small_cohort):
    for record in load_cohort(small_cohort / "cohort.csv"):
        labels = load_truth(small_cohort, record.slide_id).label_map(8)
        tissue = np.isin(labels, (LABEL_TISSUE, LABEL_LESION)).sum()
        lesion = (labels == LABEL_LESION).sum()
        assert tissue > 0.15 * labels.size
        assert 0 < lesion < 0.3 * tissue


def test_lesion_fraction_option_sets_the_lesion_area(tmp_path):
    def lesion_share(fraction):
        out = tmp_path / str(fraction[0])
        synth(out, slides=2, classes=2, size=1024, lesion_fraction=fraction, quiet=True)
        labels = load_truth(out, "slide_0000").label_map(4)
        return (labels == LABEL_LESION).sum() / np.isin(labels, (LABEL_TISSUE, LABEL_LESION)).sum()

    assert lesion_share((0.02, 0.03)) < 0.05 < 0.15 < lesion_share((0.25, 0.3))
    with pytest.raises(ConfigError, match="lesion_fraction"):
        build(SynthConfig, section="synth", overrides={"lesion_fraction": (0.3, 0.1)})


def test_truth_png_matches_scene(small_cohort):
    scene = load_truth(small_cohort, "slide_0001")
    png = cv2.imread(str(small_cohort / "truth" / "slide_0001.png"), cv2.IMREAD_GRAYSCALE)
    labels = scene.label_map(max(scene.width, scene.height) / max(png.shape))
    assert png.shape == labels.shape
    assert ((png == 255) == (labels == LABEL_LESION)).mean() > 0.999


def test_pyramid_levels_agree_with_level_zero(small_cohort):
    with Slide(small_cohort / "slides" / "slide_0002.svs") as slide:
        level1 = slide.read_level(1).astype(float)
        level0 = slide.read_level(0)
        shrunk = cv2.resize(level0, level1.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(level1 - shrunk).mean() < 10


def test_same_seed_gives_the_same_cohort(tmp_path):
    config = SynthConfig(slides=4, classes=2, size=1024, seed=11)
    assert plan_cohort(config) == plan_cohort(config)
    synth(tmp_path / "a", config)
    synth(tmp_path / "b", config)
    a = (tmp_path / "a" / "slides" / "slide_0000.svs").read_bytes()
    b = (tmp_path / "b" / "slides" / "slide_0000.svs").read_bytes()
    # identical but for the scan date/time in the description
    assert len(a) == len(b)
    assert sum(x != y for x, y in zip(a, b, strict=True)) < 64


def test_imbalance_and_mixed_resolution(tmp_path):
    plans = plan_cohort(SynthConfig(slides=30, classes=3, imbalance=4, mpp=[0.25, 0.5], seed=1))
    counts = np.bincount([p.class_index for p in plans], minlength=3)
    assert counts.sum() == 30 and counts[0] > 2 * counts[2] >= 2
    assert {p.mpp for p in plans} == {0.25, 0.5}
    for p in plans:  # same physical width whatever the resolution
        assert p.width * p.mpp == pytest.approx(4096 * 0.5, abs=1)


def test_rerun_skips_and_other_options_are_refused(tmp_path):
    synth(tmp_path, slides=2, classes=2, size=512, quiet=True)
    path = tmp_path / "slides" / "slide_0000.svs"
    before = path.stat().st_mtime_ns
    synth(tmp_path, slides=2, classes=2, size=512, quiet=True, workers=2)
    assert path.stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="size"):
        synth(tmp_path, slides=2, classes=2, size=640, quiet=True)


def test_config_validation_names_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="cannot cover"):
        build(SynthConfig, section="synth", overrides={"slides": 2, "classes": 3})
    config_file = tmp_path / "exp.yaml"
    config_file.write_text("synth:\n  slides: 4\n  colour: red\n")
    with pytest.raises(ConfigError, match="unknown option 'colour' in synth"):
        build(SynthConfig, section="synth", config_file=config_file)
    config_file.write_text("synthetic:\n  slides: 4\n")
    with pytest.raises(ConfigError, match="unknown section"):
        build(SynthConfig, section="synth", config_file=config_file)


def test_cli_writes_a_cohort_and_yaml_config_applies(tmp_path):
    config_file = tmp_path / "exp.yaml"
    config_file.write_text("synth:\n  slides: 3\n  classes: 2\n  size: 512\n")
    args = ["synth", "--out", str(tmp_path / "c"), "--config", str(config_file)]
    result = CliRunner().invoke(app, [*args, "--slides", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(load_cohort(tmp_path / "c" / "cohort.csv")) == 2  # the flag wins over the file
    bad = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "d"), "--classes", "1"])
    assert bad.exit_code != 0


@pytest.mark.slow
def test_memory_stays_bounded_as_slides_grow(tmp_path):
    """Peak RSS of writing a 4x larger slide grows by far less than its pixels would take."""
    script = (
        "import resource, sys\n"
        "from slidemil.synthetic import synth\n"
        "synth(sys.argv[1], slides=2, classes=2, size=int(sys.argv[2]), quiet=True)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )

    def peak_kb(size: int) -> int:
        out = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / str(size)), str(size)],
            check=True,
            capture_output=True,
            text=True,
        )
        return int(out.stdout.strip().splitlines()[-1])

    small, large = peak_kb(2048), peak_kb(16384)
    large_pixels_kb = 16384 * 16384 * 0.65 * 3 / 1024  # >= 510 MB of RGB per slide
    assert large - small < 0.25 * large_pixels_kb


def test_sites_nest_patients_and_keep_labels_balanced():
    plans = plan_cohort(SynthConfig(slides=40, classes=3, sites=4, imbalance=2, seed=5))
    assert {p.site for p in plans} == {"site_1", "site_2", "site_3", "site_4"}
    patients: dict[str, set] = {}
    for p in plans:
        patients.setdefault(p.patient_id, set()).add(p.site)
    assert all(len(sites) == 1 for sites in patients.values())  # a patient is at one site
    counts = pd.crosstab([p.site for p in plans], [p.class_index for p in plans])
    assert (counts > 0).all().all()  # every site has every class
    assert (counts.max() - counts.min()).max() <= 1  # each class split evenly over the sites
    no_sites = plan_cohort(SynthConfig(slides=40, classes=3, imbalance=2, seed=5))
    assert all(p.site is None for p in no_sites)
    with pytest.raises(ConfigError, match="all 3 classes"):
        build(SynthConfig, section="synth", overrides={"slides": 8, "classes": 3, "sites": 3})


def _tissue_optical_density(out, slide_id: str) -> np.ndarray:
    """Mean optical density (R, G, B) of a slide's tissue."""
    scene = load_truth(out, slide_id)
    with Slide(out / "slides" / f"{slide_id}.svs") as slide:
        image = slide.read_level(0)
    downsample = scene.width / image.shape[1]
    labels = scene.label_map(downsample)[: image.shape[0], : image.shape[1]]
    pixels = image[: labels.shape[0], : labels.shape[1]][labels != 0].astype(float)
    return (-np.log((pixels + 1) / 256)).mean(axis=0)


def test_sites_stain_and_scan_differently(tmp_path):
    options = ["--slides", "9", "--classes", "3", "--sites", "3", "--size", "768", "--seed", "2"]
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path), *options, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "in 3 sites" in result.output
    cohort = load_cohort(tmp_path / "cohort.csv")
    assert cohort.has_sites
    stains = json.loads((tmp_path / "sites.json").read_text())
    assert [s["name"] for s in stains] == ["site_1", "site_2", "site_3"]
    colour = {r.slide_id: _tissue_optical_density(tmp_path, r.slide_id) for r in cohort}
    by_site: dict[str, list] = {}
    for record in cohort:
        by_site.setdefault(record.site, []).append(colour[record.slide_id])
    means = np.array([np.mean(v, axis=0) for v in by_site.values()])
    within = np.mean([np.var(v, axis=0).sum() for v in by_site.values()])
    between = np.var(means, axis=0).sum()
    assert between > 2 * within  # the site more than the slide or the class sets the colour
    # the site's staining is part of the ground truth, so a scene re-renders as written
    scene = load_truth(tmp_path, cohort.slides[0].slide_id)
    assert scene.site_stain is not None and scene.site_stain.name == cohort.slides[0].site


def test_cohort_written_before_sites_existed_is_still_accepted(tmp_path):
    synth(tmp_path, slides=2, classes=2, size=512, quiet=True)
    record = tmp_path / "synth_config.yaml"
    record.write_text(
        "".join(line for line in record.read_text().splitlines(True) if "sites" not in line)
    )
    synth(tmp_path, slides=2, classes=2, size=512, quiet=True)  # no "other options" refusal
