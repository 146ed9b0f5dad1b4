// raytimm's page: try the served model, watch the training API's runs. Plain JS, no libraries, no build.
// Everything shown comes from this server's HTTP API; text goes in with textContent only.
"use strict";

const TOKEN_KEY = "raytimm.token"; // sessionStorage: this tab only, never in a URL
const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
const authRequired = document.body.dataset.auth === "required";
const trainingOn = document.body.dataset.training === "on";
const state = { selected: null, selectedDone: false, confusionFor: null, timer: null, busy: false };

class AuthNeeded extends Error {}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function pct(x, digits = 1) {
  return `${(100 * x).toFixed(digits)} %`;
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", `Bearer ${token}`);
  const response = await fetch(path, { ...options, headers });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken("The server refused that token.");
    throw new AuthNeeded();
  }
  if (!response.ok) throw new Error((body && body.detail) || `HTTP ${response.status}`);
  return body;
}

// ---------------------------------------------------------------- token

function askForToken(message = "") {
  stopPolling();
  $("token-panel").hidden = false;
  $("try").hidden = true;
  $("training").hidden = true;
  $("forget-token").hidden = true;
  $("token-error").textContent = message;
  $("token").focus();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("token").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token").value = "";
  start();
});

$("forget-token").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  askForToken();
});

// ---------------------------------------------------------------- try the model

async function loadModel() {
  const meta = await api("/model");
  $("model-name").textContent = meta.model_name ? `model: ${meta.model_name}` : "";
  const names = meta.class_names || [];
  const kind = meta.multi_label ? "multi-label, " : "";
  $("model-info").textContent =
    `${meta.model_name || "?"} (${kind}${meta.num_classes || names.length} classes)` +
    (meta.epoch != null ? `, epoch ${meta.epoch}` : "");
  $("class-count").textContent = String(names.length);
  $("class-list").replaceChildren(...names.map((n) => el("li", { text: n })));
}

function renderPrediction(result) {
  const preds = result.top_k_predictions || [];
  $("predicted").textContent = result.predicted_class != null
    ? `Predicted: ${result.predicted_class} (${pct(result.confidence)})` : "";
  $("bars").replaceChildren(...preds.map((p) => {
    const fill = el("span", { class: "bar-fill" });
    fill.style.width = `${Math.max(0, Math.min(1, p.confidence)) * 100}%`;
    return el("li", { class: "bar" },
      el("span", { class: "bar-label", text: p.class_name, title: p.class_name }),
      el("span", { class: "bar-track", "aria-hidden": "true" }, fill),
      el("span", { class: "bar-value", text: pct(p.confidence) }));
  }));
  const labels = Array.isArray(result.labels) ? result.labels : null;
  $("labels").hidden = labels === null;
  if (labels) {
    $("label-list").replaceChildren(...(labels.length ? labels.map((l) =>
      el("li", { text: `${l.class_name} (${pct(l.confidence)})` })) : [el("li", { text: "none" })]));
  }
}

async function predict(file) {
  $("predict-error").textContent = "";
  const preview = $("preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  const form = new FormData();
  form.append("file", file, file.name || "image");
  form.append("top_k", $("top-k").value);
  try {
    const result = await api("/predict", { method: "POST", body: form });
    renderPrediction(result);
    $("result").hidden = false;
  } catch (e) {
    if (!(e instanceof AuthNeeded)) $("predict-error").textContent = e.message;
  }
}

$("file").addEventListener("change", () => {
  if ($("file").files.length) predict($("file").files[0]);
});
$("top-k").addEventListener("change", () => {
  if ($("file").files.length) predict($("file").files[0]);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) predict(e.dataTransfer.files[0]);
});

// ---------------------------------------------------------------- training runs

function progressBar(value) {
  const v = Math.max(0, Math.min(1, Number(value) || 0));
  const fill = el("span", { class: "progress-fill" });
  fill.style.width = `${v * 100}%`;
  return el("div", { class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
                     "aria-valuenow": String(Math.round(v * 100)) },
    fill, el("span", { class: "progress-text", text: `${Math.round(v * 100)} %` }));
}

function metric(m, key, digits = 1) {
  const v = m && m[key];
  return typeof v === "number" ? v.toFixed(digits) : "–";
}

function jobRow(job) {
  const id = String(job.training_job_id);
  const active = job.state === "PENDING" || job.state === "RUNNING";
  const stop = el("button", { type: "button", class: "secondary", text: "Stop" });
  stop.disabled = !active;
  stop.addEventListener("click", async (event) => {
    event.stopPropagation();
    stop.disabled = true;
    try {
      await api(`/training/${encodeURIComponent(id)}/stop`, { method: "POST" });
      refresh();
    } catch (e) {
      if (!(e instanceof AuthNeeded)) $("training-error").textContent = e.message;
    }
  });
  const row = el("tr", { "data-job": id },
    el("td", { "data-label": "Job", text: job.run_name }),
    el("td", { "data-label": "State" }, el("span", { class: `state state-${job.state}`, text: job.state })),
    el("td", { "data-label": "Progress" }, progressBar(job.progress)),
    el("td", { "data-label": "Epoch", text: `${job.epoch}/${job.epochs ?? "?"}` }),
    el("td", { "data-label": "val/top1", text: metric(job.metrics, "val/top1") }),
    el("td", { "data-label": "" }, stop));
  if (state.selected === id) row.classList.add("selected");
  row.addEventListener("click", () => select(id));
  return row;
}

function drawChart(svg, history, series, yLabel) {
  const W = 320, H = 190, L = 44, R = 10, T = 10, B = 40;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const points = series.map((s) => history.filter((h) => typeof h[s.key] === "number" && typeof h.epoch === "number")
    .map((h) => [h.epoch, h[s.key]]));
  const all = points.flat();
  if (!all.length) {
    const t = svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" });
    t.textContent = "no finished epoch yet";
    svg.append(t);
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(svgEl("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
             svgEl("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  const label = (x, y, text, anchor) => {
    const t = svgEl("text", { x, y, "text-anchor": anchor });
    t.textContent = text;
    svg.append(t);
  };
  label(L - 4, T + 8, y1.toPrecision(3), "end");
  label(L - 4, H - B, y0.toPrecision(3), "end");
  label(L, H - B + 14, `epoch ${x0}`, "start");
  label(W - R, H - B + 14, `${x1}`, "end");
  series.forEach((s, i) => {
    const pts = points[i];
    if (!pts.length) return;
    svg.append(svgEl("polyline", { class: `s${i}`, points: pts.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" ") }));
    for (const [x, y] of pts) {
      const c = svgEl("circle", { class: `p${i}`, cx: sx(x), cy: sy(y), r: 3 });
      const title = svgEl("title");
      title.textContent = `${s.label}, epoch ${x}: ${y.toPrecision(4)}`;
      c.append(title);
      svg.append(c);
    }
    // Legend: the line style and the name, so the series read without colour.
    const ly = H - 8, lx = L + i * 130;
    svg.append(svgEl("line", { class: `s${i}`, x1: lx, y1: ly - 4, x2: lx + 22, y2: ly - 4 }));
    label(lx + 26, ly, s.label, "start");
  });
  svg.setAttribute("aria-label", `${yLabel}: ${series.map((s, i) => `${s.label} ${points[i].length} points`).join(", ")}`);
}

function renderConfusion(data) {
  const box = $("confusion");
  const cm = data && data.confusion_matrix;
  if (!Array.isArray(cm) || !cm.length) {
    box.replaceChildren(el("p", { class: "muted", text: "no confusion matrix in the best checkpoint" }));
    return;
  }
  const names = data.class_names.length === cm.length ? data.class_names : cm.map((_, i) => String(i));
  const head = el("tr", {}, el("th", { text: "true \\ predicted" }), ...names.map((n) => el("th", { scope: "col", text: n })));
  const rows = cm.map((row, i) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    return el("tr", {}, el("th", { scope: "row", text: names[i] }), ...row.map((v, j) => {
      const td = el("td", { class: i === j ? "diag" : "", text: String(v), title: `${names[i]} → ${names[j]}: ${v}` });
      td.style.backgroundColor = `rgba(47, 111, 208, ${(0.6 * v) / total})`;
      return td;
    }));
  });
  box.replaceChildren(el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)));
}

async function loadDetail(id) {
  const job = await api(`/training/${encodeURIComponent(id)}`);
  if (state.selected !== id) return;
  $("job-detail").hidden = false;
  $("job-title").textContent = `${job.run_name}: ${job.state}, epoch ${job.epoch}/${job.epochs ?? "?"} (${pct(job.progress, 0)})`;
  $("job-message").textContent = job.message || "";
  $("job-best").textContent = job.best_checkpoint
    ? `best: val/top1 ${metric(job.best_metrics, "val/top1")} at epoch ${metric(job.best_metrics, "epoch", 0)}, ${job.best_checkpoint}`
    : "no checkpoint yet";
  const history = job.history || [];
  drawChart($("chart-loss"), history, [{ key: "train/loss", label: "train loss" }, { key: "val/loss", label: "val loss" }], "loss");
  drawChart($("chart-acc"), history, [{ key: "train/top1", label: "train top-1" }, { key: "val/top1", label: "val top-1" }], "top-1 %");
  if (job.best_checkpoint && state.confusionFor !== job.best_checkpoint) {
    state.confusionFor = job.best_checkpoint;
    renderConfusion(await api(`/training/${encodeURIComponent(id)}/confusion`));
  } else if (!job.best_checkpoint) {
    $("confusion").replaceChildren();
  }
  state.selectedDone = !(job.state === "PENDING" || job.state === "RUNNING");
}

function select(id) {
  state.selected = id;
  state.selectedDone = false;
  state.confusionFor = null;
  for (const row of document.querySelectorAll("#jobs tbody tr")) row.classList.toggle("selected", row.dataset.job === id);
  loadDetail(id).catch(showTrainingError);
}

function showTrainingError(e) {
  if (!(e instanceof AuthNeeded)) $("training-error").textContent = e.message;
}

async function refresh() {
  if (state.busy) return; // a slow answer: skip this tick rather than pile requests up
  state.busy = true;
  try {
    const { jobs } = await api("/training");
    $("training-error").textContent = "";
    $("jobs-empty").hidden = jobs.length > 0;
    $("jobs").hidden = jobs.length === 0;
    $("jobs").tBodies[0].replaceChildren(...jobs.map(jobRow));
    if (state.selected === null && jobs.length) select(String(jobs[0].training_job_id));
    else if (state.selected !== null) {
      const current = jobs.find((j) => String(j.training_job_id) === state.selected);
      const active = current && (current.state === "PENDING" || current.state === "RUNNING");
      if (active || !state.selectedDone) await loadDetail(state.selected);
    }
  } catch (e) {
    showTrainingError(e);
  } finally {
    state.busy = false;
  }
}

function stopPolling() {
  if (state.timer !== null) clearInterval(state.timer);
  state.timer = null;
}

// ---------------------------------------------------------------- start

async function start() {
  if (authRequired && !sessionStorage.getItem(TOKEN_KEY)) {
    askForToken();
    return;
  }
  $("token-panel").hidden = true;
  $("forget-token").hidden = !authRequired;
  try {
    await loadModel();
  } catch (e) {
    if (e instanceof AuthNeeded) return;
    $("model-info").textContent = `the model is not available: ${e.message}`;
  }
  $("try").hidden = false;
  if (trainingOn) {
    $("training").hidden = false;
    stopPolling();
    await refresh();
    state.timer = setInterval(refresh, POLL_MS);
  }
}

start();
