// The fleet: every agent with its versions and traffic split, sessions by state, and the
// last hour's requests, errors and latency (GET /v1/agents, GET /v1/stats).

import { api } from "./api.js";
import { h, fill, card, kpi, badge, alertBox, num, ms, rate, pct, clock, STATES } from "./dom.js";
import { latencyChart, requestsChart, sessionsChart, responsive } from "./charts.js";

const REFRESH_MS = 10000;

export async function fleetPage(main, _params, ctx) {
  const draw = async () => {
    const [agents, stats] = await Promise.all([
      api("/v1/agents", { signal: ctx.signal }),
      api("/v1/stats", { signal: ctx.signal }).catch((e) => {
        if (e.name === "AbortError") throw e;
        return { error: e };
      }),
    ]);
    if (!ctx.alive) return;
    fill(main, render(agents.agents, stats));
  };
  await draw();
  ctx.every(REFRESH_MS, draw);
}

function render(agents, stats) {
  const out = h("div", { class: "page fleet", id: "fleet" });
  out.appendChild(h("div", { class: "page-head" },
    h("h1", {}, "Fleet"),
    h("span", { class: "meta" }, `Updated ${clock(new Date())} · refreshes every ${REFRESH_MS / 1000} s`)));
  if (stats.error) out.appendChild(alertBox(stats.error, "Request statistics are unavailable"));
  const total = stats.total || { requests: 0, errors: 0, client_errors: 0, rate_per_min: 0, series: [] };

  // Headline figures.
  const sessions = {};
  for (const a of agents) for (const [st, n] of Object.entries(a.sessions)) sessions[st] = (sessions[st] || 0) + n;
  const live = (sessions.running || 0) + (sessions.idle || 0);
  const allSessions = Object.entries(sessions).filter(([st]) => st !== "deleted").reduce((n, [, v]) => n + v, 0);
  const versions = agents.reduce((n, a) => n + a.versions.length, 0);
  out.appendChild(h("div", { class: "grid kpis" },
    kpi("Agents", num(agents.length), `${num(versions)} version${versions === 1 ? "" : "s"}`, { id: "kpi-agents" }),
    kpi("Sessions", num(allSessions), `${num(live)} running or idle · ${num(sessions.suspended || 0)} suspended`, { id: "kpi-sessions" }),
    kpi("Request rate", rate(total.rate_per_min), `${num(total.requests)} in the last hour`, { unit: "/min", id: "kpi-rate" }),
    kpi("Errors", num(total.errors), `${pct(total.errors, total.requests)} of requests failed (5xx) · ${num(total.client_errors)} refused (4xx)`,
      { bad: total.errors > 0, id: "kpi-errors" }),
    kpi("Latency p50", ms(total.p50_ms), `p95 ${ms(total.p95_ms)} · p99 ${ms(total.p99_ms)}`, { id: "kpi-latency" })));

  // Charts.
  const series = total.series || [];
  out.appendChild(h("div", { class: "grid two" },
    card("Latency, last hour", [responsive((w) => latencyChart(series, w)), legend([["k-p50", "p50"], ["k-p95", "p95"], ["k-p99", "p99"]]),
      h("p", { class: "muted small" }, "Time to the answer's headers (a stream's first byte), per minute.")]),
    card("Requests per minute", [responsive((w) => requestsChart(series, w)), legend([["k-ok", "answered"], ["k-client", "refused (4xx)"], ["k-err", "failed (5xx)"]])])));
  const shown = STATES.filter((st) => st !== "deleted");
  out.appendChild(card("Sessions by state", [
    responsive((w) => sessionsChart(agents.map((a) => ({ name: a.name, sessions: a.sessions })), shown, w)),
    h("div", { class: "legend" }, shown.map((st) => badge(st))),
  ], { id: "sessions-card" }));

  // The agents, each with its versions.
  const byVersion = new Map();
  for (const f of stats.agents || []) byVersion.set(`${f.agent}/${f.version}`, f);
  out.appendChild(card("Agents", agents.length ? h("div", { class: "scroll" }, agentsTable(agents, byVersion)) :
    h("div", { class: "empty" }, "No agents yet. Deploy one with ", h("code", {}, "hangar deploy DIR"), "."), { flush: true }));
  return out;
}

function legend(items) {
  return h("div", { class: "legend" }, items.map(([cls, text]) => h("span", { class: ["key", cls] }, text)));
}

export function splitBar(traffic, versions) {
  const bar = h("div", { class: "split", title: versions.map((v) => `v${v}: ${traffic[v] || 0} %`).join(" · ") });
  versions.forEach((v, i) => {
    const w = traffic[v] || 0;
    if (w) bar.appendChild(h("span", { class: `c${i % 8}`, style: { width: `${w}%` } }));
  });
  return bar;
}

function agentsTable(agents, byVersion) {
  const table = h("table", { class: "agents", id: "agents-table" },
    h("thead", {}, h("tr", {},
      h("th", {}, "Agent / version"), h("th", {}, "Traffic"), h("th", {}, "Sessions"),
      h("th", { class: "num" }, "Req/min"), h("th", { class: "num" }, "Requests"), h("th", { class: "num" }, "Errors"),
      h("th", { class: "num" }, "p50"), h("th", { class: "num" }, "p95"), h("th", { class: "num" }, "p99"))));
  for (const a of agents) {
    const body = h("tbody", { class: "agent", dataset: { agent: a.name } });
    const figs = a.versions.map((v) => byVersion.get(`${a.name}/${v}`)).filter(Boolean);
    const refused = byVersion.get(`${a.name}/null`);
    if (refused) figs.push(refused);
    const sum = (k) => figs.reduce((n, f) => n + f[k], 0);
    const counts = Object.entries(a.sessions).filter(([, n]) => n > 0);
    body.appendChild(h("tr", { class: "agent-row" },
      h("td", {}, h("a", { href: `#/agents/${encodeURIComponent(a.name)}`, class: "agent-link" }, a.name),
        a.description ? h("div", { class: "muted small" }, a.description) : null),
      h("td", {}, splitBar(a.traffic, a.versions)),
      h("td", {}, counts.length ? h("div", { class: "counts" }, counts.map(([st, n]) => h("span", { class: ["badge", `st-${st}`] }, `${n} ${st}`)))
        : h("span", { class: "muted" }, "none")),
      h("td", { class: "num" }, rate(sum("rate_per_min"))),
      h("td", { class: "num" }, num(sum("requests"))),
      h("td", { class: ["num", sum("errors") > 0 && "error"] }, num(sum("errors"))),
      h("td", { class: "num muted", colspan: 3 }, figs.length > 1 ? "per version ↓" : "")));
    a.versions.forEach((v, i) => {
      const f = byVersion.get(`${a.name}/${v}`);
      body.appendChild(versionRow(`v${v}`, v, i, a.traffic[v] || 0, f));
    });
    if (refused) body.appendChild(versionRow("no version", "none", -1, null, refused));
    table.appendChild(body);
  }
  return table;
}

function versionRow(label, v, i, weight, f) {
  return h("tr", { class: "version-row", dataset: { version: v } },
    h("td", {}, label),
    h("td", {}, weight === null ? h("span", { class: "muted small" }, "refused before routing")
      : h("span", {}, h("span", { class: ["swatch", `c${i % 8}`] }), `${weight} %`)),
    h("td", {}, ""),
    h("td", { class: "num" }, f ? rate(f.rate_per_min) : "—"),
    h("td", { class: "num" }, f ? num(f.requests) : "0"),
    h("td", { class: ["num", f && f.errors > 0 && "error"] }, f ? num(f.errors) : "0"),
    h("td", { class: "num" }, f ? ms(f.p50_ms) : "—"),
    h("td", { class: "num" }, f ? ms(f.p95_ms) : "—"),
    h("td", { class: "num" }, f ? ms(f.p99_ms) : "—"));
}
