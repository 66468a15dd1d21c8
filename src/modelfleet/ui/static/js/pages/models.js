// Models and instances: replicas, states, where each runs, its load; drain, scale, undeploy.
// Buttons call the controller through the gateway with the admin token (when one is set);
// the answer, or the API's error message, shows as a toast, then the page polls at once.

import { api } from "../api.js";
import { badge, fill, h, table } from "../dom.js";
import { seconds } from "../format.js";
import { clusterError } from "../poller.js";
import { buildView, stateKind } from "../view.js";

export default {
  id: "models",
  title: "Models",

  mount(el, app) {
    this.el = el;
    this.app = app;
    fill(el, h("h1", {}, "Models and instances"), h("p", { class: "muted" }, "Loading…"));
  },

  update(state) {
    const v = buildView(state);
    const manage = manageState(state);
    fill(this.el,
      h("h1", {}, "Models and instances"),
      manage.why ? h("p", { class: "muted" }, `Actions unavailable: ${manage.why}`) : null,
      v.models.length
        ? v.models.map((m) => modelPanel(m, manage, this.app))
        : h("p", { class: "empty" }, "No model yet. Deploy one with `modelfleet deploy NAME --backend … --model …`."),
    );
  },
};

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
      dep ? scaleControl(m, manage, app) : null,
      dep ? h("button", {
        class: "danger small", "data-action": "undeploy", disabled: !manage.ok, title: manage.why ?? "Delete the deployment; its instances stop",
        onclick: () => confirm(`Undeploy ${m.name}? Its ${m.instances.length} instance(s) stop.`) &&
          act(app, () => api.undeploy(m.name), `${m.name} undeployed`),
      }, "Undeploy") : null),
    h("p", { class: "muted" },
      m.routed
        ? `Gateway: ${m.in_flight} in flight of ${m.slots} slots, ${m.queued} queued` +
          (m.mean_latency_s ? `, mean latency ${seconds(m.mean_latency_s)}` : "") + "."
        : "Not in the gateway's route table (no ready instance)." ,
      dep ? ` Deployment: max ${dep.max_concurrency} concurrent per instance, weight ${dep.weight}, placement ${dep.placement.policy}.` : ""),
    m.instances.length ? instancesTable(m, manage, app) : h("p", { class: "empty" }, "No instance."));
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
      h("span", { class: "chips" },
        badge(i.state, stateKind(i.state), { class: "state" }),
        i.ejected ? badge(`ejected ${seconds(i.ejected_for_s)}`, "bad") : null,
        i.worker_alive === false ? badge("worker offline", "bad") : null),
      i.worker_id ?? h("span", { class: "muted" }, "unplaced"),
      i.endpoint ? h("span", { class: "mono" }, i.endpoint) : "–",
      i.in_flight === null ? "–" : `${i.in_flight} / ${i.max_concurrency}`,
      i.restarts ?? "–",
      h("td", { class: "error-text" }, i.last_error ?? (i.pending_reason ? `pending: ${i.pending_reason}` : "")),
      canDrain(i) ? h("button", {
        class: "ghost small", "data-action": "drain", disabled: !manage.ok, title: manage.why ?? "No new requests; stopped after the drain timeout",
        onclick: () => confirm(`Drain ${i.id}? It gets no new requests and stops after the drain timeout.`) &&
          act(app, () => api.drain(i.id), `${i.id} draining`),
      }, "Drain") : "",
    ]),
    (k) => ({ dataset: { instanceId: m.instances[k].id, state: m.instances[k].state } }));
}

function canDrain(i) {
  return i.enabled !== false && !i.gatewayOnly && ["ready", "starting", "pending", "failed"].includes(i.state);
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
