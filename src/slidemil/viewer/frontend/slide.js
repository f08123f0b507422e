// A slide page: the slide as a deep-zoom pyramid, its attention as a second tiled layer over it
// (both in level-0 pixels), the patch grid, the top and bottom patches, a scale bar and the
// score under the pointer. window.slidemil exposes the state for scripts and tests.
"use strict";

const slideId = decodeURIComponent(window.location.pathname.split("/").pop());
const base = `/tiles/${encodeURIComponent(slideId)}`;
const api = `/api/slides/${encodeURIComponent(slideId)}`;
const page = { info: null, viewer: null, patches: null, index: null, map: "mean", grid: null };
window.slidemil = page;

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function showError(message) {
  const element = document.getElementById("error");
  element.textContent = message;
  element.hidden = false;
  document.body.dataset.error = message;
}

async function getJson(url) {
  const response = await fetch(url);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || `${url}: HTTP ${response.status}`);
  return data;
}

function slideImage() {
  return page.viewer.world.getItemAt(0);
}

function overlayImage() {
  return page.viewer.world.getItemAt(1);
}

// Screen position (page px) of a level-0 point: what a user or a test sees there.
function screenPoint(x, y) {
  const point = slideImage().imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
  const box = page.viewer.element.getBoundingClientRect();
  return { x: box.left + point.x, y: box.top + point.y };
}
page.screenPoint = screenPoint;

function flyTo(x, y) {
  const size = page.info.patch_size_level0;
  const rect = slideImage().imageToViewportRectangle(x - size, y - size, 3 * size, 3 * size);
  page.viewer.viewport.fitBounds(rect);
  const marker = document.getElementById("marker") || document.createElement("div");
  marker.id = "marker";
  page.viewer.removeOverlay(marker);
  page.viewer.addOverlay(marker, slideImage().imageToViewportRectangle(x, y, size, size));
}
page.flyTo = flyTo;

// --- the attention layer -----------------------------------------------------------------------

function overlaySource(name) {
  return `${base}/attention/${encodeURIComponent(name)}.dzi`;
}

function setMap(name) {
  page.map = name;
  page.overlayLoaded = false;
  document.body.dataset.overlayLoaded = "false";
  const opacity = Number(document.getElementById("opacity").value);
  page.viewer.addTiledImage({
    tileSource: overlaySource(name),
    index: 1,
    replace: page.viewer.world.getItemCount() > 1,
    opacity,
    success: (event) => watchLoading(event.item, "overlayLoaded"),
    error: (event) => showError(`attention layer: ${event.message}`),
  });
  loadPatches(name);
}

function watchLoading(item, flag) {
  const update = () => {
    page[flag] = item.getFullyLoaded();
    document.body.dataset[flag] = String(page[flag]);
  };
  item.addHandler("fully-loaded-change", update);
  update();
}

function setGrid(shown) {
  if (shown && !page.grid) {
    page.viewer.addTiledImage({
      tileSource: `${base}/grid.dzi`,
      index: page.viewer.world.getItemCount(),
      success: (event) => { page.grid = event.item; },
    });
  } else if (!shown && page.grid) {
    page.viewer.world.removeItem(page.grid);
    page.grid = null;
  }
}

// --- patches: scores under the pointer and the gallery ----------------------------------------

async function loadPatches(name) {
  const data = await getJson(`${api}/patches?map=${encodeURIComponent(name)}`);
  const size = data.patch_size_level0;
  const index = new Map();  // cell of one patch side -> patches overlapping it
  for (let i = 0; i < data.x.length; i += 1) {
    for (let cx = Math.floor(data.x[i] / size); cx <= Math.floor((data.x[i] + size - 1) / size); cx += 1) {
      for (let cy = Math.floor(data.y[i] / size); cy <= Math.floor((data.y[i] + size - 1) / size); cy += 1) {
        const key = `${cx},${cy}`;
        if (!index.has(key)) index.set(key, []);
        index.get(key).push(i);
      }
    }
  }
  page.patches = data;
  page.index = index;
  await loadGallery(name);
}

function patchesAt(x, y) {
  const data = page.patches;
  if (!data) return [];
  const size = data.patch_size_level0;
  const found = page.index.get(`${Math.floor(x / size)},${Math.floor(y / size)}`) || [];
  return found.filter((i) => x >= data.x[i] && x < data.x[i] + size && y >= data.y[i] && y < data.y[i] + size);
}

function showPointer(position) {
  const point = slideImage().viewerElementToImageCoordinates(position);
  const found = patchesAt(point.x, point.y);
  const where = `(${Math.round(point.x)}, ${Math.round(point.y)}) px`;
  if (!found.length) {
    text("pointer", `no patch at ${where}`);
    return;
  }
  const data = page.patches;
  const mean = (values) => found.reduce((sum, i) => sum + values[i], 0) / found.length;
  const which = found.length === 1 ? `patch ${found[0]}` : `${found.length} patches`;
  text("pointer", `attention ${mean(data.score).toExponential(3)} · shown ${mean(data.shown).toFixed(3)} · ${which} at ${where}`);
}

async function loadGallery(name) {
  const extremes = await getJson(`${api}/extremes?map=${encodeURIComponent(name)}&k=${page.info.top_k}`);
  page.extremes = extremes;
  for (const side of ["top", "bottom"]) {
    const gallery = document.getElementById(side);
    gallery.replaceChildren();
    for (const patch of extremes[side]) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "patch";
      button.dataset.index = patch.index;
      button.title = `patch ${patch.index} at (${patch.x}, ${patch.y}): attention ${patch.score.toExponential(3)}`;
      const image = document.createElement("img");
      image.src = `${api}/patch/${patch.index}.jpeg`;
      image.alt = button.title;
      button.appendChild(image);
      button.addEventListener("click", () => flyTo(patch.x, patch.y));
      gallery.appendChild(button);
    }
  }
}

// --- the scale bar ----------------------------------------------------------------------------

function updateScaleBar() {
  const bar = document.getElementById("scale-bar");
  if (!page.info.mpp) {
    bar.hidden = true;
    return;
  }
  const zoom = slideImage().viewportToImageZoom(page.viewer.viewport.getZoom(true));
  const micronsPerPx = page.info.mpp / zoom;
  const wanted = 120 * micronsPerPx;
  const magnitude = 10 ** Math.floor(Math.log10(wanted));
  const length = [5, 2, 1].map((m) => m * magnitude).find((v) => v <= wanted) || magnitude;
  document.getElementById("scale-bar-line").style.width = `${length / micronsPerPx}px`;
  text("scale-bar-label", length >= 1000 ? `${length / 1000} mm` : `${Number(length.toPrecision(3))} µm`);
}

// --- the page ---------------------------------------------------------------------------------

function showHeader(info) {
  document.title = `${info.slide_id} · slidemil viewer`;
  text("title", info.slide_id);
  const probability = info.probability === null ? "" : ` (${(100 * info.probability).toFixed(1)}%)`;
  text("prediction", `predicted ${info.predicted}${probability}`);
  if (info.label) {
    text("verdict", `label ${info.label}: ${info.correct ? "right" : "wrong"}`);
    document.getElementById("verdict").classList.add(info.correct ? "right" : "wrong");
  }
  const model = [info.model, info.encoder].filter(Boolean).join(" on ");
  text("model", model ? `${model} · ${info.n_patches} patches` : `${info.n_patches} patches`);
  const table = document.getElementById("probabilities");
  (info.class_names || []).forEach((name, i) => {
    const row = table.insertRow();
    row.insertCell().textContent = name;
    const cell = row.insertCell();
    cell.className = "number";
    cell.textContent = `${(100 * info.probabilities[i]).toFixed(1)}%`;
  });
  const select = document.getElementById("map");
  for (const name of info.maps) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name === "mean" && info.models.length > 1 ? "mean of the models" : name;
    select.appendChild(option);
  }
  select.disabled = info.maps.length < 2;
  text("legend", `${info.cmap} colour map, ${info.normalisation} normalisation: low → high attention`);
}

async function start() {
  let info;
  try {
    info = await getJson(api);
  } catch (error) {
    showError(error.message);
    return;
  }
  page.info = info;
  showHeader(info);
  page.viewer = OpenSeadragon({
    id: "viewer",
    prefixUrl: "/static/vendor/openseadragon/images/",
    tileSources: `${base}/slide.dzi`,
    showNavigator: true,
    navigatorPosition: "TOP_RIGHT",
    maxZoomPixelRatio: 4,
    drawer: "canvas",
    crossOriginPolicy: false,
  });
  page.viewer.addOnceHandler("open", () => {
    watchLoading(slideImage(), "slideLoaded");
    setMap(page.map);
    updateScaleBar();
  });
  page.viewer.addHandler("open-failed", (event) => showError(`slide: ${event.message}`));
  page.viewer.addHandler("animation", updateScaleBar);
  page.viewer.addHandler("animation-finish", () => {
    updateScaleBar();
    document.body.dataset.animating = "false";
  });
  page.viewer.addHandler("animation-start", () => { document.body.dataset.animating = "true"; });
  new OpenSeadragon.MouseTracker({
    element: page.viewer.canvas,
    moveHandler: (event) => showPointer(event.position),
  });
  const opacity = document.getElementById("opacity");
  opacity.addEventListener("input", () => {
    const value = Number(opacity.value);
    if (overlayImage()) overlayImage().setOpacity(value);
    text("opacity-value", value.toFixed(2));
  });
  document.getElementById("map").addEventListener("change", (event) => setMap(event.target.value));
  document.getElementById("grid").addEventListener("change", (event) => setGrid(event.target.checked));
}

start();
