// The captioning page: upload an image, show its caption, and light up the regions each word attended to (the
// attention view is viewer.js, shared with the gallery). Server data is only inserted with textContent, never HTML.

import { AttentionView } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const view = new AttentionView({ stage: $("stage"), boxes: $("boxes"), caption: $("caption"),
                                 attended: $("attended"), alternatives: $("alternatives") });
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
  $("photo").src = url;
  $("result").hidden = false;
  view.show(result);
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
    if (event.key === "Escape") view.unpin();
  });
}

setUpDrop();
loadHealth();
