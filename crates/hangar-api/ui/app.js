// The dashboard's shell: sign-in, hash routes, and each page's lifetime (its timers and
// requests end when another page replaces it).
//
// Routes: #/ (fleet), #/agents/NAME, #/sessions/ID, #/traces/ID. A key may be handed over
// once as #key=hk_… (a link from the CLI, say); it is moved to sessionStorage and removed
// from the address bar and the history.

import { api, auth, onUnauthorized, ApiError } from "./api.js";
import { h, fill, alertBox, toast } from "./dom.js";
import { fleetPage } from "./fleet.js";
import { agentPage } from "./agent.js";
import { sessionPage } from "./session.js";
import { tracePage } from "./trace.js";

const main = document.getElementById("main");

const routes = [
  [/^#?\/?$/, fleetPage, "fleet"],
  [/^#\/agents\/([^/?#]+)\/?$/, agentPage, "fleet"],
  [/^#\/sessions\/([^/?#]+)\/?$/, sessionPage, "fleet"],
  [/^#\/traces\/([^/?#]+)\/?$/, tracePage, "fleet"],
];

/** The page on screen: its abort controller and timers. */
let current = null;

function leave() {
  if (!current) return;
  current.controller.abort();
  current.timers.forEach(clearInterval);
  current.cleanups.forEach((f) => { try { f(); } catch { /* leaving anyway */ } });
  current = null;
}

/** What a page gets: a signal for its requests and a way to refresh while it is shown. */
function context() {
  const ctx = {
    controller: new AbortController(),
    timers: [],
    cleanups: [],
    get signal() { return this.controller.signal; },
    get alive() { return current === this && !this.signal.aborted; },
    /**
     * Calls `fn` every `ms` while the page is shown and the tab visible, one call at a time;
     * the first failure of a run of them is shown.
     */
    every(ms, fn) {
      let busy = false;
      let failing = false;
      this.timers.push(setInterval(() => {
        if (busy || document.hidden || !this.alive) return;
        busy = true;
        fn().then(() => { failing = false; }, (e) => {
          if (e && e.name === "AbortError") return;
          console.error(e);
          if (!failing && this.alive && !(e instanceof ApiError && e.status === 401)) {
            toast(`Could not refresh: ${e.message}`);
          }
          failing = true;
        }).finally(() => { busy = false; });
      }, ms));
    },
    onLeave(fn) { this.cleanups.push(fn); },
  };
  return ctx;
}

function takeKeyFromFragment() {
  const m = /^#key=([^&]*)/.exec(location.hash);
  if (!m) return false;
  auth.set(decodeURIComponent(m[1]).trim());
  history.replaceState(null, "", `${location.pathname}${location.search}#/`);
  return true;
}

async function route() {
  takeKeyFromFragment();
  if (!auth.key) return signIn();
  leave();
  showChrome(true);
  document.getElementById("toast").hidden = true;
  const hash = location.hash || "#/";
  const found = routes.map(([re, page, nav]) => [re.exec(hash), page, nav]).find(([m]) => m);
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", !!found && a.dataset.nav === found[2]));
  if (!found) {
    fill(main, alertBox({ message: `There is no page ${hash}.` }, "Not found"), h("a", { href: "#/" }, "Back to the fleet"));
    return;
  }
  const [m, page] = found;
  const ctx = context();
  current = ctx;
  fill(main, h("div", { class: "loading" }, "Loading…"));
  try {
    await page(main, m.slice(1).map(decodeURIComponent), ctx);
  } catch (e) {
    if (e.name === "AbortError" || !ctx.alive) return;
    if (e instanceof ApiError && e.status === 401) return; // the sign-in form is up
    fill(main, alertBox(e, "Could not load this page"));
  }
}

function showChrome(signedIn) {
  document.getElementById("signout").hidden = !signedIn;
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("who").textContent = signedIn && auth.id ? `Signed in as ${auth.id}` : "";
}

/** The sign-in form, with `message` (why we are here) if any. */
function signIn(message) {
  leave();
  showChrome(false);
  const input = h("input", {
    id: "api-key", name: "key", type: "password", autocomplete: "off", spellcheck: "false",
    placeholder: "hk_…", required: true,
  });
  const error = h("p", { id: "signin-error", class: "error", role: "alert", hidden: !message }, message || "");
  const button = h("button", { type: "submit", class: "primary", id: "signin-submit" }, "Sign in");
  const fail = (text) => { error.textContent = text; error.hidden = false; button.disabled = false; input.select(); };
  const form = h("form", {
    class: "card", id: "signin",
    onsubmit: async (e) => {
      e.preventDefault();
      const key = input.value.trim();
      if (!key.startsWith("hk_")) return fail("That is not an API key: Hangar's keys start with hk_.");
      button.disabled = true;
      auth.set(key);
      try {
        // Any deployer read proves the key and its role.
        await api("/v1/agents", { quiet401: true });
      } catch (err) {
        auth.clear();
        return fail(err.message);
      }
      route();
    },
  },
  h("h1", {}, "Sign in to Hangar"),
  h("p", { class: "muted" }, "Use an API key with the deployer or admin role. On the server's machine the admin key is in ",
    h("code", {}, "<data-dir>/admin-key"), "."),
  h("label", { for: "api-key" }, "API key"),
  input, error, button,
  h("p", { class: "muted small" }, "The key is kept in this tab only (sessionStorage) and sent to this server alone."));
  fill(main, h("section", { class: "signin" }, form));
  input.focus();
}

onUnauthorized((err) => {
  auth.clear();
  signIn(`Signed out: ${err.message}`);
});

document.getElementById("signout").addEventListener("click", () => {
  auth.clear();
  signIn();
});

// Theme: the system's, or one picked here (remembered in localStorage).
const THEMES = ["auto", "light", "dark"];
function applyTheme(t) {
  if (t === "auto") document.documentElement.removeAttribute("data-theme");
  else document.documentElement.dataset.theme = t;
  const b = document.getElementById("theme");
  b.textContent = `Theme: ${t}`;
  b.title = t === "auto" ? "Theme: follow the system" : `Theme: ${t}`;
}
applyTheme(localStorage.getItem("hangar.theme") || "auto");
document.getElementById("theme").addEventListener("click", () => {
  const now = localStorage.getItem("hangar.theme") || "auto";
  const next = THEMES[(THEMES.indexOf(now) + 1) % THEMES.length];
  localStorage.setItem("hangar.theme", next);
  applyTheme(next);
});

window.addEventListener("hashchange", route);
route();
