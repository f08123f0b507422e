"""The viewer's web application (Starlette): pages, the slide list API and the deep-zoom tiles.

Routes::

    /                                     the slide list (static/list.html)
    /slide/<id>                           a slide page (static/slide.html)
    /api/cohort                           classes, whether labels are known, list page size
    /api/colour-bar.png                   the attention layer's colour map, low to high
    /api/slides?page&per_page&sort&order&predicted&correct      one page of the slide list
    /api/slides/<id>                      a slide's prediction, size, µm/px and attention maps
    /api/slides/<id>/patches?map=         every patch: level-0 x, y, score, shown score
    /api/slides/<id>/extremes?map=&k=     the top- and bottom-k patches
    /api/slides/<id>/patch/<index>.jpeg   one patch's pixels, as the encoder saw them
    /tiles/<id>/slide.dzi, slide_files/<level>/<col>_<row>.jpeg       the slide
    /tiles/<id>/attention/<map>.dzi, <map>_files/<level>/<col>_<row>.png  its attention
    /tiles/<id>/grid.dzi, grid_files/<level>/<col>_<row>.png          the patch grid

Handlers are plain functions, which Starlette runs in its thread pool: OpenSlide reads and PNG
encoding do not block other requests. Memory is bounded: tiles go through a byte-bounded LRU
cache and at most ``OPEN_SLIDES`` slides (their handles and heat grids) stay open.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from slidemil.cohort import load_cohort
from slidemil.errors import ArtifactError, SlidemilError
from slidemil.formats.attention_file import read_attention_file
from slidemil.heatmaps.render import colorize
from slidemil.prediction.trained_run import TrainedRun
from slidemil.viewer.assets import STATIC_DIR
from slidemil.viewer.config import ViewerConfig
from slidemil.viewer.slide_list import SlideList
from slidemil.viewer.tiles import (
    AttentionLayers,
    SlidePyramid,
    TileCache,
    check_same_slide,
    encode,
)

OPEN_SLIDES = 4
CACHE_HEADERS = {"Cache-Control": "private, max-age=3600"}


@dataclass
class ViewedSlide:
    """A slide being viewed: its pyramid and its attention layers."""

    pyramid: SlidePyramid
    layers: AttentionLayers
    attention_path: Path


class ViewerState:
    """What the server knows: the predictions folder, its slide list, the open slides, the
    tile cache."""

    def __init__(self, predictions: str | Path, config: ViewerConfig):
        self.predictions = Path(predictions)
        self.config = config
        self.slides = SlideList.read(self.predictions / "predictions.csv")
        self.attention_dir = self.predictions / "attention"
        self.run_info = TrainedRun.open(config.run).info if config.run is not None else None
        self.paths: dict[str, tuple[str, float | None]] = {}
        if config.cohort is not None:
            cohort = load_cohort(config.cohort, require_labels=False, check_files=False)
            self.paths = {r.slide_id: (str(r.path), r.slide_mpp) for r in cohort}
        self.cache = TileCache(config.tile_cache_mb * 2**20)
        self._open: OrderedDict[str, ViewedSlide] = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}

    def slide(self, slide_id: str) -> ViewedSlide:
        """The open slide ``slide_id`` (opened on first use; the least recent one is dropped
        when more than ``OPEN_SLIDES`` are open)."""
        if slide_id not in self.slides:
            raise KeyError(f"no slide {slide_id!r} in {self.slides.source}")
        with self._lock:
            if slide_id in self._open:
                self._open.move_to_end(slide_id)
                return self._open[slide_id]
            opening = self._opening.setdefault(slide_id, threading.Lock())
        with opening:  # one thread opens a slide; the others wait for it
            with self._lock:
                if slide_id in self._open:
                    return self._open[slide_id]
            entry = self._load(slide_id)
            with self._lock:
                self._open[slide_id] = entry
                while len(self._open) > OPEN_SLIDES:
                    # dropped, not closed: a request still reading it holds it, and OpenSlide
                    # closes the file when the last reference goes
                    self._open.popitem(last=False)
                self._opening.pop(slide_id, None)
            return entry

    def _load(self, slide_id: str) -> ViewedSlide:
        path = self.attention_dir / f"{slide_id}.h5"
        attention = read_attention_file(path)
        slide_path, slide_mpp = self.paths.get(slide_id, (None, None))
        slide_path = slide_path or attention.attrs.get("slide_path")
        if not slide_path:
            raise ArtifactError(path, "records no slide path", "pass --cohort CSV")
        mpp = slide_mpp or attention.attrs.get("slide_mpp")
        pyramid = SlidePyramid(
            slide_path, self.config.tile_size, mpp_override=mpp, reader=self.config.reader
        )
        check_same_slide(attention, pyramid, path)
        config = self.config
        layers = AttentionLayers(attention, config.normalisation, config.cmap, config.smooth)
        return ViewedSlide(pyramid, layers, path)

    def model_info(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """The model and encoder that made the predictions (from the run, when it is found)."""
        info = self.run_info
        if info is None and attrs.get("run"):
            try:
                info = TrainedRun.open(attrs["run"]).info
            except SlidemilError:
                info = None
        info = info or {}
        return {"model": info.get("model"), "encoder": info.get("encoder") or attrs.get("encoder")}


def create_app(
    predictions: str | Path,
    config: ViewerConfig | None = None,
    static_dir: str | Path = STATIC_DIR,
) -> Starlette:
    """The viewer's Starlette application over a ``slidemil predict`` output folder, serving
    the pages and scripts built into ``static_dir``."""
    state = ViewerState(predictions, config or ViewerConfig())
    static = Path(static_dir)

    def list_page(request: Request) -> Response:
        return FileResponse(static / "list.html")

    def slide_page(request: Request) -> Response:
        return FileResponse(static / "slide.html")

    def cohort(request: Request) -> Response:
        return JSONResponse(
            {
                "classes": state.slides.class_names,
                "has_labels": state.slides.has_labels,
                "total": len(state.slides.table),
                "page_size": state.config.page_size,
                "predictions": str(state.predictions),
            }
        )

    def slide_rows(request: Request) -> Response:
        query = request.query_params
        page = state.slides.page(
            page=int(query.get("page", 1)),
            per_page=max(1, min(int(query.get("per_page", state.config.page_size)), 1000)),
            sort=query.get("sort", "slide_id"),
            descending=query.get("order", "asc") == "desc",
            predicted=query.get("predicted") or None,
            correct={"true": True, "false": False}.get(query.get("correct", "")),
        )
        return JSONResponse(
            {"rows": page.rows, "total": page.total, "page": page.page, "pages": page.pages}
        )

    def slide_info(request: Request) -> Response:
        slide_id = request.path_params["slide_id"]
        row = state.slides.row(slide_id)
        if row is None:
            return _error(404, f"no slide {slide_id!r} in {state.slides.source}")
        entry = state.slide(slide_id)
        attrs = entry.layers.attention.attrs
        pyramid = entry.pyramid
        return JSONResponse(
            {
                **row,
                "class_names": [str(c) for c in attrs.get("class_names") or []],
                "probabilities": attrs.get("probabilities"),
                "dimensions": list(pyramid.dimensions),
                "mpp": pyramid.mpp,
                "slide_path": str(pyramid.path),
                "tile_size": pyramid.tile_size,
                "maps": entry.layers.map_names,
                "models": entry.layers.models,
                "patch_size_level0": entry.layers.attention.patch_size_level0,
                "n_patches": len(entry.layers.attention),
                "normalisation": state.config.normalisation,
                "cmap": state.config.cmap,
                "top_k": state.config.top_k,
                **state.model_info(attrs),
            }
        )

    def patches(request: Request) -> Response:
        entry = state.slide(request.path_params["slide_id"])
        name = request.query_params.get("map", "mean")
        layers = entry.layers
        coords = layers.attention.coords
        return JSONResponse(
            {
                "map": name,
                "patch_size_level0": layers.attention.patch_size_level0,
                "x": coords[:, 0].tolist(),
                "y": coords[:, 1].tolist(),
                "score": [float(v) for v in layers.scores(name)],
                "shown": [round(float(v), 4) for v in layers.shown(name)],
            }
        )

    def extremes(request: Request) -> Response:
        entry = state.slide(request.path_params["slide_id"])
        name = request.query_params.get("map", "mean")
        k = int(request.query_params.get("k", state.config.top_k))
        return JSONResponse(entry.layers.extremes(name, max(1, min(k, 100))))

    def patch_image(request: Request) -> Response:
        entry = state.slide(request.path_params["slide_id"])
        pixels = entry.layers.patch_pixels(request.path_params["index"], entry.pyramid)
        return Response(encode(Image.fromarray(pixels), "jpeg"), media_type="image/jpeg")

    def colour_bar(request: Request) -> Response:
        ramp = np.linspace(0, 1, 256, dtype=np.float32)[None, :]
        image = Image.fromarray(colorize(ramp, state.config.cmap), "RGBA")
        return Response(encode(image, "png"), media_type="image/png")

    def dzi(request: Request) -> Response:
        entry = state.slide(request.path_params["slide_id"])
        layer = request.path_params["layer"]
        image_format = "jpeg" if layer == "slide" else "png"
        if layer.startswith("attention/"):
            entry.layers.scores(layer.removeprefix("attention/"))  # an unknown map is a 404
        elif layer not in ("slide", "grid"):
            return _error(404, f"no layer {layer!r}")
        return Response(entry.pyramid.dzi(image_format), media_type="application/xml")

    def tile(request: Request) -> Response:
        slide_id = request.path_params["slide_id"]
        layer = request.path_params["layer"]
        level, column, row = (request.path_params[k] for k in ("level", "column", "row"))
        suffix = request.path_params["suffix"]
        entry = state.slide(slide_id)
        pyramid = entry.pyramid
        key = (slide_id, layer, level, column, row)
        if layer == "slide" and suffix == "jpeg":
            data = state.cache.get_or_make(key, lambda: pyramid.tile_jpeg(level, column, row))
            return Response(data, media_type="image/jpeg", headers=CACHE_HEADERS)
        if suffix != "png":
            return _error(404, f"layer {layer!r} has .png tiles")
        box = pyramid.tile_box(level, column, row)
        if layer == "grid":
            data = state.cache.get_or_make(key, lambda: entry.layers.grid_tile(box))
        elif layer.startswith("attention/"):
            name = layer.removeprefix("attention/")
            entry.layers.scores(name)  # an unknown map is a 404
            data = state.cache.get_or_make(
                key, lambda: entry.layers.heat_tile(name, box, pyramid.dimensions)
            )
        else:
            return _error(404, f"no layer {layer!r}")
        return Response(data, media_type="image/png", headers=CACHE_HEADERS)

    tile_path = "/tiles/{slide_id}/{layer:path}_files/{level:int}/{column:int}_{row:int}.{suffix}"
    routes = [
        Route("/", list_page),
        Route("/slide/{slide_id}", slide_page),
        Route("/api/cohort", cohort),
        Route("/api/colour-bar.png", colour_bar),
        Route("/api/slides", slide_rows),
        Route("/api/slides/{slide_id}", slide_info),
        Route("/api/slides/{slide_id}/patches", patches),
        Route("/api/slides/{slide_id}/extremes", extremes),
        Route("/api/slides/{slide_id}/patch/{index:int}.jpeg", patch_image),
        Route(tile_path, tile),
        Route("/tiles/{slide_id}/{layer:path}.dzi", dzi),
        Mount("/static", StaticFiles(directory=static, check_dir=False), name="static"),
    ]
    handlers = {
        KeyError: _not_found,
        IndexError: _not_found,
        ValueError: _bad_request,
        SlidemilError: _slide_error,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.viewer = state
    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _not_found(request: Request, error: Exception) -> JSONResponse:
    return _error(404, str(error.args[0]) if error.args else str(error))


def _bad_request(request: Request, error: Exception) -> JSONResponse:
    return _error(400, str(error))


def _slide_error(request: Request, error: Exception) -> JSONResponse:
    # a slide that moved, a broken attention file: the page shows the message, the server goes on
    return _error(422, str(error))
