// Workers: one panel per machine with its resources (memory bars) and its instances.

import { badge, downloadBar, fill, h, meter, table } from "../dom.js";
import { ago, bytes, seconds } from "../format.js";
import { buildView, stateKind } from "../view.js";

export default {
  id: "workers",
  title: "Workers",

  mount(el) {
    this.el = el;
    fill(el, h("h1", {}, "Workers"), h("p", { class: "muted" }, "Loading…"));
  },

  update(state) {
    const v = buildView(state);
    const ttl = state.workers.data?.ttl;
    fill(this.el,
      h("h1", {}, "Workers"),
      h("p", { class: "muted" },
        ttl ? `A worker is online while its last heartbeat is younger than ${seconds(ttl)}.` : "",
        v.gatewayOnly ? "No answer from the controller (yet): only the workers named in the gateway's route table are shown." : ""),
      v.workers.length ? v.workers.map(workerPanel) : h("p", { class: "empty" }, "No worker has joined yet."),
    );
  },
};

function workerPanel(w) {
  const res = w.resources ?? {};
  // llama-server instances report their own slots (busy / total), queue and prompt-cache reuse.
  const slots = new Map((res.slots ?? []).map((s) => [s.instance, s]));
  const labels = Object.entries(w.labels ?? {});
  return h("section", { class: "panel worker", dataset: { worker: w.id } },
    h("div", { class: "panel-head" },
      h("h2", {}, w.name),
      w.alive === null || w.alive === undefined ? badge("unknown") : w.alive ? badge("online", "ok") : badge("offline", "bad"),
      w.name !== w.id ? h("span", { class: "muted mono" }, w.id) : null,
      h("span", { class: "spacer" }),
      w.heartbeat_age !== undefined ? h("span", { class: "muted" }, `heartbeat ${ago(w.heartbeat_age)}`) : null),
    w.gatewayOnly ? h("p", { class: "muted" }, "Details need the controller.") : h("div", { class: "grid2" },
      h("div", {},
        h("table", {}, h("tbody", {},
          row("Address", h("span", { class: "mono" }, `${w.address}:${w.port}`)),
          row("Labels", labels.length ? h("span", { class: "chips" }, labels.map(([k, val]) => h("span", { class: "chip" }, `${k}=${val}`))) : h("span", { class: "muted" }, "none")),
          row("CPU", `${res.cpu_cores ?? "?"} cores`),
          row("GPUs", res.gpus?.length ? `${res.gpus.length}` : "none"),
          row("Model cache", res.cached_models?.length
            ? h("span", { class: "chips" }, res.cached_models.map((m) => h("span", { class: "chip" }, m)))
            : h("span", { class: "muted" }, "no remote model")),
          row("Disk free", res.disk_free === null || res.disk_free === undefined ? "–" : bytes(res.disk_free)),
          row("Version", w.version || "–"),
          row("Joined", w.registered_at ? new Date(w.registered_at * 1000).toLocaleString() : "–")))),
      h("div", {},
        meter("Memory", (res.memory_total ?? 0) - (res.memory_free ?? 0), res.memory_total ?? 0, bytes),
        (res.gpus ?? []).map((g) => meter(`GPU ${g.index}: ${g.name}`, g.memory_total - g.memory_free, g.memory_total, bytes)),
        (res.downloads ?? []).map((d) => h("div", { class: "worker-download", dataset: { source: d.source } },
          h("div", { class: "meter-label" }, h("span", {}, `Downloading ${d.source}`)), downloadBar(d))))),
    h("h3", { style: "margin-top:12px" }, `Instances (${w.instanceList.length})`),
    w.instanceList.length
      ? table(["Instance", "Model", "State", "Endpoint", { title: "In flight", num: true },
        { title: "Slots busy", num: true }, { title: "Queue", num: true }, { title: "Cache reuse", num: true },
        { title: "Restarts", num: true }],
        w.instanceList.map((i) => {
          const s = slots.get(i.id);
          return [
            h("span", { class: "mono", dataset: { instance: i.id } }, i.id),
            i.model,
            badge(i.state, stateKind(i.state)),
            i.endpoint ? h("span", { class: "mono" }, i.endpoint) : "–",
            i.in_flight === null ? "–" : `${i.in_flight} / ${i.max_concurrency}`,
            s ? h("span", { class: "slots-busy", title: s.error ?? "" }, `${s.busy} / ${s.slots}`) : "–",
            s ? h("span", { class: "slots-queue" }, `${s.queue}`) : "–",
            s && s.cache_reuse !== null && s.cache_reuse !== undefined ? `${Math.round(s.cache_reuse * 100)} %` : "–",
            i.restarts ?? "–",
          ];
        }))
      : h("p", { class: "empty" }, "No instance on this worker."));
}

function row(label, value) {
  return h("tr", {}, h("th", { style: "width:110px" }, label), h("td", {}, value));
}
