// The slide list: one page of predictions.csv at a time, sorted and filtered by the server.
"use strict";

const state = { page: 1, sort: "slide_id", order: "asc", predicted: "", correct: "" };
let cohort = null;
let latest = 0;  // the newest request: an older answer that arrives later is dropped

function readQuery() {
  const query = new URLSearchParams(window.location.search);
  for (const key of Object.keys(state)) {
    if (query.has(key)) state[key] = key === "page" ? Number(query.get(key)) || 1 : query.get(key);
  }
}

function cell(row, text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function percent(value) {
  return value === null || value === undefined ? "" : `${(100 * value).toFixed(1)}%`;
}

async function load() {
  const query = new URLSearchParams({ ...state, per_page: cohort.page_size });
  window.history.replaceState(null, "", `?${new URLSearchParams(state)}`);
  const request = ++latest;
  const response = await fetch(`/api/slides?${query}`);
  const data = await response.json();
  if (request !== latest) return;
  const body = document.querySelector("#slides tbody");
  body.replaceChildren();
  for (const slide of data.rows) {
    const row = document.createElement("tr");
    const link = document.createElement("a");
    link.href = `/slide/${encodeURIComponent(slide.slide_id)}`;
    link.textContent = slide.slide_id;
    cell(row, "").appendChild(link);
    cell(row, slide.predicted);
    cell(row, percent(slide.probability), "number");
    if (cohort.has_labels) {
      cell(row, slide.label ?? "");
      const known = slide.correct !== null && slide.correct !== undefined;
      const verdict = known ? (slide.correct ? "right" : "wrong") : "";
      cell(row, verdict, `verdict ${verdict}`);
    }
    cell(row, slide.n_patches ?? "", "number");
    row.dataset.slideId = slide.slide_id;
    body.appendChild(row);
  }
  state.page = data.page;
  document.getElementById("page").textContent = `page ${data.page} of ${data.pages}`;
  document.getElementById("count").textContent = `${data.total} of ${cohort.total} slides`;
  document.getElementById("previous").disabled = data.page <= 1;
  document.getElementById("next").disabled = data.page >= data.pages;
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.classList.toggle("sorted", th.dataset.sort === state.sort);
    th.classList.toggle("descending", th.dataset.sort === state.sort && state.order === "desc");
  }
  document.body.dataset.loaded = "true";
}

async function start() {
  readQuery();
  cohort = await (await fetch("/api/cohort")).json();
  document.getElementById("source").textContent = cohort.predictions;
  const classes = document.getElementById("filter-class");
  for (const name of cohort.classes) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    classes.appendChild(option);
  }
  classes.value = state.predicted;
  const correct = document.getElementById("filter-correct");
  correct.value = state.correct;
  document.getElementById("filter-correct-label").hidden = !cohort.has_labels;
  for (const th of document.querySelectorAll(".needs-labels")) th.hidden = !cohort.has_labels;
  classes.addEventListener("change", () => { state.predicted = classes.value; state.page = 1; load(); });
  correct.addEventListener("change", () => { state.correct = correct.value; state.page = 1; load(); });
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", () => {
      const same = state.sort === th.dataset.sort;
      state.order = same && state.order === "asc" ? "desc" : "asc";
      state.sort = th.dataset.sort;
      state.page = 1;
      load();
    });
  }
  document.getElementById("previous").addEventListener("click", () => { state.page -= 1; load(); });
  document.getElementById("next").addEventListener("click", () => { state.page += 1; load(); });
  await load();
}

start();
