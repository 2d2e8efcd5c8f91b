// The Gossamer console: reads this agent's admin API and redraws itself.
// Everything is drawn with DOM calls and textContent (names come from the
// mesh, so none of them is ever parsed as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const history = new Map(); // service -> [req/s samples]
const HISTORY = 60; // samples (every 2 s: two minutes)
let statusErrors = new Map();

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function badge(text) {
  return el("span", { class: "badge " + String(text).replace(/[^a-z]/g, "") }, text);
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function ms(v) {
  if (v === null || v === undefined) return "–";
  return v < 10 ? v.toFixed(2) + " ms" : v.toFixed(0) + " ms";
}

function pct(v) {
  return (v * 100).toFixed(v === 1 ? 0 : 1) + " %";
}

function token() {
  return $("token").value.trim();
}

async function get(path, asText) {
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  const r = await fetch(path, { headers, cache: "no-store" });
  if (!r.ok) {
    let why = r.status + "";
    try { why += ": " + (await r.json()).error; } catch (_) { /* not JSON */ }
    throw new Error(why);
  }
  return asText ? r.text() : r.json();
}

function showStatus() {
  const s = $("status");
  if (statusErrors.size === 0) {
    s.textContent = "updated " + new Date().toLocaleTimeString();
    s.className = "status";
  } else {
    s.textContent = [...statusErrors].map(([k, v]) => k + ": " + v).join("; ");
    s.className = "status bad";
  }
}

// Runs `fn` now and every `every` ms, noting failures in the header.
function every(name, ms, fn) {
  const run = async () => {
    try {
      await fn();
      statusErrors.delete(name);
    } catch (e) {
      statusErrors.set(name, e.message || String(e));
    }
    showStatus();
    setTimeout(run, ms);
  };
  run();
}

async function agent() {
  const a = await get("/v1/agent");
  $("agent").textContent = `${a.name} · ${a.addr || ""} · ${a.version || ""}`;
  document.title = `Gossamer · ${a.name}`;
}

async function members() {
  const list = await get("/v1/members");
  const counts = {};
  const rows = list.map((m) => {
    counts[m.state] = (counts[m.state] || 0) + 1;
    return el("tr", { "data-member": m.name, "data-state": m.state },
      el("td", {}, m.name + (m.self ? " (this agent)" : "")),
      el("td", {}, m.addr),
      el("td", {}, badge(m.state), m.reason ? " " + m.reason : ""),
      el("td", {}, m.incarnation),
      el("td", {}, m.generation));
  });
  replaceRows($("members"), rows);
  $("member-counts").textContent = Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ");
}

function sparkline(samples) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", `0 0 ${HISTORY} 24`);
  svg.setAttribute("preserveAspectRatio", "none");
  const max = Math.max(1, ...samples);
  const points = samples.map((v, i) => `${i + HISTORY - samples.length},${(23 - (v / max) * 22).toFixed(1)}`);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(line);
  const title = document.createElementNS(ns, "title");
  title.textContent = `peak ${max.toFixed(1)} req/s`;
  svg.append(title);
  return svg;
}

let catalog = { services: {} };

async function services() {
  const mesh = $("mesh").checked;
  const [cat, stats] = await Promise.all([
    get("/v1/catalog"),
    get(`/v1/stats?window=10s&mesh=${mesh}&by_node=true`),
  ]);
  catalog = cat;
  // Outbound rows, summed over the agents that answered: what callers saw.
  const bySvc = new Map();
  const routes = [];
  for (const r of stats.rows) {
    if (r.direction !== "outbound") continue;
    if (r.route) { routes.push(r); continue; }
    const s = bySvc.get(r.service) || { rps: 0, requests: 0, ok: 0, p50: null, p99: null };
    s.rps += r.rps;
    s.requests += r.requests;
    s.ok += r.success_rate * r.requests;
    s.p50 = Math.max(s.p50 || 0, r.p50_ms || 0);
    s.p99 = Math.max(s.p99 || 0, r.p99_ms || 0);
    bySvc.set(r.service, s);
  }
  const names = new Set([...Object.keys(cat.services), ...bySvc.keys()]);
  const rows = [];
  for (const name of [...names].sort()) {
    const s = bySvc.get(name);
    const samples = history.get(name) || [];
    samples.push(s ? s.rps : 0);
    if (samples.length > HISTORY) samples.shift();
    history.set(name, samples);
    const inst = cat.services[name] || [];
    const passing = inst.filter((i) => i.health === "passing").length;
    rows.push(el("tr", { "data-service": name },
      el("td", {}, name),
      el("td", {}, `${passing}/${inst.length} passing`),
      el("td", { "data-service-rps": name }, s ? s.rps.toFixed(1) : "0.0"),
      el("td", {}, s && s.requests ? pct(s.ok / s.requests) : "–"),
      el("td", {}, s ? ms(s.p50) : "–"),
      el("td", {}, s ? ms(s.p99) : "–"),
      el("td", {}, sparkline(samples))));
  }
  replaceRows($("services"), rows);
  $("stats-window").textContent =
    `req/s, success and latency over ${stats.window_seconds.toFixed(0)} s from ${stats.nodes.length} agent(s)` +
    (stats.unanswered.length ? `; ${stats.unanswered.length} did not answer` : "") +
    " (p50/p99: the slowest agent's)";
  $("routes-wrap").hidden = routes.length === 0;
  replaceRows($("routes"), routes.map((r) => el("tr", {},
    el("td", {}, r.service), el("td", {}, r.route), el("td", {}, r.rps.toFixed(1)),
    el("td", {}, pct(r.success_rate)), el("td", {}, ms(r.p50_ms)), el("td", {}, ms(r.p99_ms)))));
  topology(stats, cat);
  instances(cat);
}

function instances(cat) {
  const rows = [];
  for (const name of Object.keys(cat.services).sort()) {
    for (const i of cat.services[name]) {
      rows.push(el("tr", { "data-instance": `${i.node}/${i.id}`, "data-health": i.health },
        el("td", {}, name), el("td", {}, i.id), el("td", {}, i.node),
        el("td", {}, `${i.address}:${i.port}`), el("td", {}, badge(i.health)), el("td", {}, i.version || "")));
    }
  }
  replaceRows($("instances"), rows);
}

// Callers on the left (an agent and the services it hosts), services on
// the right, an edge per agent and service with traffic, its width by req/s.
function topology(stats, cat) {
  const ns = "http://www.w3.org/2000/svg";
  const hosted = new Map();
  for (const [name, list] of Object.entries(cat.services)) {
    for (const i of list) {
      const s = hosted.get(i.node) || new Set();
      s.add(name);
      hosted.set(i.node, s);
    }
  }
  const edges = stats.rows.filter((r) => r.direction === "outbound" && !r.route && r.node && r.rps > 0);
  const box = $("topology");
  if (edges.length === 0) {
    box.replaceChildren(el("p", { class: "muted" }, "No requests between services in the window."));
    return;
  }
  const callers = [...new Set(edges.map((e) => e.node))].sort();
  const targets = [...new Set(edges.map((e) => e.service))].sort();
  const rowH = 34, width = 640, left = 10, right = 430, boxW = 200;
  const height = Math.max(callers.length, targets.length) * rowH + 10;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const y = (i) => 8 + i * rowH;
  const node = (x, i, label, sub) => {
    const g = document.createElementNS(ns, "g");
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", x); r.setAttribute("y", y(i)); r.setAttribute("width", boxW);
    r.setAttribute("height", rowH - 8); r.setAttribute("rx", 4);
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x + 6); t.setAttribute("y", y(i) + 16);
    t.textContent = sub ? `${label} (${sub})` : label;
    g.append(r, t);
    return g;
  };
  const max = Math.max(...edges.map((e) => e.rps));
  for (const e of edges) {
    const a = callers.indexOf(e.node), b = targets.indexOf(e.service);
    const path = document.createElementNS(ns, "path");
    const y1 = y(a) + (rowH - 8) / 2, y2 = y(b) + (rowH - 8) / 2;
    const x1 = left + boxW, x2 = right;
    path.setAttribute("d", `M${x1},${y1} C${x1 + 80},${y1} ${x2 - 80},${y2} ${x2},${y2}`);
    path.setAttribute("class", "edge" + (e.success_rate < 0.99 ? " failing" : ""));
    path.setAttribute("stroke-width", (1 + 5 * e.rps / max).toFixed(1));
    path.setAttribute("data-edge", `${e.node}->${e.service}`);
    const title = document.createElementNS(ns, "title");
    title.textContent = `${e.node} → ${e.service}: ${e.rps.toFixed(1)} req/s, ${pct(e.success_rate)} ok, p99 ${ms(e.p99_ms)}`;
    path.append(title);
    svg.append(path);
  }
  callers.forEach((c, i) => svg.append(node(left, i, c, [...(hosted.get(c) || [])].sort().join(", "))));
  targets.forEach((t, i) => svg.append(node(right, i, t)));
  box.replaceChildren(svg);
}

async function config() {
  const [docs, metrics] = await Promise.all([get("/v1/config"), get("/metrics", true)]);
  replaceRows($("documents"), (docs.documents || []).map((d) => el("tr", {},
    el("td", {}, d.kind), el("td", {}, d.name), el("td", {}, d.version), el("td", {}, d.signer || ""),
    el("td", {}, badge(d.status)),
    el("td", {}, d.applied_at_ms ? new Date(d.applied_at_ms).toLocaleString() : ""))));
  // gossamer_authz_decisions_total{service="…",rule="…",decision="…"} N
  const rows = [];
  for (const line of metrics.split("\n")) {
    if (!line.startsWith("gossamer_authz_decisions_total{")) continue;
    const labels = {};
    for (const m of line.matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[m[1]] = m[2];
    const count = line.slice(line.lastIndexOf("}") + 1).trim();
    rows.push(el("tr", {}, el("td", {}, labels.service), el("td", {}, labels.rule),
      el("td", {}, badge(labels.decision)), el("td", {}, count)));
  }
  replaceRows($("authz"), rows.length ? rows : [el("tr", {}, el("td", { colSpan: 4, class: "muted" }, "no decisions yet"))]);
}

function describe(e) {
  const parts = [e.type, e.action];
  if (e.node) parts.push(e.node);
  if (e.service) parts.push(e.service + (e.instance ? "/" + e.instance : ""));
  if (e.document) parts.push(e.document + (e.version ? " v" + e.version : ""));
  if (e.from || e.to) parts.push(`${e.from || "–"} → ${e.to || "–"}`);
  if (e.reason) parts.push("(" + e.reason + ")");
  return parts.join(" ");
}

function events() {
  const list = $("events");
  const source = new EventSource("/v1/events?format=sse");
  const add = (msg) => {
    let e;
    try { e = JSON.parse(msg.data); } catch (_) { return; }
    const li = el("li", { "data-event": e.type + " " + e.action },
      el("time", {}, new Date(e.time).toLocaleTimeString()), badge(e.action), " ", describe(e));
    list.prepend(li);
    while (list.children.length > 200) list.lastChild.remove();
  };
  for (const kind of ["member", "service", "health", "config", "outlier", "gap"]) {
    source.addEventListener(kind, add);
  }
  source.onerror = () => statusErrors.set("events", "reconnecting");
  source.onopen = () => { statusErrors.delete("events"); showStatus(); };
}

let tapping = null;

async function tap() {
  if (tapping) { tapping.abort(); return; }
  tapping = new AbortController();
  $("tap-toggle").textContent = "stop";
  const svc = $("tap-service").value.trim();
  const q = "max_rate=20" + (svc ? "&service=" + encodeURIComponent(svc) : "");
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  try {
    const r = await fetch("/v1/tap?" + q, { headers, signal: tapping.signal });
    if (!r.ok) {
      let why = r.status + "";
      try { why += ": " + (await r.json()).error; } catch (_) { /* not JSON */ }
      $("tap-note").textContent = "The tap refused: " + why;
      return;
    }
    $("tap-note").textContent = "Watching (at most 20 requests a second are shown).";
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        if (line) tapLine(line);
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") $("tap-note").textContent = "The tap stopped: " + e.message;
  } finally {
    tapping = null;
    $("tap-toggle").textContent = "start";
  }
}

function tapLine(line) {
  let r;
  try { r = JSON.parse(line); } catch (_) { return; }
  if (r.dropped) {
    $("tap-note").textContent = `Watching; ${r.dropped} requests not shown in the last second (over the rate).`;
    return;
  }
  if (!r.start) return;
  const row = el("tr", {},
    el("td", {}, r.start.slice(11, 23)), el("td", {}, r.method || "tcp"), el("td", {}, r.service || "–"),
    el("td", {}, r.path || ""), el("td", {}, r.instance || "–"), el("td", {}, r.status),
    el("td", {}, r.duration_ms.toFixed(1)), el("td", {}, (r.flags || []).join(",")));
  const body = $("tap");
  body.prepend(row);
  while (body.children.length > 50) body.lastChild.remove();
}

function start() {
  $("token").value = sessionStorage.getItem("gossamer-token") || "";
  $("token").addEventListener("change", () => sessionStorage.setItem("gossamer-token", token()));
  $("tap-toggle").addEventListener("click", tap);
  $("mesh").addEventListener("change", () => history.clear());
  every("agent", 10000, agent);
  every("members", 1000, members);
  every("services", 2000, services);
  every("config", 5000, config);
  events();
}

document.addEventListener("DOMContentLoaded", start);
