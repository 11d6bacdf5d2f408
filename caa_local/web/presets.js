// Presets on the page: the list from GET /v1/presets (a preset is a model name any client can
// pick), "save as preset" (POST /v1/presets) and "copy as curl / Python" for the current steering.
// app.js hands in what it owns (state, the API call, the active-steering renderer) via `page`.

const $ = (id) => document.getElementById(id);

function describe(steering) {
  return steering.length
    ? steering.map((t) => `${t.vector} x${t.scale > 0 ? "+" : ""}${t.scale} @ ${t.layers.join(",")}`).join(" + ")
    : "no steering";
}

export function createPresets(page) {
  async function load() {
    const data = await (await page.api("/v1/presets")).json();
    const list = $("presets");
    list.replaceChildren();
    for (const p of data.data) {
      list.append(page.el("li", { "data-preset": p.id },
        page.el("div", { class: "row" },
          page.el("strong", {}, p.id),
          page.el("button", { type: "button", class: "add", "aria-label": `Use preset ${p.id}`,
            onclick: () => use(p) }, "Use")),
        page.el("div", { class: "muted" }, describe(p.steering) + (p.description ? ` · ${p.description}` : ""))));
    }
    $("preset-file").textContent = data.file
      ? (data.writable ? `Saved to ${data.file}.` : `${data.file} is read-only: saved presets last until restart.`)
      : "Saved presets last until the server restarts (start it with --presets FILE to keep them).";
    $("preset-model").textContent = data.aliases.join(", ");
  }

  function use(preset) {
    page.state.active = preset.steering.map((t) => ({ vector: t.vector, scale: t.scale, layer: t.layers.join(",") }));
    if (preset.positions) $("positions").value = preset.positions;
    if (preset.system) $("system").value = preset.system;
    for (const [key, value] of Object.entries(preset.options || {})) {
      const input = $(key);  // temperature, top_p, max_tokens, seed, repeat_penalty have inputs
      if (input && input.closest("#settings-grid")) input.value = value;
    }
    page.renderActive();
    page.showError("");
    $("preset-status").textContent = `Using ${preset.id}: clients get the same by asking for model "${preset.id}".`;
  }

  async function save() {
    const name = $("preset-name").value.trim();
    if (!name) { page.showError("Give the preset a name."); return; }
    const body = { name, steering: page.steeringBody(), positions: $("positions").value };
    const system = $("system").value.trim();
    if (system) body.system = system;
    try {
      const response = await page.api("/v1/presets", { method: "POST", body: JSON.stringify(body) });
      const saved = await response.json();
      $("preset-status").textContent = `Saved preset ${saved.id}` + (saved.saved_to ? ` to ${saved.saved_to}.` : " (until restart).");
      page.showError("");
      await load();
    } catch (err) {
      page.showError(err.message);
    }
  }

  function request(prompt) {
    const settings = page.settings();
    return { model: "default", messages: [{ role: "user", content: prompt }], steering: page.steeringBody(),
      steering_positions: $("positions").value, temperature: settings.temperature, max_tokens: settings.max_tokens };
  }

  function curl(prompt) {
    const body = JSON.stringify(request(prompt)).replaceAll("'", "'\\''");
    const auth = page.state.key ? ` \\\n  -H "Authorization: Bearer $CAA_LOCAL_API_KEY"` : "";
    return `curl ${location.origin}/v1/chat/completions \\\n  -H "Content-Type: application/json"${auth} \\\n  -d '${body}'`;
  }

  function python(prompt) {
    const r = request(prompt);
    const key = page.state.key ? 'os.environ["CAA_LOCAL_API_KEY"]' : '"none"';
    return [
      "import os",
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url="${location.origin}/v1", api_key=${key})`,
      "reply = client.chat.completions.create(",
      `    model="default", messages=${JSON.stringify(r.messages)},`,
      `    temperature=${r.temperature}, max_tokens=${r.max_tokens},`,
      `    extra_body={"steering": ${JSON.stringify(r.steering)}, "steering_positions": "${r.steering_positions}"},`,
      ")",
      "print(reply.choices[0].message.content)",
    ].join("\n");
  }

  async function copy(kind) {
    const prompt = $("prompt").value.trim() || "Tell me about your day.";
    const text = kind === "curl" ? curl(prompt) : python(prompt);
    const box = $("snippet");
    box.textContent = text;
    box.hidden = false;
    box.dataset.kind = kind;
    try {
      await navigator.clipboard.writeText(text);
      $("preset-status").textContent = `Copied as ${kind === "curl" ? "curl" : "Python"}.`;
    } catch (_) {
      $("preset-status").textContent = "The browser refused the clipboard: select the text below and copy it.";
    }
  }

  $("save-preset").addEventListener("click", save);
  $("copy-curl").addEventListener("click", () => copy("curl"));
  $("copy-python").addEventListener("click", () => copy("python"));
  return { load };
}
