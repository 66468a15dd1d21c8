// Overview: the cluster at a glance. Re-rendered whole on every poll (it has no inputs).

import { badge, fill, h, table } from "../dom.js";
import { trafficChart } from "../chart.js";
import { ago, plural, rate, seconds } from "../format.js";
import { STATE_ORDER, buildView, lastComplete, stateKind, totalTraffic } from "../view.js";

export default {
  id: "overview",
  title: "Overview",

  mount(el) {
    this.el = el;
    fill(el, h("h1", {}, "Overview"), h("p", { class: "muted" }, "Loading…"));
  },

  update(state) {
    const v = buildView(state);
    const status = v.status;
    const bucketS = status?.recent_bucket_s ?? 10;
    const traffic = totalTraffic(v.models);
    const minute = lastComplete(traffic, Math.round(60 / bucketS));
    const minuteS = Math.max(1, minute.buckets * bucketS);

    fill(this.el,
      h("h1", {}, "Overview"),
      h("section", { class: "cards", id: "overview-cards" },
        workersCard(v),
        modelsCard(v),
        instancesCard(v),
        card("Requests / s", status ? rate(minute.requests / minuteS) : "–",
          !status ? "gateway status unavailable" : !traffic.length ? "no model to count requests for yet"
            : `${plural(minute.requests, "request")} in the last ${minuteS === 60 ? "minute" : seconds(minuteS)}; ` +
              `${minute.errors} errors, ${minute.client_errors} client errors`,
          { id: "card-rate" }),
        routeCard(status),
        leaderCard(state.leader),
      ),
      h("div", { class: "grid2" },
        h("section", { class: "panel", id: "overview-traffic" },
          h("div", { class: "panel-head" }, h("h2", {}, "Requests"),
            h("span", { class: "muted" }, `gateway ${status?.gateway ?? "?"}, all models, last ${Math.round((traffic.length * bucketS) / 60)} minutes`)),
          traffic.length ? trafficChart(traffic, bucketS) : h("p", { class: "empty" }, "No counters yet.")),
        h("section", { class: "panel", id: "overview-workers" },
          h("div", { class: "panel-head" }, h("h2", {}, "Workers"), h("span", { class: "spacer" }),
            h("a", { href: "#/workers" }, "details →")),
          workersTable(v))),
      h("section", { class: "panel", id: "overview-models" },
        h("div", { class: "panel-head" }, h("h2", {}, "Models"), h("span", { class: "spacer" }),
          h("a", { href: "#/models" }, "details →")),
        modelsTable(v, bucketS)),
    );
  },
};

function card(label, value, sub, attrs = {}) {
  return h("div", { class: "card", ...attrs },
    h("div", { class: "label" }, label),
    h("div", { class: "value" }, value),
    h("div", { class: "sub" }, sub));
}

function workersCard(v) {
  if (v.gatewayOnly) {
    return card("Workers", String(v.workers.length), "named by the gateway's route table", { id: "card-workers" });
  }
  const online = v.workers.filter((w) => w.alive).length;
  const offline = v.workers.length - online;
  return card("Workers", `${online} / ${v.workers.length}`,
    h("span", {}, badge(`${online} online`, online ? "ok" : ""), " ", badge(`${offline} offline`, offline ? "bad" : "")),
    { id: "card-workers" });
}

function modelsCard(v) {
  const serving = v.models.filter((m) => m.ready > 0).length;
  const deployed = v.models.filter((m) => m.deployed).length;
  return card("Models", String(v.models.length),
    `${serving} serving; ${deployed} from deployments`, { id: "card-models" });
}

function instancesCard(v) {
  const counts = {};
  for (const i of v.instances) counts[i.state] = (counts[i.state] ?? 0) + 1;
  const chips = STATE_ORDER.filter((s) => counts[s]).map((s) => badge(`${counts[s]} ${s}`, stateKind(s)));
  const ejected = v.instances.filter((i) => i.ejected).length;
  if (ejected) chips.push(badge(`${ejected} ejected`, "bad"));
  return card("Instances", String(v.instances.length),
    h("span", { class: "chips" }, chips.length ? chips : "none"), { id: "card-instances" });
}

function routeCard(status) {
  const rt = status?.route_table;
  if (!rt) return card("Route table", "–", "gateway status unavailable", { id: "card-routes" });
  const kind = { fresh: "ok", stale: "warn", none: "bad" }[rt.state] ?? "";
  const sub = rt.state === "none"
    ? "no table yet: the gateway cannot route"
    : `revision ${rt.revision}; confirmed ${ago(rt.age_s)}; from ${rt.source === "snapshot" ? "the on-disk snapshot" : rt.controller ?? "?"}`;
  return card("Route table", badge(rt.state, kind), sub, { id: "card-routes" });
}

function leaderCard(leader) {
  const lease = leader.data?.lease;
  if (leader.error && !leader.data) return card("Leader", "–", `unknown: ${leader.error}`, { id: "card-leader" });
  if (!lease) return card("Leader", "none", "no controller holds the lease", { id: "card-leader" });
  const expired = lease.expires_in <= 0;
  return card("Leader", h("span", { class: "mono", title: lease.holder }, shortHolder(lease.holder)),
    `${lease.holder}; fencing token ${lease.token}; ` +
      (expired ? "lease EXPIRED" : `lease renews within ${seconds(lease.expires_in)}`) +
      (leader.error ? " (last known)" : ""),
    { id: "card-leader" });
}

function shortHolder(holder) {
  // "host:port:abcdef" → "host:port"
  const parts = holder.split(":");
  return parts.length > 2 ? parts.slice(0, -1).join(":") : holder;
}

function workersTable(v) {
  if (!v.workers.length) return h("p", { class: "empty" }, "No worker has joined.");
  return table(["Worker", "Address", "Status", "Heartbeat", { title: "Instances", num: true }],
    v.workers.map((w) => [
      h("strong", {}, w.name),
      w.address ? `${w.address}:${w.port}` : "–",
      w.alive === null ? badge("unknown") : w.alive ? badge("online", "ok") : badge("offline", "bad"),
      w.heartbeat_age === undefined ? "–" : ago(w.heartbeat_age),
      String(w.instanceList.length),
    ]),
    (i) => ({ dataset: { worker: v.workers[i].id } }));
}

function modelsTable(v, bucketS) {
  if (!v.models.length) return h("p", { class: "empty" }, "No model is deployed.");
  return table(
    ["Model", "Kind", "Ready", "Instances", { title: "In flight", num: true }, { title: "Queued", num: true },
      { title: "Req / min", num: true }, { title: "Errors / min", num: true }, { title: "Latency", num: true }],
    v.models.map((m) => {
      const last = lastComplete(m.recent, Math.round(60 / bucketS));
      const states = {};
      for (const i of m.instances) states[i.state] = (states[i.state] ?? 0) + 1;
      return [
        h("strong", {}, m.name),
        m.kind,
        `${m.ready} / ${m.replicas}`,
        h("span", { class: "chips" }, Object.entries(states).map(([s, n]) => badge(`${n} ${s}`, stateKind(s)))),
        m.in_flight ?? "–",
        m.queued ?? "–",
        String(last.requests),
        String(last.errors),
        m.mean_latency_s ? seconds(m.mean_latency_s) : "–",
      ];
    }),
    (i) => ({ dataset: { model: v.models[i].name } }));
}
