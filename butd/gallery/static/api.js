// The gallery's JSON API from the page: every refusal becomes an ApiError carrying the server's code and message.
// State-changing requests carry the session's CSRF token in the X-CSRF-Token header.
"use strict";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let csrfToken = null;

export function setCsrfToken(token) {
  csrfToken = token;
}

function errorOf(status, body, fallback) {
  const error = (body && body.error) || { code: `http_${status}`, message: fallback || `HTTP ${status}` };
  return new ApiError(status, error.code, error.message);
}

export async function api(method, path, body) {
  const headers = {};
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  if (method !== "GET" && csrfToken) headers["X-CSRF-Token"] = csrfToken;
  let response;
  try {
    response = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  } catch (err) {
    throw new ApiError(0, "network", `the server cannot be reached (${err.message})`);
  }
  if (response.status === 204) return null;
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) throw errorOf(response.status, data, response.statusText);
  return data;
}

// Multipart upload with progress: onProgress(fraction) while the bytes go out, onSent() once the server has them all
// (captioning then takes a while). XMLHttpRequest, because fetch does not report upload progress.
export function uploadImages(files, { onProgress, onSent } = {}) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    for (const file of files) form.append("images", file, file.name);
    const request = new XMLHttpRequest();
    request.open("POST", "/api/images");
    if (csrfToken) request.setRequestHeader("X-CSRF-Token", csrfToken);
    request.responseType = "json";
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable && onProgress) onProgress(event.loaded / event.total);
    });
    request.upload.addEventListener("load", () => onSent && onSent());
    request.addEventListener("load", () => {
      if (request.status >= 200 && request.status < 300) resolve(request.response);
      else reject(errorOf(request.status, request.response, request.statusText));
    });
    request.addEventListener("error", () => reject(new ApiError(0, "network", "the upload was interrupted")));
    request.send(form);
  });
}
