"""Heat maps: exact placement at patch footprints, normalisations, smoothing, figures, and the
QuPath GeoJSON and pyramidal TIFF exports re-opened by the tools users open them with."""

from __future__ import annotations

import json

import cv2
import h5py
import matplotlib
import numpy as np
import pytest
from typer.testing import CliRunner

from slidemil.errors import ArtifactError, ConfigError
from slidemil.formats.attention_file import (
    AttentionMap,
    is_complete_attention_file,
    read_attention_file,
    write_attention_file,
)
from slidemil.formats.h5 import write_attrs
from slidemil.heatmaps import (
    heat_grid,
    heatmap,
    localisation_auc,
    normalise_scores,
    patch_mask_fraction,
    rasterise,
    smooth,
)
from slidemil.heatmaps.figure import heatmap_title
from slidemil.slide import Slide
from slidemil.synthetic import write_pyramid
from slidemil.tissue.user_masks import load_user_mask

# --- a synthetic attention field with a known hot square --------------------------------------

WIDTH, HEIGHT = 1536, 1152
HOT = (384, 384, 768, 768)  # level-0 x0, y0, x1, y1: multiples of every patch size used below


def grid(patch_size: int, step: int) -> np.ndarray:
    xs = np.arange(0, WIDTH - patch_size + 1, step)
    ys = np.arange(0, HEIGHT - patch_size + 1, step)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)


def hot_scores(coords: np.ndarray, patch_size: int) -> np.ndarray:
    """1 for the patches lying wholly inside the hot square, 0 for the others."""
    x, y = coords[:, 0], coords[:, 1]
    x0, y0, x1, y1 = HOT
    inside = (x >= x0) & (y >= y0) & (x + patch_size <= x1) & (y + patch_size <= y1)
    return inside.astype(np.float64)


def brute_force(coords, values, patch_size, shape, downsample) -> np.ndarray:
    """Independent reference: each canvas pixel's centre in level-0 px, the mean score of the
    patches whose footprint contains it."""
    height, width = shape
    cx = (np.arange(width) + 0.5) * downsample
    cy = (np.arange(height) + 0.5) * downsample
    expected = np.full(shape, np.nan)
    inside_x = (coords[None, :, 0] <= cx[:, None]) & (cx[:, None] < coords[None, :, 0] + patch_size)
    for j in range(height):
        inside_y = (coords[:, 1] <= cy[j]) & (cy[j] < coords[:, 1] + patch_size)
        inside = inside_x & inside_y[None, :]  # (width, patches)
        count = inside.sum(axis=1)
        total = (inside * values[None, :]).sum(axis=1)
        expected[j] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return expected


@pytest.mark.parametrize(
    ("patch_size", "step", "downsample"),
    [(64, 64, 4.0), (128, 128, 8.0), (96, 48, 8.0), (64, 32, 8.0)],
)
def test_a_known_square_renders_to_exactly_its_pixels(patch_size, step, downsample):
    coords = grid(patch_size, step)
    values = hot_scores(coords, patch_size)
    shape = (round(HEIGHT / downsample), round(WIDTH / downsample))
    canvas = rasterise(coords, values, patch_size, shape, downsample)
    expected = brute_force(coords, values, patch_size, shape, downsample)
    np.testing.assert_array_equal(np.isnan(canvas), np.isnan(expected))
    np.testing.assert_allclose(canvas, expected, atol=1e-6, equal_nan=True)

    x0, y0, x1, y1 = (np.array(HOT) / downsample).astype(int)
    if step == patch_size:
        # no overlap: the hot pixels are exactly the square
        hot = np.zeros(shape, bool)
        hot[y0:y1, x0:x1] = True
        np.testing.assert_array_equal(canvas == 1.0, hot)
        assert set(np.unique(canvas[np.isfinite(canvas)])) == {0.0, 1.0}
    else:
        # overlap: the square's core is hot, its rim the mean of the hot and cold patches
        # covering it: 2 of 4 hot along an edge, 1 of 4 at a corner
        margin = (patch_size - step) // int(downsample)
        assert np.all(canvas[y0 + margin : y1 - margin, x0 + margin : x1 - margin] == 1.0)
        assert canvas[(y0 + y1) // 2, x0] == pytest.approx(0.5)
        shown = set(np.round(np.unique(canvas[np.isfinite(canvas)]), 6))
        assert shown == {0.0, 0.25, 0.5, 1.0}


@pytest.mark.parametrize(("patch_size", "step"), [(64, 64), (96, 48)])
def test_the_tiff_heat_grid_is_exact_on_a_regular_grid(patch_size, step):
    coords = grid(patch_size, step)
    values = hot_scores(coords, patch_size)
    canvas, cell = heat_grid(coords, values, patch_size, (WIDTH, HEIGHT))
    assert cell == np.gcd(patch_size, step)  # every patch edge falls on a cell edge
    assert canvas.shape == (HEIGHT // cell, WIDTH // cell)
    x0, y0, x1, y1 = (np.array(HOT) // cell).astype(int)
    margin = (patch_size - step) // int(cell)
    assert np.all(canvas[y0 + margin : y1 - margin, x0 + margin : x1 - margin] == 1.0)
    assert np.nanmax(np.delete(canvas, np.s_[y0:y1], axis=0)) == 0.0


def test_irregular_coordinates_get_a_fine_grid_and_tiny_patches_never_vanish():
    # CLAM-style: a 256 px grid started at the tissue's corner, so no common divisor
    coords = np.array([[13, 7], [269, 7], [13, 263], [525, 519]])
    canvas, cell = heat_grid(coords, np.array([0.0, 1.0, 0.5, 0.2]), 256, (WIDTH, HEIGHT))
    assert cell == 256 / 8
    assert canvas[263 // 32 + 1, 13 // 32 + 1] == 0.5
    # patches of 16 level-0 px on a canvas of 64 px per pixel still get a pixel each
    coords = np.array([[0, 0], [100, 100], [900, 700]])
    canvas = rasterise(coords, np.array([1.0, 2.0, 3.0]), 16, (12, 16), 64.0)
    assert np.count_nonzero(np.isfinite(canvas)) == 3
    assert canvas[1, 1] == 2.0 and canvas[11, 14] == 3.0


# --- normalisation and smoothing ------------------------------------------------------------------


def test_normalisations():
    values = np.array([3.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(normalise_scores(values, "rank"), [1.0, 0.0, 0.5, 0.5])
    np.testing.assert_allclose(normalise_scores(values, "minmax"), [1.0, 0.0, 0.5, 0.5])
    np.testing.assert_allclose(normalise_scores(values, "none"), values)
    # percentile: one extreme patch does not squash every other patch to the bottom colour
    spread = np.append(np.linspace(0, 1, 199), 1e6)
    shown = normalise_scores(spread, "percentile")
    assert shown[-1] == 1.0 and shown.min() == 0.0
    assert 0.4 < shown[100] < 0.6
    assert normalise_scores(spread, "minmax")[100] < 1e-5
    assert np.all(normalise_scores(np.full(5, 0.2), "percentile") == 0.5)
    assert normalise_scores(np.array([0.7]), "rank")[0] == 1.0
    with pytest.raises(ValueError, match="rank"):
        normalise_scores(values, "softmax")


def test_smoothing_keeps_uncovered_pixels_uncovered_and_edges_unbiased():
    canvas = np.full((40, 40), np.nan, np.float32)
    canvas[10:30, 10:30] = 0.3  # covered area, constant
    canvas[20, 20] = 1.0  # one hot pixel
    smoothed = smooth(canvas, 2.0)
    np.testing.assert_array_equal(np.isnan(smoothed), np.isnan(canvas))
    # the hot pixel spreads to its neighbours, the constant field stays constant at the border
    assert 0.3 < smoothed[20, 22] < smoothed[20, 20] < 1.0
    assert smoothed[10, 10] == pytest.approx(0.3, abs=1e-6)
    assert smooth(canvas, 0.0) is canvas


def test_localisation_auc_of_a_perfect_and_an_inverted_ranking():
    mask = np.zeros((HEIGHT // 16, WIDTH // 16), bool)
    x0, y0, x1, y1 = np.array(HOT) // 16
    mask[y0:y1, x0:x1] = True  # a lesion, the hot square, on a mask at downsample 16
    coords = grid(128, 128)
    fraction = patch_mask_fraction(coords, 128, mask, 16.0)
    inside = hot_scores(coords, 128)  # the lesion is the hot square
    np.testing.assert_array_equal(fraction == 1.0, inside == 1.0)
    assert localisation_auc(inside + 0.01 * np.arange(len(inside)), fraction) == 1.0
    assert localisation_auc(-inside, fraction) == 0.0
    assert np.isnan(localisation_auc(inside, np.zeros(len(inside))))


def test_title_names_the_predicted_class_and_its_probability():
    attrs = {
        "predicted": "tumour",
        "probabilities": [0.125, 0.875],
        "class_names": ["normal", "tumour"],
        "label": "normal",
    }
    assert heatmap_title("s1", attrs) == "s1: predicted tumour (p = 0.88), true normal"
    assert heatmap_title("s1", {**attrs, "label": None}) == "s1: predicted tumour (p = 0.88)"
    assert heatmap_title("s1", {}) == "s1"


# --- exports on a real slide ----------------------------------------------------------------------

SLIDE_SIZE = (1536, 1024)
PATCH = 128
PINK = (230, 170, 200)


def _render(x0, y0, w, h, downsample):
    image = np.empty((h, w, 3), np.uint8)
    image[:] = PINK
    return image


@pytest.fixture(scope="module")
def predictions(tmp_path_factory):
    """A predictions folder holding one attention file over a real 1536 x 1024 SVS at 0.5 µm/px:
    128 px patches on the tissue rectangle, the hot square scoring highest."""
    root = tmp_path_factory.mktemp("heatmaps")
    slide_path = write_pyramid(
        root / "slide_a.svs", *SLIDE_SIZE, _render, mpp=0.5, magnification=20, quality=90
    )
    xs, ys = np.meshgrid(np.arange(128, 1408, PATCH), np.arange(128, 896, PATCH))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    hot = (coords[:, 0] >= 512) & (coords[:, 0] < 768) & (coords[:, 1] >= 384)
    hot &= coords[:, 1] < 640
    raw = np.where(hot, 3.0, 0.0) + np.linspace(0, 0.5, len(coords))
    attention = np.exp(raw) / np.exp(raw).sum()
    attrs = {
        "slide_id": "slide_a",
        "slide_path": str(slide_path),
        "models": ["fold_0"],
        "class_names": ["normal", "tumour"],
        "probabilities": [0.1, 0.9],
        "predicted": "tumour",
        "patch_size_level0": float(PATCH),
        "patch_size": PATCH,
        "read_level": 0,
        "read_size": PATCH,
        "step": PATCH,
        "slide_mpp": 0.5,
        "slide_dimensions": list(SLIDE_SIZE),
    }
    write_attention_file(
        root / "preds" / "attention" / "slide_a.h5", AttentionMap(coords, attention, raw, attrs)
    )
    return root / "preds", coords, hot


@pytest.fixture(scope="module")
def rendered(predictions, tmp_path_factory):
    out = tmp_path_factory.mktemp("heatmaps_out")
    summary = heatmap(
        predictions[0], out, tiff=True, alpha=1.0, normalisation="minmax", top_k=4, quiet=True
    )
    return out, summary


def test_figure_gallery_and_exports_are_written(rendered):
    out, summary = rendered
    assert summary.done == ["slide_a"] and not summary.failed
    for name in ("slide_a.png", "slide_a_gallery.png", "slide_a.geojson", "slide_a.tiff"):
        assert (out / name).is_file(), name
    figure = cv2.imread(str(out / "slide_a.png"))
    gallery = cv2.imread(str(out / "slide_a_gallery.png"))
    assert figure.shape[1] > 1000 and gallery.shape[1] > 300  # real images, not empty files
    assert (out / "heatmap_config.yaml").is_file()


def test_geojson_opens_as_qupath_tiles_and_as_polygons(rendered, predictions):
    out, _ = rendered
    _, coords, hot = predictions
    data = json.loads((out / "slide_a.geojson").read_text())
    features = data["features"]
    assert data["type"] == "FeatureCollection" and len(features) == len(coords)
    first = features[0]
    assert first["properties"]["objectType"] == "tile"
    x, y = coords[0]
    ring = first["geometry"]["coordinates"][0]
    assert ring == [[x, y], [x + PATCH, y], [x + PATCH, y + PATCH], [x, y + PATCH], [x, y]]
    measured = np.array([f["properties"]["measurements"]["attention"] for f in features])
    assert measured[hot].min() > measured[~hot].max()
    assert {"attention", "attention_raw", "attention_shown"} <= set(
        first["properties"]["measurements"]
    )
    # the same polygons, read as a user mask, cover exactly the patches
    mask = load_user_mask(out / "slide_a.geojson", SLIDE_SIZE, rasterize_size=384)
    covered = mask.mask.sum() * mask.downsample**2
    assert covered == pytest.approx(len(coords) * PATCH**2, rel=0.05)


def test_tiff_opens_in_openslide_at_full_resolution(rendered, predictions):
    out, _ = rendered
    _, coords, hot = predictions
    with Slide(out / "slide_a.tiff") as tiff:
        assert tiff.dimensions == SLIDE_SIZE
        assert tiff.mpp == pytest.approx(0.5)
        assert tiff.level_count >= 2
        jet = matplotlib.colormaps["jet"]
        hottest = np.array(jet(1.0, bytes=True)[:3], float)
        coldest = np.array(jet(0.0, bytes=True)[:3], float)
        x, y = coords[np.flatnonzero(hot)[-1]] + PATCH // 2
        assert np.abs(tiff.read_region((x, y), 0, (1, 1))[0, 0] - hottest).max() < 20
        x, y = coords[0] + PATCH // 2
        assert np.abs(tiff.read_region((x, y), 0, (1, 1))[0, 0] - coldest).max() < 20
        # where no patch lies, the slide shows through
        assert np.abs(tiff.read_region((40, 40), 0, (1, 1))[0, 0] - np.array(PINK)).max() < 12
        # the edge of a hot patch is where the patch ends, at full resolution
        x0, y0 = (int(v) for v in coords[np.flatnonzero(hot)[0]])
        inside = tiff.read_region((x0 + 64, y0 + 64), 0, (1, 1))[0, 0].astype(float)
        row = tiff.read_region((x0 - 8, y0 + 64), 0, (16, 1))[0].astype(float)
        assert np.abs(row[-6:] - inside).max() < 30, "the patch's colour starts at its edge"
        assert np.abs(row[:6] - inside).max(axis=1).min() > 60, "and not before"


def test_a_rerun_skips_finished_slides_and_the_cli_renders(rendered, predictions, tmp_path):
    out, _ = rendered
    again = heatmap(
        predictions[0], out, tiff=True, alpha=1.0, normalisation="minmax", top_k=4, quiet=True
    )
    assert again.skipped == ["slide_a"] and not again.done

    from slidemil.cli import app
    from slidemil.cli import commands as _  # noqa: F401 - registers the commands

    result = CliRunner().invoke(
        app,
        ["heatmap", str(predictions[0]), "--out", str(tmp_path / "cli"), "--top-k", "0",
         "--no-geojson", "--smooth", "0.5", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "slide_a.png").is_file()
    assert not (tmp_path / "cli" / "slide_a.geojson").exists()
    same = dict(top_k=0, geojson=False, smooth=0.5, quiet=True)
    assert heatmap(predictions[0], tmp_path / "cli", **same).skipped == ["slide_a"]
    # another look (colour map, normalisation, ...) redraws instead of keeping the old figures
    redrawn = heatmap(predictions[0], tmp_path / "cli", **same, cmap="viridis")
    assert redrawn.done == ["slide_a"]


def test_heatmap_errors_name_the_folder_and_the_fix(predictions, tmp_path):
    with pytest.raises(ArtifactError, match="run slidemil predict first"):
        heatmap(tmp_path, quiet=True)
    with pytest.raises(ConfigError, match="colour map"):
        heatmap(predictions[0], tmp_path, cmap="no-such-map", quiet=True)
    summary = heatmap(predictions[0], tmp_path / "h", model="fold_7", quiet=True, top_k=0)
    assert "fold_7" in summary.failed["slide_a"]
    assert (tmp_path / "h" / "failures.csv").is_file()


# --- per-class maps -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def class_predictions(predictions, tmp_path_factory):
    """The slide of ``predictions`` with class-specific integrated-gradient scores: class
    ``tumour`` high on the hot square, class ``normal`` high on the first patch row."""
    folder, coords, hot = predictions
    source = read_attention_file(folder / "attention" / "slide_a.h5")
    first_row = coords[:, 1] == coords[:, 1].min()
    per_class = np.stack([np.where(first_row, 2.0, -1.0), np.where(hot, 2.0, -1.0)], axis=1)
    per_class += np.linspace(0, 0.1, len(coords))[:, None]
    attrs = {**source.attrs, "explanation": "ig", "class_specific": True}
    attrs["explanation_settings"] = {"baseline": "zero", "steps": 32}
    out = tmp_path_factory.mktemp("class_maps")
    write_attention_file(
        out / "attention" / "slide_a.h5",
        AttentionMap(
            coords, source.attention, source.attention_raw, attrs, class_scores=per_class[:, None]
        ),
    )
    return out, coords, hot, first_row


def _measured(path, name: str) -> np.ndarray:
    features = json.loads(path.read_text())["features"]
    return np.array([f["properties"]["measurements"][name] for f in features])


def test_each_class_gets_its_own_map(class_predictions, tmp_path):
    folder, _, hot, first_row = class_predictions
    summary = heatmap(folder, tmp_path, class_name="all", top_k=2, quiet=True)
    assert summary.done == ["slide_a"] and not summary.failed
    for stem in ("slide_a_normal", "slide_a_tumour"):
        for suffix in (".png", "_gallery.png", ".geojson"):
            assert (tmp_path / f"{stem}{suffix}").is_file(), stem + suffix
    tumour = _measured(tmp_path / "slide_a_tumour.geojson", "ig tumour")
    normal = _measured(tmp_path / "slide_a_normal.geojson", "ig normal")
    assert tumour[hot].min() > tumour[~hot].max()
    assert normal[first_row].min() > normal[~first_row].max()
    normal_png = cv2.imread(str(tmp_path / "slide_a_normal.png"))
    assert np.abs(normal_png.astype(int) - cv2.imread(str(tmp_path / "slide_a_tumour.png"))).max()
    assert heatmap(folder, tmp_path, class_name="all", top_k=2, quiet=True).skipped == ["slide_a"]

    # one class by name, and the default of an ig file: its predicted class (tumour)
    heatmap(folder, tmp_path / "one", class_name="normal", top_k=0, quiet=True)
    np.testing.assert_allclose(_measured(tmp_path / "one" / "slide_a.geojson", "ig normal"), normal)
    heatmap(folder, tmp_path / "default", top_k=0, quiet=True)
    default = _measured(tmp_path / "default" / "slide_a.geojson", "ig tumour")
    np.testing.assert_allclose(default, tumour)

    from slidemil.cli import app
    from slidemil.cli import commands as _  # noqa: F401 - registers the commands

    result = CliRunner().invoke(
        app, ["heatmap", str(folder), "--out", str(tmp_path / "cli"), "--class", "normal",
              "--top-k", "0", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(_measured(tmp_path / "cli" / "slide_a.geojson", "ig normal"), normal)
    result = CliRunner().invoke(app, ["heatmap", str(folder), "--class", "benign", "--quiet"])
    assert result.exit_code != 0 and "no class 'benign'" in result.output


def test_attention_files_keep_todays_map_and_refuse_a_class_they_lack(
    predictions, class_predictions, tmp_path
):
    folder = predictions[0]
    heatmap(folder, tmp_path / "a", top_k=0, quiet=True)  # an attention file: the weights
    assert (
        "attention"
        in json.loads((tmp_path / "a" / "slide_a.geojson").read_text())["features"][0][
            "properties"
        ]["measurements"]
    )
    # class-agnostic scores: --class all draws the one map they make
    heatmap(folder, tmp_path / "b", class_name="all", top_k=0, quiet=True)
    assert (tmp_path / "b" / "slide_a.png").is_file()
    assert not (tmp_path / "b" / "slide_a_tumour.png").exists()
    with pytest.raises(ConfigError, match="no class 'benign'; its classes are normal, tumour"):
        heatmap(class_predictions[0], tmp_path / "c", class_name="benign", quiet=True)


def test_version_1_attention_files_still_draw_and_say_they_lack_class_scores(predictions, tmp_path):
    source = read_attention_file(predictions[0] / "attention" / "slide_a.h5")
    old = tmp_path / "old" / "attention" / "slide_a.h5"
    old.parent.mkdir(parents=True)
    with h5py.File(old, "w") as f:  # exactly what slidemil wrote before format 2
        f.create_dataset("coords", data=source.coords)
        f.create_dataset("attention", data=source.attention)
        f.create_dataset("attention_raw", data=source.attention_raw)
        attrs = {
            k: v for k, v in source.attrs.items() if not k.startswith(("explanation", "class_s"))
        }
        write_attrs(f.attrs, {**attrs, "format_version": 1})
    assert is_complete_attention_file(old)  # a predict rerun keeps it as done
    read = read_attention_file(old)
    assert read.class_scores is None and read.explanation == "attention"
    assert not read.class_specific
    summary = heatmap(tmp_path / "old", tmp_path / "maps", top_k=0, quiet=True)
    assert summary.done == ["slide_a"]
    with pytest.raises(ConfigError, match=r"no per-class scores \(attention format 1\)"):
        heatmap(tmp_path / "old", tmp_path / "maps2", class_name="tumour", quiet=True)
