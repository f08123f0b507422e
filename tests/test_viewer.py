"""``slidemil view``: the server's deep-zoom tiles against OpenSlide, the attention layer where
the attention file puts it, the slide list, errors, the asset build, and the whole viewer in a
real headless Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tracemalloc
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from flat_slides import write_flat_tiff
from slidemil.cohort import load_cohort
from slidemil.errors import ArtifactError
from slidemil.formats.attention_file import AttentionMap, write_attention_file
from slidemil.heatmaps.render import colorize
from slidemil.prediction.run import prediction_table
from slidemil.slide import Slide
from slidemil.synthetic import SlideScene, make_scene, write_pyramid
from slidemil.viewer import ViewerConfig, ViewerServer, create_app
from slidemil.viewer.assets import FRONTEND_DIR, REQUIRED, build_assets, missing_assets
from slidemil.viewer.slide_list import SlideList
from slidemil.viewer.tiles import SlidePyramid, TileCache

SIZE = (2560, 1792)  # level-0 px: not a multiple of the tile size, so edge tiles are partial
MPP = 0.5
PATCH = 256
CLASSES = ("normal", "tumour")
HOT = (1280, 768)  # level-0 top-left of slide_a's top patch (fold_0 and the mean)
HOT_FOLD_1 = (512, 1024)  # fold_1's top patch (a flatter map: the mean peaks at HOT)
COLD = (256, 256)  # the lowest-scoring patch of every map
CHROMIUM = Path("/usr/bin/chromium")
DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"
HOT_RGB = tuple(int(v) for v in colorize(np.ones((1, 1), np.float32), "jet")[0, 0, :3])
COLD_RGB = tuple(int(v) for v in colorize(np.zeros((1, 1), np.float32), "jet")[0, 0, :3])


def checkerboard(x0, y0, w, h, downsample):
    """32-px squares in level-0 px, two colours: any offset of a tile shows at every level."""
    xs = x0 + (np.arange(w) + 0.5) * downsample
    ys = y0 + (np.arange(h) + 0.5) * downsample
    dark = ((xs[None, :] // 32).astype(int) + (ys[:, None] // 32).astype(int)) % 2 == 1
    image = np.empty((h, w, 3), np.uint8)
    image[:] = (235, 190, 215)
    image[dark] = (120, 60, 140)
    return image


def patch_grid() -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(256, 2304, PATCH), np.arange(256, 1536, PATCH))
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def scores_peaking_at(coords: np.ndarray, peak: tuple[int, int]) -> np.ndarray:
    """Raw scores falling with the distance to ``peak``, lowest at ``COLD``."""
    distance = np.hypot(*(coords - np.array(peak)).T)
    raw = -distance / PATCH
    raw[(coords == COLD).all(axis=1)] = raw.min() - 5
    return raw


def tissue_scene() -> SlideScene:
    """slide_c's synthetic tissue with lesions (for the screenshots in docs/viewer.md)."""
    return make_scene(np.random.default_rng(11), *SIZE, MPP, class_index=1)


def tissue_patches(scene: SlideScene) -> tuple[np.ndarray, np.ndarray]:
    """128-px patches mostly on tissue, scored by how much lesion they hold (two models)."""
    xs, ys = np.meshgrid(np.arange(0, SIZE[0], 128), np.arange(0, SIZE[1], 128))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    tissue, lesion = scene.masks(0, 0, SIZE[0] // 16, SIZE[1] // 16, 16)
    cells = (SIZE[1] // 128, 8, SIZE[0] // 128, 8)
    tissue_share = tissue.reshape(cells).mean(axis=(1, 3)).ravel()
    lesion_share = lesion.reshape(cells).mean(axis=(1, 3)).ravel()
    keep = tissue_share > 0.5
    noise = np.random.default_rng(0).normal(0, 0.3, size=(int(keep.sum()), 2))
    return coords[keep], 4 * lesion_share[keep, None] + noise


@pytest.fixture(scope="module")
def predicted(tmp_path_factory) -> Path:
    """A predictions folder as ``slidemil predict`` writes it, over three real SVS slides:
    slide_a (tumour, right; two fold models with different hot spots) and slide_b (tumour,
    predicted normal: wrong) on a checkerboard, slide_c (normal, right) of synthetic tissue."""
    root = tmp_path_factory.mktemp("viewer")
    scene = tissue_scene()
    grid = patch_grid()
    hot_spots = np.stack(
        [scores_peaking_at(grid, HOT), 0.5 * scores_peaking_at(grid, HOT_FOLD_1)], axis=1
    )
    slides = {  # label, P(tumour), pixels, patches, raw scores, patch side (level-0 px)
        "slide_a": ("tumour", 0.9, checkerboard, grid, hot_spots, PATCH),
        "slide_b": ("tumour", 0.3, checkerboard, grid, hot_spots, PATCH),
        "slide_c": ("normal", 0.2, scene.render, *tissue_patches(scene), 128),
    }
    run = root / "run"  # the run.json of the training run, as slidemil train writes it
    run.mkdir()
    run_record = {"class_names": list(CLASSES), "encoder": "resnet50-trunc", "feature_dim": 1024,
                  "model": "abmil-gated", "folds": 2}  # fmt: skip
    (run / "run.json").write_text(json.dumps(run_record), encoding="utf-8")
    rows = []
    for slide_id, (label, tumour_probability, render, coords, raw, side) in slides.items():
        slide_path = write_pyramid(
            root / "slides" / f"{slide_id}.svs", *SIZE, render, mpp=MPP, magnification=20
        )
        attention = np.exp(raw) / np.exp(raw).sum(axis=0)
        probabilities = [1 - tumour_probability, tumour_probability]
        attrs = {
            "slide_id": slide_id, "slide_path": str(slide_path), "label": label,
            "models": ["fold_0", "fold_1"], "class_names": list(CLASSES),
            "probabilities": probabilities,
            "predicted": CLASSES[int(np.argmax(probabilities))], "n_patches": len(coords),
            "encoder": "resnet50-trunc", "patch_size_level0": float(side), "patch_size": side,
            "read_level": 0, "read_size": side, "step": side, "slide_mpp": MPP,
            "slide_dimensions": list(SIZE), "run": str(run),
        }  # fmt: skip
        path = root / "preds" / "attention" / f"{slide_id}.h5"
        per_class = None
        if slide_id == "slide_b":  # class-specific scores (--explain ig): normal peaks elsewhere
            normal = np.repeat(scores_peaking_at(coords, HOT_FOLD_1)[:, None], 2, axis=1)
            per_class = np.stack([normal, raw], axis=2)  # (N, F, C)
            attrs.update(explanation="ig", class_specific=True)
        write_attention_file(
            path, AttentionMap(coords, attention, raw, attrs, class_scores=per_class)
        )
        rows.append({"slide_id": slide_id, "path": str(slide_path), "label": label,
                     "patient_id": f"patient_{slide_id}"})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    cohort = load_cohort(root / "cohort.csv", require_labels=False, check_files=False)
    table = prediction_table(cohort, root / "preds" / "attention", CLASSES)
    table.to_csv(root / "preds" / "predictions.csv", index=False)
    return root / "preds"


@pytest.fixture(scope="module")
def server(predicted):
    if shutil.which("npm") is not None:
        build_assets()  # after an edit of frontend/ (nothing to do otherwise)
    if missing_assets():
        pytest.fail("viewer assets are not built: run `python -m slidemil.viewer.assets`")
    with ViewerServer(predicted, ViewerConfig(port=0, tile_cache_mb=8)) as running:
        yield running


def get(server: ViewerServer, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(server: ViewerServer, path: str):
    status, body = get(server, path)
    return status, json.loads(body)


def get_image(server: ViewerServer, path: str) -> np.ndarray:
    status, body = get(server, path)
    assert status == 200, body
    return np.asarray(Image.open(io.BytesIO(body)))


def pyramid_of(server: ViewerServer, layer: str) -> tuple[int, int, int]:
    """(tile size, overlap, deepest level) from a layer's Deep Zoom descriptor."""
    status, body = get(server, f"/tiles/slide_a/{layer}.dzi")
    assert status == 200, body
    root = ET.fromstring(body)
    size = root.find("{*}Size")
    width, height = int(size.get("Width")), int(size.get("Height"))
    assert (width, height) == SIZE  # level-0 px: every layer lies on the slide's coordinates
    deepest = int(np.ceil(np.log2(max(width, height))))
    return int(root.get("TileSize")), int(root.get("Overlap")), deepest


def tile_origin(column: int, row: int, tile: int, overlap: int, downsample: int):
    """Level-0 top-left of a deep-zoom tile (inner edges carry ``overlap`` extra px)."""
    x = column * tile - (overlap if column else 0)
    y = row * tile - (overlap if row else 0)
    return x * downsample, y * downsample


# --- tiles against OpenSlide -------------------------------------------------------------------


@pytest.mark.parametrize("steps_down", [0, 1, 2, 3])
def test_slide_tiles_are_the_slide_at_every_zoom(server, predicted, steps_down):
    tile, overlap, deepest = pyramid_of(server, "slide")
    level, downsample = deepest - steps_down, 2**steps_down
    columns = int(np.ceil(SIZE[0] / downsample / tile))
    rows = int(np.ceil(SIZE[1] / downsample / tile))
    with Slide(predicted.parent / "slides" / "slide_a.svs") as slide:
        for column, row in {
            (0, 0),
            (min(1, columns - 1), min(1, rows - 1)),
            (columns - 1, rows - 1),
        }:
            got = get_image(server, f"/tiles/slide_a/slide_files/{level}/{column}_{row}.jpeg")
            x0, y0 = tile_origin(column, row, tile, overlap, downsample)
            height, width = got.shape[:2]
            region = slide.read_region((x0, y0), 0, (width * downsample, height * downsample))
            expected = cv2.resize(region, (width, height), interpolation=cv2.INTER_AREA)
            error = np.abs(got.astype(float) - expected).mean()
            # one checkerboard square (32 level-0 px) off: the colours swap
            off = x0 - 32 if x0 >= 32 else x0 + 32
            shifted = slide.read_region((off, y0), 0, region.shape[1::-1])
            shifted = cv2.resize(shifted, (width, height), interpolation=cv2.INTER_AREA)
            # JPEG twice (the slide's tiles, then ours) on sharp edges: a few levels of error
            assert error < 12, (level, column, row, error)
            assert np.abs(got.astype(float) - shifted).mean() > 5 * error + 20  # a sharp test


def test_low_zoom_tiles_of_a_flat_slide_read_it_in_bounded_blocks(tmp_path):
    """A single-level slide has no small level to cut the overview tiles from: they come from
    level 0 block by block, never the whole level at once, and still show the slide."""
    path = write_flat_tiff(tmp_path / "flat.tif", 6144, 5120)
    pyramid = SlidePyramid(path, tile_size=254)
    tracemalloc.start()
    try:
        overview = pyramid.tile_jpeg(pyramid.level_count - 6, 0, 0)  # 32 level-0 px per px
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    level_bytes = 6144 * 5120 * 4  # what OpenSlide hands over for a whole-level read
    assert peak < level_bytes / 5, f"peak {peak / 2**20:.0f} MiB: level 0 was read whole"
    got = np.asarray(Image.open(io.BytesIO(overview)).convert("RGB"))
    with Slide(path) as slide:
        expected = cv2.resize(
            slide.read_region((0, 0), 0, (got.shape[1] * 32, got.shape[0] * 32)),
            got.shape[1::-1], interpolation=cv2.INTER_AREA,
        )  # fmt: skip
    assert got.shape == (160, 192, 3)
    assert np.abs(got.astype(float) - expected).mean() < 6


@pytest.mark.parametrize("reader", ["openslide", "tiles"])
def test_the_chosen_reader_serves_the_same_tiles(predicted, reader):
    path = predicted.parent / "slides" / "slide_a.svs"
    chosen, auto = SlidePyramid(path, 254, reader=reader), SlidePyramid(path, 254)
    assert chosen.slide.reader_name == reader
    level = chosen.level_count - 2
    got = np.asarray(Image.open(io.BytesIO(chosen.tile_jpeg(level, 0, 0))).convert("RGB"))
    reference = np.asarray(Image.open(io.BytesIO(auto.tile_jpeg(level, 0, 0))).convert("RGB"))
    assert got.shape == reference.shape
    assert np.abs(got.astype(float) - reference).mean() < 2  # JPEG decoders, then our JPEG


def test_attention_tiles_are_hot_exactly_on_the_top_patch(server):
    tile, overlap, deepest = pyramid_of(server, "attention/mean")
    for steps_down in (0, 2):
        downsample = 2**steps_down
        level = deepest - steps_down
        for name, (hx, hy) in (("mean", HOT), ("fold_0", HOT), ("fold_1", HOT_FOLD_1)):
            centre = (hx + PATCH // 2, hy + PATCH // 2)
            column, row = (c // downsample // tile for c in centre)
            x0, y0 = tile_origin(column, row, tile, overlap, downsample)
            rgba = get_image(
                server, f"/tiles/slide_a/attention/{name}_files/{level}/{column}_{row}.png"
            )
            inside = (int((centre[1] - y0) / downsample), int((centre[0] - x0) / downsample))
            assert tuple(rgba[inside][:3]) == HOT_RGB and rgba[inside][3] == 255, name
            # one pixel left of the hot patch is another patch, not hot
            edge = (inside[0], int((hx - x0) / downsample) - 1)
            assert tuple(rgba[edge][:3]) != HOT_RGB, name
    # outside every patch (the slide's margin) the layer is transparent
    corner = get_image(server, f"/tiles/slide_a/attention/mean_files/{deepest}/0_0.png")
    assert corner[..., 3].max() == 0


def test_the_patch_grid_outlines_patches_only_where_they_are_visible(server):
    tile, overlap, deepest = pyramid_of(server, "grid")
    outline = get_image(server, f"/tiles/slide_a/grid_files/{deepest}/1_1.png")
    x0, _ = tile_origin(1, 1, tile, overlap, 1)
    # the patch edge at level-0 x = 256 is drawn, the middle of a patch is not
    assert outline[10, 256 - x0, 3] > 0
    assert outline[10, 256 + PATCH // 2 - x0, 3] == 0
    far = get_image(server, f"/tiles/slide_a/grid_files/{deepest - 7}/0_0.png")
    assert far[..., 3].max() == 0  # a patch is 2 px there: no grid


def test_patches_and_extremes_follow_the_chosen_map(server):
    for name, peak in (("mean", HOT), ("fold_1", HOT_FOLD_1)):
        status, extremes = get_json(server, f"/api/slides/slide_a/extremes?map={name}&k=3")
        assert status == 200
        assert (extremes["top"][0]["x"], extremes["top"][0]["y"]) == peak
        assert (extremes["bottom"][0]["x"], extremes["bottom"][0]["y"]) == COLD
        status, patches = get_json(server, f"/api/slides/slide_a/patches?map={name}")
        top = extremes["top"][0]["index"]
        assert (patches["x"][top], patches["y"][top]) == peak and patches["shown"][top] == 1.0
    pixels = get_image(server, f"/api/slides/slide_a/patch/{extremes['top'][0]['index']}.jpeg")
    expected = checkerboard(*HOT_FOLD_1, PATCH, PATCH, 1)
    assert pixels.shape == (PATCH, PATCH, 3) and np.abs(pixels - expected.astype(float)).mean() < 6


def test_class_specific_scores_are_maps_of_their_own(server):
    status, info = get_json(server, "/api/slides/slide_b")
    assert status == 200
    assert info["maps"] == ["mean", "fold_0", "fold_1", "class:normal", "class:tumour"]
    # class normal's scores peak at HOT_FOLD_1 in both folds; tumour's are the raw attention's
    for name, peak in (("class:tumour", HOT), ("class:normal", HOT_FOLD_1)):
        status, extremes = get_json(server, f"/api/slides/slide_b/extremes?map={name}&k=1")
        assert status == 200 and (extremes["top"][0]["x"], extremes["top"][0]["y"]) == peak
    status, patches = get_json(server, "/api/slides/slide_b/patches?map=class:tumour")
    assert status == 200 and len(patches["score"]) == len(patch_grid())
    status, _ = get_json(server, "/api/slides/slide_a/patches?map=class:tumour")
    assert status == 404  # slide_a's scores are class-agnostic: no class maps


def test_the_tile_cache_keeps_recent_tiles_within_its_budget():
    cache, made = TileCache(max_bytes=1000), []

    def make(i):
        made.append(i)
        return bytes(300)

    for i in range(10):
        cache.get_or_make(("tile", i), lambda i=i: make(i))
    assert cache.bytes <= 1000 and len(cache) == 3
    cache.get_or_make(("tile", 9), lambda: make(99))  # a recent tile is served, not cut again
    cache.get_or_make(("tile", 0), lambda: make(0))  # an old one was dropped
    assert made == [*range(10), 0]


def test_the_api_serves_the_pages_and_the_bundled_openseadragon(predicted):
    import slidemil

    running = slidemil.view(predicted, port=0, block=False)
    try:
        assert running.url.startswith("http://127.0.0.1:") and not running.exposed
        status, page = get(running, "/")
        assert status == 200 and b"slidemil viewer" in page
        status, script = get(running, "/static/vendor/openseadragon/openseadragon.min.js")
        assert status == 200 and b"OpenSeadragon" in script  # offline: no CDN
        status, page = get(running, "/slide/slide_a")
        assert status == 200 and b"openseadragon.min.js" in page and b"//cdn" not in page
    finally:
        running.stop()


# --- the slide list ----------------------------------------------------------------------------


def test_the_list_pages_sorts_and_filters(server):
    status, cohort = get_json(server, "/api/cohort")
    assert status == 200 and cohort["classes"] == list(CLASSES) and cohort["has_labels"]
    status, first = get_json(server, "/api/slides?per_page=2&sort=probability&order=desc")
    assert (first["total"], first["pages"]) == (3, 2)
    # slide_c: normal at 0.8; slide_a: tumour at 0.9; slide_b: normal at 0.7
    assert [r["slide_id"] for r in first["rows"]] == ["slide_a", "slide_c"]
    status, second = get_json(server, "/api/slides?per_page=2&page=2&sort=probability&order=desc")
    assert [r["slide_id"] for r in second["rows"]] == ["slide_b"]
    status, normal = get_json(server, "/api/slides?predicted=normal")
    assert sorted(r["slide_id"] for r in normal["rows"]) == ["slide_b", "slide_c"]
    status, wrong = get_json(server, "/api/slides?correct=false")
    assert [(r["slide_id"], r["label"], r["predicted"]) for r in wrong["rows"]] == [
        ("slide_b", "tumour", "normal")
    ]
    status, bad = get_json(server, "/api/slides?sort=colour")
    assert status == 400 and "sort must be one of" in bad["error"]


def test_a_cohort_without_labels_lists_predictions_only(predicted, tmp_path):
    table = pd.read_csv(predicted / "predictions.csv").drop(columns="label")
    table.to_csv(tmp_path / "predictions.csv", index=False)  # as predict writes it unlabelled
    slides = SlideList.read(tmp_path / "predictions.csv")
    assert not slides.has_labels and slides.class_names == list(CLASSES)
    page = slides.page(sort="correct")
    assert [r["slide_id"] for r in page.rows] == ["slide_a", "slide_b", "slide_c"]
    assert all(r["label"] is None and r["correct"] is None for r in page.rows)


def test_slide_info_has_what_the_page_shows(server):
    status, info = get_json(server, "/api/slides/slide_a")
    assert status == 200
    assert info["dimensions"] == list(SIZE) and info["mpp"] == pytest.approx(MPP)
    assert info["maps"] == ["mean", "fold_0", "fold_1"] and info["correct"] is True
    assert info["predicted"] == "tumour" and info["probability"] == pytest.approx(0.9)
    assert (info["model"], info["encoder"]) == ("abmil-gated", "resnet50-trunc")  # from the run


# --- errors ------------------------------------------------------------------------------------


def test_requests_for_what_does_not_exist_say_so(server):
    for path in (
        "/api/slides/nope",
        "/tiles/slide_a/attention/fold_9.dzi",
        "/tiles/slide_a/slide_files/99/0_0.jpeg",
        "/tiles/slide_a/slide_files/5/40_40.jpeg",
    ):
        status, body = get_json(server, path)
        assert status == 404 and body["error"], path


def test_a_moved_slide_fails_alone_with_its_path(predicted, tmp_path):
    copy = tmp_path / "preds"
    shutil.copytree(predicted, copy)
    cohort = pd.read_csv(predicted.parent / "cohort.csv")
    cohort.loc[cohort["slide_id"] == "slide_b", "path"] = str(tmp_path / "gone.svs")
    cohort.to_csv(tmp_path / "moved.csv", index=False)
    config = ViewerConfig(port=0, cohort=tmp_path / "moved.csv")
    with ViewerServer(copy, config) as running:
        status, body = get_json(running, "/api/slides/slide_b")
        assert status == 422 and "gone.svs" in body["error"] and "file not found" in body["error"]
        assert get_json(running, "/api/slides/slide_a")[0] == 200


def test_what_cannot_be_served_is_refused_before_listening(predicted, tmp_path):
    with pytest.raises(ArtifactError, match=r"predictions\.csv not found.*slidemil predict"):
        create_app(tmp_path)
    with pytest.raises(ArtifactError, match="not a training run"):
        create_app(predicted, ViewerConfig(run=tmp_path))
    with pytest.raises(ArtifactError, match=r"viewer assets missing.*Node\.js >= 18 with npm"):
        ViewerServer(predicted, ViewerConfig(port=0), static_dir=tmp_path / "static")


def test_cli_help_names_every_option():
    from slidemil.cli import commands  # noqa: F401  (registers the commands)
    from slidemil.cli.app import app

    result = CliRunner().invoke(app, ["view", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in (
        "--run",
        "--port",
        "--host",
        "--cohort",
        "--cmap",
        "--tile-cache-mb",
        "--reader",
    ):
        assert option in result.output


# --- the asset build ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm (Node.js) is not installed")
def test_assets_build_from_the_lock_file_and_skip_when_up_to_date(tmp_path):
    frontend = tmp_path / "frontend"
    shutil.copytree(FRONTEND_DIR, frontend, ignore=shutil.ignore_patterns("node_modules"))
    static = tmp_path / "static"
    assert missing_assets(static) == list(REQUIRED)
    assert build_assets(frontend, static)
    assert missing_assets(static) == []
    assert b"OpenSeadragon" in (static / "vendor/openseadragon/openseadragon.min.js").read_bytes()
    assert not build_assets(frontend, static)  # unchanged sources: nothing to do


# --- in a real browser -------------------------------------------------------------------------

BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=BROWSER_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        page = context.new_page()
        yield page
        context.close()


def screen_pixel(screenshot: bytes, point: dict) -> tuple[int, int, int]:
    image = np.asarray(Image.open(io.BytesIO(screenshot)).convert("RGB"))
    return tuple(int(v) for v in image[round(point["y"]), round(point["x"])])


def close_to(rgb, expected, tolerance: int = 12) -> bool:
    return max(abs(int(a) - int(b)) for a, b in zip(rgb, expected, strict=True)) <= tolerance


def save_for_docs(page, name: str, folder: Path) -> bytes:
    """A screenshot, also written to docs/images/ when SLIDEMIL_DOCS_IMAGES=1."""
    shot = page.screenshot(path=str(folder / name))
    if os.environ.get("SLIDEMIL_DOCS_IMAGES") == "1":
        image = Image.open(io.BytesIO(shot)).convert("RGB").quantize(128)  # small files
        image.save(DOCS_IMAGES / name, optimize=True)
    return shot


DRAWN = """() => {
    const state = window.slidemil;
    if (!state || !state.viewer || !state.slideLoaded || !state.overlayLoaded) return false;
    const viewport = state.viewer.viewport;
    const still = viewport.getCenter(true).distanceTo(viewport.getCenter(false)) < 1e-9;
    return still && Math.abs(viewport.getZoom(true) - viewport.getZoom(false)) < 1e-9;
}"""


def wait_until_drawn(page) -> None:
    """Until the view stands still with every tile of both layers loaded (checked twice: the
    frame after an animation may ask for new tiles)."""
    for _ in range(2):
        page.wait_for_function(DRAWN, timeout=30_000)
        page.wait_for_timeout(400)


@pytest.mark.slow
def test_the_viewer_in_a_browser(server, browser_page, tmp_path):
    page = browser_page
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.url, wait_until="networkidle")
    page.wait_for_selector("body[data-loaded=true]")
    rows = page.locator("#slides tbody tr")
    assert rows.count() == 3
    page.click("th[data-sort=probability]")
    page.click("th[data-sort=probability]")  # descending
    page.wait_for_selector("th[data-sort=probability].descending")
    assert page.locator("#slides tbody tr").first.get_attribute("data-slide-id") == "slide_a"
    page.select_option("#filter-correct", "false")
    page.wait_for_function("document.querySelectorAll('#slides tbody tr').length === 1")
    assert "wrong" in page.locator("#slides tbody tr").first.inner_text()
    page.select_option("#filter-correct", "")
    page.wait_for_function("document.querySelectorAll('#slides tbody tr').length === 3")
    save_for_docs(page, "viewer_list.png", tmp_path)

    page.click("a[href='/slide/slide_a']")
    page.wait_for_selector("#top .patch img")
    wait_until_drawn(page)
    page.fill("#opacity", "1")
    page.locator("#top .patch").first.click()  # flies to the top patch
    wait_until_drawn(page)
    # near the patch centre, in the middle of a checkerboard square (not on an edge)
    probe = {"x": HOT[0] + PATCH / 2 + 16, "y": HOT[1] + PATCH / 2 + 16}
    hot = page.evaluate(f"window.slidemil.screenPoint({probe['x']}, {probe['y']})")
    shot = page.screenshot()
    assert close_to(screen_pixel(shot, hot), HOT_RGB), screen_pixel(shot, hot)

    page.fill("#opacity", "0")  # the slide itself shows through
    page.wait_for_timeout(300)
    seen = screen_pixel(page.screenshot(), hot)
    slide_rgb = checkerboard(probe["x"] - 0.5, probe["y"] - 0.5, 1, 1, 1)[0, 0]
    assert close_to(seen, slide_rgb, 20), (seen, slide_rgb)

    page.fill("#opacity", "0.6")
    page.mouse.move(hot["x"], hot["y"])
    top = page.evaluate("window.slidemil.extremes.top[0].index")
    page.wait_for_function(
        f"document.getElementById('pointer').textContent.includes('patch {top}')"
    )
    page.check("#grid")
    page.wait_for_function("window.slidemil.grid && window.slidemil.grid.getFullyLoaded()")

    page.locator("#bottom .patch").first.click()  # the coldest patch, at full opacity
    page.fill("#opacity", "1")
    wait_until_drawn(page)
    cold = page.evaluate(
        f"window.slidemil.screenPoint({COLD[0] + PATCH / 2}, {COLD[1] + PATCH / 2})"
    )
    assert close_to(screen_pixel(page.screenshot(), cold), COLD_RGB)

    page.select_option("#map", "fold_1")  # another model's map moves the hot spot
    page.wait_for_function(f"window.slidemil.extremes.top[0].x === {HOT_FOLD_1[0]}")
    page.locator("#top .patch").first.click()
    wait_until_drawn(page)
    hot = page.evaluate(
        f"window.slidemil.screenPoint({HOT_FOLD_1[0] + PATCH / 2}, {HOT_FOLD_1[1] + PATCH / 2})"
    )
    assert close_to(screen_pixel(page.screenshot(), hot), HOT_RGB)
    assert page.locator("#scale-bar-label").inner_text().endswith(("µm", "mm"))

    # the pictures in docs/viewer.md: synthetic tissue, whole and at its hottest patch
    page.goto(f"{server.url}slide/slide_c")
    wait_until_drawn(page)
    save_for_docs(page, "viewer_slide.png", tmp_path)
    page.locator("#top .patch").first.click()
    page.check("#grid")
    wait_until_drawn(page)
    top = page.evaluate("window.slidemil.extremes.top[0]")
    point = page.evaluate(f"window.slidemil.screenPoint({top['x'] + 100}, {top['y'] + 90})")
    page.mouse.move(point["x"], point["y"])
    page.wait_for_function(
        f"document.getElementById('pointer').textContent.includes('patch {top['index']}')"
    )
    save_for_docs(page, "viewer_zoom.png", tmp_path)
    assert not errors
