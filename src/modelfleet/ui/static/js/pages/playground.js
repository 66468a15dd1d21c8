// Playground: chat with streaming output, and an embeddings box.
//
// Chat POSTs /v1/chat/completions with "stream": true through the gateway and reads the
// server-sent events from the response body as they arrive (fetch + ReadableStream; see
// sse.js). Each delta is appended to the reply at once. The page is built once on mount;
// polling only refreshes the model pickers, so typing and streaming are never disturbed.

import { api } from "../api.js";
import { fill, h } from "../dom.js";
import { seconds } from "../format.js";
import { sseData } from "../sse.js";
import { buildView, modelKind } from "../view.js";

export default {
  id: "playground",
  title: "Playground",

  mount(el, app) {
    this.app = app;
    this.messages = []; // the conversation sent with every request (system prompt aside)
    this.abort = null;
    this.served = null; // names from /v1/models (the API key's view), refreshed now and then
    this.servedAt = 0;
    const ui = (this.ui = {
      chatModel: h("select", { id: "chat-model", "aria-label": "chat model" }),
      log: h("div", { class: "chat-log", id: "chat-log" },
        h("p", { class: "empty", id: "chat-empty" }, "Pick a model and say something. Replies stream in as they are generated.")),
      input: h("textarea", { id: "chat-input", rows: 3, placeholder: "Message (Enter sends, Shift+Enter for a new line)" }),
      send: h("button", { id: "chat-send", type: "submit" }, "Send"),
      stop: h("button", { id: "chat-stop", type: "button", class: "ghost", disabled: true }, "Stop"),
      clear: h("button", { id: "chat-clear", type: "button", class: "ghost" }, "New chat"),
      system: h("textarea", { id: "chat-system", rows: 2, placeholder: "optional, e.g. You are a terse assistant." }),
      temperature: h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: 0.1, value: "0.7" }),
      maxTokens: h("input", { id: "chat-max-tokens", type: "number", min: 1, max: 4096, step: 1, value: "128" }),
      embedModel: h("select", { id: "embed-model", "aria-label": "embedding model" }),
      embedInput: h("textarea", { id: "embed-input", rows: 3, value: "The quick brown fox jumps over the lazy dog." }),
      embedGo: h("button", { id: "embed-go", type: "button" }, "Embed"),
      embedOut: h("div", { class: "embedding-result", id: "embed-result" }),
    });

    ui.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        this.sendChat();
      }
    });
    ui.stop.addEventListener("click", () => this.abort?.abort());
    ui.clear.addEventListener("click", () => this.clearChat());
    ui.embedGo.addEventListener("click", () => this.embed());

    fill(el,
      h("h1", {}, "Playground"),
      h("div", { class: "playground" },
        h("section", { class: "panel" },
          h("div", { class: "panel-head" }, h("h2", {}, "Chat"), h("span", { class: "spacer" }), ui.chatModel, ui.clear),
          ui.log,
          h("form", { class: "composer", onsubmit: (e) => { e.preventDefault(); this.sendChat(); } },
            ui.input,
            h("div", { class: "row end", style: "margin-top:8px" }, ui.stop, ui.send))),
        h("div", {},
          h("section", { class: "panel" },
            h("h2", {}, "Generation"),
            h("label", {}, "System prompt", ui.system),
            h("div", { class: "knobs" },
              h("label", {}, "Temperature", ui.temperature),
              h("label", {}, "Max tokens", ui.maxTokens))),
          h("section", { class: "panel" },
            h("div", { class: "panel-head" }, h("h2", {}, "Embeddings"), h("span", { class: "spacer" }), ui.embedModel),
            ui.embedInput,
            h("div", { class: "row end", style: "margin-top:8px" }, ui.embedGo),
            ui.embedOut))),
    );
  },

  unmount() {
    this.abort?.abort();
  },

  update(state) {
    // Models: those the cluster knows (with their backend, to tell chat from embeddings),
    // plus those /v1/models lists for our API key (that works without the admin token).
    if (Date.now() - this.servedAt > 10000) {
      this.servedAt = Date.now();
      api.servedModels().then((r) => { this.served = r.data.map((m) => m.id); }, () => {});
    }
    const known = new Map(buildView(state).models.map((m) => [m.name, m.kind]));
    for (const name of this.served ?? []) if (!known.has(name)) known.set(name, modelKind(name, null));
    const names = [...known.keys()].sort();
    fillSelect(this.ui.chatModel, names, (n) => known.get(n) === "chat");
    fillSelect(this.ui.embedModel, names, (n) => known.get(n) === "embedding");
  },

  clearChat() {
    this.abort?.abort();
    this.messages = [];
    fill(this.ui.log);
  },

  async sendChat() {
    const { ui } = this;
    const text = ui.input.value.trim();
    const model = ui.chatModel.value;
    if (!text || this.abort || !model) return;
    ui.input.value = "";
    document.getElementById("chat-empty")?.remove();
    this.messages.push({ role: "user", content: text });
    ui.log.append(bubble("user", "you", text));

    const reply = bubble("assistant", model, "");
    reply.dataset.state = "waiting";
    ui.log.append(reply);
    const textEl = reply.querySelector(".text");
    const statsEl = reply.querySelector(".stats");
    scrollDown(ui.log);

    const system = ui.system.value.trim();
    const body = {
      model,
      messages: [...(system ? [{ role: "system", content: system }] : []), ...this.messages],
      temperature: Number(ui.temperature.value),
      max_tokens: Number(ui.maxTokens.value),
    };
    this.setBusy(new AbortController());
    const t0 = performance.now();
    let firstAt = null;
    let chunks = 0;
    let finish = null;
    let content = "";
    try {
      const response = await api.chatStream(body, this.abort.signal);
      reply.dataset.state = "streaming";
      for await (const data of sseData(response)) {
        if (data === "[DONE]") break;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message ?? JSON.stringify(event.error));
        const choice = event.choices?.[0];
        const delta = choice?.delta?.content ?? "";
        if (delta) {
          firstAt ??= performance.now();
          chunks += 1;
          content += delta;
          textEl.textContent = content; // shown as soon as it arrives
          scrollDown(ui.log);
        }
        finish = choice?.finish_reason ?? finish;
      }
      reply.dataset.state = "done";
    } catch (err) {
      if (err.name === "AbortError") {
        reply.dataset.state = "stopped";
        finish = "stopped by you";
      } else {
        reply.dataset.state = "error";
        const hint = err.auth ? " Set an API key in Settings." : "";
        reply.append(h("div", { class: "error-text", id: "chat-error" }, `${err}${hint}`));
      }
    } finally {
      this.setBusy(null);
    }
    if (content) this.messages.push({ role: "assistant", content });
    const end = performance.now();
    if (firstAt !== null) {
      const streamS = (end - firstAt) / 1000;
      statsEl.textContent = `first token after ${Math.round(firstAt - t0)} ms · ${chunks} chunks in ${seconds(streamS)}` +
        (streamS > 0 ? ` (${(chunks / streamS).toFixed(1)}/s)` : "") + (finish ? ` · finish: ${finish}` : "");
    }
  },

  setBusy(controller) {
    this.abort = controller;
    this.ui.send.disabled = Boolean(controller);
    this.ui.stop.disabled = !controller;
  },

  async embed() {
    const { ui } = this;
    const model = ui.embedModel.value;
    const input = ui.embedInput.value;
    if (!model || !input.trim()) return;
    ui.embedGo.disabled = true;
    fill(ui.embedOut, h("p", { class: "muted" }, "Embedding…"));
    const t0 = performance.now();
    try {
      const res = await api.embeddings(model, input);
      const vec = res.data[0].embedding;
      const norm = Math.sqrt(vec.reduce((acc, x) => acc + x * x, 0));
      const preview = vec.slice(0, 8).map((x) => x.toFixed(4)).join(", ");
      fill(ui.embedOut,
        h("p", {},
          "dimension ", h("strong", { id: "embed-dim" }, String(vec.length)),
          ` · norm ${norm.toFixed(3)}`,
          res.usage?.prompt_tokens ? ` · ${res.usage.prompt_tokens} tokens` : "",
          ` · ${Math.round(performance.now() - t0)} ms`),
        h("div", { class: "vector", id: "embed-preview" }, `[${preview}${vec.length > 8 ? ", …" : ""}]`));
    } catch (err) {
      const hint = err.auth ? " Set an API key in Settings." : "";
      fill(ui.embedOut, h("p", { class: "error-text", id: "embed-error" }, `${err}${hint}`));
    } finally {
      ui.embedGo.disabled = false;
    }
  },
};

function bubble(role, who, text) {
  return h("div", { class: `msg ${role}` },
    h("div", { class: "who" }, who),
    h("div", { class: "text" }, text),
    h("div", { class: "stats" }));
}

function scrollDown(el) {
  el.scrollTop = el.scrollHeight;
}

/** Refill a <select> when the names change, keeping the choice; default to a preferred one. */
function fillSelect(select, names, preferred) {
  const key = names.join("\n");
  if (select.dataset.names === key) return;
  const previous = select.value;
  select.dataset.names = key;
  fill(select, ...names.map((n) => h("option", { value: n }, n)));
  if (names.includes(previous)) select.value = previous;
  else select.value = names.find(preferred) ?? names[0] ?? "";
}
