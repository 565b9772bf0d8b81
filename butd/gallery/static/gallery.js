// The gallery page: log in or register, upload images (pick or drop, with progress), a grid of captioned thumbnails
// with search and a favourites filter, a detail dialog with the word-by-word attention view, deletion and log-out.
// Server data is only ever inserted with textContent or as attribute values, never as HTML.
"use strict";

import { api, ApiError, setCsrfToken, uploadImages } from "./api.js";
import { AttentionView } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const state = { user: null, query: "", favourites: false, cursor: null, detail: null, minPassword: 8 };
const viewer = new AttentionView({ stage: $("stage"), boxes: $("boxes"), caption: $("caption"),
                                   attended: $("attended"), alternatives: $("alternatives") });

function setStatus(element, text, isError = false) {
  element.textContent = text;
  element.classList.toggle("error", isError);
}

const megabytes = (bytes) => `${(bytes / 1e6).toFixed(1)} MB`;

// Any 401 means the session is gone (expired, revoked, logged out elsewhere): back to the log-in form.
async function guarded(action, statusElement = $("status")) {
  try {
    return await action();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401 && state.user) {
      showAuth("Your session has ended: log in again.");
    } else {
      setStatus(statusElement, err.message, true);
    }
    return undefined;
  }
}

function showAuth(message = "") {
  state.user = null;
  setCsrfToken(null);
  if ($("detail").open) $("detail").close();
  $("grid").replaceChildren();
  $("account").hidden = true;
  $("gallery-view").hidden = true;
  $("auth-view").hidden = false;
  $("password").value = "";
  setStatus($("auth-status"), message, Boolean(message));
  $("username").focus();
}

function showGallery(session) {
  state.user = session.user;
  setCsrfToken(session.csrf_token);
  $("auth-view").hidden = true;
  $("gallery-view").hidden = false;
  $("account").hidden = false;
  $("whoami").textContent = session.user.username;
  showUsage(session.user.used_bytes, session.user.quota_bytes);
  setStatus($("status"), "");
  reload();
}

function showUsage(used, quota = state.user.quota_bytes) {
  state.user.used_bytes = used;
  $("usage").textContent = `${megabytes(used)} of ${megabytes(quota)}`;
}

async function authenticate(action) {
  const username = $("username").value.trim();
  const password = $("password").value;
  if (!username || !password) {
    setStatus($("auth-status"), "Enter a user name and a password.", true);
    return;
  }
  try {
    showGallery(await api("POST", `/api/${action}`, { username, password }));
  } catch (err) {
    setStatus($("auth-status"), err.message, true);
  }
}

async function reload() {
  state.cursor = null;
  $("grid").replaceChildren();
  await loadPage();
}

async function loadPage() {
  const params = new URLSearchParams();
  if (state.query) params.set("q", state.query);
  if (state.favourites) params.set("favourites", "true");
  if (state.cursor) params.set("cursor", state.cursor);
  const page = await guarded(() => api("GET", `/api/images?${params}`));
  if (!page) return;
  for (const image of page.images) $("grid").append(tile(image));
  state.cursor = page.next_cursor;
  $("more").hidden = !page.next_cursor;
  const filtered = state.query || state.favourites;
  $("count").textContent = page.total === 1 ? "1 image" : `${page.total} images`;
  $("empty").hidden = page.total > 0;
  $("empty").textContent = filtered ? "No image matches." : "No images yet: drop some above.";
}

function tile(image) {
  const item = document.createElement("li");
  item.className = "tile";
  item.dataset.id = image.id;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.setAttribute("aria-label", `Open “${image.caption}”`);
  const thumb = document.createElement("img");
  thumb.src = image.thumbnail_url;
  thumb.alt = "";
  thumb.loading = "lazy";
  open.append(thumb);
  open.addEventListener("click", () => openDetail(image.id));
  const caption = document.createElement("p");
  caption.className = "tile-caption";
  caption.textContent = image.caption;
  const meta = document.createElement("div");
  meta.className = "tile-meta";
  const name = document.createElement("span");
  name.className = "tile-name";
  name.textContent = image.name;
  name.title = `${image.name}, ${new Date(image.created_at).toLocaleString()}`;
  const star = document.createElement("button");
  star.type = "button";
  star.className = "star";
  star.addEventListener("click", () => toggleFavourite(image.id, star.getAttribute("aria-pressed") !== "true"));
  meta.append(name, star);
  item.append(open, caption, meta);
  showFavourite(item, image.favourite);
  return item;
}

function showFavourite(item, favourite) {
  const star = item.querySelector(".star");
  star.setAttribute("aria-pressed", String(favourite));
  star.setAttribute("aria-label", favourite ? "Unmark favourite" : "Mark favourite");
  star.textContent = favourite ? "★" : "☆";
  item.classList.toggle("favourite", favourite);
}

async function toggleFavourite(id, favourite) {
  const image = await guarded(() => api(favourite ? "PUT" : "DELETE", `/api/images/${id}/favourite`));
  if (!image) return;
  const item = document.querySelector(`.tile[data-id="${CSS.escape(id)}"]`);
  if (item) showFavourite(item, image.favourite);
  if (state.detail && state.detail.id === id) showDetailFavourite(image.favourite);
  if (state.favourites && !image.favourite && item) item.remove();
}

async function upload(fileList) {
  const files = [...fileList];
  if (!files.length || !state.user) return;
  const progress = $("progress");
  $("progress-box").hidden = false;
  progress.value = 0;
  $("progress-text").textContent = `Sending ${files.length} image(s)…`;
  setStatus($("status"), "");
  document.body.classList.add("busy");
  try {
    const result = await uploadImages(files, {
      onProgress: (fraction) => { progress.value = Math.round(100 * fraction); },
      onSent: () => {
        progress.removeAttribute("value"); // indeterminate while the model captions
        $("progress-text").textContent = `Captioning ${files.length} image(s)…`;
      },
    });
    showUsage(result.used_bytes);
    setStatus($("status"), `Captioned and stored ${result.images.length} image(s).`);
    await reload();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) showAuth("Your session has ended: log in again.");
    else setStatus($("status"), `Nothing was stored: ${err.message}`, true);
  } finally {
    $("progress-box").hidden = true;
    document.body.classList.remove("busy");
    $("file").value = "";
  }
}

async function openDetail(id) {
  const image = await guarded(() => api("GET", `/api/images/${id}`));
  if (!image) return;
  state.detail = image;
  const stage = $("stage");
  // The stage takes the image's shape so that boxes (in % of the image) land where they belong.
  stage.style.width = `min(100%, ${((70 * image.width) / image.height).toFixed(2)}vh)`;
  $("photo").width = image.width; // reserves the image's shape before it loads: nothing moves under the pointer
  $("photo").height = image.height;
  $("photo").src = image.image_url;
  $("photo").alt = image.caption;
  viewer.show(image);
  showDetailFavourite(image.favourite);
  $("detail-meta").textContent = `${image.name} · ${image.width}×${image.height} · ` +
    `${new Date(image.created_at).toLocaleString()} · ${image.model} · beam ${image.beam_size}`;
  if (!$("detail").open) $("detail").showModal();
}

function showDetailFavourite(favourite) {
  state.detail.favourite = favourite;
  $("detail-favourite").setAttribute("aria-pressed", String(favourite));
  $("detail-favourite").textContent = favourite ? "★ Favourite" : "☆ Favourite";
}

function confirmDialog(text) {
  return new Promise((resolve) => {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    const finish = (answer) => {
      $("confirm-yes").onclick = null;
      $("confirm-no").onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    $("confirm-yes").onclick = () => finish(true);
    $("confirm-no").onclick = () => finish(false);
    dialog.onclose = () => finish(false);
    dialog.showModal();
  });
}

async function deleteDetail() {
  const image = state.detail;
  if (!(await confirmDialog(`Delete “${image.caption}” (${image.name})? This cannot be undone.`))) return;
  if ((await guarded(() => api("DELETE", `/api/images/${image.id}`).then(() => true))) !== true) return;
  $("detail").close();
  setStatus($("status"), `Deleted ${image.name}.`);
  const me = await guarded(() => api("GET", "/api/me"));
  if (me) showUsage(me.user.used_bytes);
  await reload();
}

async function clearAll() {
  if (!(await confirmDialog("Delete every image of your gallery? This cannot be undone."))) return;
  const result = await guarded(() => api("DELETE", "/api/images?confirm=true"));
  if (!result) return;
  showUsage(result.used_bytes);
  setStatus($("status"), `Deleted ${result.deleted} image(s).`);
  await reload();
}

function setUp() {
  $("auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    authenticate(event.submitter && event.submitter.value === "register" ? "register" : "login");
  });
  $("logout").addEventListener("click", async () => {
    await guarded(() => api("POST", "/api/logout"));
    showAuth("You are logged out.");
    $("auth-status").classList.remove("error");
  });
  $("file").addEventListener("change", () => upload($("file").files));
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    upload(event.dataTransfer.files);
  });
  drop.tabIndex = 0; // keyboard users open the file picker with Enter or Space
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file").click(); }
  });
  let searchTimer = null;
  $("search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { state.query = $("search").value.trim(); reload(); }, 250);
  });
  $("favourites-only").addEventListener("click", () => {
    state.favourites = !state.favourites;
    $("favourites-only").setAttribute("aria-pressed", String(state.favourites));
    reload();
  });
  $("more").addEventListener("click", loadPage);
  $("clear-all").addEventListener("click", clearAll);
  $("detail-close").addEventListener("click", () => $("detail").close());
  $("detail-delete").addEventListener("click", deleteDetail);
  $("detail-favourite").addEventListener("click", () => toggleFavourite(state.detail.id, !state.detail.favourite));
  $("detail").addEventListener("cancel", (event) => { if (viewer.unpin()) event.preventDefault(); });
  $("detail").addEventListener("close", () => { state.detail = null; $("photo").removeAttribute("src"); });
}

async function start() {
  setUp();
  try {
    const health = await api("GET", "/healthz");
    $("random-warning").hidden = !health.random_detector;
    $("server-info").textContent = `model: ${health.model}`;
    $("limits").textContent = `JPEG, PNG, WebP… up to ${health.max_images} at once, ` +
      `${megabytes(health.max_upload_bytes)} per upload`;
    state.minPassword = health.password_min_length;
    $("password-hint").textContent = `At least ${health.password_min_length} characters.`;
  } catch (err) {
    $("server-info").textContent = `server unreachable (${err.message})`;
  }
  try {
    showGallery(await api("GET", "/api/me"));
  } catch {
    showAuth();
  }
}

start();
