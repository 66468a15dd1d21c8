// What the pages show, built from the poller's raw answers.
//
// Two sources describe the cluster:
//   - the controller (through /v1/cluster/…): workers, instances with their state, deployments;
//   - the gateway (/v1/gateway/status): its route table with per-instance load (in flight,
//     ejected) and per-model queues and request counts.
// buildView() joins them by instance id and model name. With the controller unreachable and
// never seen, it falls back to the route table alone, so the pages still show what the
// gateway routes to (flagged gatewayOnly).

const EMBEDDING_BACKENDS = new Set(["sentence-transformers"]);
const EMBEDDING_NAME = /embed|minilm|bge|e5-|gte-/i;

export function modelKind(name, backend) {
  if (backend) return EMBEDDING_BACKENDS.has(backend) ? "embedding" : "chat";
  return EMBEDDING_NAME.test(name) ? "embedding" : "chat";
}

export function buildView(state) {
  const status = state.status.data;
  const clusterInstances = state.instances.data?.data;
  const clusterWorkers = state.workers.data?.data;
  const clusterModels = state.models.data?.data ?? [];
  const deployments = state.deployments.data?.data ?? [];

  // Gateway-side load, by instance id and by model name.
  const routed = new Map();
  const gwModels = new Map();
  for (const m of status?.models ?? []) {
    gwModels.set(m.name, m);
    for (const i of m.instances) routed.set(i.id, { ...i, model: m.name });
  }

  // Instances: the controller's list, or the route table's when the controller was never seen.
  const gatewayOnly = !clusterInstances;
  const instances = (clusterInstances ?? [...routed.values()].map(fromRoute)).map((i) => {
    const gw = routed.get(i.id);
    return {
      ...i,
      routed: Boolean(gw),
      in_flight: gw ? gw.in_flight : null,
      ejected: gw ? gw.ejected : false,
      ejected_for_s: gw ? gw.ejected_for_s : 0,
      gateway_failures: gw ? gw.failures : 0,
    };
  });

  // Models: every name any source knows.
  const names = new Set([
    ...deployments.map((d) => d.name),
    ...clusterModels.map((m) => m.name),
    ...gwModels.keys(),
    ...instances.map((i) => i.model),
  ]);
  const models = [...names].sort().map((name) => {
    const dep = deployments.find((d) => d.name === name) ?? null;
    const cm = clusterModels.find((m) => m.name === name) ?? null;
    const gw = gwModels.get(name) ?? null;
    const mine = instances.filter((i) => i.model === name);
    const backend = dep?.backend ?? cm?.backend ?? mine.find((i) => i.backend)?.backend ?? null;
    return {
      name,
      backend,
      kind: modelKind(name, backend),
      deployment: dep,
      deployed: Boolean(dep),
      replicas: dep ? dep.replicas : cm ? cm.replicas : mine.length,
      // "routed": known only from the route table (controller unreachable), and routable.
      ready: mine.filter((i) => i.state === "ready" || i.state === "routed").length,
      instances: mine,
      in_flight: gw?.in_flight ?? null,
      queued: gw?.queued ?? null,
      slots: gw?.slots ?? null,
      mean_latency_s: gw?.mean_latency_s ?? null,
      routing: gw?.routing ?? null,
      prefix_blocks: gw?.prefix_blocks ?? 0,
      recent: gw?.recent ?? [],
      routed: Boolean(gw),
    };
  });

  // Workers: the controller's list, or the workers named by the route table.
  const workerIds = [...new Set(instances.map((i) => i.worker_id).filter(Boolean))];
  const workers = (clusterWorkers ?? workerIds.map((id) => ({ id, name: id, alive: null, gatewayOnly: true })))
    .map((w) => ({ ...w, instanceList: instances.filter((i) => i.worker_id === w.id) }));

  return { instances, models, workers, gatewayOnly, status, leader: state.leader.data };
}

/** An instance as the route table describes it (no state: enabled ones are routable). */
function fromRoute(r) {
  return {
    id: r.id,
    model: r.model,
    worker_id: r.worker_id || null,
    endpoint: r.endpoint,
    enabled: r.enabled,
    max_concurrency: r.max_concurrency,
    state: r.enabled ? "routed" : "draining",
    restarts: null,
    last_error: null,
    backend: null,
    gatewayOnly: true,
  };
}

/** Requests per bucket summed over all models: [{start, requests, client_errors, errors}]. */
export function totalTraffic(models) {
  const byStart = new Map();
  for (const m of models) {
    for (const b of m.recent) {
      const t = byStart.get(b.start) ?? { start: b.start, requests: 0, client_errors: 0, errors: 0 };
      t.requests += b.requests;
      t.client_errors += b.client_errors;
      t.errors += b.errors;
      byStart.set(b.start, t);
    }
  }
  return [...byStart.values()].sort((a, b) => a.start - b.start);
}

/** Sums over the last `n` complete buckets (the newest bucket is still filling, so it is left out). */
export function lastComplete(series, n) {
  const done = series.slice(0, -1).slice(-n);
  const sum = (k) => done.reduce((acc, b) => acc + b[k], 0);
  return { requests: sum("requests"), client_errors: sum("client_errors"), errors: sum("errors"), buckets: done.length };
}

/** Instance state → badge colour. */
export function stateKind(state) {
  return { ready: "ok", routed: "ok", starting: "info", downloading: "info", pending: "", draining: "warn", failed: "bad",
    stopped: "" }[state] ?? "";
}

export const STATE_ORDER = ["ready", "starting", "downloading", "pending", "draining", "failed", "stopped", "routed"];
