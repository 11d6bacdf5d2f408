// The steering page: plain JS, no framework, no build step (see caa_local/serve/web.py).
// Answers stream over fetch + ReadableStream (EventSource cannot POST); compare mode sends two
// requests at once, unsteered and steered, each with its own AbortController, so two slots
// answer side by side.
import { drawCalibration } from "./chart.js";
import { createPresets } from "./presets.js";

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem("caa-key") || "",
  vectors: new Map(),   // id -> /v1/vectors entry
  active: [],           // [{vector, scale, layer}]
  turns: [],            // [{user, answers: [{kind, label, steering, text, finish}]}]
  controllers: [],
  online: false,
  nLayer: 0,
};
window.caaMetrics = { firstTokenMs: null };

// -- small DOM helpers ------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children) node.append(child);
  return node;
}
function showError(message) {
  const box = $("alert");
  box.textContent = message;
  box.hidden = !message;
}
const fmt = (x) => (x > 0 ? "+" : "") + Number(x).toFixed(2).replace(/\.?0+$/, "");

// -- HTTP ---------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}
async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  if (options.body) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    setOnline(false);
    throw new ApiError("The server is not reachable; reconnecting…", 0);
  }
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error.message || message; } catch (_) { /* not JSON */ }
    if (response.status === 401) askKey(message);
    throw new ApiError(message, response.status);
  }
  return response;
}

function askKey(message) {
  $("key-button").hidden = false;
  const dialog = $("key-dialog");
  if (dialog.open) return;
  $("key-input").value = "";
  dialog.querySelector("label").firstChild.textContent = message + " — API key ";
  dialog.showModal();
}

// -- connection and library ----------------------------------------------------------------
function setOnline(online) {
  state.online = online;
  $("conn").textContent = online ? "● connected" : "○ reconnecting…";
  $("conn").className = "conn " + (online ? "ok" : "down");
}

async function connect() {
  try {
    const health = await (await fetch("/health")).json();
    setOnline(true);
    $("model").textContent = health.model;
    $("key-button").hidden = !health.auth;
    if (health.auth && !state.key) { askKey("This server needs an API key."); return; }
    await loadLibrary();
    await presets.load();
    showError("");
  } catch (err) {
    if (err instanceof ApiError && err.status) { showError(err.message); return; }
    setOnline(false);
    setTimeout(connect, 2000);
  }
}

async function watchHealth() {
  // Reconnect after a server restart: poll /health while offline, then reload the library.
  if (!state.online) return;
  try {
    const response = await fetch("/health", { cache: "no-store" });
    if (!response.ok) throw new Error();
  } catch (_) {
    setOnline(false);
    showError("Lost the server; reconnecting…");
    connect();
  }
}

async function loadLibrary() {
  const data = await (await api("/v1/vectors")).json();
  state.nLayer = data.n_layer;
  state.vectors = new Map(data.data.map((v) => [v.id, v]));
  const list = $("library");
  list.replaceChildren();
  for (const v of data.data) {
    if (v.kind === "condition") {  // gates a term ("when"); steers nothing itself
      list.append(el("li", { class: v.fits ? "" : "unfit" },
        el("div", { class: "row" }, el("strong", {}, v.id), el("span", { class: "badge ok" }, "condition")),
        el("div", { class: "muted" }, "choose it in a vector's “when” menu")));
      continue;
    }
    const recommended = v.recommended_layer !== null
      ? `layer ${v.recommended_layer}, x${fmt(v.recommended_multiplier ?? 1)}` : `layers ${v.layers.join(",")}`;
    const item = el("li", { class: v.fits ? "" : "unfit" },
      el("div", { class: "row" },
        el("strong", {}, v.id),
        el("span", { class: "badge " + (v.fits ? "ok" : "bad"), title: v.problem || "fits the loaded model" },
          v.fits ? "fits" : "does not fit"),
        el("button", { type: "button", class: "add", "aria-label": `Add ${v.id}`, disabled: !v.fits,
          onclick: () => addTerm(v.id) }, "Add")),
      el("div", { class: "muted" }, (v.behavior && v.behavior !== v.id ? v.behavior + " · " : "") + recommended));
    if (!v.fits && v.problem) item.append(el("div", { class: "muted" }, v.problem));
    if (v.calibration) {
      const figure = el("figure", { class: "calib" });
      drawCalibration(figure, v.calibration, v.recommended_multiplier);
      item.append(figure);
    }
    list.append(item);
  }
  if (!state.active.length && data.default_steering.length) {
    state.active = data.default_steering.map((t) => ({ vector: t.vector, scale: t.scale, layer: t.layers.join(",") }));
  }
  renderActive();
}

// -- active steering -------------------------------------------------------------------------
function sliderRange(v) {
  const curve = v.calibration?.curve?.map((p) => p.multiplier) || [];
  if (curve.length >= 2) return [Math.min(...curve), Math.max(...curve)];
  const m = Math.max(2, Math.abs(v.recommended_multiplier ?? 1) * 2);
  return [-m, m];
}

function addTerm(id) {
  const v = state.vectors.get(id);
  const layer = v.recommended_layer ?? v.layers[0];
  state.active.push({ vector: id, scale: v.recommended_multiplier ?? 1, layer: String(layer) });
  renderActive();
  const sliders = document.querySelectorAll("#active input[type=range]");
  sliders[sliders.length - 1]?.focus();
}

function renderActive() {
  const list = $("active");
  list.replaceChildren();
  $("active-empty").hidden = state.active.length > 0;
  state.active.forEach((term, i) => {
    const v = state.vectors.get(term.vector);
    const [lo, hi] = v ? sliderRange(v) : [-5, 5];
    const value = el("output", { id: `scale-out-${i}` }, fmt(term.scale));
    const slider = el("input", { type: "range", min: lo, max: hi, step: (hi - lo) / 40, value: term.scale,
      id: `scale-${i}`, "aria-label": `${term.vector} strength`,
      oninput: (e) => { term.scale = Number(e.target.value); value.textContent = fmt(term.scale); } });
    const layers = v ? v.layers : [Number(term.layer)];
    const select = el("select", { "aria-label": `${term.vector} layer`, onchange: (e) => { term.layer = e.target.value; } },
      ...layers.map((l) => el("option", { value: String(l), selected: String(l) === String(term.layer) }, `layer ${l}`)));
    if (layers.length > 1) select.append(el("option", { value: "all", selected: term.layer === "all" }, "all layers"));
    const conditions = [...state.vectors.values()].filter((c) => c.kind === "condition" && c.fits).map((c) => c.id);
    const when = el("select", { "aria-label": `${term.vector} when`, onchange: (e) => { term.when = e.target.value; } },
      el("option", { value: "" }, "always"),
      ...conditions.flatMap((c) => [el("option", { value: c, selected: term.when === c }, `when ${c}`),
        el("option", { value: "!" + c, selected: term.when === "!" + c }, `unless ${c}`)]));
    list.append(el("li", {},
      el("div", { class: "row" }, el("label", { for: `scale-${i}` }, el("strong", {}, term.vector)), value, select,
        ...(conditions.length ? [when] : []),
        el("button", { type: "button", "aria-label": `Remove ${term.vector}`,
          title: "Remove", onclick: () => { state.active.splice(i, 1); renderActive(); } }, "✕")),
      slider));
  });
}

function steeringBody() {
  return state.active.map((t) => ({ vector: t.vector, scale: t.scale, layers: t.layer,
    ...(t.when ? { when: { condition: t.when.replace(/^!/, ""), invert: t.when.startsWith("!") } } : {}) }));
}

function label(steering) {
  return steering.length ? steering.map((t) => `${t.vector} x${fmt(t.scale)} @ ${t.layers.join(",")}` +
    (t.when ? " " + t.when.map((c) => (c.invert ? "unless " : "when ") + c.condition).join(" or ") : "")).join(" + ")
    : "unsteered";
}

// What each condition decided for this answer: "when work: fired (0.00114 < 0.107)".
function conditionsLabel(conditions) {
  return conditions.map((c) => `${c.invert ? "unless" : "when"} ${c.condition}: ${c.fired ? "fired" : "not fired"} ` +
    `(${c.score.toPrecision(3)} ${c.comparison === "above" ? ">" : "<"} ${c.threshold.toPrecision(3)})`).join("; ");
}

// -- chat -------------------------------------------------------------------------------------
function settings() {
  const num = (id) => Number($(id).value);
  return { temperature: num("temperature"), top_p: num("top_p"), max_tokens: num("max_tokens"),
    seed: num("seed"), repeat_penalty: num("repeat_penalty") };
}

function history(kind) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const turn of state.turns) {
    messages.push({ role: "user", content: turn.user });
    const answer = turn.answers.find((a) => a.kind === kind) || turn.answers[turn.answers.length - 1];
    if (answer && answer.text) messages.push({ role: "assistant", content: answer.text });
  }
  return messages;
}

async function* sse(response) {
  // Split the byte stream on blank lines; skip ':' keepalives; stop at [DONE].
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function runAnswer(answer, body, node) {
  const controller = new AbortController();
  state.controllers.push(controller);
  const textNode = node.querySelector(".text");
  try {
    const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    for await (const chunk of sse(response)) {
      if (chunk.error) throw new ApiError(chunk.error.message, 500);
      if (chunk.steering) {
        answer.steering = chunk.steering;
        answer.label = label(chunk.steering);
        node.querySelector(".label").textContent = answer.label;
      }
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        if (window.caaMetrics.firstTokenMs === null) window.caaMetrics.firstTokenMs = performance.now();  // ms since page load
        answer.text += choice.delta.content;
        textNode.textContent = answer.text;
      }
      if (choice.finish_reason) answer.finish = choice.finish_reason;
      if (chunk.conditions) {
        answer.label += ` · ${conditionsLabel(chunk.conditions)}`;
        node.querySelector(".label").textContent = answer.label;
      }
    }
    node.classList.add("done");
  } catch (err) {
    if (err.name === "AbortError") { answer.finish = "stopped"; node.classList.add("done"); return; }
    answer.error = err.message;
    node.append(el("p", { class: "error", role: "alert" }, err.message));
    showError(err.message);
  }
}

function answerNode(answer) {
  return el("article", { class: "answer " + answer.kind },
    el("div", { class: "label" }, answer.label), el("div", { class: "text" }, answer.text));
}

async function send(prompt) {
  showError("");
  const compare = $("compare").checked && state.active.length > 0;
  const common = { model: "default", stream: true, ...settings(), steering_positions: $("positions").value };
  const turn = { user: prompt, answers: [] };
  const kinds = compare ? ["unsteered", "steered"] : [state.active.length ? "steered" : "unsteered"];
  const row = el("div", { class: "answers" + (compare ? " compare" : "") });
  $("log").append(el("div", { class: "turn" }, el("p", { class: "user" }, prompt), row));
  const jobs = kinds.map((kind) => {
    const steering = kind === "steered" ? steeringBody() : [];
    const answer = { kind, label: kind === "steered" ? "steered…" : "unsteered", steering: [], text: "", finish: null };
    turn.answers.push(answer);
    const node = answerNode(answer);
    row.append(node);
    const body = { ...common, messages: [...history(kind), { role: "user", content: prompt }], steering };
    return runAnswer(answer, body, node);
  });
  state.turns.push(turn);
  $("send").disabled = true;
  $("stop").disabled = false;
  $("log").lastChild.scrollIntoView({ block: "end" });
  await Promise.all(jobs);
  state.controllers = [];
  $("send").disabled = false;
  $("stop").disabled = true;
  $("prompt").focus();
}

function exportJson() {
  const data = { model: $("model").textContent, system: $("system").value, settings: settings(),
    steering: steeringBody(), turns: state.turns };
  const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
  const link = el("a", { href: url, download: "caa-conversation.json" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// -- wiring -------------------------------------------------------------------------------
$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || $("send").disabled) return;
  $("prompt").value = "";
  send(prompt);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controllers.forEach((c) => c.abort()));
$("reset").addEventListener("click", () => { state.turns = []; $("log").replaceChildren(); showError(""); });
$("export").addEventListener("click", exportJson);
$("key-button").addEventListener("click", () => askKey("API key"));
$("key-cancel").addEventListener("click", () => $("key-dialog").close("cancel"));
$("key-dialog").addEventListener("close", () => {
  if ($("key-dialog").returnValue !== "ok") return;
  state.key = $("key-input").value.trim();
  sessionStorage.setItem("caa-key", state.key);
  connect();
});
const presets = createPresets({ api, el, state, renderActive, settings, steeringBody, showError });
setInterval(watchHealth, 3000);
connect();
