// Small DOM helpers. Everything the API returns is untrusted text (log lines, file names,
// span attributes): it only ever becomes a text node or an attribute, never markup.

const SVG_NS = "http://www.w3.org/2000/svg";
// Set as DOM properties rather than attributes.
const PROPS = new Set(["value", "checked", "disabled", "hidden", "selected", "textContent"]);

function setAttrs(el, attrs, svg) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.setAttribute("class", Array.isArray(v) ? v.filter(Boolean).join(" ") : v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    // CSSOM, which the page's Content-Security-Policy allows (style attributes it does not).
    else if (k === "style") Object.assign(el.style, v);
    else if (!svg && PROPS.has(k)) el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else if (c instanceof Node) el.appendChild(c);
    else el.appendChild(document.createTextNode(String(c)));
  }
}

/** Replaces `el`'s children (nested arrays flattened; null, undefined and false skipped). */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** An HTML element: `h("a", {href: "#/"}, "Fleet")`. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs, false);
  append(el, children);
  return el;
}

/** An SVG element. */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs, true);
  append(el, children);
  return el;
}

/** A card with a title, optional tools on the right, and a body. */
export function card(title, body, { tools = null, flush = false, cls = null, id = null } = {}) {
  return h("section", { class: ["card", cls], id },
    title || tools ? h("header", {}, title ? h("h2", {}, title) : null, tools ? h("div", { class: "tools" }, tools) : null) : null,
    h("div", { class: ["body", flush && "flush"] }, body));
}

export function kpi(label, value, sub, { unit = null, bad = false, id = null } = {}) {
  return h("div", { class: ["card", "kpi", bad && "bad"], id },
    h("div", { class: "label" }, label),
    h("div", { class: "value" }, value, unit ? h("span", { class: "unit" }, unit) : null),
    sub ? h("div", { class: "sub" }, sub) : null);
}

export function badge(state) {
  return h("span", { class: ["badge", `st-${state}`], dataset: { state } }, state);
}

/** An error from the API (or anything else) as a visible alert. */
export function alertBox(err, what) {
  return h("div", { class: "alert", role: "alert" },
    h("strong", {}, what || "Something went wrong"),
    err && err.code && err.status ? `${err.message} (${err.code}, HTTP ${err.status})` : String(err && err.message || err));
}

export function crumbs(...parts) {
  const out = h("div", { class: "crumbs" });
  parts.filter(Boolean).forEach((p, i) => {
    if (i) out.appendChild(h("span", { class: "sep" }, "/"));
    out.appendChild(Array.isArray(p) ? h("a", { href: p[1] }, p[0]) : h("span", {}, p));
  });
  return out;
}

let toastTimer = null;
export function toast(message) {
  const t = document.getElementById("toast");
  t.textContent = message;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 3500);
}

// Formatting.

const nf = new Intl.NumberFormat("en", { maximumFractionDigits: 0 });

export function num(n) {
  return n === null || n === undefined ? "—" : nf.format(n);
}

export function ms(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  if (v === 0) return "0";
  if (v < 1) return `${v.toFixed(2)} ms`;
  if (v < 10) return `${v.toFixed(1)} ms`;
  if (v < 1000) return `${Math.round(v)} ms`;
  if (v < 60000) return `${(v / 1000).toFixed(v < 10000 ? 2 : 1)} s`;
  return `${(v / 60000).toFixed(1)} min`;
}

export function rate(v) {
  if (v === null || v === undefined) return "—";
  return v >= 10 ? nf.format(v) : v.toFixed(v >= 1 ? 1 : 2);
}

export function pct(part, whole) {
  if (!whole) return "0 %";
  const p = (100 * part) / whole;
  return `${p < 1 && p > 0 ? p.toFixed(1) : Math.round(p)} %`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${units[i]}`;
}

export function parseTime(t) {
  if (t === null || t === undefined) return null;
  if (typeof t === "number") return new Date(t);
  const d = new Date(t);
  return Number.isNaN(d.getTime()) ? null : d;
}

/** "3 min ago", with the exact time in a tooltip. */
export function ago(t) {
  const d = parseTime(t);
  if (!d) return h("span", { class: "muted" }, "—");
  const s = Math.round((Date.now() - d.getTime()) / 1000);
  let text;
  if (s < 5) text = "just now";
  else if (s < 60) text = `${s} s ago`;
  else if (s < 3600) text = `${Math.floor(s / 60)} min ago`;
  else if (s < 86400) text = `${Math.floor(s / 3600)} h ago`;
  else text = `${Math.floor(s / 86400)} d ago`;
  return h("time", { datetime: d.toISOString(), title: d.toLocaleString() }, text);
}

export function clock(d) {
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
}

export function hhmm(d) {
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
}

/** Microseconds as a duration. */
export function us(v) {
  return v === null || v === undefined ? "—" : ms(v / 1000);
}

export const STATES = ["creating", "running", "idle", "suspending", "suspended", "resuming", "failed", "deleted"];
