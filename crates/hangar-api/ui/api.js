// The API client: every call carries the key (`Authorization: Bearer`), errors become
// `ApiError`s with the API's own code and message, and a 401 sends the page back to the
// sign-in form. The key lives in sessionStorage: per tab, gone when the tab closes.

const KEY = "hangar.key";

export const auth = {
  get key() { return sessionStorage.getItem(KEY); },
  set(key) { sessionStorage.setItem(KEY, key); },
  clear() { sessionStorage.removeItem(KEY); },
  /** The key's public id (`hk_<id>_<secret>` → `key:<id>`), as the audit trail names it. */
  get id() {
    const m = /^hk_([0-9a-f]+)_/.exec(this.key || "");
    return m ? `key:${m[1]}` : null;
  },
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let unauthorized = () => {};
/** What to do when the API says the key is not (or no longer) valid. */
export function onUnauthorized(fn) { unauthorized = fn; }

async function errorOf(resp) {
  let code = `http_${resp.status}`;
  let message = `HTTP ${resp.status} ${resp.statusText}`.trim();
  try {
    const body = await resp.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(resp.status, code, message);
}

/**
 * Calls the API. Options: `method`, `body` (sent as JSON), `signal`, `accept`, `raw` (return
 * the Response instead of parsed JSON), `quiet401` (do not go back to the sign-in form).
 */
export async function api(path, { method = "GET", body, signal, accept, raw = false, quiet401 = false } = {}) {
  const key = auth.key;
  const headers = {};
  if (key) headers.Authorization = `Bearer ${key}`;
  if (accept) headers.Accept = accept;
  const init = { method, headers, signal, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "unreachable", `Hangar did not answer (${e.message}). Is the server running?`);
  }
  if (!resp.ok) {
    const err = await errorOf(resp);
    if (resp.status === 401 && !quiet401) unauthorized(err);
    throw err;
  }
  if (raw) return resp;
  if (resp.status === 204) return null;
  return resp.json();
}

/** Like `api`, but a 404 (an endpoint this server does not have yet, or nothing there) is `null`. */
export async function optional(path, opts) {
  try {
    return await api(path, opts);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) return null;
    throw e;
  }
}

export const enc = encodeURIComponent;
