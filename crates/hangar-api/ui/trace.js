// One trace (GET /v1/traces/ID) as a waterfall: a row per span under its parent, a bar
// from its start to its end; clicking a span shows its attributes.

import { api, enc, ApiError } from "./api.js";
import { h, fill, card, alertBox, crumbs, us } from "./dom.js";
import { waterfall, responsive } from "./charts.js";

export async function tracePage(main, [id], ctx) {
  let trace;
  try {
    trace = await api(`/v1/traces/${enc(id)}`, { signal: ctx.signal });
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      fill(main, crumbs(["Fleet", "#/"], "Trace"), alertBox(e, `No trace ${id} on this server`));
      return;
    }
    throw e;
  }
  if (!ctx.alive) return;
  const spans = trace.spans || [];
  if (!spans.length) {
    fill(main, crumbs(["Fleet", "#/"], "Trace"), h("div", { class: "empty" }, "This trace has no spans."));
    return;
  }
  const rows = order(spans);
  const t0 = Math.min(...spans.map((sp) => sp.start_us));
  const t1 = Math.max(...spans.map((sp) => sp.end_us));
  const services = [...new Set(rows.map((r) => r.span.service))];
  const root = rows[0].span;
  const errors = spans.filter((sp) => sp.status === "error").length;
  const attr = (k) => spans.map((sp) => sp.attributes && sp.attributes[k]).find((v) => v !== undefined);
  const session = attr("hangar.session.id") || attr("session.id");
  const agent = attr("gen_ai.agent.name");

  const details = h("div", { id: "span-details" }, h("div", { class: "empty" }, "Click a span to see its attributes."));
  let selected = null;
  const select = (sp) => {
    selected = sp.span_id;
    fill(details, spanDetails(sp, t0));
  };

  fill(main, h("div", { class: "page trace-page", id: "trace-page" },
    crumbs(["Fleet", "#/"], agent ? [agent, `#/agents/${encodeURIComponent(agent)}`] : null,
      session ? [session, `#/sessions/${encodeURIComponent(session)}`] : null, "Trace"),
    h("div", { class: "page-head" },
      h("h1", {}, root.name || "Trace"),
      h("span", { class: "meta mono" }, trace.trace_id),
      h("span", { class: "meta" }, `${new Date(t0 / 1000).toLocaleString()} · ${us(t1 - t0)} · ${spans.length} spans` +
        (errors ? ` · ${errors} failed` : ""))),
    h("div", { class: "legend" }, services.map((sv, i) => h("span", {}, h("span", { class: ["swatch", `c${i % 8}`] }), sv))),
    card("Waterfall", responsive((w) => waterfall(rows, t0, t1, services, select, w, selected)), { id: "waterfall-card" }),
    card("Span", details, { id: "span-card" })));
}

/** Spans depth-first from the roots (no parent, or a parent not in the trace), by start. */
function order(spans) {
  const ids = new Set(spans.map((sp) => sp.span_id));
  const children = new Map();
  const roots = [];
  for (const sp of spans) {
    if (sp.parent_span_id && ids.has(sp.parent_span_id) && sp.parent_span_id !== sp.span_id) {
      if (!children.has(sp.parent_span_id)) children.set(sp.parent_span_id, []);
      children.get(sp.parent_span_id).push(sp);
    } else {
      roots.push(sp);
    }
  }
  const byStart = (a, b) => a.start_us - b.start_us;
  const out = [];
  const seen = new Set();
  const walk = (sp, depth) => {
    if (seen.has(sp.span_id)) return;
    seen.add(sp.span_id);
    out.push({ span: sp, depth });
    (children.get(sp.span_id) || []).sort(byStart).forEach((c) => walk(c, depth + 1));
  };
  roots.sort(byStart).forEach((r) => walk(r, 0));
  return out;
}

function spanDetails(sp, t0) {
  const attrs = Object.entries(sp.attributes || {}).sort(([a], [b]) => a.localeCompare(b));
  return h("div", {},
    h("dl", { class: "facts" },
      h("dt", {}, "Name"), h("dd", {}, h("strong", {}, sp.name)),
      h("dt", {}, "Service"), h("dd", {}, sp.service || "—"),
      h("dt", {}, "Kind"), h("dd", {}, sp.kind || "—"),
      h("dt", {}, "Status"), h("dd", { class: sp.status === "error" ? "error" : null }, sp.status || "unset",
        sp.status_message ? ` — ${sp.status_message}` : ""),
      h("dt", {}, "Starts at"), h("dd", {}, `+${us(sp.start_us - t0)}`),
      h("dt", {}, "Duration"), h("dd", {}, us(sp.end_us - sp.start_us)),
      h("dt", {}, "Span id"), h("dd", { class: "mono" }, sp.span_id),
      h("dt", {}, "Parent"), h("dd", { class: "mono" }, sp.parent_span_id || "— (root)")),
    attrs.length ? h("table", { class: "attrs", id: "span-attributes" },
      h("thead", {}, h("tr", {}, h("th", {}, "Attribute"), h("th", {}, "Value"))),
      h("tbody", {}, attrs.map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, typeof v === "string" ? v : JSON.stringify(v))))))
      : h("p", { class: "muted" }, "No attributes."));
}
