//! The live status page (`/status`, self-contained HTML that polls its JSON twin) and
//! `/status.json`: connected backends and their agents, requests and errors per backend over
//! the last 15 minutes, open tunnels, recent errors.

use serde_json::{json, Value};

use crate::base::history::{now, BUCKET_SECS};
use crate::State;

/// The JSON twin of the page.
pub fn json(state: &State) -> Value {
    let t = now();
    let history = &state.metrics.history;
    let mut backends: Vec<Value> = state
        .broker
        .agents()
        .into_iter()
        .map(|(name, agents)| {
            let agents: Vec<Value> = agents
                .iter()
                .map(|(a, polls)| {
                    json!({
                        "id": a.id,
                        "addr": a.info.addr,
                        "version": a.info.version,
                        "protocol": a.info.protocol.as_str(),
                        "since": a.since,
                        "parked_polls": polls,
                    })
                })
                .collect();
            let mut v = history.series(&name, t);
            v["name"] = json!(name);
            v["agents"] = json!(agents);
            v
        })
        .collect();
    backends.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let errors = history.recent_errors();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "now": t,
        "uptime_secs": t.saturating_sub(history.started()),
        "draining": state.draining(),
        "bucket_secs": BUCKET_SECS,
        "totals": {
            "in_flight": state.broker.in_flight(),
            "parked": state.broker.parked(),
            "open_tunnels": state.tunnels.len(),
            "open_connections": state.conns.open(),
            "buffered_bytes": state.budget.in_use(),
        },
        "backends": backends,
        "recent_errors": errors,
        "cluster": state.cluster.as_ref().map(|c| {
            let view = c.view();
            json!({
                "replica": format!("{:08x}", c.tag()),
                "advertise_url": c.advertise_url(),
                "redis": if c.redis_up() { "up" } else { "unreachable" },
                "replicas": view.replicas.iter().map(|(tag, url)| json!({"replica": tag, "url": url})).collect::<Vec<_>>(),
                "names": view.names.iter().map(|(name, tags)| json!({"name": name, "replicas": tags})).collect::<Vec<_>>(),
            })
        }),
    })
}

/// The page: no external assets, renders `/status.json` every two seconds. Every value is
/// set with `textContent`, never parsed as HTML (names and messages come from users).
pub const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>relay status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  .meta { color: #666; margin-bottom: 1rem; }
  .cards { display: flex; gap: .8rem; flex-wrap: wrap; margin-bottom: 1.2rem; }
  .card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5rem .9rem; min-width: 7rem; }
  .card b { display: block; font-size: 1.4rem; }
  table { border-collapse: collapse; width: 100%; background: #fff; margin-bottom: 1.2rem; }
  th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #eee; vertical-align: top; }
  th { background: #f0f0f0; font-weight: 600; }
  .num { text-align: right; font-variant-numeric: tabular-nums; }
  .bad { color: #b00020; }
  .agents { font-size: 12px; color: #555; }
  svg { display: block; }
  .empty { color: #888; font-style: italic; }
  #stale { color: #b00020; display: none; }
</style>
</head>
<body>
<h1>relay status</h1>
<div class="meta"><span id="version"></span> · up <span id="uptime"></span> · <span id="state"></span> <span id="stale">(status unavailable, retrying)</span></div>
<div class="cards">
  <div class="card">backends<b id="t-backends">–</b></div>
  <div class="card">in flight<b id="t-in_flight">–</b></div>
  <div class="card">waiting<b id="t-parked">–</b></div>
  <div class="card">tunnels<b id="t-open_tunnels">–</b></div>
  <div class="card">connections<b id="t-open_connections">–</b></div>
</div>
<table id="backends">
  <thead><tr><th>backend</th><th>agents</th><th class="num">requests</th><th class="num">req/s (1 min)</th><th class="num">errors (1 min)</th><th>last 15 min</th></tr></thead>
  <tbody><tr><td colspan="6" class="empty">no backend connected</td></tr></tbody>
</table>
<div id="cluster" hidden>
<h2 style="font-size:1.1rem">Cluster <span class="meta" id="cluster-meta"></span></h2>
<table id="cluster-names">
  <thead><tr><th>backend</th><th>replicas holding its agents</th></tr></thead>
  <tbody></tbody>
</table>
</div>
<h2 style="font-size:1.1rem">Recent errors</h2>
<table id="errors">
  <thead><tr><th>time</th><th>backend</th><th class="num">status</th><th>what happened</th></tr></thead>
  <tbody><tr><td colspan="4" class="empty">none</td></tr></tbody>
</table>
<script>
"use strict";
const NS = "http://www.w3.org/2000/svg";
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function ago(secs) {
  if (secs < 60) return secs + "s";
  if (secs < 3600) return Math.floor(secs / 60) + "m";
  if (secs < 86400) return Math.floor(secs / 3600) + "h";
  return Math.floor(secs / 86400) + "d";
}
function sparkline(points) {
  const w = 180, h = 28, svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h);
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  const max = Math.max(1, ...points.map(p => p[0]));
  const step = points.length > 1 ? w / (points.length - 1) : w;
  for (const [idx, color] of [[0, "#1a73e8"], [1, "#b00020"]]) {
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("fill", "none"); line.setAttribute("stroke", color); line.setAttribute("stroke-width", "1.5");
    line.setAttribute("points", points.map((p, i) => (i * step).toFixed(1) + "," + (h - 1 - (p[idx] / max) * (h - 2)).toFixed(1)).join(" "));
    svg.appendChild(line);
  }
  return svg;
}
function render(s) {
  document.getElementById("version").textContent = "relay-server " + s.version;
  document.getElementById("uptime").textContent = ago(s.uptime_secs);
  document.getElementById("state").textContent = s.draining ? "draining" : "serving";
  document.getElementById("t-backends").textContent = s.backends.length;
  for (const k of ["in_flight", "parked", "open_tunnels", "open_connections"])
    document.getElementById("t-" + k).textContent = s.totals[k];
  const body = document.querySelector("#backends tbody");
  body.replaceChildren();
  if (s.backends.length === 0) {
    const tr = el("tr"); const td = el("td", "no backend connected", "empty"); td.colSpan = 6; tr.appendChild(td); body.appendChild(tr);
  }
  for (const b of s.backends) {
    const tr = el("tr");
    tr.dataset.backend = b.name;
    tr.appendChild(el("td", b.name));
    const agents = el("td", undefined, "agents");
    for (const a of b.agents) agents.appendChild(el("div", a.addr + " · " + a.version + " · " + a.protocol + " · since " + ago(s.now - a.since)));
    tr.appendChild(agents);
    tr.appendChild(el("td", b.requests, "num requests"));
    tr.appendChild(el("td", b.rps.toFixed(2), "num rps"));
    tr.appendChild(el("td", (100 * b.error_rate).toFixed(1) + "%", "num" + (b.error_rate > 0 ? " bad" : "")));
    const spark = el("td"); spark.appendChild(sparkline(b.series)); tr.appendChild(spark);
    body.appendChild(tr);
  }
  const cl = document.getElementById("cluster");
  cl.hidden = !s.cluster;
  if (s.cluster) {
    document.getElementById("cluster-meta").textContent = "this replica " + s.cluster.replica +
      " · Redis " + s.cluster.redis + " · replicas: " + s.cluster.replicas.map(r => r.replica + " " + r.url).join(", ");
    const cb = document.querySelector("#cluster-names tbody");
    cb.replaceChildren();
    for (const n of s.cluster.names) {
      const tr = el("tr");
      tr.appendChild(el("td", n.name));
      tr.appendChild(el("td", n.replicas.join(", ")));
      cb.appendChild(tr);
    }
  }
  const errs = document.querySelector("#errors tbody");
  errs.replaceChildren();
  if (s.recent_errors.length === 0) {
    const tr = el("tr"); const td = el("td", "none", "empty"); td.colSpan = 4; tr.appendChild(td); errs.appendChild(tr);
  }
  for (const e of s.recent_errors) {
    const tr = el("tr");
    tr.appendChild(el("td", new Date(e.time * 1000).toLocaleTimeString()));
    tr.appendChild(el("td", e.name));
    tr.appendChild(el("td", e.status, "num bad"));
    tr.appendChild(el("td", e.message));
    errs.appendChild(tr);
  }
  document.body.dataset.loaded = "1";
}
async function refresh() {
  try {
    const r = await fetch("status.json", { cache: "no-store" });
    if (!r.ok) throw new Error(r.status);
    render(await r.json());
    document.getElementById("stale").style.display = "none";
  } catch (e) {
    document.getElementById("stale").style.display = "inline";
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"##;
