// Every call the console makes goes through here. The browser talks only to the gateway:
//   /v1/gateway/status      the gateway's own view (route table, load, request counts)
//   /v1/cluster/...         passed through to a healthy controller (admin token)
//   /v1/chat/completions, /v1/embeddings, /v1/models   inference (API key)
// Credentials live in sessionStorage (this tab only) and go out as "Authorization: Bearer".

const STORAGE = { admin: "modelfleet.adminToken", key: "modelfleet.apiKey" };

export const credentials = {
  get admin() { return sessionStorage.getItem(STORAGE.admin) || ""; },
  get apiKey() { return sessionStorage.getItem(STORAGE.key) || ""; },
  set(kind, value) {
    if (value) sessionStorage.setItem(STORAGE[kind], value);
    else sessionStorage.removeItem(STORAGE[kind]);
  },
};

/** An error from the API, carrying the OpenAI error body's message, type and code.
 *  status 0 means no HTTP answer at all (network down, gateway gone). */
export class ApiError extends Error {
  constructor(status, message, { type = null, code = null } = {}) {
    super(message);
    this.status = status;
    this.type = type;
    this.code = code;
  }

  get network() { return this.status === 0; }
  get auth() { return this.status === 401 || this.status === 403; }

  /** "401 invalid or missing API key" — what the pages show. */
  toString() { return this.status ? `${this.status} ${this.message}` : this.message; }
}

/** Turn a non-2xx response into an ApiError, reading {"error": {"message": …}} when present. */
export async function errorFrom(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    const err = body.error ?? body;
    const message = typeof err === "string" ? err : err.message || err.detail || text;
    return new ApiError(response.status, message, { type: err.type, code: err.code });
  } catch {
    return new ApiError(response.status, text.trim().slice(0, 300) || response.statusText || "request failed");
  }
}

function headers(auth, json) {
  const out = {};
  const secret = auth === "admin" ? credentials.admin : auth === "key" ? credentials.apiKey : "";
  if (secret) out.Authorization = `Bearer ${secret}`;
  if (json) out["Content-Type"] = "application/json";
  return out;
}

/**
 * fetch() a JSON API. auth: "admin" (cluster, gateway status), "key" (inference) or null.
 * Returns the parsed body (null for 204), or throws ApiError.
 */
export async function call(path, { method = "GET", body, auth = "admin", signal, timeoutMs = 15000 } = {}) {
  const response = await send(path, { method, body, auth, signal, timeoutMs });
  if (response.status === 204) return null;
  return response.json();
}

/** Like call(), but hands back the Response (for streaming); throws ApiError on non-2xx. */
export async function send(path, { method = "GET", body, auth = "admin", signal, timeoutMs = 0 } = {}) {
  const signals = [signal, timeoutMs ? AbortSignal.timeout(timeoutMs) : null].filter(Boolean);
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(auth, body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: signals.length ? AbortSignal.any(signals) : undefined,
      cache: "no-store",
    });
  } catch (exc) {
    if (exc.name === "AbortError" && signal?.aborted) throw exc; // the user pressed Stop
    const why = exc.name === "TimeoutError" ? "timed out" : "did not answer";
    throw new ApiError(0, `the gateway ${why} (${path})`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

// Shorthands for the calls the pages make. Paths are relative so that a gateway served
// under a path prefix still works.
const enc = encodeURIComponent;
export const api = {
  status: (buckets = 30) => call(`v1/gateway/status?buckets=${buckets}`),
  workers: () => call("v1/cluster/workers"),
  instances: () => call("v1/cluster/instances"),
  models: () => call("v1/cluster/models"),
  deployments: () => call("v1/cluster/deployments"),
  leader: () => call("v1/cluster/leader"),
  catalog: () => call("v1/cluster/catalog"),
  deploy: (body) => call("v1/cluster/deployments", { method: "POST", body, timeoutMs: 30000 }),
  drain: (id) => call(`v1/cluster/instances/${enc(id)}/drain`, { method: "POST" }),
  // The last lines of an instance's runner log; with a request id, only the lines naming it.
  instanceLogs: (id, { lines = 200, request = "" } = {}) =>
    call(`v1/cluster/instances/${enc(id)}/logs?lines=${lines}` + (request ? `&request=${enc(request)}` : "")),
  scale: (name, replicas) => call(`v1/cluster/deployments/${enc(name)}`, { method: "PATCH", body: { replicas } }),
  undeploy: (name) => call(`v1/cluster/deployments/${enc(name)}`, { method: "DELETE" }),
  keys: () => call("v1/cluster/keys"),
  createKey: (name) => call("v1/cluster/keys", { method: "POST", body: { name } }),
  revokeKey: (id) => call(`v1/cluster/keys/${enc(id)}`, { method: "DELETE" }),
  servedModels: () => call("v1/models", { auth: "key" }),
  embeddings: (model, input) => call("v1/embeddings", { method: "POST", auth: "key", body: { model, input }, timeoutMs: 60000 }),
  chatStream: (body, signal) => send("v1/chat/completions", { method: "POST", auth: "key", body: { ...body, stream: true }, signal }),
};
