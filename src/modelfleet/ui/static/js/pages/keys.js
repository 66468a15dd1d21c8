// API keys: create (the secret is shown once, here), list, revoke. Admin calls.
// Inference is open while no key was ever created; once one was, every inference call needs a
// live key (revoking the last key closes inference, it never reopens it).

import { api, credentials } from "../api.js";
import { badge, fill, h, table } from "../dom.js";

export default {
  id: "keys",
  title: "API keys",

  mount(el, app) {
    this.app = app;
    this.keys = null;
    this.error = null;
    this.listAt = 0;
    this.ui = {
      name: h("input", { id: "key-name", placeholder: "name, e.g. team-search", maxlength: 128 }),
      create: h("button", { id: "key-create", type: "submit" }, "Create key"),
      secret: h("div", { id: "key-secret-box" }),
      list: h("div", { id: "key-list" }, h("p", { class: "muted" }, "Loading…")),
    };
    fill(el,
      h("h1", {}, "API keys"),
      h("p", { class: "muted" },
        "Inference through the gateway is open to anyone while no key exists; once one exists, every call needs a live key " +
        "(Authorization: Bearer …). Gateways learn of new and revoked keys within one route-table refresh."),
      h("section", { class: "panel" },
        h("h2", {}, "New key"),
        h("form", { class: "row", onsubmit: (e) => { e.preventDefault(); this.create(); } },
          h("div", { style: "flex:1;min-width:220px" }, this.ui.name), this.ui.create)),
      this.ui.secret,
      h("section", { class: "panel" }, h("h2", {}, "Keys"), this.ui.list),
    );
    this.load();
  },

  update() {
    if (Date.now() - this.listAt > 5000) this.load(); // keys are not in the common poll
  },

  async load() {
    this.listAt = Date.now();
    try {
      this.keys = (await api.keys()).data;
      this.error = null;
    } catch (err) {
      this.error = err;
    }
    this.render();
  },

  render() {
    const { list } = this.ui;
    const parts = [];
    if (this.error) {
      const hint = this.error.auth ? " Keys need the admin token: set it in Settings." : "";
      parts.push(h("p", { class: "error-text", id: "key-error" }, `Could not list keys: ${this.error}.${hint}`));
    }
    if (this.keys && !this.keys.length) parts.push(h("p", { class: "empty" }, "No key: inference is open."));
    if (this.keys?.length) {
      const active = this.keys.filter((k) => !k.revoked).length;
      parts.push(h("p", { class: "muted" }, active ? `${active} active: inference needs a key.` : "All revoked: inference is closed until a key is created."));
      const sorted = [...this.keys].sort((a, b) => Number(a.revoked) - Number(b.revoked) || b.created_at - a.created_at);
      parts.push(table(["Name", "Id", "Created", "Status", ""],
        sorted.map((k) => [
          h("strong", {}, k.name),
          h("span", { class: "mono" }, k.id),
          k.created_at ? new Date(k.created_at * 1000).toLocaleString() : "–",
          k.revoked ? badge("revoked") : badge("active", "ok"),
          k.revoked ? "" : h("button", {
            class: "danger small", "data-action": "revoke",
            onclick: () => confirm(`Revoke ${k.name} (${k.id})? Clients using it get 401 from then on.`) && this.revoke(k),
          }, "Revoke"),
        ]),
        (i) => ({ class: sorted[i].revoked ? "revoked" : null, dataset: { keyId: sorted[i].id, keyName: sorted[i].name } })));
    }
    fill(list, ...parts);
  },

  async create() {
    const name = this.ui.name.value.trim();
    if (!name) {
      this.ui.name.focus();
      return;
    }
    this.ui.create.disabled = true;
    try {
      const k = await api.createKey(name);
      this.ui.name.value = "";
      this.showSecret(k);
      this.app.toast(`key ${k.name} created`);
    } catch (err) {
      this.app.toast(String(err), "error");
    } finally {
      this.ui.create.disabled = false;
    }
    await this.load();
  },

  showSecret(k) {
    const use = h("button", { class: "ghost small", type: "button", id: "key-use" }, "Use in the playground");
    use.addEventListener("click", () => {
      credentials.set("key", k.key);
      this.app.credentialsChanged();
      this.app.toast(`the playground now sends ${k.name}`);
    });
    const copy = h("button", { class: "ghost small", type: "button" }, "Copy");
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(k.key);
        this.app.toast("copied");
      } catch {
        this.app.toast("copy failed: select the text and copy it", "error");
      }
    });
    fill(this.ui.secret, h("section", { class: "secret-box", dataset: { keyId: k.id } },
      h("strong", {}, `Secret of ${k.name} (${k.id})`),
      h("div", { class: "muted" }, "Shown once: the cluster keeps only its hash. Store it now."),
      h("div", { class: "secret", id: "key-secret" }, k.key),
      h("div", { class: "row" }, copy, use)));
  },

  async revoke(k) {
    try {
      await api.revokeKey(k.id);
      this.app.toast(`key ${k.name} revoked`);
      // The secret of a revoked key is no use any more: stop showing it.
      if (this.ui.secret.querySelector(`[data-key-id="${CSS.escape(k.id)}"]`)) fill(this.ui.secret);
    } catch (err) {
      this.app.toast(String(err), "error");
    }
    await this.load();
  },
};
