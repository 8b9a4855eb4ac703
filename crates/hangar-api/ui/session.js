// One session: what it is, its state timeline (GET /v1/sessions/ID/events), a live tail
// of its agent's log (followed with fetch + a stream reader, since EventSource cannot send
// the key), a browser of its workspace files, and its traces.

import { api, optional, enc } from "./api.js";
import { h, fill, card, badge, alertBox, crumbs, toast, ms, bytes, ago, clock, parseTime, us } from "./dom.js";
import { timelineChart, responsive } from "./charts.js";

const REFRESH_MS = 5000;
/** Log lines kept on screen. */
const MAX_LINES = 5000;

export async function sessionPage(main, [id], ctx) {
  const base = `/v1/sessions/${enc(id)}`;
  let session = await api(base, { signal: ctx.signal });
  if (!ctx.alive) return;

  const head = h("div");
  const facts = h("div");
  const timeline = h("div");
  const traces = h("div", {}, h("div", { class: "loading" }, "Loading…"));
  const logs = logView(base, ctx);
  const files = fileBrowser(base, () => session, ctx, () => reload());

  const drawHead = () => {
    const canSuspend = ["running", "idle"].includes(session.state);
    const canResume = session.state === "suspended";
    const act = (what) => async () => {
      try {
        await api(`${base}/${what}`, { method: "POST", signal: ctx.signal });
        await reload();
        toast(`Session ${what === "suspend" ? "suspended" : "resumed"}`);
      } catch (e) {
        if (e.name !== "AbortError") toast(`Could not ${what}: ${e.message}`);
      }
    };
    fill(head, 
      crumbs(["Fleet", "#/"], [session.agent, `#/agents/${encodeURIComponent(session.agent)}`], session.id),
      h("div", { class: "page-head" },
        h("h1", { class: "mono" }, session.id),
        h("span", { id: "session-state" }, badge(session.state)),
        h("span", { class: "meta" }, `updated ${clock(new Date())}`),
        h("div", { class: "actions" },
          canSuspend ? h("button", { type: "button", id: "suspend", onclick: act("suspend") }, "Suspend") : null,
          canResume ? h("button", { type: "button", id: "resume", onclick: act("resume") }, "Resume") : null)));
  };

  const drawFacts = () => {
    const c = session.checkpoint;
    const p = session.agent_process;
    fill(facts, h("dl", { class: "facts", id: "session-facts" },
      h("dt", {}, "Agent"), h("dd", {}, h("a", { href: `#/agents/${encodeURIComponent(session.agent)}` }, session.agent), ` v${session.version}`),
      h("dt", {}, "User"), h("dd", { class: "mono" }, session.isolation_key),
      h("dt", {}, "Sandbox"), h("dd", { class: "mono" }, session.sandbox || "—"),
      h("dt", {}, "Created"), h("dd", {}, ago(session.created_at)),
      h("dt", {}, "Last activity"), h("dd", {}, ago(session.last_activity)),
      c ? [h("dt", {}, "Checkpoint"), h("dd", {}, `${c.mode}, ${bytes(c.bytes)}, took ${ms(c.took_ms)}, `, ago(c.created_at),
        c.note ? h("div", { class: "muted small" }, c.note) : null)] : null,
      p ? [h("dt", {}, "Agent process"), h("dd", {}, `${p.state}${p.pid ? `, pid ${p.pid}` : ""}, ${p.restarts} restart${p.restarts === 1 ? "" : "s"}` +
        (p.last_exit !== null && p.last_exit !== undefined ? `, last exit ${p.last_exit}` : ""),
        p.last_error ? h("div", { class: "error small" }, p.last_error) : null)] : null,
      session.error ? [h("dt", {}, "Error"), h("dd", {}, h("pre", { class: "errtext" }, session.error))] : null));
  };

  const drawTimeline = async () => {
    const ev = await optional(`${base}/events`, { signal: ctx.signal });
    if (!ctx.alive) return;
    fill(timeline, ...stateTimeline(session, ev && ev.events));
  };

  const drawTraces = async () => {
    let list;
    try {
      list = await optional(`/v1/traces?session=${enc(id)}&limit=50`, { signal: ctx.signal });
    } catch (e) {
      if (e.name === "AbortError") return;
      fill(traces, alertBox(e, "Could not list traces"));
      return;
    }
    if (!ctx.alive) return;
    fill(traces, tracesTable(list && list.traces));
  };

  /** The session read again and everything redrawn. */
  const reload = async () => {
    const asleep = (st) => ["suspending", "suspended", "deleted", "failed"].includes(st);
    const before = asleep(session.state);
    session = await api(base, { signal: ctx.signal });
    if (!ctx.alive) return;
    drawHead();
    drawFacts();
    await drawTimeline();
    // The file browser offers to resume a suspended session rather than doing it unasked.
    if (before !== asleep(session.state)) files.stateChanged();
  };

  drawHead();
  drawFacts();
  fill(main, h("div", { class: "page session-page", id: "session-page", dataset: { session: id } },
    head,
    h("div", { class: "grid wide-narrow" },
      card("State timeline", timeline, { id: "timeline-card" }),
      card("Session", facts)),
    card("Log", logs.el, { flush: true, tools: logs.tools, id: "log-card" }),
    h("div", { class: "grid two" },
      card("Files", files.el, { flush: true, id: "files-card", tools: files.tools }),
      card("Traces", traces, { flush: true, id: "traces-card" }))));
  await drawTimeline().catch((e) => { if (e.name !== "AbortError") fill(timeline, alertBox(e, "Could not load events")); });
  drawTraces();
  logs.start();
  files.start();

  ctx.every(REFRESH_MS, reload);
  ctx.every(REFRESH_MS * 3, drawTraces);
}

// An event's kind is the state the session entered; `restored` (how a resume went) marks a
// moment and starts no segment.
const KIND_STATE = {
  creating: "creating", running: "running", suspending: "suspending", suspended: "suspended",
  resuming: "resuming", failed: "failed", deleted: "deleted",
};

/** The timeline's SVG and its event list; without recorded events, what the session record tells. */
function stateTimeline(session, events) {
  const now = Date.now();
  const created = parseTime(session.created_at)?.getTime() ?? now;
  if (events && events.length) {
    const pts = events.map((e) => ({ at: e.at_ms ?? parseTime(e.at)?.getTime() ?? now, kind: e.kind, detail: e.detail }))
      .sort((a, b) => a.at - b.at);
    const segments = [];
    pts.forEach((p, i) => {
      const state = KIND_STATE[p.kind];
      if (!state || state === "deleted") return;
      const to = i + 1 < pts.length ? pts[i + 1].at : (session.state === "deleted" ? p.at : now);
      segments.push({ from: p.at, to, state });
    });
    const t0 = Math.min(pts[0].at, created);
    const t1 = Math.max(now, pts[pts.length - 1].at);
    const markers = pts.map((p) => ({ at: p.at, kind: p.kind, label: p.kind }));
    const suspends = pts.filter((p) => p.kind === "suspended").length;
    const resumes = pts.filter((p) => p.kind === "restored").length;
    return [
      responsive((w) => timelineChart(segments, markers, t0, t1, w)),
      h("div", { class: "legend" }, h("span", {}, `${pts.length} events · ${suspends} suspension${suspends === 1 ? "" : "s"} · ${resumes} resumption${resumes === 1 ? "" : "s"}`)),
      h("div", { class: "scroll" }, h("table", { class: "events", id: "events-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "When"), h("th", {}, "Event"), h("th", {}, "Detail"))),
        h("tbody", {}, [...pts].reverse().slice(0, 50).map((p) => h("tr", { dataset: { kind: p.kind } },
          h("td", { class: "nowrap" }, new Date(p.at).toLocaleString()),
          h("td", {}, h("span", { class: ["badge", `st-${KIND_STATE[p.kind] || "unknown"}`] }, p.kind)),
          h("td", { class: "small mono" }, detailText(p.detail))))))),
    ];
  }
  // No event log on this server (or none for this session): the record's own times.
  const markers = [{ at: created, kind: "created", label: "created" }];
  const cp = session.checkpoint && parseTime(session.checkpoint.created_at);
  if (cp) markers.push({ at: cp.getTime(), kind: "suspended", label: "last checkpoint" });
  const last = parseTime(session.last_activity);
  if (last) markers.push({ at: last.getTime(), kind: "activity", label: "last activity" });
  const end = session.state === "deleted" && last ? last.getTime() : now;
  return [
    responsive((w) => timelineChart([{ from: created, to: end, state: session.state }], markers, created, Math.max(now, end), w)),
    h("p", { class: "muted small", id: "no-events" },
      "No state events recorded for this session: the bar shows its current state since creation, with its last checkpoint and activity."),
  ];
}

function detailText(detail) {
  if (!detail || typeof detail !== "object") return detail ? String(detail) : "";
  return Object.entries(detail).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
}

function tracesTable(traces) {
  if (!traces) return h("div", { class: "empty", id: "no-traces" }, "No traces yet: this server does not keep traces.");
  if (!traces.length) return h("div", { class: "empty", id: "no-traces" }, "No traces yet for this session.");
  return h("div", { class: "scroll" }, h("table", { id: "traces-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "Trace"), h("th", {}, "Started"), h("th", { class: "num" }, "Duration"), h("th", { class: "num" }, "Spans"))),
    h("tbody", {}, traces.map((t) => h("tr", { dataset: { trace: t.trace_id } },
      h("td", {}, h("a", { href: `#/traces/${encodeURIComponent(t.trace_id)}`, class: "trace-link" }, t.name || t.trace_id),
        t.error ? h("span", { class: "badge st-failed", title: "a span failed" }, "error") : null),
      h("td", {}, ago(Math.floor(t.start_us / 1000))),
      h("td", { class: "num" }, us(t.duration_us)),
      h("td", { class: "num" }, String(t.spans)))))));
}

/**
 * The live log: `GET …/logs?follow=true` read chunk by chunk. Plain text (lines as they
 * come) or, when the server answers `text/event-stream`, events `{ts, stream, line}`.
 */
function logView(base, ctx) {
  const pre = h("pre", { class: "log", id: "log", tabindex: "0", "aria-label": "Agent log" });
  const status = h("span", { class: "small", id: "log-status" }, h("span", { class: "dot" }), "connecting…");
  const pauseBtn = h("button", { type: "button", class: "small", id: "log-pause" }, "Pause");
  const wrapBtn = h("button", { type: "button", class: "small", id: "log-wrap" }, "Wrap");
  const reconnect = h("button", { type: "button", class: "small", id: "log-reconnect", hidden: true }, "Reconnect");
  let paused = false;
  let held = [];
  let pending = null;
  let controller = null;

  const setStatus = (cls, text) => fill(status, h("span", { class: ["dot", cls] }), text);
  const atBottom = () => pre.scrollHeight - pre.scrollTop - pre.clientHeight < 30;

  const add = (entries) => {
    if (paused) { held.push(...entries); return; }
    const stick = atBottom();
    const frag = document.createDocumentFragment();
    for (const e of entries) {
      frag.appendChild(h("span", { class: ["ln", e.stream === "stderr" && "stderr", e.note && "note"] },
        e.ts ? h("span", { class: "ts", title: e.ts }, clock(new Date(e.ts))) : null, e.line));
    }
    if (pending) pre.insertBefore(frag, pending); else pre.appendChild(frag);
    while (pre.childNodes.length > MAX_LINES) pre.removeChild(pre.firstChild);
    if (stick) pre.scrollTop = pre.scrollHeight;
  };
  const setPending = (text) => {
    if (!text) { pending?.remove(); pending = null; return; }
    if (!pending) { pending = h("span", { class: "ln pending" }); pre.appendChild(pending); }
    pending.textContent = text;
  };

  pauseBtn.addEventListener("click", () => {
    paused = !paused;
    pauseBtn.textContent = paused ? "Resume" : "Pause";
    if (!paused) { const h2 = held; held = []; add(h2); }
  });
  wrapBtn.addEventListener("click", () => pre.classList.toggle("wrap"));
  reconnect.addEventListener("click", () => { fill(pre); pending = null; start(); });

  async function start() {
    reconnect.hidden = true;
    controller = new AbortController();
    const abort = () => controller.abort();
    ctx.signal.addEventListener("abort", abort, { once: true });
    setStatus("", "connecting…");
    let resp;
    try {
      resp = await api(`${base}/logs?follow=true&tail_bytes=65536`, {
        raw: true, signal: controller.signal, accept: "text/event-stream, text/plain;q=0.9",
      });
    } catch (e) {
      if (e.name === "AbortError") return;
      setStatus("ended", `cannot follow the log: ${e.message}`);
      reconnect.hidden = false;
      return;
    }
    const sse = (resp.headers.get("content-type") || "").startsWith("text/event-stream");
    setStatus("live", sse ? "following (events)" : "following");
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        if (sse) {
          const blocks = buf.split(/\r?\n\r?\n/);
          buf = blocks.pop();
          add(blocks.map(parseEvent).filter(Boolean));
        } else {
          const lines = buf.split("\n");
          buf = lines.pop();
          if (lines.length) add(lines.map((line) => ({ line: line.replace(/\r$/, "") })));
          setPending(buf);
        }
      }
      setPending("");
      if (buf && !sse) add([{ line: buf }]);
      setStatus("ended", "the log stream ended");
    } catch (e) {
      if (e.name === "AbortError" || ctx.signal.aborted) return;
      setStatus("ended", `the log stream broke: ${e.message}`);
    }
    reconnect.hidden = false;
  }

  ctx.onLeave(() => controller && controller.abort());
  return { el: pre, tools: h("div", { class: "filters" }, status, reconnect, pauseBtn, wrapBtn), start };
}

/** One SSE block: `data:` lines joined; JSON `{ts, stream, line}` or plain text. */
function parseEvent(block) {
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
  }
  if (!data.length) return null;
  const text = data.join("\n");
  try {
    const v = JSON.parse(text);
    if (v && typeof v === "object" && "line" in v) return { ts: v.ts, stream: v.stream, line: String(v.line) };
  } catch { /* plain text */ }
  return { line: text };
}

/** The session's files: directories listed, files previewed (text) or downloaded. */
function fileBrowser(base, getSession, ctx, onWoken) {
  const path = h("div", { class: "path", id: "files-path" });
  const listing = h("div", { id: "files-list" });
  const preview = h("div", { class: "preview", id: "files-preview", hidden: true });
  const el = h("div", { class: "files" }, h("div", { class: "body" }, path), listing, preview);
  const up = h("button", { type: "button", class: "small", id: "files-up" }, "Up");
  const refreshBtn = h("button", { type: "button", class: "small", id: "files-refresh" }, "Refresh");
  let cwd = "/";
  let started = false;

  const crumbsFor = (p) => {
    const parts = p.split("/").filter(Boolean);
    fill(path, h("button", { type: "button", onclick: () => open("/") }, "/"),
      ...parts.map((name, i) => {
        const to = `/${parts.slice(0, i + 1).join("/")}`;
        return [h("button", { type: "button", onclick: () => open(to) }, name), i + 1 < parts.length ? "/" : null];
      }));
  };

  const join = (dir, name) => (dir.endsWith("/") ? dir : `${dir}/`) + name;

  async function open(p) {
    const s = getSession();
    if (s.state === "suspended" || s.state === "suspending") {
      fill(listing, h("div", { class: "empty" },
        h("p", {}, "This session is suspended. Browsing its files resumes it."),
        h("button", { type: "button", id: "files-resume", onclick: () => load(p).then(onWoken) }, "Resume and browse")));
      crumbsFor(p);
      return;
    }
    if (s.state === "deleted" || s.state === "failed") {
      fill(listing, h("div", { class: "empty" }, `The session is ${s.state}: its files cannot be browsed.`));
      return;
    }
    await load(p);
  }

  async function load(p) {
    fill(listing, h("div", { class: "loading" }, "Loading…"));
    let st;
    try {
      st = await api(`${base}/files?path=${enc(p)}`, { signal: ctx.signal });
    } catch (e) {
      if (e.name === "AbortError") return;
      fill(listing, alertBox(e, `Cannot open ${p}`));
      return;
    }
    if (st.type !== "dir") {
      cwd = p.replace(/\/[^/]*$/, "") || "/";
      crumbsFor(cwd);
      await load(cwd);
      show(st);
      return;
    }
    cwd = st.path || p;
    crumbsFor(cwd);
    const entries = [...(st.entries || [])].sort((a, b) =>
      (a.type === "dir" ? 0 : 1) - (b.type === "dir" ? 0 : 1) || a.name.localeCompare(b.name));
    if (!entries.length) {
      fill(listing, h("div", { class: "empty" }, "This directory is empty."));
      return;
    }
    fill(listing, h("div", { class: "scroll" }, h("table", { id: "files-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", { class: "num" }, "Size"), h("th", {}, "Modified"))),
      h("tbody", {}, entries.map((e) => {
        const full = join(cwd, e.name);
        const icon = e.type === "dir" ? "▸" : e.type === "symlink" ? "↪" : "·";
        return h("tr", { dataset: { name: e.name, type: e.type } },
          h("td", { class: "name" }, h("span", { class: "icon" }, icon),
            h("button", { type: "button", onclick: () => (e.type === "file" ? show({ ...e, path: full }) : load(full)) }, e.name)),
          h("td", { class: "num" }, e.type === "dir" ? "" : bytes(e.size)),
          h("td", {}, e.mtime ? ago(e.mtime * 1000) : "—"));
      })))));
  }

  async function show(entry) {
    preview.hidden = false;
    const download = h("button", { type: "button", class: "small", onclick: () => save(entry) }, "Download");
    const close = h("button", { type: "button", class: "small ghost", onclick: () => { preview.hidden = true; } }, "Close");
    const head = h("header", {}, h("strong", { class: "mono" }, entry.path), h("span", { class: "muted" }, bytes(entry.size)),
      h("span", { class: "spacer" }), download, close);
    if (entry.size > 256 * 1024) {
      fill(preview, head, h("div", { class: "empty" }, "Too large to preview here; download it instead."));
      return;
    }
    fill(preview, head, h("div", { class: "loading" }, "Loading…"));
    try {
      const resp = await api(`${base}/files/content?path=${enc(entry.path)}`, { raw: true, signal: ctx.signal });
      const buf = new Uint8Array(await resp.arrayBuffer());
      let text = null;
      try {
        text = new TextDecoder("utf-8", { fatal: true }).decode(buf);
        if (text.includes("\u0000")) text = null;
      } catch { text = null; }
      fill(preview, head, text === null ? h("div", { class: "empty" }, "A binary file.")
        : h("pre", { id: "file-content" }, text || "(empty)"));
    } catch (e) {
      if (e.name !== "AbortError") fill(preview, head, alertBox(e, `Cannot read ${entry.path}`));
    }
  }

  async function save(entry) {
    try {
      const resp = await api(`${base}/files/content?path=${enc(entry.path)}`, { raw: true, signal: ctx.signal });
      const url = URL.createObjectURL(await resp.blob());
      const a = h("a", { href: url, download: entry.path.split("/").pop() || "file" });
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) {
      if (e.name !== "AbortError") toast(`Download failed: ${e.message}`);
    }
  }

  up.addEventListener("click", () => open(cwd.replace(/\/[^/]+\/?$/, "") || "/"));
  refreshBtn.addEventListener("click", () => open(cwd));

  return {
    el,
    tools: h("div", { class: "filters" }, up, refreshBtn),
    start() { started = true; open(cwd); },
    stateChanged() { if (started) open(cwd); },
  };
}
