// telvirt web console. Every page is drawn from the REST API with the signed-in authority's
// token, so it shows exactly what that authority may see; the VNFs and their phases follow the
// API's watch (server-sent events, read with fetch because EventSource cannot send a token).
// No build step and no dependencies: this file is served as it is (ADR 060).
"use strict";

const PHASES = ["Pending", "Scheduled", "Starting", "Running", "Locked", "Stopping", "Stopped", "Failed", "Unknown"];
const state = {
  token: sessionStorage.getItem("telvirt.token") || "",
  vnfs: new Map(),
  synced: false,
  watch: null,
  listeners: new Set(),
  timers: [],
  redraw: null,
};

// ----- helpers ---------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    // Through the CSSOM: the page's policy refuses inline style attributes.
    else if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

async function api(method, path) {
  if (!state.token) throw new Error("signed out");
  const answer = await fetch(path, { method, headers: { Authorization: `Bearer ${state.token}` } });
  if (answer.status === 401) {
    signOut("The token was refused; sign in again.");
    throw new Error("unauthorized");
  }
  const type = answer.headers.get("content-type") || "";
  const body = type.includes("json") ? await answer.json() : await answer.text();
  if (!answer.ok) throw new Error(body && body.detail ? body.detail : `${answer.status}`);
  return body;
}

// Runs `f` now and every `ms`, never two runs at once (a slow answer is not overtaken).
function every(ms, f) {
  let busy = false;
  const run = async () => {
    if (busy) return;
    busy = true;
    try { await f(); } finally { busy = false; }
  };
  run();
  state.timers.push(setInterval(run, ms));
}

function onVnfs(f) {
  state.listeners.add(f);
  f();
}

function cpus(list) {
  return (list || []).map((c) => c.join(",")).join(" ");
}

function activeHost(v) {
  const p = (v.placements || []).find((p) => p.role === "active");
  return p ? p.host : "";
}

// ----- the watch ---------------------------------------------------------------------------

async function watchVnfs() {
  const controller = new AbortController();
  state.watch = controller;
  try {
    const answer = await fetch("/v1/watch/vnfs", {
      headers: { Authorization: `Bearer ${state.token}` },
      signal: controller.signal,
    });
    if (answer.status === 401) return signOut("The token was refused; sign in again.");
    const reader = answer.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (data) take(JSON.parse(data));
      }
    }
  } catch (e) {
    if (controller.signal.aborted) return;
  }
  // The stream ended (the node restarted, a proxy closed it): list again from a new watch.
  // (Unless it was stopped meanwhile: signed out, or signed in again with a watch of its own.)
  setTimeout(() => {
    if (state.watch !== controller || !state.token) return;
    state.vnfs.clear();
    state.synced = false;
    watchVnfs();
  }, 1000);
}

function take(message) {
  if (message.type === "ADDED" || message.type === "MODIFIED") state.vnfs.set(message.name, message.vnf);
  else if (message.type === "DELETED") state.vnfs.delete(message.name);
  else if (message.type === "SYNCED") state.synced = true;
  if (state.synced) for (const f of state.listeners) f();
}

// ----- pages -------------------------------------------------------------------------------

function signIn(message) {
  const main = document.getElementById("main");
  const input = h("input", { id: "token", type: "password", placeholder: "tvt_...", autocomplete: "off" });
  const error = h("p", { class: "error", id: "signin-error" }, message || "");
  main.replaceChildren(
    h("section", {},
      h("h1", {}, "Sign in"),
      h("p", { class: "muted" }, "An authority's token (admin's is in the client config `telvirt serve` wrote). It stays in this tab only."),
      h("form", {
        id: "signin",
        onsubmit: async (e) => {
          e.preventDefault();
          state.token = input.value.trim();
          try {
            await api("GET", "/v1/vnfs?limit=1");
          } catch (err) {
            state.token = "";
            error.textContent = `Refused: ${err.message}`;
            return;
          }
          sessionStorage.setItem("telvirt.token", state.token);
          start();
        },
      }, input, h("p", {}, h("button", { type: "submit", id: "signin-button" }, "Sign in"))),
      error));
}

function stopPage() {
  for (const t of state.timers) clearInterval(t);
  state.timers = [];
  clearTimeout(state.redraw);
  state.listeners.clear();
}

function signOut(message) {
  stopPage();
  state.token = "";
  sessionStorage.removeItem("telvirt.token");
  if (state.watch) state.watch.abort();
  state.watch = null;
  state.vnfs.clear();
  state.synced = false;
  document.getElementById("logout").hidden = true;
  document.getElementById("nav").replaceChildren();
  signIn(message);
}

function overview(main) {
  const counts = h("div", { class: "phases", id: "phase-counts" });
  const rows = h("tbody", { id: "vnf-rows" });
  const hosts = h("div", { id: "hosts" });
  const nets = h("ul", { id: "networks" });
  main.replaceChildren(
    h("section", {}, h("h2", {}, "VNFs by phase"), counts,
      h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Phase", "Runtime", "Host", "CPUs", "Reason"].map((t) => h("th", {}, t)))), rows)),
    h("section", {}, h("h2", {}, "Hosts and their cores"),
      h("div", { class: "legend" }, ["free", "vnf", "group", "shared", "reserved"].map((c) => h("span", { class: c }, c))), hosts),
    h("section", {}, h("h2", {}, "Networks"), nets));
  onVnfs(() => {
    const by = new Map(PHASES.map((p) => [p, 0]));
    for (const v of state.vnfs.values()) by.set(v.phase, (by.get(v.phase) || 0) + 1);
    counts.replaceChildren(...[...by].map(([p, n]) => h("span", { class: "phase-count", "data-phase-count": p }, h("span", { class: `phase ${p}` }, p), ` ${n}`)));
    const sorted = [...state.vnfs.values()].sort((a, b) => a.name.localeCompare(b.name));
    rows.dataset.synced = state.synced ? "yes" : "";
    rows.replaceChildren(...sorted.map((v) => h("tr", { "data-vnf": v.name },
      h("td", {}, h("a", { href: `#/vnf/${encodeURIComponent(v.name)}` }, v.name)),
      h("td", {}, h("span", { class: `phase ${v.phase}`, "data-phase": v.phase }, v.phase)),
      h("td", {}, v.descriptor.spec.runtime),
      h("td", {}, activeHost(v)),
      h("td", {}, cpus((v.placements || [])[0] && v.placements[0].vcpus)),
      h("td", { class: "muted" }, v.reason || ""))));
    // The core maps change with placements: redraw them soon after a change.
    clearTimeout(state.redraw);
    state.redraw = setTimeout(drawHosts, 200);
  });
  async function drawHosts() {
    let list;
    try { list = await api("GET", "/v1/hosts"); } catch (e) { hosts.replaceChildren(h("p", { class: "error" }, e.message)); return; }
    hosts.replaceChildren(...list.map((host) => h("div", { class: "host", "data-host": host.name },
      h("h2", {}, host.name, " ", h("span", { class: "muted" }, `${host.status}${host.schedulable ? "" : ", cordoned"} · ${host.runtimes.join(", ")} · ${Math.round(host.memory_bytes / 1048576)} MiB`)),
      h("div", { class: "cores" }, host.cpus.map((c) => {
        const use = c.use || {};
        const who = use.vnf || use.group || "";
        const what = use.purpose || (use.state === "group" ? `${use.vcpus} vCPUs` : "");
        return h("div", { class: `cpu ${use.state}`, "data-cpu": c.cpu, "data-holder": who, title: `cpu ${c.cpu} (core ${c.core}, node ${c.numa_node}): ${use.state} ${who} ${what}` },
          h("b", {}, c.cpu), who || use.state);
      })))));
  }
  every(5000, drawHosts);
  every(5000, async () => {
    try {
      const list = await api("GET", "/v1/networks");
      nets.replaceChildren(...list.map((n) => h("li", { "data-network": n.name }, h("a", { href: `#/net/${encodeURIComponent(n.name)}` }, n.name), ` ${n.descriptor.spec.links.length} links`)));
    } catch (e) { nets.replaceChildren(h("li", { class: "error" }, e.message)); }
  });
}

function vnfPage(main, name) {
  const title = h("h1", {}, name, " ");
  const phase = h("span", { class: "phase", id: "vnf-phase" });
  const reason = h("p", { class: "muted", id: "vnf-reason" });
  const message = h("p", { class: "error", id: "action-error" });
  const act = (action) => async () => {
    message.textContent = "";
    try { await api("POST", `/v1/vnfs/${encodeURIComponent(name)}/${action}`); } catch (e) { message.textContent = `${action}: ${e.message}`; }
  };
  const placement = h("tbody", { id: "placement" });
  const events = h("tbody", { id: "events" });
  const stats = h("pre", { id: "stats" }, "…");
  const maps = h("pre", { id: "maps" }, "…");
  const log = h("pre", { id: "log" }, "…");
  const descriptor = h("pre", { id: "descriptor" });
  title.append(phase);
  main.replaceChildren(
    h("section", {}, title, reason,
      h("div", { class: "actions" }, ["lock", "unlock", "start", "stop"].map((a) => h("button", { "data-action": a, onclick: act(a) }, a))),
      message,
      h("h2", {}, "Placement"),
      h("table", {}, h("thead", {}, h("tr", {}, ["Role", "Host", "vCPU CPUs", "Emulator", "NUMA"].map((t) => h("th", {}, t)))), placement)),
    h("div", { class: "grid2" },
      h("section", {}, h("h2", {}, "Counters"), stats),
      h("section", {}, h("h2", {}, "Maps"), maps)),
    h("section", {}, h("h2", {}, "Events"), h("table", {}, h("thead", {}, h("tr", {}, ["At", "From", "To", "Reason", "Actor"].map((t) => h("th", {}, t)))), events)),
    h("section", {}, h("h2", { id: "log-title" }, "Log"), log),
    h("section", {}, h("h2", {}, "Descriptor"), descriptor));
  let seen = "";
  onVnfs(() => {
    const v = state.vnfs.get(name);
    if (!v) { if (state.synced) { phase.textContent = "not visible"; phase.className = "phase Unknown"; } return; }
    phase.textContent = v.phase;
    phase.className = `phase ${v.phase}`;
    phase.dataset.phase = v.phase;
    reason.textContent = v.reason || "";
    placement.replaceChildren(...(v.placements || []).map((p) => h("tr", {},
      h("td", {}, p.role), h("td", {}, p.host), h("td", {}, cpus(p.vcpus)), h("td", {}, (p.emulator_cpus || []).join(",")), h("td", {}, (p.numa_nodes || []).join(",")))));
    descriptor.textContent = JSON.stringify(v.descriptor, null, 2);
    // A new event comes with every change of the record.
    if (v.updated_at !== seen) drawEvents();
    seen = v.updated_at;
  });
  async function drawEvents() {
    try {
      const list = await api("GET", `/v1/vnfs/${encodeURIComponent(name)}/events`);
      events.replaceChildren(...list.slice(-30).reverse().map((e) => h("tr", {},
        h("td", { class: "muted" }, e.at), h("td", {}, e.from || ""), h("td", {}, e.to), h("td", {}, e.reason), h("td", {}, e.actor))));
    } catch (e) { events.replaceChildren(h("tr", {}, h("td", { class: "error" }, e.message))); }
  }
  const path = `/v1/vnfs/${encodeURIComponent(name)}`;
  every(2000, async () => {
    const v = state.vnfs.get(name);
    if (!v) return;
    const wasm = v.descriptor.spec.runtime === "wasm";
    try {
      const s = wasm ? await api("GET", `${path}/stats`) : null;
      stats.textContent = s ? [
        `received   ${s.packets_in}`, `forwarded  ${s.packets_forwarded}`, `dropped    ${s.packets_dropped}`,
        `batches    ${s.batches}`, `traps      ${s.batches_trapped}`, `restarts   ${s.restarts}`,
        ...(s.counters || []).map((c) => `${c.name.padEnd(10)} ${c.value}`)].join("\n") : "vm VNF: see /metrics for QEMU's memory and vCPU times";
      stats.dataset.received = s ? s.packets_in : "";
    } catch (e) { stats.textContent = e.message; }
    try {
      const m = wasm ? await api("GET", `${path}/maps`) : null;
      maps.textContent = m ? m.map((x) => `${x.name}: ${x.kind}, ${x.entries} of ${x.max_entries} entries`).join("\n") : "no maps (vm VNF)";
    } catch (e) { maps.textContent = e.message; }
    try {
      if (wasm) {
        const l = await api("GET", `${path}/logs`);
        log.textContent = (l.lines || []).map((x) => `${x.seq} ${x.level} ${x.text}`).join("\n") || "(no log lines)";
      } else {
        document.getElementById("log-title").textContent = "Serial console";
        const c = await api("GET", `${path}/console?lines=40`);
        log.textContent = c.join("\n");
      }
    } catch (e) { log.textContent = e.message; }
  });
}

// Layers of a network's graph: each node one column right of its rightmost predecessor.
function layout(nodes, edges) {
  const depth = new Map(nodes.map((n) => [n, 0]));
  for (let i = 0; i < nodes.length; i++) {
    for (const e of edges) {
      if (e.from !== e.to && depth.get(e.to) < depth.get(e.from) + 1 && depth.get(e.from) + 1 < nodes.length) depth.set(e.to, depth.get(e.from) + 1);
    }
  }
  const columns = new Map();
  for (const n of nodes) {
    const d = depth.get(n);
    if (!columns.has(d)) columns.set(d, []);
    columns.get(d).push(n);
  }
  const at = new Map();
  for (const [d, list] of columns) list.forEach((n, i) => at.set(n, { x: 20 + d * 250, y: 30 + i * 90 }));
  return at;
}

function networkPage(main, name) {
  const graph = h("div", { id: "graph" });
  const links = h("tbody", { id: "links" });
  const sinks = h("div", { id: "sinks" });
  const error = h("p", { class: "error" });
  main.replaceChildren(
    h("section", {}, h("h1", {}, `Network ${name}`), error, graph),
    h("section", {}, h("h2", {}, "Links"), h("table", {}, h("thead", {}, h("tr", {}, ["Link", "Wired", "Packets", "Bytes", "Drops"].map((t) => h("th", {}, t)))), links)),
    h("section", {}, h("h2", {}, "Sinks: one-way latency of test frames"), sinks));
  every(1000, async () => {
    let n;
    try { n = await api("GET", `/v1/networks/${encodeURIComponent(name)}`); error.textContent = ""; } catch (e) { error.textContent = e.message; return; }
    const st = n.status || { links: [], sinks: [] };
    const edges = n.descriptor.spec.links.map((l, i) => {
      const [a, b] = l.split("->").map((s) => s.trim());
      return { link: l, from: a.split(".")[0], to: b.split(".")[0], state: st.links[i] || {} };
    });
    const names = [...new Set([...n.descriptor.spec.nodes.map((x) => x.name), ...edges.flatMap((e) => [e.from, e.to])])];
    const at = layout(names, edges);
    const width = Math.max(...[...at.values()].map((p) => p.x)) + 170;
    const height = Math.max(...[...at.values()].map((p) => p.y)) + 70;
    const kinds = new Map(n.descriptor.spec.nodes.map((x) => [x.name, x.kind]));
    graph.replaceChildren(svg("svg", { width, height, viewBox: `0 0 ${width} ${height}` },
      svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 8, markerHeight: 8, orient: "auto" }, svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#6b7385" }))),
      edges.map((e) => {
        const a = at.get(e.from), b = at.get(e.to);
        const x1 = a.x + 130, y1 = a.y + 22, x2 = b.x, y2 = b.y + 22;
        return svg("g", { "data-link": e.link },
          svg("line", { x1, y1, x2, y2, stroke: e.state.active ? "#2457c5" : "#b3261e", "stroke-width": 2, "marker-end": "url(#arrow)" }),
          svg("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 8, "text-anchor": "middle", "data-packets": e.state.packets || 0 }, `${e.state.packets || 0} pkts`),
          e.state.drops ? svg("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 + 16, "text-anchor": "middle", fill: "#b3261e" }, `${e.state.drops} drops`) : []);
      }),
      names.map((x) => {
        const p = at.get(x);
        return svg("g", { "data-node": x },
          svg("rect", { x: p.x, y: p.y, width: 130, height: 44, rx: 6, fill: kinds.has(x) ? "#eef0f4" : "#dfe8fb", stroke: "#6b7385" }),
          svg("text", { x: p.x + 10, y: p.y + 19 }, x),
          svg("text", { x: p.x + 10, y: p.y + 35, fill: "#6b7385" }, kinds.get(x) || "vnf"));
      })));
    links.replaceChildren(...edges.map((e) => h("tr", { "data-link": e.link },
      h("td", {}, e.link), h("td", {}, e.state.active ? "yes" : "no"), h("td", { class: "packets" }, e.state.packets || 0),
      h("td", {}, e.state.bytes || 0), h("td", {}, e.state.drops || 0))));
    sinks.replaceChildren(...(st.sinks || []).map((s) => {
      const bounds = ["1µs", "2.5µs", "5µs", "10µs", "25µs", "50µs", "100µs", "250µs", "500µs", "1ms", "2.5ms", "5ms", "10ms", "25ms", "50ms", "100ms", "250ms", "500ms", "1s", ">1s"];
      const most = Math.max(1, ...s.latency_buckets);
      const mean = s.received ? (s.latency_sum_ns / s.received / 1000).toFixed(1) : "-";
      return h("div", { "data-sink": s.name },
        h("p", {}, h("b", {}, s.name), ` received ${s.received}, lost ${s.lost}, mean ${mean} µs`),
        h("div", { class: "bars" }, s.latency_buckets.map((c, i) => h("div", { style: `height:${(100 * c) / most}%`, title: `≤ ${bounds[i]}: ${c}`, "data-count": c }))),
        h("div", { class: "bar-labels" }, s.latency_buckets.map((_, i) => h("span", {}, bounds[i]))));
    }));
  });
}

// ----- routing -----------------------------------------------------------------------------

function route() {
  stopPage();
  const main = document.getElementById("main");
  const [, page, arg] = (location.hash || "#/").split("/");
  const name = arg ? decodeURIComponent(arg) : "";
  if (page === "vnf" && name) vnfPage(main, name);
  else if (page === "net" && name) networkPage(main, name);
  else overview(main);
}

function start() {
  document.getElementById("logout").hidden = false;
  document.getElementById("nav").replaceChildren(h("a", { href: "#/" }, "Overview"));
  if (!state.watch) watchVnfs();
  route();
}

window.addEventListener("hashchange", () => { if (state.token) route(); });
document.getElementById("logout").addEventListener("click", () => signOut());
if (state.token) start(); else signIn();
