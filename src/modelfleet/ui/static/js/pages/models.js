// Models and instances: replicas, states, where each runs, its load; deploy, drain, scale, undeploy.
// Buttons call the controller through the gateway with the admin token (when one is set);
// the answer, or the API's error message, shows as a toast, then the page polls at once.
//
// The deploy form (built once, so that polling never wipes what is being typed) takes a
// catalog entry or a source (hf://, modelscope://, https://, a path on the workers, a bundled
// name), a backend, replicas and placement labels. A remote source is downloaded by each worker
// that gets a replica: its instances show "downloading" with a progress bar, then come up.

import { api } from "../api.js";
import { badge, downloadBar, fill, h, table } from "../dom.js";
import { bytes, seconds } from "../format.js";
import { clusterError } from "../poller.js";
import { buildView, stateKind } from "../view.js";

const BACKENDS = ["llama.cpp", "llama-cpp-python", "sentence-transformers", "transformers", "vllm", "openai"];

export default {
  id: "models",
  title: "Models",

  mount(el, app) {
    this.el = el;
    this.app = app;
    this.catalog = null; // entries from /v1/cluster/catalog, loaded once (retried until it answers)
    this.form = deployForm(this, app);
    this.note = h("div");
    this.list = h("div", {}, h("p", { class: "muted" }, "Loading…"));
    fill(el, h("h1", {}, "Models and instances"), this.form.panel, this.note, this.list);
    this.loadCatalog();
  },

  update(state) {
    const v = buildView(state);
    const manage = manageState(state);
    this.form.enable(manage);
    if (!this.catalog && manage.ok) this.loadCatalog();
    fill(this.note, manage.why ? h("p", { class: "muted" }, `Actions unavailable: ${manage.why}`) : null);
    fill(this.list,
      v.models.length
        ? v.models.map((m) => modelPanel(m, manage, this.app))
        : h("p", { class: "empty" }, "No model yet. Deploy one with the form above or `modelfleet deploy NAME --model SOURCE`."),
    );
  },

  async loadCatalog() {
    if (this.loadingCatalog) return;
    this.loadingCatalog = true;
    try {
      this.catalog = (await api.catalog()).data;
      this.form.setCatalog(this.catalog);
    } catch {
      // shown by the banners; retried at the next update
    } finally {
      this.loadingCatalog = false;
    }
  },
};

/** The deploy form: catalog picker, name, source, backend, replicas, labels. */
function deployForm(page, app) {
  const ui = {
    catalog: h("select", { id: "deploy-catalog", "aria-label": "catalog entry" },
      h("option", { value: "" }, "— a source of your own —")),
    name: h("input", { id: "deploy-name", required: true, maxlength: 255, placeholder: "the model name clients send" }),
    source: h("input", { id: "deploy-source", placeholder: "hf://ORG/REPO:Q4_K_M, modelscope://…, https://…#sha256=…, /path" }),
    backend: h("select", { id: "deploy-backend" },
      h("option", { value: "" }, "automatic"), BACKENDS.map((b) => h("option", { value: b }, b))),
    replicas: h("input", { id: "deploy-replicas", type: "number", min: 0, max: 1000, step: 1, value: "1" }),
    labels: h("input", { id: "deploy-labels", placeholder: "gpu=a100, zone=eu (optional)" }),
    about: h("p", { class: "hint", id: "deploy-about" }, "Pick a model of the catalog, or give its source."),
    submit: h("button", { id: "deploy-submit", type: "submit" }, "Deploy"),
    error: h("p", { class: "error-text", id: "deploy-error" }),
  };
  ui.catalog.addEventListener("change", () => {
    const e = (page.catalog ?? []).find((c) => c.name === ui.catalog.value);
    if (!e) {
      ui.about.textContent = "Give the source: the workers that run a replica download it into their cache.";
      return;
    }
    ui.name.value = e.name;
    ui.source.value = e.source;
    ui.backend.value = e.backend;
    const needs = [e.size ? `${bytes(e.size)} to download` : null, e.memory ? `${bytes(e.memory)} RAM per replica` : null,
      e.gpu_memory ? `${bytes(e.gpu_memory)} GPU memory with all layers on a GPU` : null].filter(Boolean).join(", ");
    ui.about.textContent = `${e.description || e.name} (${e.kind}, ${e.backend})${needs ? `: ${needs}` : ""}.`;
  });
  const form = h("form", { id: "deploy-form", class: "deploy-form", onsubmit: (ev) => { ev.preventDefault(); submit(); } },
    h("label", {}, "From the catalog", ui.catalog),
    h("label", {}, "Name", ui.name),
    h("label", { class: "wide" }, "Source", ui.source),
    h("label", {}, "Backend", ui.backend),
    h("label", {}, "Replicas", ui.replicas),
    h("label", {}, "Placement labels", ui.labels),
    h("div", { class: "wide" }, ui.about),
    h("div", { class: "row end wide" }, ui.error, ui.submit));
  const panel = h("details", { class: "panel deploy", id: "deploy-panel" },
    h("summary", {}, h("strong", {}, "Deploy a model")), form);

  async function submit() {
    ui.error.textContent = "";
    const labels = {};
    for (const part of ui.labels.value.split(",").map((x) => x.trim()).filter(Boolean)) {
      const [k, ...rest] = part.split("=");
      if (!k || !rest.length) {
        ui.error.textContent = `placement labels are k=v, comma-separated (got "${part}")`;
        return;
      }
      labels[k.trim()] = rest.join("=").trim();
    }
    const body = { name: ui.name.value.trim(), replicas: Number(ui.replicas.value || 1), placement: { labels } };
    const entry = (page.catalog ?? []).find((c) => c.name === ui.catalog.value);
    if (entry && ui.source.value.trim() === entry.source) body.catalog = entry.name; // its defaults too
    else body.source = ui.source.value.trim();
    if (ui.backend.value) body.backend = ui.backend.value;
    ui.submit.disabled = true;
    try {
      const d = await api.deploy(body);
      const size = d.model_bytes ? `, ${bytes(d.model_bytes)}` : "";
      app.toast(`${d.name} deployed: ${d.backend} ${d.source}${size}`);
      panel.open = false;
    } catch (err) {
      ui.error.textContent = String(err);
    } finally {
      ui.submit.disabled = false;
    }
    app.refresh();
  }

  return {
    panel,
    setCatalog(entries) {
      fill(ui.catalog, h("option", { value: "" }, "— a source of your own —"),
        entries.map((e) => h("option", { value: e.name },
          `${e.name} · ${e.kind} · ${e.backend}${e.size ? ` · ${bytes(e.size)}` : ""}`)));
    },
    enable(manage) {
      ui.submit.disabled = !manage.ok;
      ui.submit.title = manage.why ?? "Create the deployment";
    },
  };
}

/** Can this browser change the cluster now? Only while the controller answers our reads. */
function manageState(state) {
  const err = clusterError(state);
  if (!err) return { ok: true, why: null };
  if (err.auth) return { ok: false, why: `${err} — set the admin token in Settings.` };
  return { ok: false, why: `the controller is unreachable (${err}).` };
}

function modelPanel(m, manage, app) {
  const dep = m.deployment;
  return h("section", { class: "panel model", dataset: { model: m.name } },
    h("div", { class: "panel-head" },
      h("h2", {}, m.name),
      badge(m.kind, "info"),
      m.backend ? h("span", { class: "muted" }, m.backend) : null,
      badge(`${m.ready} / ${m.replicas} ready`, m.ready >= m.replicas && m.replicas > 0 ? "ok" : m.ready ? "warn" : "bad"),
      m.deployed ? null : h("span", { class: "muted" }, "declared by a worker (no deployment)"),
      h("span", { class: "spacer" }),
      dep && dep.autoscale ? badge(autoscaleText(dep.autoscale), "info", { class: "autoscale" }) : null,
      dep && !dep.autoscale ? scaleControl(m, manage, app) : null,
      dep ? h("button", {
        class: "danger small", "data-action": "undeploy", disabled: !manage.ok, title: manage.why ?? "Delete the deployment; its instances stop",
        onclick: () => confirm(`Undeploy ${m.name}? Its ${m.instances.length} instance(s) stop.`) &&
          act(app, () => api.undeploy(m.name), `${m.name} undeployed`),
      }, "Undeploy") : null),
    h("p", { class: "muted" },
      m.routed
        ? `Gateway: ${m.in_flight} in flight of ${m.slots} slots, ${m.queued} queued` +
          (m.mean_latency_s ? `, mean latency ${seconds(m.mean_latency_s)}` : "") +
          (m.routing === "prefix" ? `; prefix-aware routing, ${m.prefix_blocks} prompt blocks indexed` :
            m.routing ? `; routing ${m.routing}` : "") + "."
        : "Not in the gateway's route table (no ready instance)." ,
      dep ? ` Deployment: max ${dep.max_concurrency} concurrent per instance, weight ${dep.weight}, placement ${dep.placement.policy}.` : ""),
    dep && dep.autoscale ? decisionLine(dep) : null,
    m.instances.length ? instancesTable(m, manage, app) : h("p", { class: "empty" }, "No instance."));
}

/** "1..8 replicas, target 4" (+ ", to zero after 300 s idle"): the deployment's autoscale policy. */
function autoscaleText(p) {
  const zero = p.min_replicas === 0 ? `, to zero after ${p.idle_after_s} s idle` : "";
  return `autoscale ${p.min_replicas}..${p.max_replicas} replicas, target ${p.target_ongoing}${zero}`;
}

/** Desired vs current replicas and the autoscaler's last decision with its reason. */
function decisionLine(dep) {
  const st = dep.autoscale_status;
  const last = st
    ? ` Last decision ${seconds(Math.max(0, Date.now() / 1000 - st.at))} ago: ${st.desired} (${st.reason}).`
    : " No decision yet.";
  return h("p", { class: "muted autoscale-decision" }, `Desired ${dep.replicas} replica(s).${last}`);
}

function scaleControl(m, manage, app) {
  const n = m.deployment.replicas;
  const scaleTo = (k) => act(app, () => api.scale(m.name, k), `${m.name} scaled to ${k}`);
  const title = manage.why ?? "Change the number of replicas";
  return h("span", { class: "scale", title },
    h("span", { class: "muted" }, "replicas"),
    h("button", { class: "ghost small", "data-action": "scale-down", disabled: !manage.ok || n <= 0, onclick: () => scaleTo(n - 1), "aria-label": "one replica less" }, "−"),
    h("span", { class: "replicas" }, String(n)),
    h("button", { class: "ghost small", "data-action": "scale-up", disabled: !manage.ok, onclick: () => scaleTo(n + 1), "aria-label": "one replica more" }, "+"));
}

function instancesTable(m, manage, app) {
  return table(
    ["Instance", "State", "Worker", "Endpoint", { title: "In flight", num: true }, { title: "Restarts", num: true }, "Last error", ""],
    m.instances.map((i) => [
      h("span", { class: "mono" }, i.id),
      h("div", {},
        h("span", { class: "chips" },
          badge(i.state, stateKind(i.state), { class: "state" }),
          i.ejected ? badge(`ejected ${seconds(i.ejected_for_s)}`, "bad") : null,
          i.worker_alive === false ? badge("worker offline", "bad") : null),
        i.state === "downloading" && i.download ? downloadBar(i.download) : null),
      i.worker_id ?? h("span", { class: "muted" }, "unplaced"),
      i.endpoint ? h("span", { class: "mono" }, i.endpoint) : "–",
      i.in_flight === null ? "–" : `${i.in_flight} / ${i.max_concurrency}`,
      i.restarts ?? "–",
      h("td", { class: "error-text" }, i.last_error ?? (i.pending_reason ? `pending: ${i.pending_reason}` : "")),
      h("span", { class: "row-actions" },
      i.worker_id ? h("button", {
        class: "ghost small", "data-action": "logs", title: "The runner's log (filter by a request id)",
        onclick: () => showLogs(i.id),
      }, "Logs") : "",
      canDrain(i) ? h("button", {
        class: "ghost small", "data-action": "drain", disabled: !manage.ok, title: manage.why ?? "No new requests; stopped after the drain timeout",
        onclick: () => confirm(`Drain ${i.id}? It gets no new requests and stops after the drain timeout.`) &&
          act(app, () => api.drain(i.id), `${i.id} draining`),
      }, "Drain") : ""),
    ]),
    (k) => ({ dataset: { instanceId: m.instances[k].id, state: m.instances[k].state } }));
}

/** The instance log dialog: the runner log's last lines, or those naming one request id
 *  (X-Request-ID, as the gateway's access log and every answer carry it). Built once. */
let logsDialog = null;

function showLogs(instanceId) {
  if (!logsDialog) logsDialog = buildLogsDialog();
  logsDialog.open(instanceId);
}

function buildLogsDialog() {
  const ui = {
    title: h("h2", {}, "Logs"),
    request: h("input", { id: "logs-request", type: "search", placeholder: "request id (X-Request-ID)", "aria-label": "request id", maxlength: "128" }),
    show: h("button", { type: "submit", class: "small", "data-action": "logs-show" }, "Show"),
    close: h("button", { type: "button", class: "ghost small", "data-action": "logs-close" }, "Close"),
    status: h("p", { class: "muted", id: "logs-status" }),
    lines: h("pre", { class: "log-lines", id: "logs-lines" }),
  };
  const form = h("form", { class: "logs-filter" }, ui.request, ui.show, ui.close);
  const dialog = h("dialog", { id: "instance-logs", class: "logs-dialog" }, ui.title, form, ui.status, ui.lines);
  document.body.append(dialog);
  let current = null;
  async function load() {
    const request = ui.request.value.trim();
    ui.status.textContent = "Loading…";
    try {
      const data = await api.instanceLogs(current, { request });
      ui.lines.textContent = data.lines.join("\n");
      ui.status.textContent = `${data.lines.length} line(s) from worker ${data.worker}` +
        (request ? ` naming request ${request}` : "") + ".";
    } catch (err) {
      ui.lines.textContent = "";
      ui.status.textContent = String(err);
    }
  }
  form.addEventListener("submit", (e) => { e.preventDefault(); load(); });
  ui.close.addEventListener("click", () => dialog.close());
  return {
    open(id) {
      current = id;
      ui.title.textContent = `Logs of ${id}`;
      ui.lines.textContent = "";
      if (!dialog.open) dialog.showModal();
      load();
    },
  };
}

function canDrain(i) {
  return i.enabled !== false && !i.gatewayOnly && ["ready", "starting", "downloading", "pending", "failed"].includes(i.state);
}

async function act(app, fn, done) {
  try {
    await fn();
    app.toast(done);
  } catch (err) {
    app.toast(String(err), "error");
  }
  app.refresh();
}
