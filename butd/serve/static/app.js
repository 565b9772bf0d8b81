// The captioning page: upload an image, show its caption, and light up the regions each word attended to.
// Server data is only ever inserted with textContent, never as HTML.
"use strict";

const TOP_REGIONS = 5;      // boxes drawn per word at most
const MIN_SHARE = 0.05;     // ...and only those with at least this share of the word's attention
const LABELLED = 3;         // boxes that get a "word: object (weight)" label
const COLOURS = ["#ffc400", "#00b7ff", "#ff5aaa", "#78e65a", "#ff8c28"];

const $ = (id) => document.getElementById(id);
let current = null;         // the last ImageCaption returned by the server
let pinned = null;          // index of the word selected by click / Enter, or null
let previewUrl = null;

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function loadHealth() {
  try {
    const response = await fetch("/healthz");
    const health = await response.json();
    $("random-warning").hidden = !health.random_detector;
    $("server-info").textContent =
      `${health.model} on ${health.device} · detector: ${health.detector} · boxes ${health.boxes}`;
    $("limits").textContent = `up to ${(health.max_upload_bytes / 1e6).toFixed(0)} MB, ` +
      `${(health.max_pixels / 1e6).toFixed(0)} megapixels`;
    fillBeamSizes(health.max_beam_size);
  } catch (err) {
    $("server-info").textContent = `server unreachable (${err})`;
    fillBeamSizes(10);
  }
}

function fillBeamSizes(max) {
  const select = $("beam");
  if (select.options.length) return;
  for (let k = 1; k <= max; k++) {
    const option = new Option(k === 1 ? "1 (greedy)" : String(k), String(k), false, k === 3);
    select.add(option);
  }
}

async function caption(file) {
  if (!file) return;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  setStatus(`Captioning ${file.name}…`);
  document.body.classList.add("busy");
  const form = new FormData();
  form.append("images", file, file.name);
  form.append("beam_size", $("beam").value || "3");
  try {
    const response = await fetch("/v1/captions", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) {
      const error = body.error || { message: response.statusText };
      setStatus(`Could not caption ${file.name}: ${error.message}`, true);
      return;
    }
    show(body.captions[0], previewUrl);
    setStatus(`Captioned ${file.name} with beam size ${body.beam_size}.`);
  } catch (err) {
    setStatus(`Request failed: ${err}`, true);
  } finally {
    document.body.classList.remove("busy");
  }
}

function show(result, url) {
  current = result;
  pinned = null;
  $("photo").src = url;
  $("result").hidden = false;
  const captionEl = $("caption");
  captionEl.replaceChildren();
  result.words.forEach((entry, i) => {
    const word = document.createElement("button");
    word.type = "button";
    word.className = "word";
    word.textContent = entry.word;
    word.dataset.index = String(i);
    word.setAttribute("aria-pressed", "false");
    word.addEventListener("mouseenter", () => highlight(i));
    word.addEventListener("focus", () => highlight(i));
    word.addEventListener("mouseleave", () => highlight(pinned));
    word.addEventListener("blur", () => highlight(pinned));
    word.addEventListener("click", () => { pinned = pinned === i ? null : i; highlight(pinned); });
    captionEl.append(word, " ");
  });
  if (!result.words.length) captionEl.textContent = "(the model produced an empty caption)";
  const list = $("alternatives");
  list.replaceChildren();
  result.alternatives.forEach((alt) => {
    const item = document.createElement("li");
    const text = document.createElement("span");
    text.textContent = alt.caption || "(empty)";
    const score = document.createElement("span");
    score.className = "logprob";
    score.textContent = `log p = ${alt.logprob.toFixed(2)}`;
    item.append(text, score);
    list.append(item);
  });
  highlight(null);
}

// The regions a word attended to most: [{index, weight}], strongest first.
function topRegions(wordIndex) {
  const weights = current.words[wordIndex].attention;
  return weights
    .map((weight, index) => ({ index, weight }))
    .sort((a, b) => b.weight - a.weight)
    .slice(0, TOP_REGIONS)
    .filter((r, rank) => rank === 0 || r.weight >= MIN_SHARE);
}

function highlight(wordIndex) {
  const layer = $("boxes");
  const attended = $("attended");
  layer.replaceChildren();
  attended.replaceChildren();
  document.querySelectorAll(".word").forEach((el) => {
    const active = Number(el.dataset.index) === wordIndex;
    el.classList.toggle("active", active);
    el.setAttribute("aria-pressed", String(pinned !== null && Number(el.dataset.index) === pinned));
  });
  $("stage").classList.toggle("focused", wordIndex !== null);
  if (wordIndex === null || !current) return;
  const word = current.words[wordIndex].word;
  const regions = topRegions(wordIndex);
  const peak = regions.length ? regions[0].weight : 1;
  const heading = document.createElement("p");
  heading.className = "attended-title";
  heading.textContent = `While writing “${word}” the decoder looked at:`;
  const list = document.createElement("ul");
  // Weakest first, so the strongest box is drawn on top.
  [...regions].reverse().forEach((r) => {
    const rank = regions.indexOf(r);
    const region = current.regions[r.index];
    const [x1, y1, x2, y2] = region.box;
    const box = document.createElement("div");
    box.className = "box";
    box.style.left = `${(100 * x1) / current.width}%`;
    box.style.top = `${(100 * y1) / current.height}%`;
    box.style.width = `${(100 * (x2 - x1)) / current.width}%`;
    box.style.height = `${(100 * (y2 - y1)) / current.height}%`;
    box.style.setProperty("--colour", COLOURS[rank % COLOURS.length]);
    box.style.setProperty("--strength", (0.35 + 0.65 * r.weight / peak).toFixed(3));
    // The three strongest boxes are labelled (more labels would cover each other); the list names them all.
    if (rank < LABELLED) {
      const label = document.createElement("span");
      label.className = "box-label";
      label.textContent = `${word}: ${regionName(region)} (${r.weight.toFixed(2)})`;
      // A box touching the top edge keeps its label inside, where the stage does not clip it.
      if (y1 / current.height < 0.07) label.classList.add("inside");
      box.append(label);
    }
    layer.append(box);
  });
  separateLabels(layer);
  regions.forEach((r, rank) => {
    const item = document.createElement("li");
    item.style.setProperty("--colour", COLOURS[rank % COLOURS.length]);
    item.textContent = `${regionName(current.regions[r.index])} — ${(100 * r.weight).toFixed(1)}%`;
    list.append(item);
  });
  attended.append(heading, list);
}

// Push labels down until they stop covering one another; the strongest box's label keeps its place.
function separateLabels(layer) {
  const placed = [];
  [...layer.querySelectorAll(".box-label")].reverse().forEach((label) => {
    let shift = 0;
    for (let tries = 0; tries < 6; tries++) {
      const rect = label.getBoundingClientRect();
      const hit = placed.find((p) => rect.left < p.right && p.left < rect.right && rect.top < p.bottom && p.top < rect.bottom);
      if (!hit) break;
      shift += hit.bottom - rect.top;
      label.style.top = `${shift - 3}px`;
    }
    placed.push(label.getBoundingClientRect());
  });
}

function regionName(region) {
  return [region.attribute, region.object].filter(Boolean).join(" ") || "region";
}

function setUpDrop() {
  const drop = $("drop");
  const input = $("file");
  input.addEventListener("change", () => caption(input.files[0]));
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) caption(file);
  });
  // The label is focusable so keyboard users can open the file picker with Enter or Space.
  drop.tabIndex = 0;
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && pinned !== null) { pinned = null; highlight(null); }
  });
}

setUpDrop();
loadHealth();
