// Hand-drawn SVG charts: latency over time, requests per minute, sessions by state, a
// session's state timeline and a trace's waterfall. Colours come from CSS classes, so both
// themes apply; every mark has a <title> for its exact figures.

import { h, s, fill, ms, num, hhmm, clock, us } from "./dom.js";

/**
 * A box whose chart is drawn at the box's own width (and again when it changes), so that
 * text in the SVG keeps its size instead of being scaled with a viewBox.
 */
export function responsive(draw, cls) {
  const box = h("div", { class: ["chart-box", cls] });
  let last = 0;
  const ro = new ResizeObserver(() => {
    const w = Math.round(box.clientWidth);
    if (w > 0 && w !== last) {
      last = w;
      fill(box, draw(w));
    }
  });
  ro.observe(box);
  return box;
}

/** 0 and round steps up to at least `max`. */
export function niceTicks(max, count = 4) {
  if (!(max > 0)) return [0, 1];
  const raw = max / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= raw);
  const ticks = [];
  for (let v = 0; v < max + step * 0.999; v += step) ticks.push(+v.toPrecision(12));
  return ticks;
}

function svgRoot(cls, W, height, label) {
  return s("svg", {
    class: `chart ${cls}`, width: W, height, viewBox: `0 0 ${W} ${height}`, role: "img", "aria-label": label,
  });
}

function emptyNote(svg, W, height, text) {
  svg.appendChild(s("text", { class: "empty-note", x: W / 2, y: height / 2, "text-anchor": "middle" }, text));
  return svg;
}

/** The frame of a per-minute chart: y grid with labels, x labels every ten minutes. */
function minuteFrame(svg, W, series, m, height, yTicks, yFmt) {
  const inner = W - m.l - m.r;
  const bw = inner / Math.max(series.length, 1);
  const y = (v) => height - m.b - (v / yTicks[yTicks.length - 1]) * (height - m.t - m.b);
  const grid = s("g", { class: "grid" });
  for (const t of yTicks) {
    grid.appendChild(s("line", { x1: m.l, x2: W - m.r, y1: y(t), y2: y(t) }));
    grid.appendChild(s("text", { x: m.l - 6, y: y(t) + 4, "text-anchor": "end" }, yFmt(t)));
  }
  svg.appendChild(grid);
  const axis = s("g", { class: "axis" });
  const every = bw * 10 >= 44 ? 10 : 20;
  series.forEach((p, i) => {
    const d = new Date(p.start * 1000);
    const last = i === series.length - 1;
    // Ten-minute marks, none so close to "now" that their labels touch.
    if ((d.getMinutes() % every === 0 && (series.length - 1 - i) * bw >= 44) || last) {
      const x = m.l + (i + 0.5) * bw;
      axis.appendChild(s("line", { x1: x, x2: x, y1: height - m.b, y2: height - m.b + 4 }));
      axis.appendChild(s("text", { x, y: height - 6, "text-anchor": last ? "end" : "middle" }, last ? "now" : hhmm(d)));
    }
  });
  axis.appendChild(s("line", { x1: m.l, x2: W - m.r, y1: height - m.b, y2: height - m.b }));
  svg.appendChild(axis);
  return { x: (i) => m.l + (i + 0.5) * bw, y, bw };
}

/**
 * Latency percentiles per minute (`series` from /v1/stats): p50, p95 and p99 lines, a dot
 * per minute with requests.
 */
export function latencyChart(series, W, height = 200) {
  const svg = svgRoot("latency-chart", W, height, "Latency percentiles per minute");
  const keys = ["p99_ms", "p95_ms", "p50_ms"];
  const max = Math.max(0, ...series.flatMap((p) => keys.map((k) => p[k] ?? 0)));
  if (!series.some((p) => p.requests > 0)) return emptyNote(svg, W, height, "No requests in the last hour");
  const m = { l: 56, r: 14, t: 10, b: 24 };
  const ticks = niceTicks(max);
  const f = minuteFrame(svg, W, series, m, height, ticks, ms);
  for (const k of keys) {
    const cls = k.slice(0, 3);
    let d = "";
    let prev = false;
    series.forEach((p, i) => {
      const v = p[k];
      if (v === null || v === undefined) { prev = false; return; }
      d += `${prev ? "L" : "M"}${f.x(i).toFixed(1)},${f.y(v).toFixed(1)}`;
      prev = true;
    });
    if (d) svg.appendChild(s("path", { class: `line ${cls}`, d }));
    const dots = s("g", { class: `dots ${cls}` });
    series.forEach((p, i) => {
      if (p[k] === null || p[k] === undefined) return;
      dots.appendChild(s("circle", { class: cls, cx: f.x(i), cy: f.y(p[k]), r: k === "p50_ms" ? 3 : 2.5 },
        s("title", {}, `${hhmm(new Date(p.start * 1000))} · ${num(p.requests)} requests\n` +
          `p50 ${ms(p.p50_ms)} · p95 ${ms(p.p95_ms)} · p99 ${ms(p.p99_ms)}`)));
    });
    svg.appendChild(dots);
  }
  return svg;
}

/** Requests per minute as bars: answered, refused (4xx) and failed (5xx) stacked. */
export function requestsChart(series, W, height = 200) {
  const svg = svgRoot("requests-chart", W, height, "Requests per minute");
  if (!series.some((p) => p.requests > 0)) return emptyNote(svg, W, height, "No requests in the last hour");
  const m = { l: 40, r: 14, t: 10, b: 24 };
  const ticks = niceTicks(Math.max(...series.map((p) => p.requests)));
  const f = minuteFrame(svg, W, series, m, height, ticks, (v) => num(v));
  const bars = s("g", { class: "bars" });
  const base = f.y(0);
  series.forEach((p, i) => {
    if (!p.requests) return;
    const w = Math.max(1, f.bw * 0.7);
    const x = f.x(i) - w / 2;
    const ok = p.requests - p.errors - p.client_errors;
    let top = base;
    const g = s("g", {}, s("title", {}, `${hhmm(new Date(p.start * 1000))}: ${num(p.requests)} requests, ` +
      `${num(p.client_errors)} refused (4xx), ${num(p.errors)} failed (5xx)`));
    for (const [n, cls] of [[ok, "bar-ok"], [p.client_errors, "bar-client"], [p.errors, "bar-err"]]) {
      if (!n) continue;
      const hgt = base - f.y(n);
      top -= hgt;
      g.appendChild(s("rect", { class: cls, x, y: top, width: w, height: Math.max(hgt, 1) }));
    }
    bars.appendChild(g);
  });
  svg.appendChild(bars);
  return svg;
}

/** One horizontal bar per agent, split by session state. */
export function sessionsChart(agents, states, W) {
  const row = 26;
  const m = { l: 120, r: 50, t: 6, b: 6 };
  const height = Math.max(agents.length, 1) * row + m.t + m.b;
  const svg = svgRoot("sessions-chart", W, height, "Sessions by state");
  const totals = agents.map((a) => states.reduce((n, st) => n + (a.sessions[st] || 0), 0));
  const max = Math.max(0, ...totals);
  if (!max) return emptyNote(svg, W, height, "No sessions");
  const inner = W - m.l - m.r;
  agents.forEach((a, i) => {
    const y = m.t + i * row;
    svg.appendChild(s("text", { class: "label", x: m.l - 8, y: y + row / 2 + 4, "text-anchor": "end" },
      a.name.length > 16 ? `${a.name.slice(0, 15)}…` : a.name));
    let x = m.l;
    for (const st of states) {
      const n = a.sessions[st] || 0;
      if (!n) continue;
      const w = (n / max) * inner;
      svg.appendChild(s("rect", { class: `seg ${st}`, x, y: y + 4, width: Math.max(w, 2), height: row - 8, rx: 2 },
        s("title", {}, `${a.name}: ${n} ${st}`)));
      x += w;
    }
    svg.appendChild(s("text", { x: x + 6, y: y + row / 2 + 4 }, num(totals[i])));
  });
  return svg;
}

const STEPS_S = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800];

function timeTicks(t0, t1, count = 6) {
  const span = (t1 - t0) / 1000;
  const step = (STEPS_S.find((st) => span / st <= count) || STEPS_S[STEPS_S.length - 1]) * 1000;
  const out = [];
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) out.push(t);
  return { ticks: out, step };
}

function timeLabel(t, step) {
  const d = new Date(t);
  if (step >= 86400000) return d.toLocaleDateString([], { month: "short", day: "numeric" });
  return step < 60000 ? clock(d) : hhmm(d);
}

/**
 * A session's states over time: `segments` [{from, to, state}] (ms since the epoch) as one
 * bar, `markers` [{at, kind, label}] as flags above it (suspensions and resumptions stand out).
 */
export function timelineChart(segments, markers, t0, t1, W) {
  const height = 92;
  const m = { l: 30, r: 30, t: 30, b: 26 };
  const svg = svgRoot("timeline", W, height, "Session state timeline");
  if (!(t1 > t0)) t1 = t0 + 1000;
  const x = (t) => m.l + ((t - t0) / (t1 - t0)) * (W - m.l - m.r);
  const barY = m.t;
  const barH = height - m.t - m.b - 6;
  const { ticks, step } = timeTicks(t0, t1, Math.max(2, Math.floor((W - m.l - m.r) / 90)));
  const grid = s("g", { class: "grid" });
  for (const t of ticks) {
    grid.appendChild(s("line", { x1: x(t), x2: x(t), y1: barY - 4, y2: barY + barH + 4 }));
    grid.appendChild(s("text", { x: x(t), y: height - 6, "text-anchor": "middle" }, timeLabel(t, step)));
  }
  svg.appendChild(grid);
  for (const seg of segments) {
    const x1 = x(seg.from);
    const w = Math.max(x(seg.to) - x1, 1.5);
    svg.appendChild(s("rect", { class: `seg ${seg.state}`, x: x1, y: barY, width: w, height: barH, rx: 2 },
      s("title", {}, `${seg.state}: ${new Date(seg.from).toLocaleString()} → ${new Date(seg.to).toLocaleString()} (${ms(seg.to - seg.from)})`)));
  }
  for (const mk of markers) {
    const cx = x(mk.at);
    const cls = /suspend/.test(mk.kind) ? "suspend" : /resum|restor/.test(mk.kind) ? "resume" : /fail/.test(mk.kind) ? "fail" : "";
    svg.appendChild(s("g", { class: `marker ${cls}`, dataset: { kind: mk.kind } },
      s("title", {}, `${mk.label || mk.kind} · ${new Date(mk.at).toLocaleString()}`),
      s("line", { x1: cx, x2: cx, y1: barY - 12, y2: barY + barH }),
      s("path", { d: `M${cx - 5},${barY - 20}h10l-5,8z` })));
  }
  return svg;
}

/**
 * A trace as a waterfall: one row per span (depth-first, children by start), one <rect>
 * per span placed by its start and end. `onSelect(span)` is called when a row is clicked.
 */
export function waterfall(rows, t0, t1, services, onSelect, width, selected) {
  const row = 24;
  const labelW = Math.min(300, Math.max(160, width * 0.28));
  const m = { t: 26, r: 70, b: 6 };
  const height = m.t + rows.length * row + m.b;
  const svg = s("svg", {
    class: "chart waterfall", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "Trace waterfall",
  });
  const span = Math.max(t1 - t0, 1);
  const x = (t) => labelW + ((t - t0) / span) * (width - labelW - m.r);
  const ticks = niceTicks(span, Math.max(2, Math.floor((width - labelW - m.r) / 110)));
  for (const t of ticks) {
    if (t > span * 1.001) continue;
    svg.appendChild(s("line", { class: "tick", x1: x(t0 + t), x2: x(t0 + t), y1: m.t - 6, y2: height - m.b }));
    svg.appendChild(s("text", { class: "dim", x: x(t0 + t), y: 14, "text-anchor": "middle" }, us(t)));
  }
  svg.appendChild(s("line", { class: "sep", x1: labelW - 8, x2: labelW - 8, y1: 0, y2: height }));
  const groups = [];
  rows.forEach(({ span: sp, depth }, i) => {
    const y = m.t + i * row;
    const start = x(sp.start_us);
    const w = Math.max(x(sp.end_us) - start, 2);
    const svc = services.indexOf(sp.service) % 8;
    const name = sp.name || "(unnamed)";
    const room = Math.max(8, Math.floor((labelW - 16 - depth * 12) / 7));
    const g = s("g", { class: "row", dataset: { span: sp.span_id } },
      s("title", {}, `${name} · ${sp.service} · ${us(sp.end_us - sp.start_us)}${sp.status === "error" ? " · error" : ""}`),
      s("text", { x: 8 + depth * 12, y: y + 16 }, name.length > room ? `${name.slice(0, room - 1)}…` : name),
      s("rect", {
        class: ["span", `svc${svc}`, sp.status === "error" && "error"], x: start, y: y + 5, width: w, height: row - 10,
        dataset: { span: sp.span_id },
      }),
      s("text", { class: "dim", x: Math.min(start + w + 6, width - m.r + 4), y: y + 16 }, us(sp.end_us - sp.start_us)));
    const pick = () => {
      groups.forEach((o) => { o.classList.remove("selected"); o.querySelector("rect").classList.remove("selected"); });
      g.classList.add("selected");
      g.querySelector("rect").classList.add("selected");
    };
    g.addEventListener("click", () => { pick(); onSelect(sp); });
    if (selected === sp.span_id) pick();
    groups.push(g);
    svg.appendChild(g);
  });
  return svg;
}
