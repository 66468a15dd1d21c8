// Live data: two loops poll every ~2 s and keep the last good answer of every source.
//
//   gateway loop:  /v1/gateway/status      (answers even with every controller down)
//   cluster loop:  /v1/cluster/{workers, instances, models, deployments, leader}
//
// They are separate so that a controller that hangs never freezes what the gateway itself
// knows. After each round every listener gets the whole state:
//   state.status / state.workers / … = { data, error, okAt }
// data is the last good answer (kept when a later call fails), error the last call's
// ApiError or null, okAt the Date.now() of the last good answer.

import { api } from "./api.js";

const GATEWAY = { status: () => api.status(30) };
const CLUSTER = {
  workers: api.workers,
  instances: api.instances,
  models: api.models,
  deployments: api.deployments,
  leader: api.leader,
};

export class Poller {
  constructor(intervalMs = 2000) {
    this.intervalMs = intervalMs;
    this.state = {};
    for (const name of [...Object.keys(GATEWAY), ...Object.keys(CLUSTER)]) {
      this.state[name] = { data: null, error: null, okAt: null };
    }
    this.listeners = [];
    this.wakeups = [];
  }

  onUpdate(fn) { this.listeners.push(fn); }

  start() {
    // The first render waits for both loops (or 3 s), so that a page does not flash the
    // gateway-only view while the cluster's first answer is on its way.
    this.pending = 2;
    setTimeout(() => { this.pending = 0; this.notify(); }, 3000);
    this.loop(GATEWAY);
    this.loop(CLUSTER);
  }

  /** Has the first round been rendered? */
  get started() { return this.pending === 0; }

  /** Poll now (after an action) instead of at the next tick. */
  refresh() {
    for (const wake of this.wakeups.splice(0)) wake();
  }

  async loop(sources) {
    let first = true;
    for (;;) {
      await Promise.all(Object.entries(sources).map(([name, fetcher]) => this.fetchOne(name, fetcher)));
      if (first) {
        first = false;
        this.pending = Math.max(0, this.pending - 1);
      }
      this.notify();
      // A hidden tab polls less often; refresh() cuts any wait short.
      const wait = document.hidden ? this.intervalMs * 5 : this.intervalMs;
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, wait);
        this.wakeups.push(() => { clearTimeout(timer); resolve(); });
      });
    }
  }

  async fetchOne(name, fetcher) {
    const slot = this.state[name];
    try {
      slot.data = await fetcher();
      slot.error = null;
      slot.okAt = Date.now();
    } catch (err) {
      slot.error = err;
    }
  }

  notify() {
    if (!this.started) return;
    for (const fn of this.listeners) {
      try {
        fn(this.state);
      } catch (err) {
        console.error("console: rendering failed", err); // one broken page must not stop polling
      }
    }
  }
}

/** The first error among the cluster sources (they share one controller), or null. */
export function clusterError(state) {
  for (const name of Object.keys(CLUSTER)) if (state[name].error) return state[name].error;
  return null;
}

/** Has any cluster call ever answered? */
export function clusterLoaded(state) {
  return Object.keys(CLUSTER).some((name) => state[name].okAt !== null);
}
