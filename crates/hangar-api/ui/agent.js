// One agent: its figures, versions, the traffic editor (PUT /v1/agents/NAME/traffic) and
// its sessions with filters by state and user.

import { api, enc } from "./api.js";
import { h, fill, card, kpi, badge, alertBox, crumbs, toast, num, ms, rate, pct, ago, clock, STATES } from "./dom.js";
import { latencyChart, requestsChart, responsive } from "./charts.js";
import { splitBar } from "./fleet.js";

const REFRESH_MS = 10000;

export async function agentPage(main, [name], ctx) {
  const base = `/v1/agents/${enc(name)}`;
  const load = () => Promise.all([
    api(base, { signal: ctx.signal }),
    api(`${base}/versions`, { signal: ctx.signal }),
    api(`${base}/sessions`, { signal: ctx.signal }),
    api(`/v1/stats?agent=${enc(name)}`, { signal: ctx.signal }).catch((e) => {
      if (e.name === "AbortError") throw e;
      return { error: e };
    }),
  ]);
  let [agent, versions, sessions, stats] = await load();
  if (!ctx.alive) return;

  const head = h("div");
  const figures = h("div", { class: "stack" });
  const editor = trafficEditor(name, () => agent, async (saved) => {
    agent = { ...agent, traffic: saved };
    drawHead();
    drawVersions();
  });
  const versionsBody = h("div");
  const sessionsView = sessionsTable();

  const drawHead = () => {
    fill(head, 
      crumbs(["Fleet", "#/"], name),
      h("div", { class: "page-head" },
        h("h1", {}, name),
        h("span", { class: "meta" }, agent.description || ""),
        h("div", { class: "actions" },
          h("span", { class: "meta" }, "Endpoint ", h("code", {}, agent.endpoint)),
          h("span", { class: "meta" }, `· updated ${clock(new Date())}`))));
  };
  const drawFigures = () => {
    const t = stats.total || { requests: 0, errors: 0, client_errors: 0, rate_per_min: 0, series: [] };
    const live = (agent.sessions.running || 0) + (agent.sessions.idle || 0);
    fill(figures, 
      stats.error ? alertBox(stats.error, "Request statistics are unavailable") : null,
      h("div", { class: "grid kpis" },
        kpi("Request rate", rate(t.rate_per_min), `${num(t.requests)} in the last hour`, { unit: "/min" }),
        kpi("Errors", num(t.errors), `${pct(t.errors, t.requests)} failed · ${num(t.client_errors)} refused`, { bad: t.errors > 0 }),
        kpi("Latency p50", ms(t.p50_ms), `p95 ${ms(t.p95_ms)} · p99 ${ms(t.p99_ms)}`),
        kpi("Sessions", num(Object.entries(agent.sessions).filter(([st]) => st !== "deleted").reduce((n, [, v]) => n + v, 0)),
          `${num(live)} running or idle · ${num(agent.sessions.suspended || 0)} suspended`)),
      h("div", { class: "grid two" },
        card("Latency, last hour", [responsive((w) => latencyChart(t.series || [], w, 180)),
          h("div", { class: "legend" }, ["p50", "p95", "p99"].map((p) => h("span", { class: ["key", `k-${p}`] }, p)))]),
        card("Requests per minute", [responsive((w) => requestsChart(t.series || [], w, 180)),
          h("div", { class: "legend" }, [["k-ok", "answered"], ["k-client", "refused (4xx)"], ["k-err", "failed (5xx)"]]
            .map(([c, text]) => h("span", { class: ["key", c] }, text)))])));
  };
  const drawVersions = () => {
    fill(versionsBody, versionsTable(versions.versions, agent.traffic));
  };

  drawHead();
  drawFigures();
  drawVersions();
  editor.update(agent);
  sessionsView.update(sessions.sessions);
  fill(main, h("div", { class: "page agent-page", id: "agent-page", dataset: { agent: name } },
    head,
    figures,
    h("div", { class: "grid wide-narrow" },
      card("Versions", versionsBody, { flush: true }),
      card("Traffic", editor.el, { id: "traffic-card" })),
    card("Sessions", sessionsView.el, { flush: true, tools: sessionsView.tools, id: "sessions-card" })));

  ctx.every(REFRESH_MS, async () => {
    [agent, versions, sessions, stats] = await load();
    if (!ctx.alive) return;
    drawHead();
    drawFigures();
    drawVersions();
    editor.update(agent);
    sessionsView.update(sessions.sessions);
  });
}

function versionsTable(versions, traffic) {
  if (!versions.length) return h("div", { class: "empty" }, "No versions.");
  const rows = [...versions].sort((a, b) => b.number - a.number).map((v) => {
    const sp = v.spec || {};
    const r = sp.resources || {};
    return h("tr", { dataset: { version: v.number } },
      h("td", {}, h("strong", {}, `v${v.number}`)),
      h("td", { class: "num" }, `${traffic[v.number] || 0} %`),
      h("td", {}, ago(v.created_at)),
      h("td", {}, h("code", { title: v.image }, shortImage(v.image))),
      h("td", {}, sp.isolation || "—"),
      h("td", { class: "small" }, [r.cpus !== undefined ? `${r.cpus} CPU` : null, r.memory, r.disk].filter(Boolean).join(" · ") || "—"),
      h("td", {}, sp.idle_timeout || "—"),
      h("td", { class: "small" }, (sp.protocols || []).join(", ") || "—"));
  });
  return h("div", { class: "scroll" }, h("table", { class: "versions", id: "versions-table" },
    h("thead", {}, h("tr", {}, ["Version", "Traffic", "Deployed", "Image", "Isolation", "Resources", "Idle timeout", "Protocols"]
      .map((t, i) => h("th", { class: i === 1 ? "num" : null }, t)))),
    h("tbody", {}, rows)));
}

function shortImage(img) {
  if (!img) return "—";
  const m = /^sha256:([0-9a-f]{12})/.exec(img);
  return m ? `sha256:${m[1]}` : img;
}

/**
 * The traffic editor: a slider and a number per version. With two versions, moving one
 * moves the other so that they keep summing to 100; with more, the total must be made 100
 * by hand before Save is enabled. Refreshes do not overwrite unsaved edits.
 */
function trafficEditor(name, getAgent, onSaved) {
  const el = h("form", { class: "traffic-editor", id: "traffic-editor", novalidate: true });
  let baseline = {};
  let weights = {};
  let versions = [];
  const rows = h("div");
  const bar = h("div");
  const sum = h("span", { class: "sum", id: "traffic-sum" });
  const reset = h("button", { type: "button", id: "traffic-reset" }, "Reset");
  const save = h("button", { type: "submit", class: "primary", id: "traffic-save" }, "Save traffic");
  const message = h("div", { id: "traffic-message", role: "status", hidden: true });
  el.append(
    h("p", { class: "muted small" }, "New sessions pick a version by these weights; a session keeps its version for life."),
    rows, bar,
    h("div", { class: "total" }, h("span", { class: "muted" }, "Total"), sum, h("div", { class: "buttons" }, reset, save)),
    message);

  const dirty = () => versions.some((v) => weights[v] !== baseline[v]);
  const total = () => versions.reduce((n, v) => n + weights[v], 0);
  const inputs = new Map();

  const refresh = () => {
    const t = total();
    sum.textContent = `${t} %`;
    sum.classList.toggle("bad", t !== 100);
    sum.title = t === 100 ? "" : "Weights must add up to 100";
    save.disabled = t !== 100 || !dirty();
    reset.disabled = !dirty();
    fill(bar, splitBar(weights, versions));
    for (const v of versions) {
      const [range, number] = inputs.get(v);
      if (+range.value !== weights[v]) range.value = weights[v];
      if (document.activeElement !== number && +number.value !== weights[v]) number.value = weights[v];
    }
  };

  const set = (v, value, fromUser) => {
    const n = Math.max(0, Math.min(100, Math.round(Number(value) || 0)));
    weights[v] = n;
    if (fromUser && versions.length === 2) {
      const other = versions.find((o) => o !== v);
      weights[other] = 100 - n;
    }
    message.hidden = true;
    refresh();
  };

  const build = () => {
    inputs.clear();
    fill(rows, ...versions.map((v, i) => {
      const range = h("input", {
        type: "range", min: 0, max: 100, step: 1, value: weights[v], "aria-label": `v${v} weight`,
        class: "weight-range", dataset: { version: v },
        oninput: (e) => set(v, e.target.value, true),
      });
      const number = h("input", {
        type: "number", min: 0, max: 100, step: 1, value: weights[v], "aria-label": `v${v} weight in percent`,
        class: "weight", id: `weight-${v}`, dataset: { version: v },
        oninput: (e) => { if (e.target.value !== "") set(v, e.target.value, true); },
        onchange: (e) => set(v, e.target.value, true),
      });
      inputs.set(v, [range, number]);
      return h("div", { class: "row" },
        h("label", { for: `weight-${v}` }, h("span", { class: ["swatch", `c${i % 8}`] }), `v${v}`),
        range, number, h("span", { class: "muted" }, "%"));
    }));
    refresh();
  };

  reset.addEventListener("click", () => {
    weights = { ...baseline };
    message.hidden = true;
    refresh();
  });

  el.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (save.disabled) return;
    save.disabled = true;
    save.textContent = "Saving…";
    const body = { weights: Object.fromEntries(versions.map((v) => [String(v), weights[v]])) };
    try {
      const answer = await api(`/v1/agents/${enc(name)}/traffic`, { method: "PUT", body });
      const saved = Object.fromEntries(Object.entries(answer.weights).map(([k, w]) => [Number(k), w]));
      baseline = { ...saved };
      weights = { ...saved };
      const text = `Traffic saved: ${versions.map((v) => `v${v} ${saved[v] || 0} %`).join(" · ")}`;
      message.className = "notice ok";
      message.textContent = text;
      message.hidden = false;
      toast(text);
      await onSaved(answer.weights);
    } catch (err) {
      message.className = "notice bad";
      message.textContent = `Not saved: ${err.message}`;
      message.hidden = false;
    } finally {
      save.textContent = "Save traffic";
      refresh();
    }
  });

  return {
    el,
    /** New figures from the server; unsaved edits are kept. */
    update(agent) {
      const vs = [...agent.versions].sort((a, b) => a - b);
      const fresh = Object.fromEntries(vs.map((v) => [v, agent.traffic[v] || 0]));
      const same = vs.length === versions.length && vs.every((v, i) => v === versions[i]);
      if (same && dirty()) { baseline = fresh; refresh(); return; }
      versions = vs;
      baseline = fresh;
      weights = { ...fresh };
      if (same) refresh(); else build();
    },
    get agent() { return getAgent(); },
  };
}

/** The sessions table with its state and user filters (applied here, as you type). */
function sessionsTable() {
  const state = h("select", { id: "state-filter", "aria-label": "Filter by state" },
    h("option", { value: "" }, "All states"), STATES.map((st) => h("option", { value: st }, st)));
  const user = h("input", { id: "user-filter", type: "search", placeholder: "Filter by user…", "aria-label": "Filter by user" });
  const count = h("span", { class: "muted small", id: "sessions-count" });
  const el = h("div");
  let all = [];
  const draw = () => {
    const st = state.value;
    const u = user.value.trim().toLowerCase();
    const shown = all
      .filter((x) => !st || x.state === st)
      .filter((x) => !u || x.isolation_key.toLowerCase().includes(u))
      .sort((a, b) => (b.last_activity || "").localeCompare(a.last_activity || ""));
    count.textContent = `${shown.length} of ${all.length}`;
    if (!all.length) return fill(el, h("div", { class: "empty" }, "No sessions yet. The first request from a user creates one."));
    if (!shown.length) return fill(el, h("div", { class: "empty" }, "No session matches these filters."));
    fill(el, h("div", { class: "scroll" }, h("table", { id: "sessions-table" },
      h("thead", {}, h("tr", {}, ["Session", "User", "Version", "State", "Created", "Last activity"].map((t) => h("th", {}, t)))),
      h("tbody", {}, shown.map((x) => h("tr", { dataset: { session: x.id, state: x.state } },
        h("td", {}, h("a", { href: `#/sessions/${encodeURIComponent(x.id)}`, class: "mono session-link" }, x.id)),
        h("td", { class: "user" }, x.isolation_key),
        h("td", {}, `v${x.version}`),
        h("td", {}, badge(x.state), x.error ? h("span", { class: "error small", title: x.error }, " ⚠") : null),
        h("td", {}, ago(x.created_at)),
        h("td", {}, ago(x.last_activity))))))));
  };
  state.addEventListener("change", draw);
  user.addEventListener("input", draw);
  return {
    el,
    tools: h("div", { class: "filters" }, count, state, user),
    update(sessions) { all = sessions; draw(); },
  };
}
