// EdgeFleet dashboard: one page over the JSON API (docs/api.md). No framework; uPlot for charts.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { sort: "device_id", order: "asc", page: 1, perPage: 50, timer: null, stream: null, charts: [] };
const TOKEN_KEY = "edgefleet-dashboard-token";

function esc(v) {
  return String(v ?? "—").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function ms(v) { return v == null ? "—" : (v < 10 ? v.toFixed(2) : v.toFixed(1)); }
function power(w, source, estimated) {
  if (w == null) return "not measured";
  return estimated ? `<span class="est" title="${esc(source)}">≈${w.toFixed(2)} W (est.)</span>` : `${w.toFixed(2)} W`;
}
function age(s) {
  if (s == null) return "never";
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return s < 86400 ? `${(s / 3600).toFixed(1)} h ago` : `${(s / 86400).toFixed(1)} d ago`;
}
function when(ts) { return ts == null ? "—" : new Date(ts * 1000).toLocaleString(); }
function token() { return $("#token").value.trim(); }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const res = await fetch(path, Object.assign({}, options, { headers }));
  const body = await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) { const err = new Error(body.error || res.statusText); err.status = res.status; throw err; }
  return body;
}

function showError(err) {
  const el = $("#error");
  el.hidden = !err;
  el.textContent = err ? String(err.message || err) : "";
}

function show(view) {
  for (const v of ["fleet", "device", "artifacts", "pushes", "optimize"]) $(`#view-${v}`).hidden = v !== view;
}

function stopLive() {
  if (state.timer) clearInterval(state.timer);
  if (state.stream) state.stream.close();
  for (const c of state.charts) c.destroy();
  state.timer = null; state.stream = null; state.charts = [];
}

// -- fleet -----------------------------------------------------------------------------------
async function loadFleet() {
  const q = new URLSearchParams({ sort: state.sort, order: state.order, page: state.page, per_page: state.perPage });
  if ($("#f-group").value) q.set("group", $("#f-group").value);
  if ($("#f-state").value) q.set("state", $("#f-state").value);
  if ($("#f-search").value.trim()) q.set("search", $("#f-search").value.trim());
  const data = await api(`/api/devices?${q}`);
  const rows = data.devices.map((d) => `<tr data-device="${esc(d.device_id)}">
    <td><a href="#/device/${encodeURIComponent(d.device_id)}">${esc(d.device_id)}</a></td>
    <td class="state-${esc(d.state)}">${esc(d.state)}</td><td>${esc(d.profile)}</td><td>${esc(d.group)}</td>
    <td>${esc(d.model || (d.artifact_id || "").slice(0, 12) || null)}</td>
    <td class="num">${ms(d.p50_ms)}</td><td class="num${d.over_objective ? " over" : ""}">${ms(d.p95_ms)}</td>
    <td class="num" title="${esc(d.policy_scope)}">${ms(d.objective_p95_ms)}</td>
    <td>${power(d.power_w, d.power_source, d.power_estimated)}</td>
    <td class="num">${d.temperature_c == null ? "—" : d.temperature_c.toFixed(0) + " °C"}</td>
    <td>${age(d.last_seen_age_s)}</td></tr>`);
  $("#fleet tbody").innerHTML = rows.join("");
  const groupSel = $("#f-group"), chosen = groupSel.value;
  groupSel.innerHTML = '<option value="">all</option>' + data.groups.map((g) => `<option>${esc(g)}</option>`).join("");
  groupSel.value = chosen;
  $("#counts").textContent = `${data.total} shown · ${data.counts.online} online · ${data.counts.offline} offline · ${data.counts.unregistered} unregistered`;
  $("#page-info").textContent = `page ${data.page} of ${data.pages}`;
  $("#prev").disabled = data.page <= 1;
  $("#next").disabled = data.page >= data.pages;
  for (const th of document.querySelectorAll("#fleet th[data-sort]")) {
    th.classList.toggle("asc", th.dataset.sort === state.sort && state.order === "asc");
    th.classList.toggle("desc", th.dataset.sort === state.sort && state.order === "desc");
  }
  document.body.dataset.loaded = "fleet";
  // ms from navigation to the first table drawn (the page-load test reads it)
  if (!document.body.dataset.firstLoadMs) document.body.dataset.firstLoadMs = performance.now().toFixed(0);
}

function fleetView() {
  show("fleet");
  const refresh = () => loadFleet().then(() => showError(null), showError);
  refresh();
  state.timer = setInterval(refresh, 5000);
}

// -- device ----------------------------------------------------------------------------------
function makeChart(el, title, series, width) {
  const opts = {
    width, height: 220, title, scales: { x: { time: true } },
    series: [{}].concat(series.map((s) => ({ label: s.label, stroke: s.color, width: 2, spanGaps: true }))),
    axes: [{}, {}],
  };
  return new uPlot(opts, [[]].concat(series.map(() => [])), el);
}

async function deviceView(deviceId) {
  show("device");
  $("#action-msg").textContent = "";
  $("#action-msg").className = "";
  const [detail, series] = await Promise.all([
    api(`/api/devices/${encodeURIComponent(deviceId)}`),
    api(`/api/devices/${encodeURIComponent(deviceId)}/telemetry?limit=300`),
  ]);
  renderDevice(detail);
  loadPushChoices(detail.profile).catch(showError);
  const width = Math.max(400, $("#view-device").clientWidth - 20);
  $("#chart-latency").innerHTML = ""; $("#chart-power").innerHTML = "";
  const lat = makeChart($("#chart-latency"), "field latency", [{ label: "p50 ms", color: "#1a73e8" }, { label: "p95 ms", color: "#e8710a" }], width);
  const pow = makeChart($("#chart-power"), "power", [{ label: "W", color: "#137333" }], width);
  state.charts = [lat, pow];
  const data = { x: [], p50: [], p95: [], w: [] };
  const add = (r) => {
    data.x.push(r.ts); data.p50.push(r.p50_ms); data.p95.push(r.p95_ms); data.w.push(r.power_w);
    if (data.x.length > 2000) for (const k of Object.keys(data)) data[k].shift();
  };
  const redraw = () => {
    lat.setData([data.x, data.p50, data.p95]);
    pow.setData([data.x, data.w]);
    const points = $("#points");
    points.dataset.points = String(data.x.length);
    points.textContent = `${data.x.length} reports, live`;
  };
  series.telemetry.forEach(add);
  redraw();
  const last = series.telemetry[series.telemetry.length - 1];
  const q = new URLSearchParams(last ? { after_ts: last.ts, after_seq: last.seq } : {});
  if (token()) q.set("access_token", token());
  state.stream = new EventSource(`/api/devices/${encodeURIComponent(deviceId)}/telemetry/stream?${q}`);
  state.stream.addEventListener("telemetry", (ev) => { add(JSON.parse(ev.data)); redraw(); });
  state.timer = setInterval(() => api(`/api/devices/${encodeURIComponent(deviceId)}`).then(renderDevice, showError), 5000);
  document.body.dataset.loaded = "device";
}

function renderDevice(d) {
  $("#d-title").textContent = d.device_id;
  $("#d-facts").innerHTML = `<span class="state-${esc(d.state)}">${esc(d.state)}</span>
    <span>profile ${esc(d.profile)}</span><span>group ${esc(d.group)}</span><span>agent ${esc(d.agent_version)}</span>
    <span>p50 ${ms(d.p50_ms)} ms · <span class="${d.over_objective ? "over" : ""}">p95 ${ms(d.p95_ms)} ms</span>
      ${d.objective_p95_ms == null ? "" : `(objective ${ms(d.objective_p95_ms)} ms, ${esc(d.policy_scope)})`}</span><span>${power(d.power_w, d.power_source, d.power_estimated)}</span>
    <span>${d.temperature_c == null ? "" : d.temperature_c.toFixed(0) + " °C"}</span><span>seen ${age(d.last_seen_age_s)}</span>`;
  const slot = (s) => (s ? `${esc(s.model || "")} <code>${esc(s.artifact_id.slice(0, 12))}</code>` : "—");
  $("#d-slots").innerHTML = `active: ${slot(d.slots.active)} · previous: ${slot(d.slots.previous)} `;
  $("#d-slots").dataset.active = d.slots.active ? d.slots.active.artifact_id : "";
  $("#d-deployments tbody").innerHTML = d.deployments.slice(-50).reverse().map((e) => `<tr><td>${when(e.ts)}</td>
    <td>${esc(e.kind)}</td><td><code>${esc((e.artifact_id || "").slice(0, 12) || null)}</code></td>
    <td>${esc(e.deployment_id)}</td><td>${esc(e.detail.reason || e.detail.error || "")}</td></tr>`).join("");
  const bench = (label, s) => {
    const b = s && d.benchmarks[s.artifact_id];
    return s ? `<tr><td>${label}</td><td><code>${esc(s.artifact_id.slice(0, 12))}</code></td><td class="num">${ms(b && b.p50_ms)}</td>
      <td class="num">${ms(b && b.p95_ms)}</td><td>${b ? power(b.power_w, b.power_source, (b.power_source || "").startsWith("estimate")) : "—"}</td></tr>` : "";
  };
  $("#d-benchmarks tbody").innerHTML = bench("active", d.slots.active) + bench("previous", d.slots.previous);
  $("#d-loop tbody").innerHTML = d.loop_events.slice(-50).reverse().map((e) => `<tr><td>${when(e.ts)}</td>
    <td>${esc(e.kind.replace(/^loop\./, ""))}</td><td><code>${esc((e.artifact_id || "").slice(0, 12) || null)}</code></td>
    <td>${esc(e.detail.reason || "")}</td></tr>`).join("");
  $("#rollback").disabled = !d.slots.previous || d.state !== "online";
  $("#push").disabled = d.state === "unregistered";
  if (document.activeElement !== $("#objective")) $("#objective").value = d.objective_p95_ms ?? "";
  $("#rollback").dataset.device = d.device_id;
}

async function act(what, body) {
  const deviceId = $("#rollback").dataset.device;
  const msg = $("#action-msg");
  msg.className = ""; msg.textContent = what === "push" ? "pushing…" : "rolling back…";
  $("#rollback").disabled = $("#push").disabled = true;
  try {
    const out = await api(`/api/devices/${encodeURIComponent(deviceId)}/${what}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: body ? JSON.stringify(body) : undefined });
    msg.className = out.ok ? "done" : "refused";
    msg.textContent = `${what === "push" ? "pushed" : "rolled back"}: ${out.state}, now on ${out.model || out.artifact_id}`;
  } catch (err) {
    msg.className = "refused";
    msg.textContent = `refused (${err.status || "error"}): ${err.message}`;
  }
  renderDevice(await api(`/api/devices/${encodeURIComponent(deviceId)}`));
}

async function setObjective() {
  const deviceId = $("#rollback").dataset.device;
  const msg = $("#action-msg");
  try {
    const out = await api(`/api/policies/device:${encodeURIComponent(deviceId)}`, {
      method: "PATCH", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ objective: { latency_p95_ms: Number($("#objective").value) } }) });
    msg.className = "done";
    msg.textContent = `policy of ${out.scope}: p95 objective ${out.policy.latency_p95_ms} ms`;
  } catch (err) {
    msg.className = "refused";
    msg.textContent = `refused (${err.status || "error"}): ${err.message}`;
  }
  renderDevice(await api(`/api/devices/${encodeURIComponent(deviceId)}`));
}

async function loadPushChoices(profile) {
  const data = await api("/api/artifacts");
  $("#push-artifact").innerHTML = data.artifacts.filter((a) => a.profile === profile)
    .map((a) => `<option value="${esc(a.artifact_id)}">${esc(a.model)} ${esc(a.precision)} ${esc(a.artifact_id.slice(0, 12))}</option>`).join("");
}

// -- artifacts, pushes -------------------------------------------------------------------------
function size(n) { return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`; }
function figures(m) {
  const flat = [];
  const walk = (o, p) => {
    for (const [k, v] of Object.entries(o || {})) {
      if (v && typeof v === "object") walk(v, `${p}${k}.`);
      else if (typeof v === "number") flat.push(`${p}${k}=${Number.isInteger(v) ? v : v.toPrecision(3)}`);
    }
  };
  walk(m, "");
  return flat.slice(0, 6).join(" ");
}

async function artifactsView() {
  show("artifacts");
  const data = await api("/api/artifacts");
  $("#artifacts tbody").innerHTML = data.artifacts.map((a) => `<tr><td><code title="${esc(a.artifact_id)}">${esc(a.artifact_id.slice(0, 12))}</code></td>
    <td>${esc(a.model)}</td><td>${esc(a.profile)}</td><td>${esc(a.runtime)}</td><td>${esc(a.precision)}</td>
    <td class="num">${size(a.size_bytes)}</td><td><code>${esc(a.key_id)}</code></td><td>${esc(figures(a.verification))}</td>
    <td>${when(a.created_at)}</td></tr>`).join("");
  document.body.dataset.loaded = "artifacts";
}

async function pushesView() {
  show("pushes");
  const refresh = async () => {
    const data = await api("/api/pushes");
    $("#deployments tbody").innerHTML = data.deployments.map((d) => `<tr data-device="${esc(d.device_id)}">
      <td><a href="#/device/${encodeURIComponent(d.device_id)}">${esc(d.device_id)}</a></td>
      <td><code>${esc((d.artifact_id || "").slice(0, 12) || null)}</code></td><td>${esc(d.stage)}</td>
      <td><progress max="1" value="${d.progress}"></progress>${d.bytes_total ? ` ${size(d.bytes_done)} / ${size(d.bytes_total)}` : ""}</td>
      <td class="${d.state === "active" ? "done" : d.final ? "refused" : ""}">${esc(d.state)}</td>
      <td>${when(d.started)}</td><td>${esc(d.error || "")}</td></tr>`).join("");
    $("#pushes tbody").innerHTML = data.pushes.map((p) => `<tr><td>${esc(p.push_id)}</td><td>${esc(p.target)}</td>
      <td>${esc((p.plan.devices || []).length)}</td><td>${esc((p.plan.canaries || []).join(", ") || "none")}</td>
      <td>${esc(p.plan.stage)}</td><td>${esc(p.state)}</td><td>${when(p.created_at)}</td><td>${when(p.finished_at)}</td><td>${esc(p.reason)}</td></tr>`).join("");
    document.body.dataset.loaded = "pushes";
  };
  await refresh();
  state.timer = setInterval(() => refresh().catch(showError), 5000);
}

// -- builder optimize: the Pareto front of a run (device latency against quality), hover for the recipe
async function optimizeView() {
  show("optimize");
  const runs = (await api("/api/optimize-runs")).runs;
  const sel = $("#o-run");
  sel.innerHTML = runs.map((r) => `<option value="${esc(r.id)}">${esc(r.study || r.id)} (${esc(r.trials)} trials)</option>`).join("");
  $("#o-info").textContent = runs.length ? "" : "no runs: start serve with --http-reports DIR (builder optimize --out folders)";
  sel.onchange = () => drawPareto(sel.value).catch(showError);
  if (runs.length) await drawPareto(runs[0].id);
  document.body.dataset.loaded = "optimize";
}

async function drawPareto(runId) {
  for (const c of state.charts) c.destroy();
  const run = await api(`/api/optimize-runs/${runId.split("/").map(encodeURIComponent).join("/")}`);
  const pts = run.candidates.filter((c) => c.device_latency_ms != null && c.quality != null)
    .sort((a, b) => a.device_latency_ms - b.device_latency_ms);
  const x = pts.map((c) => c.device_latency_ms);
  const all = pts.map((c) => c.quality);
  const front = pts.map((c) => (c.on_front ? c.quality : null));
  $("#o-info").textContent = `${pts.length} candidates · quality: ${run.quality_is || "?"} · chosen: ${run.chosen ? run.chosen.recipe : "none"}`;
  $("#chart-pareto").innerHTML = "";
  const chart = new uPlot({
    width: Math.max(400, $("#view-optimize").clientWidth - 20), height: 320, title: "device latency (ms) vs quality",
    scales: { x: { time: false } },
    series: [{ label: "latency ms" },
      { label: "candidates", stroke: "#9aa0a6", paths: () => null, points: { show: true, size: 7 } },
      { label: "Pareto front", stroke: "#1a73e8", width: 2, spanGaps: true, points: { show: true, size: 9 } }],
    hooks: { setCursor: [(u) => {
      const c = u.cursor.idx == null ? null : pts[u.cursor.idx];
      $("#o-hover").textContent = c ? `trial ${c.trial}: ${c.recipe} — ${ms(c.device_latency_ms)} ms (${c.latency_source}), quality ${c.quality.toFixed(4)}, ${c.download_bytes == null ? "?" : size(c.download_bytes)}${c.on_front ? ", on the front" : ""}` : "hover a point to see its recipe";
    }] },
  }, [x, all, front], $("#chart-pareto"));
  state.charts = [chart];
  $("#chart-pareto").dataset.points = String(pts.length);
}

// -- routing ---------------------------------------------------------------------------------
function route() {
  stopLive();
  showError(null);
  document.body.dataset.loaded = "";
  const hash = location.hash.replace(/^#/, "") || "/";
  const device = hash.match(/^\/device\/(.+)$/);
  const done = device ? deviceView(decodeURIComponent(device[1]))
    : hash === "/artifacts" ? artifactsView() : hash === "/pushes" ? pushesView()
    : hash === "/optimize" ? optimizeView() : Promise.resolve(fleetView());
  done.catch(showError);
}

window.addEventListener("DOMContentLoaded", () => {
  $("#token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("#token").addEventListener("change", () => sessionStorage.setItem(TOKEN_KEY, token()));
  for (const th of document.querySelectorAll("#fleet th[data-sort]")) {
    th.addEventListener("click", () => {
      state.order = state.sort === th.dataset.sort && state.order === "asc" ? "desc" : "asc";
      state.sort = th.dataset.sort;
      state.page = 1;
      loadFleet().catch(showError);
    });
  }
  for (const id of ["#f-group", "#f-state"]) $(id).addEventListener("change", () => { state.page = 1; loadFleet().catch(showError); });
  $("#f-search").addEventListener("input", () => { state.page = 1; loadFleet().catch(showError); });
  $("#prev").addEventListener("click", () => { state.page -= 1; loadFleet().catch(showError); });
  $("#next").addEventListener("click", () => { state.page += 1; loadFleet().catch(showError); });
  $("#rollback").addEventListener("click", () => act("rollback"));
  $("#push").addEventListener("click", () => act("push", { artifact_id: $("#push-artifact").value }));
  $("#set-objective").addEventListener("click", setObjective);
  window.addEventListener("hashchange", route);
  route();
});
